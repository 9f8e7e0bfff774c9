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


def _records(paths) -> list[dict]:
    return [json.loads(line) for p in paths for line in p.read_text().splitlines()]


def _same_logprobs(a: list, b: list) -> bool:
    """Equal token by token; the numbers up to float rounding (rows share a step with others)."""
    def flat(xs: list) -> list:
        return [(x["token_id"], x["text"], round(x["logprob"], 4), [(t, s, round(v, 4)) for t, s, v in x["top"]])
                for x in xs]
    return flat(a) == flat(b)


def test_ray_records_carry_the_local_fields_and_values(bundles, tmp_path, local_ray):
    """Key for key, value for value: ids of both types, stop sequences, logprobs; and the same
    Parquet columns and rows."""
    import pyarrow.parquet as pq

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i if i % 2 else f"q{i}", "prompt": ["All", "Speak", "You"][i % 3],
                                           **({"stop": ["e", "a"]} if i % 4 == 1 else {})}) + "\n"
                               for i in range(12)))
    args = ["sample", str(bundles["char"]), "--prompts", str(prompts), "--seed", "3", "--max-new-tokens", "10",
            "--logprobs", "2", "--batch-size", "4", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "local.jsonl"), "--ordered"]) == 0
    ray_args = ["--ray", "--ray-actors", "2", "--ray-cpus-per-actor", "0.5"]  # sizing: test_offline_ray_sizing.py
    assert main(args + ["--out", str(tmp_path / "ray_out"), *ray_args]) == 0
    want = _records([tmp_path / "local.jsonl"])
    got = _records(sorted((tmp_path / "ray_out").iterdir()))
    assert [list(r) for r in got] == [list(r) for r in want]  # the same keys, in the same order
    assert any("stop_sequence" in r for r in got) and {type(r["id"]) for r in got} == {int, str}
    for g, w in zip(got, want):
        assert _same_logprobs(g.pop("logprobs"), w.pop("logprobs"))
        assert g == w

    assert main(args + ["--out", str(tmp_path / "local.parquet"), "--ordered"]) == 0
    assert main(args + ["--out", str(tmp_path / "ray.parquet"), *ray_args]) == 0
    local = pq.read_table(tmp_path / "local.parquet")
    ray_table = pq.read_table(sorted((tmp_path / "ray.parquet").iterdir()))
    assert ray_table.schema == local.schema
    keep = [c for c in local.column_names if c != "logprobs"]
    assert ray_table.select(keep).to_pylist() == local.select(keep).to_pylist()
