"""One seed rule on every front end: a (prompt, seed, settings) gives one text through gRPC, HTTP
(one prompt, a list of prompts, any n), the in-process Generator, `lstmgen sample` and `--ray`.
The rule: a request's k-th choice (prompt i, sample j of n: k = i * n + j) samples with seed + k."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import lstmgen
from lstmgen_client import Client
from test_http_api import post, start_http_server, stop

SETTINGS = dict(temperature=0.8, top_p=0.9, top_k=20)
PROMPTS = ["First Citizen:", "All"]


def test_one_seeded_prompt_gives_one_text_on_every_path(bundles, tmp_path):
    bundle, seed, n_tokens = bundles["char"], 11, 40
    proc, target, base, _ = start_http_server(bundle, tmp_path / "serve.log")
    try:
        with Client(target) as c:
            grpc_texts = [c.generate(p, max_new_tokens=n_tokens, seed=seed + k, **SETTINGS).text
                          for k, p in enumerate(PROMPTS)]
            grpc_n = [c.generate(PROMPTS[k // 2], max_new_tokens=n_tokens, seed=seed + k, **SETTINGS).text
                      for k in range(4)]
        _, one = post(base + "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": n_tokens, "seed": seed,
                                                 **SETTINGS})
        _, listed = post(base + "/v1/completions", {"prompt": PROMPTS, "max_tokens": n_tokens, "seed": seed,
                                                    **SETTINGS})
        _, with_n = post(base + "/v1/completions", {"prompt": PROMPTS, "n": 2, "max_tokens": n_tokens,
                                                    "seed": seed, **SETTINGS})
    finally:
        assert stop(proc) == 0
    with lstmgen.Generator(bundle, device="cpu", threads=1) as g:
        api = [c.text for c in g.generate(PROMPTS, max_new_tokens=n_tokens, seed=seed, **SETTINGS)]

    assert one["choices"][0]["text"] == grpc_texts[0]
    assert [c["text"] for c in listed["choices"]] == grpc_texts == api  # prompt i: seed + i
    assert [c["seed"] for c in with_n["choices"]] == [seed, seed + 1, seed + 2, seed + 3]
    assert [c["text"] for c in with_n["choices"]] == grpc_n  # choice k = i * n + j: seed + k

    # offline: a line with its own seed gives its first sample that seed, on the local path and on Ray
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "seed": seed + k, "max_new_tokens": n_tokens, **SETTINGS})
                               + "\n" for k, p in enumerate(PROMPTS)))
    local = tmp_path / "local.jsonl"
    run = [sys.executable, "-m", "lstmgen.cli", "sample", str(bundle), "--prompts", str(prompts)]
    done = subprocess.run([*run, "--out", str(local), "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["text"] for line in local.read_text().splitlines()] == grpc_texts

    if not os.environ.get("CI"):  # in CI a missing extra is a failure, not a skip
        pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": 2})
    out = tmp_path / "ray_out"
    done = subprocess.run([*run, "--out", str(out), "--ray", "--ray-actors", "1"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    rows = sorted((json.loads(line) for f in out.iterdir() for line in f.read_text().splitlines()),
                  key=lambda r: r["index"])
    assert [r["text"] for r in rows] == grpc_texts


def test_stop_strings_end_a_completion_where_they_end_a_stream(bundles, tmp_path):
    """Through the real server: a non-streamed HTTP completion (a quiet row: its stop strings are
    matched in the pool, serve/quiet_stops.py) ends where the same seeded gRPC stream (the per-token
    matcher) ends, with the same text and finish reason, for stops that span tokens or never occur."""
    bundle, n_tokens = bundles["char"], 200
    stops = [["e "], ["\n", "zz"], ["Citizen"], ["qqq"]]
    proc, target, base, _ = start_http_server(bundle, tmp_path / "serve.log")
    try:
        with Client(target) as c:
            streamed = [c.generate("First", max_new_tokens=n_tokens, seed=seed, stop=s, temperature=1.2)
                        for seed in range(3) for s in stops]
        quiet = [post(base + "/v1/completions", {"prompt": "First", "max_tokens": n_tokens, "seed": seed,
                                                 "stop": s, "temperature": 1.2})[1]["choices"][0]
                 for seed in range(3) for s in stops]
    finally:
        assert stop(proc) == 0
    assert [q["text"] for q in quiet] == [r.text for r in streamed]
    reasons = [r.finished.reason for r in streamed]
    assert [q["finish_reason"] for q in quiet] == ["stop" if r == "stop_sequence" else r for r in reasons]
    assert reasons.count("stop_sequence") >= 3 and reasons[3::4] == ["length"] * 3
