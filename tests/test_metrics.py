"""Observability through the real server: /metrics scraped over HTTP, request ids in metadata and
JSON logs, and `lstmgen loadtest` reporting the server's memory and rows."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import grpc
import pytest

from lstmgen.tools.bench import inside_server, scheduler_alone, where_it_went
from lstmgen.tools.scrape import counter_deltas, scrape_metrics, wait_for
from lstmgen_client import Client, InvalidArgumentError
from lstmgen_client.v1 import generator_pb2 as pb
from tests.conftest import start_server


def metrics_url(srv) -> str:
    """The server logs its metrics address before it prints the ready line."""
    m = re.search(r"metrics on (http://\S+/metrics)", srv.log.read_text())
    assert m, srv.log.read_text()
    return m.group(1)


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    """Metrics once the server holds no rows, no queued or open streams (or the last scrape)."""
    return wait_for(url, lambda m: m["lstmgen_active_rows"] == m["lstmgen_streams_in_system"]
                    == m["lstmgen_open_streams"] == 0, timeout)


@pytest.fixture(scope="module")
def srv(bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "metrics_server.log"
    s = start_server(bundles["char"], log, "--metrics-port", "0", "--log-format", "json")
    yield s
    s.stop()


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_move_with_traffic(srv):
    url = metrics_url(srv)
    before = wait_idle(url)
    with Client(srv.target, timeout=30) as c:
        results = [c.generate("First", max_new_tokens=25, seed=i) for i in range(3)]
        with pytest.raises(InvalidArgumentError):
            c.generate("First", max_new_tokens=0)
    after = wait_idle(url)
    assert all(r.finished.generated_tokens == 25 for r in results)
    assert delta(after, before, "lstmgen_generated_tokens_total") == 75
    assert delta(after, before, "lstmgen_prompt_tokens_total") == 15
    assert delta(after, before, 'lstmgen_requests_total{status="OK"}') == 3
    assert delta(after, before, 'lstmgen_requests_total{status="INVALID_ARGUMENT"}') == 1
    assert delta(after, before, 'lstmgen_rejections_total{reason="invalid_argument"}') == 1
    assert delta(after, before, "lstmgen_time_to_first_token_seconds_count") == 3
    # the prompt call reads all but the prompt's last token; every token comes from a decode
    # step (the first one reads that last prompt token), one row each
    assert delta(after, before, 'lstmgen_step_seconds_count{kind="decode"}') == 75
    assert delta(after, before, 'lstmgen_batch_rows_sum{kind="decode"}') == 75
    assert delta(after, before, 'lstmgen_step_seconds_count{kind="prompt"}') == 3
    # tokens chosen once per decode step; `lstmgen bench` reads both as each step's mean
    assert delta(after, before, "lstmgen_sampling_seconds_count") == 75
    inside = inside_server(counter_deltas(before, after))
    assert inside["decode_steps"] == 75 and inside["step_ms"] > 0 and 0 < inside["sampling_ms"] < 250
    assert "iteration_ms" not in inside  # no window: nothing to divide the wall time by
    # inter-token gaps: every decode step after the first of each request
    assert delta(after, before, "lstmgen_inter_token_latency_seconds_count") == 72
    assert after['lstmgen_inter_token_latency_seconds_bucket{le="+Inf"}'] == \
        after["lstmgen_inter_token_latency_seconds_count"]
    assert after["process_resident_memory_bytes"] > 10e6
    assert after["lstmgen_active_rows"] == after["lstmgen_queued_streams"] == 0


def test_request_id_echoed_and_logged(srv):
    with grpc.insecure_channel(srv.target) as ch:
        call = ch.unary_stream("/lstmgen.v1.Generator/Generate",
                               request_serializer=pb.GenerateRequest.SerializeToString,
                               response_deserializer=pb.GenerateResponse.FromString)
        stream = call(pb.GenerateRequest(prompt="All", max_new_tokens=5), timeout=10,
                      metadata=(("x-request-id", "req-42.a"),))
        assert list(stream)[-1].finished.generated_tokens == 5
        assert ("x-request-id", "req-42.a") in [tuple(m) for m in stream.initial_metadata()]
        assert ("x-request-id", "req-42.a") in [tuple(m) for m in stream.trailing_metadata()]
        # an id that could forge log lines is replaced by one the server makes up
        with pytest.raises(grpc.RpcError) as e:
            list(call(pb.GenerateRequest(prompt=""), timeout=10, metadata=(("x-request-id", "a b=c " * 40),)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        rid = dict(tuple(m) for m in e.value.trailing_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{16}", rid)
    ours, bad = log_records(srv, "req-42.a"), log_records(srv, rid)  # the status goes out before the log line
    assert ours and "status=OK" in ours[-1]["message"] and ours[-1]["logger"] == "lstmgen.service"
    assert bad and "status=INVALID_ARGUMENT" in bad[-1]["message"] and "prompt" in bad[-1]["message"]


def log_records(srv, request_id: str, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in srv.log.read_text().splitlines() if line.startswith("{")]
        found = [r for r in lines if r.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_loadtest_command_reports_server_state(srv, tmp_path):
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, "-m", "lstmgen.cli", "loadtest", "--target", srv.target, "--streams", "8",
                        "--seconds", "2", "--warmup", "0.3", "--cancel-fraction", "0.3", "--prompt", "First",
                        "--max-new-tokens", "40", "--probe-rate", "20", "--metrics", metrics_url(srv),
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    for key in ("tokens_per_s", "p50_ms", "p99_ms", "ttft_ms", "ttft_p99_ms", "tokens_per_message", "failed"):
        assert key in s  # `lstmgen bench` (tools/bench/server.py) reads these
    assert s["completed"] > 0 and s["cancelled"] > 0 and s["failed"] == {} and s["tokens_per_s"] > 0
    assert s["seconds"] == pytest.approx(2.0, abs=0.005)  # the window, whatever the streams took to notice its end
    assert s["requests"] >= s["completed"] + s["cancelled"]
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"]
    server = s["server"]
    assert server["before"]["rss_bytes"] > 0 and server["after"]["rss_bytes"] > 0
    assert server["after"]["active_rows"] == server["after"]["in_system"] == 0
    # the counters inside the 2 s window alone, and `lstmgen bench`'s reading of them
    window = server["window"]
    assert 1.9 < window["seconds"] < 2.5, window["seconds"]
    i = inside_server(window["deltas"], window["seconds"])
    assert i["decode_steps"] > 10 and 0 < i["rows_per_step"] <= 8 + 1  # 8 streams, and a probe call
    assert i["iteration_ms"] == pytest.approx(1e3 * window["seconds"] / i["decode_steps"])
    # the worker's step, sampling and prompt calls are disjoint spans of the window: they fit in it
    assert i["step_ms"] + i["sampling_ms"] + i["prompt_ms"] < 1.05 * i["iteration_ms"]
    # the server makes what the client counts, and what cancelled calls left unread
    assert 0.8 * s["tokens_per_s"] < i["tokens_per_s"] < 3 * s["tokens_per_s"]
    # the cores each side kept busy in the same window: some, and no more than the machine has
    cpu = s["load_generator_cpu"]
    assert cpu["seconds"] == pytest.approx(2.0, abs=0.05) and cpu["cpu_seconds"] > 0
    assert 0 < cpu["cores"] <= os.cpu_count() and 0 < i["server_cores"] <= os.cpu_count()
    probe = s["probe"]  # 20 one-token calls a second on their own connection, all admitted here
    assert probe["rate"] == 20 and 30 <= probe["OK"]["count"] <= 41 and probe["OK"]["max"] < 5000


def test_bench_line_takes_the_iteration_apart_and_names_the_cores():
    deltas = {'lstmgen_step_seconds_count{kind="decode"}': 100.0, 'lstmgen_step_seconds_sum{kind="decode"}': 0.8,
              "lstmgen_sampling_seconds_sum": 0.06, 'lstmgen_step_seconds_sum{kind="prompt"}': 0.01,
              'lstmgen_batch_rows_sum{kind="decode"}': 6370.0, "lstmgen_generated_tokens_total": 6370.0,
              "process_cpu_seconds_total": 1.85}
    i = inside_server(deltas, 1.0)
    assert i["iteration_ms"] == pytest.approx(10.0) and i["other_ms"] == pytest.approx(1.3)
    assert i["server_cores"] == pytest.approx(1.85)
    line = where_it_went({**i, "raw_step_ms": 6.4, "load_generator_cores": 0.106})
    assert ("iteration 10.000 ms = step 8.000 ms (1.25x the raw step, 6.400 ms) + sampling 0.600 ms (8% of the step)"
            " + prompts 0.100 ms + the rest 1.300 ms; 63.7 rows a step, 6,370 tok/s made") in line
    assert f"cores in use: server 1.85, load generator 0.11 (of {os.cpu_count()})" in line
    assert "cores" not in where_it_went(inside_server({k: v for k, v in deltas.items() if "cpu" not in k}, 1.0))


def test_bench_runs_the_scheduler_alone_with_the_servers_pacing(bundles):
    """`lstmgen bench`'s in-process point: the real scheduler and engine, readers back to back, every
    mode's settings (mixed: penalties and greedy rows in one batch) accepted and generating."""
    for mode in ("mixed", "top_p"):
        rate = scheduler_alone(bundles["word"], streams=4, seconds=0.6, prompt="the", max_new_tokens=12,
                               mode=mode, threads=1, warmup=0.2)
        assert rate > 50, (mode, rate)  # a tiny model makes thousands a second; 0 when nothing counts


