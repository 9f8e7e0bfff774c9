"""Data-parallel training through torchrun (gloo on CPU) against one process on the same global batch.

Dropout is 0 here: with dropout each rank draws its own masks (seeded seed + rank), so a 2-process
run is statistically, not bitwise, the 1-process run. SGD rather than Adam: Adam's division by
sqrt(v) magnifies the last-bit differences of a differently ordered gradient sum.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from lstmgen.train.checkpoint import load_checkpoint
from lstmgen.train.config import preset
from lstmgen.train.distributed import DistInfo
from lstmgen.train.trainer import train

ARGS = dict(embedding_size=16, hidden_size=24, batch_size=4, bptt=16, eval_batch_size=3,  # 3: uneven split
            optimizer="sgd", lr=0.5, dropout=0.0, log_interval=1, save_every=0, seed=3, device="cpu")


def test_shard_is_contiguous_and_covers_every_stream():
    for n in (1, 3, 4, 10):
        for world in (1, 2, 3, 4):
            parts = [DistInfo(r, world).shard(n) for r in range(world)]
            assert [i for s in parts for i in range(n)[s]] == list(range(n))
            assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


def losses(run_dir) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(open(run_dir / "steps.csv"))]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_process_ddp_matches_one_process(tmp_path):
    data = tmp_path / "c.txt"
    data.write_text("".join(f"the cat {i % 5} sat on mat {i % 3} .\n" for i in range(120)))
    flags = ["--preset", "tiny", "--max-steps", "20", "--no-progress"]
    for k, v in ARGS.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lstmgen.cli", "train", "--data", str(data), "--out", str(tmp_path / "ddp"), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best checkpoint:") == 1  # rank 0 alone reports

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    quiet = dict(log=lambda s: None, progress_bar=False)
    try:
        train(preset("tiny", max_steps=20, **ARGS), str(data), tmp_path / "one", **quiet)
        for run in ("ddp", "one"):  # copies: the 20-step checkpoints are compared below
            (tmp_path / f"{run}-30").mkdir()
            for f in (tmp_path / run).iterdir():
                (tmp_path / f"{run}-30" / f.name).write_bytes(f.read_bytes())
            train(preset("tiny", max_steps=30, **ARGS), None, tmp_path / f"{run}-30", resume=True, **quiet)
    finally:
        torch.set_num_threads(n)

    two, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 21))  # one writer, every step
    for (_, a), (_, b) in zip(two, one):
        assert a == pytest.approx(b, rel=1e-4)
    a, b = load_checkpoint(tmp_path / "ddp" / "last.pt"), load_checkpoint(tmp_path / "one" / "last.pt")
    assert a.metrics["val_loss"] == pytest.approx(b.metrics["val_loss"], rel=1e-5)
    assert a.metrics["tokens_seen"] == b.metrics["tokens_seen"] == 20 * 4 * 16
    for k, t in a.state_dict.items():
        torch.testing.assert_close(t, b.state_dict[k], rtol=1e-4, atol=1e-5)
    # last.pt holds the whole batch's LSTM state and each rank's RNG: resumable at any world size
    assert a.progress["hidden"][0].shape == (2, 4, 24) and len(a.progress["rng"]["ranks"]) == 2
    torch.testing.assert_close(a.progress["hidden"][1], b.progress["hidden"][1], rtol=1e-4, atol=1e-5)
    # and the 2-process checkpoint resumes in one process where the 1-process run would be
    a, b = load_checkpoint(tmp_path / "ddp-30" / "last.pt"), load_checkpoint(tmp_path / "one-30" / "last.pt")
    assert a.progress["global_step"] == b.progress["global_step"] == 30
    for k, t in a.state_dict.items():
        torch.testing.assert_close(t, b.state_dict[k], rtol=1e-4, atol=1e-5)
