"""`lstmgen sample --ray` sizes its actors from the cluster: the documented command with no CPU
flag finishes on a 2-CPU machine (it used to hang: two 1-CPU actors left Ray's read task no CPU),
a request the cluster cannot meet fails in seconds naming the numbers and the flag, and Ray's own
progress and logs go to a file. The command runs in its own process and starts its own local Ray
instance, held to 2 CPUs whatever the machine has (RAY_OVERRIDE_RESOURCES)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from lstmgen.cli import main
from lstmgen.offline.ray_data import ROOM, RayResourceError, actor_cpus

if os.environ.get("CI"):
    import ray  # noqa: F401  (in CI a missing extra is a failure, not a skip)
else:
    ray = pytest.importorskip("ray")


def _lstmgen(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local instance, not a cluster
    env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": 2})
    return subprocess.run([sys.executable, "-m", "lstmgen.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": ["All", "Speak", "You are"][i % 3]}) + "\n"
                            for i in range(24)))
    return path


def test_two_actors_with_no_cpu_flag_finish_on_two_cpus(bundles, tmp_path):
    prompts, out = _prompts(tmp_path), tmp_path / "samples"
    args = ["sample", str(bundles["char"]), "--prompts", str(prompts)]
    done = _lstmgen(*args, "--out", str(out), "--ray", "--ray-actors", "2", timeout=300)  # the documented command
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for f in sorted(out.iterdir()) for line in f.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in got] == [(i, 0) for i in range(24)]
    # Ray's progress and logs went to the file the command names; stderr holds lstmgen's lines only
    lines = done.stderr.splitlines()
    assert len(lines) <= 3 and all(line.startswith("lstmgen sample: ") for line in lines), done.stderr
    assert f"Ray's progress and logs go to {tmp_path / 'samples.ray.log'}" in lines[0]
    assert "24 samples written by Ray" in lines[-1] and "2 actor(s) x 0.75 CPU of 2" in lines[-1]
    assert "Started a local Ray instance" in (tmp_path / "samples.ray.log").read_text()
    # the local path, given the base seed the Ray run drew, writes the same records
    seed = re.search(r"base seed (\d+)", lines[-1]).group(1)
    local = tmp_path / "local.jsonl"
    assert main(args + ["--out", str(local), "--seed", seed, "--quiet"]) == 0
    # (the local path writes in completion order; samples that end in the same step, in any order)
    assert got == sorted((json.loads(line) for line in local.read_text().splitlines()),
                         key=lambda r: (r["index"], r["sample"]))
    # a second run into the same folder would add every sample again: refused before Ray starts
    again = _lstmgen(*args, "--out", str(out), "--ray", "--ray-actors", "2", timeout=60)
    assert again.returncode == 2 and "already holds" in again.stderr and "--overwrite" in again.stderr
    assert not (tmp_path / "samples.lock").exists()
    # --overwrite replaces what the first run wrote, and only that: the same records, once
    again = _lstmgen(*args, "--out", str(out) + "/", "--ray", "--ray-actors", "2", "--overwrite", "--seed", seed,
                     timeout=300)
    assert again.returncode == 0, again.stderr
    assert [json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.read_text().splitlines()] == got


def test_a_request_the_cluster_cannot_meet_fails_in_seconds(bundles, tmp_path):
    out = tmp_path / "samples"
    start = time.monotonic()
    done = _lstmgen("sample", str(bundles["char"]), "--prompts", str(_prompts(tmp_path)), "--out", str(out),
                    "--ray", "--ray-actors", "8", "--ray-cpus-per-actor", "1", timeout=120)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - start < 60  # Ray's start-up; the check itself is immediate
    assert ("--ray-actors 8 x --ray-cpus-per-actor 1 = 8 CPUs, but the Ray cluster has 2: "
            "lower --ray-cpus-per-actor (e.g. 0.187 for 8 actors)") in done.stderr
    assert len(done.stderr.splitlines()) == 2 and not out.exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_cpu_count_that_is_no_count_is_refused_before_ray_starts(bundles, tmp_path, capsys, value):
    rc = main(["sample", str(bundles["char"]), "--prompts", str(_prompts(tmp_path)), "--out", str(tmp_path / "o"),
               "--ray", "--ray-cpus-per-actor", value])
    assert rc == 2 and "--ray-cpus-per-actor is" in capsys.readouterr().err


def test_actor_cpus_leave_room_for_the_write_tasks():
    assert actor_cpus(2, 2, 1, None) == 0.75  # (2 - 0.5) / 2
    assert actor_cpus(2, 8, 1, None) == 0.187
    assert actor_cpus(16, 2, 1, None) == 1  # the thread count when the cluster has more
    assert actor_cpus(16, 4, 2, None) == 2
    assert actor_cpus(6, 2, 4, None) == 2  # 2.75 rounded down to whole CPUs
    assert actor_cpus(2, 2, 1, 1) == 1  # the user's request, when the cluster has the CPUs
    with pytest.raises(RayResourceError, match=r"--ray-actors 3 x --ray-cpus-per-actor 1 = 3 CPUs, but the Ray "
                                               r"cluster has 2"):
        actor_cpus(2, 3, 1, 1)
    with pytest.raises(RayResourceError, match=r"--ray-actors 200 on the Ray cluster's 2 CPUs .* lower --ray-actors"):
        actor_cpus(2, 200, 1, None)
    assert ROOM == 0.5


def test_a_record_that_fails_makes_the_ray_run_exit_1_as_the_local_one(bundles, tmp_path):
    """A prompt the model cannot read gets an "error" record on both paths, and both exit 1."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "All"}) + "\n" + json.dumps({"prompt": "ROMEO"}) + "\n")
    args = ["sample", str(bundles["char"]), "--prompts", str(prompts), "--max-new-tokens", "8"]
    local = _lstmgen(*args, "--out", str(tmp_path / "local.jsonl"), timeout=120)
    assert local.returncode == 1 and "1 with an error" in local.stderr, local.stderr
    done = _lstmgen(*args, "--out", str(tmp_path / "ray_out"), "--ray", "--ray-actors", "1", timeout=300)
    assert done.returncode == 1 and "2 samples written by Ray" in done.stderr and "1 with an error" in done.stderr, \
        done.stderr


def test_overwrite_never_removes_files_ray_did_not_write(bundles, tmp_path):
    """A folder holding the prompts file (or any .jsonl this command did not write) is refused,
    even with --overwrite, before anything is removed."""
    data = tmp_path / "data"
    data.mkdir()
    prompts = _prompts(data)
    (data / "other.parquet").write_bytes(b"not ours")
    done = _lstmgen("sample", str(bundles["char"]), "--prompts", str(prompts), "--out", str(data), "--ray",
                    "--overwrite", timeout=60)
    assert done.returncode == 2 and "did not write" in done.stderr, done.stderr
    assert sorted(f.name for f in data.iterdir()) == ["other.parquet", "p.jsonl"]