def test_loadtest_needs_only_the_client():
    code = ("import sys\nfrom lstmgen.cli import main\n"
            "try:\n    main(['loadtest', '--help'])\nexcept SystemExit:\n    pass\n"
            "bad = {m.split('.')[0] for m in sys.modules} & {'numpy', 'onnxruntime', 'torch'}\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "--cancel-fraction" in r.stdout, r.stderr


def test_unauthenticated_call_counts_under_its_status_too(bundles, tmp_path):
    """One call, one status, counted the same everywhere: a call refused for its token is in
    requests_total{status="UNAUTHENTICATED"} as well as in rejections_total{reason="unauthenticated"}."""
    from lstmgen_client import UnauthenticatedError

    (tmp_path / "token").write_text("t0ken\n")
    s = start_server(bundles["char"], tmp_path / "auth.log", "--auth-token-file", str(tmp_path / "token"),
                     "--metrics-port", "0")
    try:
        url = metrics_url(s)
        before = scrape_metrics(url)
        with Client(s.target, timeout=10) as c:
            for _ in range(2):
                with pytest.raises(UnauthenticatedError):
                    c.generate("First", max_new_tokens=3)
            with pytest.raises(UnauthenticatedError):
                c.model_info()
        with Client(s.target, timeout=10, token="t0ken") as c:
            c.generate("First", max_new_tokens=3)
        after = scrape_metrics(url)
    finally:
        s.stop()
    assert delta(after, before, 'lstmgen_requests_total{status="UNAUTHENTICATED"}') == 3
    assert delta(after, before, 'lstmgen_rejections_total{reason="unauthenticated"}') == 3
    assert delta(after, before, 'lstmgen_requests_total{status="OK"}') == 1
