"""train/trainer.py, loop.py, lm_task.py and checkpoint.py: schedule, a tiny real run, checkpoints, resume."""
from __future__ import annotations

import csv
import json
import math
import random

import pytest
import torch

from lstmgen.train.checkpoint import CheckpointError, load_checkpoint
from lstmgen.train.config import PRESETS, preset
from lstmgen.train.data import batchify, load_corpus
from lstmgen.train.model import RecurrentLM
from lstmgen.train.lm_task import evaluate
from lstmgen.train.setup import TrainError, check_config, lr_at
from lstmgen.train.trainer import train


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def corpus_file(path, lines: int = 300, seed: int = 0):
    """Repetitive, learnable text: a few words in short sentences."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    text = "".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 6))) + ".\n" for _ in range(lines))
    path.write_text(text)
    return path


def small(**overrides):
    """The tiny preset, shrunk so a step takes about a millisecond."""
    kw = dict(embedding_size=16, hidden_size=32, batch_size=4, bptt=16, eval_batch_size=4,
              log_interval=5, max_steps=30, epochs=50, seed=7, device="cpu")
    kw.update(overrides)
    return preset("tiny", **kw)


# -- schedule and config --------------------------------------------------------------------------
def test_zaremba_lr_schedule():
    cfg = PRESETS["ptb-small"]  # lr 1.0, decay 0.5 after epoch 4
    assert [lr_at(cfg, e) for e in range(1, 8)] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]
    large = PRESETS["ptb-large"]  # 1/1.15 after epoch 14
    assert lr_at(large, 14) == 1.0 and lr_at(large, 16) == pytest.approx(1 / 1.15 ** 2)
    assert lr_at(PRESETS["tiny"], 9) == PRESETS["tiny"].lr  # no decay


def test_check_config_names_every_problem():
    with pytest.raises(TrainError) as e:
        check_config(small(bptt=0, dropout=1.5, optimizer="rmsprop"))
    assert "bptt" in str(e.value) and "dropout" in str(e.value) and "optimizer" in str(e.value)


# -- a tiny real run ------------------------------------------------------------------------------
def test_tiny_run_learns_and_writes_the_run_directory(tmp_path):
    data = corpus_file(tmp_path / "c.txt")
    out = tmp_path / "run"
    logged: list[str] = []
    best = train(small(max_steps=60), str(data), out, log=logged.append, progress_bar=False)
    assert best == out / "best.pt"
    for name in ("best.pt", "last.pt", "config.json", "metrics.csv"):
        assert (out / name).is_file(), name

    ck = load_checkpoint(best)
    vocab_size = len(ck.vocab)
    m = ck.metrics
    c = load_corpus(str(data), "char")
    valid = batchify(c.valid, 4)  # [N, 4]
    torch.manual_seed(7)
    untrained = evaluate(RecurrentLM(ck.model_config), valid, 16)  # about ln(V)
    assert m["val_loss"] < untrained - 0.5
    assert m["val_bpc"] == pytest.approx(m["val_loss"] / math.log(2))
    assert m["global_step"] == 60 and m["tokens_seen"] == 60 * 4 * 16
    assert m["train_tokens"] == ck.corpus["tokens"]["train"] and ck.corpus["layout"] == "single"
    assert len(ck.corpus["sha256"]) == 64

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert list(rows[0]) == ["epoch", "step", "train_loss", "val_loss", "val_bpc", "lr", "tokens_per_s", "elapsed_s"]
    assert int(rows[-1]["step"]) == 60 and float(rows[-1]["tokens_per_s"]) > 0
    assert float(rows[-1]["train_loss"]) < math.log(vocab_size)

    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["hidden_size"] == 32 and saved["model"]["vocab_size"] == vocab_size
    assert any(line.startswith("config: ") for line in logged)
    assert any("val loss" in line and "max_steps=60" in line for line in logged)
    # the checkpoint rebuilds the same model (weights only, no pickled module)
    assert evaluate(ck.build_model(), valid, 16) == pytest.approx(m["val_loss"], rel=1e-5)


def test_word_level_run_with_test_split_and_epochs(tmp_path):
    d = tmp_path / "ptb"
    d.mkdir()
    corpus_file(d / "ptb.train.txt", 200, seed=1)
    corpus_file(d / "ptb.valid.txt", 30, seed=2)
    corpus_file(d / "ptb.test.txt", 30, seed=3)
    cfg = preset("ptb-small", embedding_size=16, hidden_size=16, batch_size=4, bptt=10, epochs=2,
                 eval_batch_size=2, decay_after=1, device="cpu", save_every=0)
    best = train(cfg, str(d), tmp_path / "run", log=lambda s: None, progress_bar=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert [float(r["lr"]) for r in rows] == [1.0, 0.5]  # Zaremba decay after epoch 1
    m = load_checkpoint(best).metrics
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
    assert "test_ppl" in m and m["test_ppl"] < 20  # 11-word vocab, learnable text
    assert m["epochs_trained"] == 2.0


def test_max_seconds_stops_and_still_saves(tmp_path):
    data = corpus_file(tmp_path / "c.txt")
    train(small(max_steps=0, max_seconds=0.3), str(data), tmp_path / "run", log=lambda s: None,
          progress_bar=False)
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck.progress["global_step"] > 0 and "val_loss" in ck.metrics


# -- checkpoints ----------------------------------------------------------------------------------
class Foreign:
    pass


def test_bad_checkpoints_raise_checkpoint_error_naming_the_file(tmp_path):
    data = corpus_file(tmp_path / "c.txt")
    train(small(max_steps=3), str(data), tmp_path / "run", log=lambda s: None, progress_bar=False)
    good = (tmp_path / "run" / "best.pt").read_bytes()
    cases = {
        "garbage.pt": b"this is not a checkpoint",
        "truncated.pt": good[: len(good) // 2],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"state_dict": {}}, tmp_path / "unmarked.pt")
    torch.save(Foreign(), tmp_path / "pickled.pt")  # refused by weights_only=True: no code runs
    for name in (*cases, "unmarked.pt", "pickled.pt"):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


# -- resume ---------------------------------------------------------------------------------------
def test_resume_replays_the_uninterrupted_run_exactly(tmp_path):
    """10 steps + resume to 20 == 20 steps straight, across an epoch boundary, with dropout."""
    data = corpus_file(tmp_path / "c.txt", lines=60)  # about 14 batches per epoch
    cfg = small(dropout=0.3, max_steps=20, save_every=5)
    quiet = dict(log=lambda s: None, progress_bar=False)
    train(cfg, str(data), tmp_path / "a", **quiet)
    train(small(dropout=0.3, max_steps=10, save_every=5), str(data), tmp_path / "b", **quiet)
    assert load_checkpoint(tmp_path / "b" / "last.pt").progress["global_step"] == 10
    train(cfg, None, tmp_path / "b", resume=True, **quiet)  # data: the run's own corpus

    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a.progress["epoch"] == b.progress["epoch"] == 2
    assert b.progress["global_step"] == 20
    for k, t in a.state_dict.items():
        assert torch.equal(t, b.state_dict[k]), k
    assert a.metrics["val_loss"] == b.metrics["val_loss"]
    rows = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [10, 14, 20]  # stop, end of epoch 1, stop


def test_resume_refuses_incompatible_changes(tmp_path):
    data = corpus_file(tmp_path / "c.txt")
    quiet = dict(log=lambda s: None, progress_bar=False)
    train(small(max_steps=3), str(data), tmp_path / "run", **quiet)
    with pytest.raises(TrainError, match="already holds a run"):
        train(small(max_steps=3), str(data), tmp_path / "run", **quiet)
    with pytest.raises(TrainError, match="hidden_size 32 -> 64"):
        train(small(hidden_size=64), str(data), tmp_path / "run", resume=True, **quiet)
    other = corpus_file(tmp_path / "other.txt", seed=5)
    with pytest.raises(TrainError, match="differs"):
        train(small(max_steps=6), str(other), tmp_path / "run", resume=True, **quiet)
    with pytest.raises(TrainError, match="nothing to resume"):
        train(small(), str(data), tmp_path / "fresh", resume=True, **quiet)
