"""`lstmgen sample` on long samples: progress counts the tokens of unfinished samples and prints on
its interval, the ETA follows this run's token rate (after --resume too); and one writer per
output: a second run into an output that a run is writing fails at once (exit 2), naming its pid.

The real command in a subprocess on a tiny real bundle. Lines are timestamped as they arrive on
the pipe; events are ordered by what the command prints and writes (waited for), never by a delay."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

WORDS = ["All", "Speak", "First Citizen", "You are", "hear me"]
PROMPTS, LONG = 16, 12_000  # every sample runs to max_new_tokens: they all finish at the very end
ARGS = ["--seed", "5", "--max-new-tokens", str(LONG), "--threads", "1", "--device", "cpu", "--progress-interval", "0.2"]
LINE = re.compile(r"lstmgen sample: (\d+)/(\d+) samples \([\d.]+%\)  ([\d,]+) tokens  ([\d.,]+) samples/s  "
                  r"[\d,]+ tokens/s  elapsed \S+  ETA (\S+)$")


def cmd(bundle, prompts, out, *extra):
    return [sys.executable, "-m", "lstmgen.cli", "sample", str(bundle), "--prompts", str(prompts),
            "--out", str(out), *ARGS, *extra]


def write_prompts(path, n=PROMPTS):
    path.write_text("".join(json.dumps({"id": i, "prompt": WORDS[i % 5]}) + "\n" for i in range(n)))
    return path


def seconds(eta: str) -> float:
    """`_duration`'s text back in seconds: 4.2s, 37s, 3m05s, 1h02m."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?", eta)
    h, mi, s = (float(x or 0) for x in m.groups())
    return 3600 * h + 60 * mi + s


class Lines:
    """Reads a process's stderr on a thread, keeping each line with the time it arrived."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.got, self._cv = proc, [], threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cv:
                self.got.append((time.monotonic(), line.rstrip("\n")))
                self._cv.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match | None:
        """The first line matching `pattern` (None when the process ended without one)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for _, line in self.got:
                    if (m := re.search(pattern, line)):
                        return m
                if self.proc.poll() is not None and not self._thread.is_alive():
                    return None
                self._cv.wait(min(0.05, max(deadline - time.monotonic(), 0)))
                if time.monotonic() > deadline:
                    return None

    def finish(self) -> list[tuple[float, str]]:
        self.proc.wait(120)
        self._thread.join(10)
        return self.got


def run_timed(command) -> tuple[int, list[tuple[float, str]]]:
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines = Lines(proc)
    got = lines.finish()
    return proc.returncode, got


def progress(got):
    return [(t, LINE.search(line)) for t, line in got if LINE.search(line)]


@pytest.fixture(scope="module")
def long_run(bundles, tmp_path_factory):
    """One uninterrupted run of PROMPTS long samples: its prompts, output and timed stderr lines."""
    d = tmp_path_factory.mktemp("long")
    prompts, out = write_prompts(d / "p.jsonl"), d / "whole.jsonl"
    rc, got = run_timed(cmd(bundles["char"], prompts, out))
    assert rc == 0, got
    return prompts, out, got


# -- progress --------------------------------------------------------------------------------------

def test_progress_counts_tokens_of_unfinished_samples_on_its_interval(long_run):
    prompts, out, got = long_run
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == PROMPTS and all(r["generated_tokens"] == LONG for r in rows)  # all end at the end
    before_any = [int(m[3].replace(",", "")) for _, m in progress(got) if m[1] == "0"]
    # lines on the interval while no sample has finished, their token counts rising
    assert len(before_any) >= 3, [line for _, line in got]
    assert before_any == sorted(before_any) and len({n for n in before_any if n > 0}) >= 2, before_any
    last = progress(got)[-1][1]
    assert last[1] == last[2] == str(PROMPTS) and last[3] == f"{PROMPTS * LONG:,}"


