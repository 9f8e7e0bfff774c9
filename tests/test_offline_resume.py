"""`lstmgen sample --resume`: killed with SIGKILL at random points, resumed, the final file is the
uninterrupted run's (byte for byte with --ordered; the same lines without)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from lstmgen.cli import main

ARGS = ["--num-samples", "2", "--max-new-tokens", "24", "--seed", "11", "--batch-size", "8", "--threads", "1",
        "--device", "cpu", "--quiet"]


def prompts_file(tmp_path, n=300):
    p = tmp_path / "prompts.jsonl"
    words = ["All", "Speak", "First Citizen", "You are", "hear me"]
    p.write_text("".join(json.dumps({"id": f"p{i}", "prompt": words[i % 5], **({"seed": i} if i % 7 == 0 else {})})
                         + "\n" for i in range(n)))
    return p


def cmd(bundle, prompts, out, *extra):
    return [sys.executable, "-m", "lstmgen.cli", "sample", str(bundle), "--prompts", str(prompts),
            "--out", str(out), *ARGS, *extra]


def kill_at_random_points(command, out, rng, kills: int, total: int) -> int:
    """Runs `command` (with --resume) and SIGKILLs it `kills` times, each time once its output has
    reached a random point of what is left of the whole file (`total` bytes). A point in the
    output, not a delay: a random delay outlasted the whole run on a fast or a busy machine."""
    done = 0
    for _ in range(kills):
        before = out.stat().st_size if out.exists() else 0
        if before >= total:
            break
        target = before + 1 + int(rng.uniform(0.0, 0.7) * (total - before))
        proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.stat().st_size >= target:
                break
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            done += 1
        proc.wait()
    return done


@pytest.mark.parametrize("ordered, kills", [(True, 3), (False, 2)])
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_file(bundles, tmp_path, ordered, kills):
    prompts = prompts_file(tmp_path)
    extra = ["--ordered"] if ordered else []
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    assert main(cmd(bundles["char"], prompts, whole, *extra)[3:]) == 0
    seed = int(os.environ.get("LSTMGEN_TEST_SEED", random.randrange(1 << 30)))
    print(f"kill timing seed {seed}")
    kills = kill_at_random_points(cmd(bundles["char"], prompts, resumed, "--resume", *extra), resumed,
                                  random.Random(seed), kills, whole.stat().st_size)
    assert kills >= 1, "the run finished before it could be killed: make it longer"
    assert subprocess.run(cmd(bundles["char"], prompts, resumed, "--resume", *extra)).returncode == 0
    if ordered:
        assert resumed.read_bytes() == whole.read_bytes()
    else:
        assert sorted(resumed.read_text().splitlines()) == sorted(whole.read_text().splitlines())


def test_resume_repairs_a_torn_last_line_and_refuses_other_settings(bundles, tmp_path, capsys):
    prompts = prompts_file(tmp_path, n=20)
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    base = ["sample", str(bundles["char"]), "--prompts", str(prompts), *ARGS, "--ordered"]
    assert main(base + ["--out", str(whole)]) == 0
    lines = whole.read_text().splitlines(keepends=True)
    assert len(lines) == 40
    part.write_text("".join(lines[:13]) + lines[13][:25])  # killed mid-line
    (tmp_path / "part.jsonl.run.json").write_text((tmp_path / "whole.jsonl.run.json").read_text())
    assert main(base + ["--out", str(part), "--resume", "--max-new-tokens", "9"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err
    assert main(base + ["--out", str(part), "--resume"]) == 0
    assert part.read_bytes() == whole.read_bytes()
    assert "torn last line" in capsys.readouterr().err
