"""Stopping a training run: Ctrl-C / SIGTERM save a checkpoint that --resume continues exactly;
--max-seconds trains that long (past the preset's epochs, validation included); a run folder is
trained into again with resume=True / overwrite=True; samples every N updates; the demo says when
its model trained too briefly to write anything readable."""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import lstmgen
from lstmgen.cli import main
from lstmgen.tools import demo
from lstmgen.train import cli as train_cli
from lstmgen.train.checkpoint import load_checkpoint
from lstmgen.train.config import preset
from lstmgen.train.trainer import TrainError, train

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SMALL = dict(embedding_size=16, hidden_size=32, batch_size=4, bptt=16, eval_batch_size=4, dropout=0.2,
             log_interval=5, seed=3, device="cpu")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def corpus_file(path, lines: int = 300, seed: int = 0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 6))) + ".\n"
                            for _ in range(lines)))
    return path


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lstmgen.cli", "train", *args]


def read_until(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """The process's output lines up to and including the first that holds `needle`."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never appeared in:\n{''.join(lines)[-3000:]}")


def metrics_rows(run) -> list[dict]:
    return list(csv.DictReader(open(run / "metrics.csv")))


# -- issue 4: an interrupt saves, --resume continues exactly -------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_last_pt_and_resume_continues_exactly(tmp_path, sig, code):
    data = corpus_file(tmp_path / "c.txt")  # about 100 updates per epoch
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd("--data", str(data), "--out", str(out), "--preset", "tiny", *flags(**SMALL),
                                      "--epochs", "1000", "--progress-interval", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        read_until(proc, "ETA")  # a progress line: some updates are done
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, rest[-3000:]
    ck = load_checkpoint(out / "last.pt")
    step = ck.progress["global_step"]
    assert step > 0 and ck.progress["optimizer"]["state"] and ck.progress["step_in_epoch"] > 0
    assert f"interrupted ({sig.name}) at step {step}; saved {out / 'last.pt'}" in rest
    assert "--resume" in rest and "Traceback" not in rest

    resumed = subprocess.run(train_cmd("--out", str(out), "--resume", "--max-steps", str(step + 7), "--no-progress"),
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at epoch {ck.progress['epoch']}, step {step}" in resumed.stdout
    after = load_checkpoint(out / "last.pt")
    assert after.progress["global_step"] == step + 7

    # the same updates without the interruption: the same weights, bit for bit
    straight = train(preset("tiny", **SMALL, epochs=1000, max_steps=step + 7), str(data), tmp_path / "straight",
                     log=lambda s: None, progress_bar=False)
    ref = load_checkpoint(straight.parent / "last.pt")
    for k, t in ref.state_dict.items():
        assert torch.equal(after.state_dict[k], t), k
    assert after.metrics["val_loss"] == ref.metrics["val_loss"]


def test_an_interrupt_before_the_first_update_keeps_nothing_and_says_why(tmp_path, monkeypatch, capsys):
    from lstmgen.train import lm_task

    real = lm_task.load_corpus

    def interrupted_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the corpus loads
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_task, "load_corpus", interrupted_load)
    out = tmp_path / "run"
    rc = main(["train", "--data", str(corpus_file(tmp_path / "c.txt")), "--out", str(out), "--preset", "tiny",
               *flags(**SMALL), "--no-progress"])
    assert rc == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGINT) before the first update finished: there was nothing to save" in err
    assert not out.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_a_second_signal_interrupts_at_once_and_a_duplicate_does_not(monkeypatch):
    from lstmgen.train import interrupt

    def signalled() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line

    before = signal.getsignal(signal.SIGTERM)  # another test's library (Ray) may have set one
    monkeypatch.setattr(interrupt, "REPEAT_S", 3600.0)  # any repeat counts as the same signal
    with interrupt.StopSignals() as s, s.deferred():
        signalled()
        signalled()
        assert s.received == "SIGTERM"
    monkeypatch.setattr(interrupt, "REPEAT_S", 0.0)  # any repeat is a second Ctrl-C
    with interrupt.StopSignals() as s, s.deferred():
        signalled()
        with pytest.raises(interrupt.TrainInterrupted) as e:
            signalled()
    assert e.value.signal_name == "SIGTERM" and e.value.checkpoint is None
    assert signal.getsignal(signal.SIGTERM) is before  # the handler it found, restored


# -- issue 5: --max-seconds means "train this long" ---------------------------------------------------
def test_max_seconds_trains_past_the_presets_epoch_and_stops_near_the_limit(tmp_path):
    limit = 10
    data = corpus_file(tmp_path / "c.txt", lines=1500)  # tiny preset: an epoch is ~20 updates, about a second
    out = tmp_path / "run"
    proc = subprocess.run(train_cmd("--data", str(data), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                                    "--max-seconds", str(limit), "--no-progress"),
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 0  # the preset's 1 dropped
    rows = metrics_rows(out)
    assert int(rows[-1]["epoch"]) > 1, proc.stdout  # past the tiny preset's single epoch
    elapsed = float(rows[-1]["elapsed_s"])  # the run's own clock, its closing validation included
    assert limit - 1 <= elapsed <= limit + 5, proc.stdout
    assert f"stop: max_seconds={limit} reached" in proc.stdout


def test_a_long_validation_is_kept_within_the_time_limit(tmp_path):
    """Validation alone would take several times the limit: it reads a prefix instead."""
    data = corpus_file(tmp_path / "c.txt", lines=20000)
    limit = 3.0
    logged: list[str] = []
    cfg = preset("tiny", **{**SMALL, "eval_batch_size": 1}, valid_fraction=0.8, max_seconds=limit, epochs=50)
    t0 = time.monotonic()
    best = train(cfg, str(data), tmp_path / "run", log=logged.append, progress_bar=False)
    m = load_checkpoint(best).metrics
    elapsed = float(metrics_rows(tmp_path / "run")[-1]["elapsed_s"])
    assert elapsed <= limit + 2.5, (elapsed, logged)
    assert time.monotonic() - t0 < limit + 30  # the corpus load and the saves besides
    assert 0 < m["val_fraction"] < 1 and m["global_step"] > 0
    assert any("of the validation text" in line for line in logged), logged


def test_epochs_are_dropped_only_for_a_time_limit_without_epochs(tmp_path):
    def resolve(*argv: str):
        p = argparse.ArgumentParser()
        train_cli.add_arguments(p)
        return train_cli.resolve_config(p.parse_args(["--out", str(tmp_path / "r"), *argv]))

    assert resolve("--preset", "tiny").epochs == 1
    assert resolve("--preset", "tiny", "--max-seconds", "300").epochs == 0
    assert resolve("--preset", "tiny", "--max-seconds", "300", "--epochs", "3").epochs == 3
    assert resolve("--preset", "char-rnn", "--max-steps", "50").epochs == 20
    with pytest.raises(TrainError, match="epochs=0"):
        train(preset("tiny", **SMALL, epochs=0), "unused", tmp_path / "r", progress_bar=False)


# -- issue 6: training into the same folder again -------------------------------------------------------
def test_api_trains_into_the_same_folder_with_resume_or_overwrite(tmp_path, capsys):
    data = str(corpus_file(tmp_path / "c.txt"))
    out = tmp_path / "run"
    cfg = preset("tiny", **SMALL, max_steps=6, epochs=0)
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("mine")
    lstmgen.train(data, out, cfg, progress=False)
    with pytest.raises(TrainError) as e:
        lstmgen.train(data, out, cfg, progress=False)
    assert "resume=True" in str(e.value) and "overwrite=True" in str(e.value) and "--" not in str(e.value)

    lstmgen.train(data, out, preset("tiny", **SMALL, max_steps=10, epochs=0), resume=True, progress=False)
    assert load_checkpoint(out / "last.pt").progress["global_step"] == 10
    lstmgen.train(data, out, cfg, overwrite=True, progress=False)
    assert load_checkpoint(out / "last.pt").progress["global_step"] == 6  # started over
    assert [r["step"] for r in metrics_rows(out)] == ["6"] and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(TrainError, match="choose one"):
        lstmgen.train(data, out, cfg, resume=True, overwrite=True, progress=False)

    capsys.readouterr()
    assert main(["train", "--data", data, "--out", str(out), "--preset", "tiny", *flags(**SMALL),
                 "--max-steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "(--resume)" in err and "(--overwrite)" in err and "=True" not in err
    assert main(["train", "--data", data, "--out", str(out), "--preset", "tiny", *flags(**SMALL),
                 "--max-steps", "2", "--no-progress", "--overwrite"]) == 0


# -- issue 11: samples while training; the demo's verdict ------------------------------------------------
def test_sample_every_prints_samples_and_changes_nothing(tmp_path, capsys):
    data = str(corpus_file(tmp_path / "c.txt"))
    base = ["train", "--data", data, "--preset", "tiny", *flags(**SMALL), "--max-steps", "10", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a"), "--sample-every", "4"]) == 0
    shown = capsys.readouterr().out
    assert "--- sample at step 4 (temperature 0.8) ---" in shown and "--- sample at step 8" in shown
    body = shown.split("--- sample at step 8 (temperature 0.8) ---\n")[1].split("\n--- end of sample ---")[0]
    assert len(body) >= 100 and set(body) <= set(open(data).read())  # text in the corpus's alphabet
    assert main([*base, "--out", str(tmp_path / "b")]) == 0  # not a terminal, no flag: no samples
    assert "sample at step" not in capsys.readouterr().out
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for k, t in a.state_dict.items():  # sampling draws from its own generator: training is unchanged
        assert torch.equal(t, b.state_dict[k]), k


def test_samples_are_on_by_default_at_a_terminal_only():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    def args(**kw):
        return argparse.Namespace(**{"sample_every": None, "quiet": False, "log_format": "text", **kw})

    assert train_cli.sample_every(args(), Tty()) == train_cli.TERMINAL_SAMPLE_EVERY
    assert train_cli.sample_every(args(), io.StringIO()) == 0
    assert train_cli.sample_every(args(quiet=True), Tty()) == 0
    assert train_cli.sample_every(args(sample_every=0), Tty()) == 0
    assert train_cli.sample_every(args(sample_every=7), io.StringIO()) == 7


def test_demo_says_when_it_trained_too_briefly(tmp_path):
    unigram = 3.14  # nats/char of the stdlib corpus's character frequencies
    assert "too briefly" in demo.training_note(val_loss=2.9, unigram_loss=unigram, steps=60)
    assert demo.training_note(val_loss=1.2, unigram_loss=unigram, steps=3000) is None
    assert "too briefly" in demo.training_note(val_loss=1.2, unigram_loss=None, steps=40)
    assert demo.training_note(val_loss=1.2, unigram_loss=None, steps=3000) is None
    text = tmp_path / "t.txt"
    text.write_text("ab" * 50)
    assert demo.unigram_loss(str(text)) == pytest.approx(0.6931, abs=1e-3)  # two symbols: ln 2
    assert demo.unigram_loss("https://example.com/x.txt") is None


def test_a_signal_during_the_closing_validation_at_max_steps_is_finished_by_resume(tmp_path, monkeypatch):
    """Ctrl-C while the run validates at max_steps: last.pt is at the limit with no validation;
    --resume does that validation (best.pt, the metrics row) instead of saying "nothing to do"."""
    from lstmgen.train.interrupt import TrainInterrupted
    from lstmgen.train.loop import Loop

    data = str(corpus_file(tmp_path / "c.txt"))
    out = tmp_path / "run"
    cfg = preset("tiny", **SMALL, max_steps=6, epochs=0)
    real = Loop._validate
    monkeypatch.setattr(Loop, "_validate", lambda self: None)  # as when a signal cuts it short
    with pytest.raises(TrainInterrupted):
        lstmgen.train(data, out, cfg, progress=False)
    assert load_checkpoint(out / "last.pt").progress["global_step"] == 6 and not (out / "best.pt").exists()
    monkeypatch.setattr(Loop, "_validate", real)
    best = lstmgen.train(data, out, cfg, resume=True, progress=False)
    assert best.is_file() and [r["step"] for r in metrics_rows(out)] == ["6"]