def test_after_resume_rate_and_eta_are_this_runs(long_run, bundles, tmp_path):
    prompts, whole, _ = long_run
    part = tmp_path / "part.jsonl"
    part.write_text(whole.read_text().splitlines(keepends=True)[0])  # one sample done by an earlier run
    (tmp_path / "part.jsonl.run.json").write_text((whole.parent / "whole.jsonl.run.json").read_text())
    rc, got = run_timed(cmd(bundles["char"], prompts, part, "--resume"))
    assert rc == 0, got
    assert sorted(part.read_text().splitlines()) == sorted(whole.read_text().splitlines())
    end = next(t for t, line in got if "samples in" in line)  # the summary: the run's work is over
    lines = progress(got)
    waiting = [(t, m) for t, m in lines if m[1] == "1"]  # the earlier run's sample only
    assert len(waiting) >= 2, [line for _, line in got]
    assert all(m[4] == "0.0" for _, m in waiting)  # samples/s: none finished in this run yet
    t, m = next((t, m) for t, m in waiting if m[5] != "?")
    eta, left = seconds(m[5]), end - t
    # the old ETA (samples left / this run's sample rate) said minutes for what took seconds
    assert left / 3 - 1 <= eta <= 3 * left + 2, (m[0], left)


# -- one writer per output -------------------------------------------------------------------------

def lock_holder(out) -> str:
    try:
        return (out.parent / (out.name + ".lock")).read_text().strip()
    except FileNotFoundError:
        return ""


def holds_lock(proc, out, timeout: float = 60.0) -> bool:
    """Waits (polling) until `proc`'s pid is in OUT.lock; False if it ends first."""
    deadline = time.monotonic() + timeout
    while lock_holder(out) != str(proc.pid):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_second_writer_fails_at_once_naming_the_first(bundles, tmp_path):
    prompts, out = write_prompts(tmp_path / "p.jsonl", n=4), tmp_path / "o.jsonl"
    first = subprocess.Popen(cmd(bundles["char"], prompts, out), stderr=subprocess.PIPE, text=True)
    lines = Lines(first)
    try:
        assert holds_lock(first, out), f"no lock file naming the running command: {lines.got}"
        assert lines.wait_for(r"[1-9][\d,]* tokens/s") is not None, lines.got  # mid-run: sampling
        first.send_signal(signal.SIGSTOP)  # it holds the lock, and the output stays as it is
        before = out.read_bytes() if out.exists() else b""
        for mode in ("--resume", "--overwrite"):
            t0 = time.monotonic()
            second = subprocess.run(cmd(bundles["char"], prompts, out, mode), capture_output=True, text=True,
                                    timeout=60)
            assert second.returncode == 2, second.stderr
            assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr, second.stderr
            assert time.monotonic() - t0 < 30  # refused before any sampling
            assert (out.read_bytes() if out.exists() else b"") == before  # not appended to, not deleted
    finally:
        first.send_signal(signal.SIGCONT)
    lines.finish()
    assert first.returncode == 0, lines.got
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["index"], r["sample"]) for r in rows) == [(i, 0) for i in range(4)]  # once each
    assert not (tmp_path / "o.jsonl.lock").exists()
    # the lock is free again: a resume of the finished output runs, and finds it complete
    again = subprocess.run(cmd(bundles["char"], prompts, out, "--resume"), capture_output=True, text=True)
    assert again.returncode == 0 and "4 of 4 samples already written" in again.stderr, again.stderr
    assert len(out.read_text().splitlines()) == 4


def test_a_killed_writers_lock_does_not_block_the_next_run(bundles, tmp_path):
    prompts, out = write_prompts(tmp_path / "p.jsonl", n=4), tmp_path / "o.jsonl"
    first = subprocess.Popen(cmd(bundles["char"], prompts, out), stderr=subprocess.PIPE, text=True)
    lines = Lines(first)
    assert holds_lock(first, out), f"no lock file naming the running command: {lines.got}"
    assert lines.wait_for(r"[1-9][\d,]* tokens/s") is not None, lines.got  # mid-run: sampling
    first.send_signal(signal.SIGKILL)
    lines.finish()
    assert lock_holder(out) == str(first.pid)  # left behind, naming a dead process: the kernel freed the lock
    rc, got = run_timed(cmd(bundles["char"], prompts, out, "--resume"))
    assert rc == 0, got
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["index"], r["sample"]) for r in rows) == [(i, 0) for i in range(4)]
    assert not (tmp_path / "o.jsonl.lock").exists()
