"""Resume after a real kill: `lstmgen train` is SIGKILLed mid-epoch once last.pt exists, resumed with
--resume, and must end bit for bit where an uninterrupted run with the same seed ends.

What makes that hold: last.pt is written atomically (temporary file + rename), and it holds the
weights, the optimizer, the epoch and the step within it, the LSTM state of every stream, the
training-loss sums of the unfinished metrics row and the RNG state (dropout is on here, so that
matters). The logs are cut back to last.pt's step on resume, so they read the same too.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lstmgen.train.checkpoint import load_checkpoint
from lstmgen.train.config import preset
from lstmgen.train.trainer import train

ARGS = dict(embedding_size=16, hidden_size=32, batch_size=4, bptt=16, eval_batch_size=4, epochs=20,
            dropout=0.2, log_interval=7, save_every=10, max_steps=400, seed=11, device="cpu")


def cli_flags() -> list[str]:
    flags = ["--preset", "tiny", "--no-progress"]
    for k, v in ARGS.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


def columns(path, *names) -> list[tuple[str, ...]]:
    return [tuple(r[n] for n in names) for r in csv.DictReader(open(path))]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    data = tmp_path / "c.txt"  # about 60 updates per epoch
    data.write_text("".join(f"line {i % 7} of a small text, said {i % 3}.\n" for i in range(130)))
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lstmgen.cli", "train", "--data", str(data), "--out", str(out), *cli_flags()]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        rc = proc.wait(30)
    assert rc == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_checkpoint(out / "last.pt").progress
    assert 0 < killed_at["global_step"] < ARGS["max_steps"] and killed_at["step_in_epoch"] > 0

    resumed = subprocess.run([sys.executable, "-m", "lstmgen.cli", "train", "--out", str(out), "--resume",
                              "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at epoch {killed_at['epoch']}, step {killed_at['global_step']}" in resumed.stdout

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the subprocesses: the same kernels
    try:
        train(preset("tiny", **ARGS), str(data), tmp_path / "straight", log=lambda s: None, progress_bar=False)
    finally:
        torch.set_num_threads(n)

    a, b = load_checkpoint(out / "last.pt"), load_checkpoint(tmp_path / "straight" / "last.pt")
    assert a.progress["global_step"] == b.progress["global_step"] == ARGS["max_steps"]
    for k, t in b.state_dict.items():
        assert torch.equal(a.state_dict[k], t), k
    assert a.metrics["val_loss"] == b.metrics["val_loss"]
    for name, cols in (("steps.csv", ("step", "epoch", "loss", "lr")),
                       ("metrics.csv", ("epoch", "step", "train_loss", "val_loss", "lr"))):
        assert columns(out / name, *cols) == columns(tmp_path / "straight" / name, *cols), name
