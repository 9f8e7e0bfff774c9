"""`lstmgen sample --ray`: the same job through Ray Data on a local Ray instance (2 CPUs) that
the test starts; the same seeds must give the same texts as the local path."""
from __future__ import annotations

import json
import os

import pytest

from lstmgen.cli import main

if os.environ.get("CI"):
    import ray  # noqa: F401  (in CI a missing extra is a failure, not a skip)
else:
    ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_path_gives_the_local_texts(bundles, tmp_path, local_ray):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": ["All", "Speak", "You are"][i % 3],
                                           **({"seed": 5, "num_samples": 3} if i == 4 else {})}) + "\n"
                               for i in range(24)))
    args = ["sample", str(bundles["char"]), "--prompts", str(prompts), "--seed", "9", "--max-new-tokens", "12",
            "--num-samples", "2", "--batch-size", "8", "--quiet"]
    local = tmp_path / "local.jsonl"
    assert main(args + ["--out", str(local)]) == 0
    # Two actors with 1 thread each; each reserves half a CPU so Ray's read tasks can run beside them.
    ray_out = tmp_path / "ray_out"
    assert main(args + ["--out", str(ray_out), "--ray", "--ray-actors", "2", "--ray-cpus-per-actor", "0.5"]) == 0
    want = {(r["index"], r["sample"]): r for r in map(json.loads, local.read_text().splitlines())}
    got = [json.loads(line) for f in sorted(ray_out.iterdir()) for line in f.read_text().splitlines()]
    assert len(got) == len(want) == 24 * 2 + 1
    assert [(r["index"], r["sample"]) for r in got] == sorted(want)  # preserve_order: input order
    for r in got:
        w = want[(r["index"], r["sample"])]
        assert (r["id"], r["seed"], r["text"], r["finish_reason"]) == (w["id"], w["seed"], w["text"], w["finish_reason"])
