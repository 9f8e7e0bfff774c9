"""The run directory's per-epoch figures (metrics.csv, steps.csv, curves.png) and the --amp option."""
from __future__ import annotations

import csv

import pytest
import torch

from lstmgen.train.checkpoint import load_checkpoint
from lstmgen.train.config import preset
from lstmgen.train.runlog import truncate_after, write_csv
from lstmgen.train.trainer import TrainError, train


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def small(**kw):
    base = dict(embedding_size=16, hidden_size=24, batch_size=4, bptt=16, eval_batch_size=4, epochs=2,
                log_interval=5, save_every=0, seed=5, device="cpu")
    return preset("tiny", **{**base, **kw})


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("".join(f"the cat {i % 5} sat on mat {i % 3} .\n" for i in range(100)))
    return f


@pytest.mark.parametrize("level, figure", [("char", "val_bpc"), ("word", "val_ppl")])
def test_each_epoch_writes_metrics_steps_and_curves(tmp_path, text_file, level, figure):
    out = tmp_path / "run"
    train(small(level=level), str(text_file), out, log=lambda s: None, progress_bar=False)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert list(rows[0]) == ["epoch", "step", "train_loss", "val_loss", figure, "lr", "tokens_per_s", "elapsed_s"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["tokens_per_s"]) > 0 and float(r["elapsed_s"]) > 0 for r in rows)
    steps = list(csv.DictReader(open(out / "steps.csv")))
    assert list(steps[0]) == ["step", "epoch", "loss", "lr", "tokens_per_s", "elapsed_s"]
    assert int(steps[-1]["step"]) == int(rows[-1]["step"])
    assert [int(s["step"]) for s in steps] == sorted(int(s["step"]) for s in steps)
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list(out.glob("*.tmp"))


def test_truncate_and_rewrite_csv(tmp_path):
    f = tmp_path / "s.csv"
    write_csv(f, [{"step": 5, "loss": 1.5}, {"step": 10, "loss": 1.25}, {"step": 15, "loss": 1.0}])
    truncate_after(f, 10)
    assert [r["step"] for r in csv.DictReader(open(f))] == ["5", "10"]
    write_csv(f, [])
    assert not f.exists()


def test_amp_bf16_is_a_noop_with_a_message_on_cpu(tmp_path, text_file):
    logged: list[str] = []
    train(small(amp="bf16", max_steps=6), str(text_file), tmp_path / "a", log=logged.append, progress_bar=False)
    train(small(max_steps=6), str(text_file), tmp_path / "b", log=lambda s: None, progress_bar=False)
    assert any("amp=bf16 ignored" in line and "CUDA only" in line for line in logged)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for k, t in a.state_dict.items():
        assert torch.equal(t, b.state_dict[k]), k
    with pytest.raises(TrainError, match="amp must be one of off, bf16"):
        train(small(amp="fp16"), str(text_file), tmp_path / "c", log=lambda s: None, progress_bar=False)
