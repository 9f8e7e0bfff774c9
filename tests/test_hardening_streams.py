"""Hardening, second round (issue 9), through the real server: streams whose client does not read
(admission, cancels, shutdown), seeds a double holds, and the worker thread's failures.

A client that does not read is made with a small HTTP/2 window (`HELD`): the server's writes then
wait for the client's reads, as they would for a stalled client on a real network."""
from __future__ import annotations

import asyncio
import re
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmgen.serve import decode as scheduler_module
from lstmgen.serve.engine import EngineConfig
from lstmgen.serve.faults import failing_every
from lstmgen.serve.server import Server, ServerConfig
from lstmgen.tools.scrape import wait_for
from lstmgen_client import AsyncClient, Client, InternalError, UnavailableError
from lstmgen_client.v1 import generator_pb2 as pb
from tests.conftest import start_server
from tests.test_metrics import metrics_url, wait_idle

# ~1 KB of window per stream and no window growth: the server's writes wait for our reads.
HELD = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def raw_generate(channel: grpc.Channel):
    return channel.unary_stream("/lstmgen.v1.Generator/Generate",
                                request_serializer=pb.GenerateRequest.SerializeToString,
                                response_deserializer=pb.GenerateResponse.FromString)




def no_traceback(log: str) -> None:
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


@pytest.fixture(scope="module")
def small(bundles, tmp_path_factory):
    """2 concurrent + 2 queued streams."""
    log = tmp_path_factory.mktemp("logs") / "streams.log"
    s = start_server(bundles["char"], log, "--max-concurrent", "2", "--max-queued", "2",
                     "--max-new-tokens", "100000", "--metrics-port", "0",
                     "--max-unread-output", "100000")  # generate it all unread (backpressure: test_backpressure)
    yield s
    s.stop()


def test_unread_streams_keep_their_slots(small):
    """Streams that finished generating but were never read still count against the limits: a
    flood past them is refused at once, and reading one to its end frees its slot."""
    url = metrics_url(small)
    wait_idle(url)
    with grpc.insecure_channel(small.target, options=HELD) as ch:
        gen = raw_generate(ch)
        stalled = [gen(pb.GenerateRequest(prompt="All", max_new_tokens=3000, seed=i),
                       metadata=(("x-request-id", f"st-{i}"),)) for i in range(4)]  # ~3 KB each: >> the window
        m = wait_for(url, lambda m: m["lstmgen_open_streams"] == 4 and m["lstmgen_streams_in_system"] == 0)
        assert m["lstmgen_streams_in_system"] == 0, m  # all generated; none read
        for i in range(20):
            with pytest.raises(grpc.RpcError) as e:
                next(gen(pb.GenerateRequest(prompt="All", max_new_tokens=5), timeout=10))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "4 streams open (running, queued or not yet read)" in e.value.details()
        first = list(stalled[0])  # read one to its end: all its text, and its slot comes back
        assert sum(r.token_count for r in first) == 3000 and first[-1].finished.generated_tokens == 3000
        wait_for(url, lambda m: m["lstmgen_open_streams"] == 3)
        assert sum(r.token_count for r in gen(pb.GenerateRequest(prompt="All", max_new_tokens=5), timeout=10)) == 5
        for call in stalled[1:]:
            call.cancel()
    m = wait_idle(url)
    assert m["lstmgen_open_streams"] == m["lstmgen_streams_in_system"] == 0


def test_cancel_with_writes_held_is_one_info_line(small):
    """A client cancelling streams whose writes are held by flow control: one INFO access line per
    stream, never gRPC's 'ExecuteBatchError raised in core' traceback."""
    url = metrics_url(small)
    before = wait_idle(url)["lstmgen_generated_tokens_total"]
    with grpc.insecure_channel(small.target, options=HELD) as ch:
        gen = raw_generate(ch)
        calls = [gen(pb.GenerateRequest(prompt="All", max_new_tokens=50_000, seed=i),
                     metadata=(("x-request-id", f"held-{i}"),)) for i in range(4)]
        # the two generating streams are well into their text, none of it read: writes are held
        wait_for(url, lambda m: m["lstmgen_open_streams"] == 4
                 and m["lstmgen_generated_tokens_total"] >= before + 20_000, 60)
        for call in calls:
            call.cancel()
    wait_idle(url)
    deadline = time.monotonic() + 5
    line = r"INFO lstmgen.service: stream end request_id=held-\d status=CANCELLED"
    while len(re.findall(line, small.log.read_text())) < 4:
        assert time.monotonic() < deadline, small.log.read_text()[-3000:]
        time.sleep(0.05)
    no_traceback(small.log.read_text())


def test_sigterm_gives_slow_readers_the_whole_grace_period(bundles, tmp_path):
    """SIGTERM while six clients read slowly (their output was generated long before they read it)
    and one reads nothing: the six get all their text and OK; the unread one ends once the grace
    period is over; the process exits 0."""
    srv = start_server(bundles["char"], tmp_path / "grace.log", "--grace", "5")
    n, results, started = 1500, {}, threading.Barrier(7)

    def slow_reader(i: int, ch: grpc.Channel) -> None:
        got, finished = 0, None
        try:
            for k, msg in enumerate(raw_generate(ch)(pb.GenerateRequest(prompt="All", max_new_tokens=n, seed=i),
                                                     timeout=30)):
                if k == 0:
                    started.wait()
                got += msg.token_count
                finished = msg.finished if msg.HasField("finished") else finished
                time.sleep(0.002 * len(msg.text))  # ~2 ms a character: about 3 s in all
            results[i] = ("OK", got, finished.generated_tokens)
        except grpc.RpcError as e:
            results[i] = (e.code().name, got, e.details())

    try:
        with grpc.insecure_channel(srv.target, options=HELD) as ch:
            unread = raw_generate(ch)(pb.GenerateRequest(prompt="All", max_new_tokens=n, seed=99), timeout=30)
            readers = [threading.Thread(target=slow_reader, args=(i, ch)) for i in range(6)]
            for t in readers:
                t.start()
            started.wait()
            signalled = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            for t in readers:
                t.join(30)
            read_all = time.monotonic() - signalled
            assert srv.proc.wait(15) == 0
            took = time.monotonic() - signalled
            with pytest.raises(grpc.RpcError):  # read only after the grace period: cut off
                list(unread)
        assert results == {i: ("OK", n, n) for i in range(6)}, results
        assert read_all > 1.5  # they really were still reading after generation had ended
        assert 4.5 < took < 10, took  # the unread stream held the server for the grace period, no more
        log = srv.log.read_text()
        assert "grace period of 5.0s over; 1 stream(s) end with UNAVAILABLE" in log
        no_traceback(log)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_server_picked_seeds_fit_a_double(char_server):
    """A JavaScript client reads uint64 as a double: a seed the server picks must replay there."""
    with Client(char_server.target, timeout=30) as c:
        seeds = [c.generate("All", max_new_tokens=1).finished.seed for _ in range(40)]
        assert all(0 <= s < 2**53 for s in seeds), [s for s in seeds if s >= 2**53]
        assert len(set(seeds)) == 40
        again = c.generate("All", max_new_tokens=20, seed=seeds[0])  # and replays as before
        assert again.finished.seed == seeds[0] and again.finished.generated_tokens == 20


def test_a_sampler_failure_fails_only_the_rows_it_touched(bundles, monkeypatch, caplog):
    """A failure outside the model call (here: the sampler, called once per iteration for all its
    rows, raises every 7th time) ends the rows of that iteration with INTERNAL, logged with their
    ids; the others finish, and the worker goes on."""
    monkeypatch.setattr(scheduler_module, "choose_checked", failing_every(scheduler_module.choose_checked, 7))
    cfg = ServerConfig(bundle=str(bundles["char"]), host="127.0.0.1", port=0,
                       engine=EngineConfig(device="cpu", intra_op_threads=1, spin="run"))

    async def main():
        server = Server(cfg)
        port = await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=20) as c:
                async def one(i, n=None):
                    await asyncio.sleep(0.003 * i if n is None else 0)
                    try:
                        await c.generate("First", max_new_tokens=n or 3 + i % 12, seed=i, request_id=f"sf-{i}")
                        return f"sf-{i}", "OK"
                    except InternalError as e:
                        assert "injected failure in choose_checked" in e.message
                        return f"sf-{i}", "INTERNAL"
                status = dict(await asyncio.gather(*(one(i) for i in range(60))))
                later = [await one(100 + i, n=2) for i in range(5)]  # the worker is still there
            return status, later, server.scheduler.in_system, server.scheduler.open_streams
        finally:
            await server.stop()

    status, later, in_system, still_open = asyncio.run(main())
    failed = {rid for rid, st in status.items() if st == "INTERNAL"}
    assert failed and len(failed) < len(status), status
    assert any(st == "OK" for _, st in later) and in_system == still_open == 0
    lines = re.findall(r"(?:prompt|decode) step failed for \d+ request\(s\) request_ids=(\S+);", caplog.text)
    logged = {rid for ids in lines for rid in ids.split(",")}
    assert failed <= logged and logged - failed <= {rid for rid, st in later if st == "INTERNAL"}


def test_a_worker_that_cannot_go_on_ends_every_stream_and_exits_nonzero(bundles, tmp_path):
    """Test hook: decode step 2000 raises a failure nothing in the loop contains. Every stream ends
    UNAVAILABLE, health turns NOT_SERVING, new calls are refused, and the process exits 1."""
    srv = start_server(bundles["char"], tmp_path / "crash.log", "--inject-worker-crash-at-step", "2000",
                       "--grace", "3", "--max-new-tokens", "1000000")
    try:
        with grpc.insecure_channel(srv.target, options=HELD) as held, Client(srv.target, timeout=20) as c:
            unread = raw_generate(held)(pb.GenerateRequest(prompt="All", max_new_tokens=1_000_000), timeout=30)
            streams = [c.generate_stream("All", max_new_tokens=1_000_000, seed=i) for i in range(2)]
            assert all(next(s).token_count for s in streams)
            errors = []
            for s in streams:
                with pytest.raises(UnavailableError) as e:
                    list(s)
                errors.append(e.value.message)
            assert all("generation worker failed" in m for m in errors), errors
            # the unread stream holds the server in its grace period. Health turns NOT_SERVING on the
            # event loop once the worker has ended its streams: a client may see its stream end first
            # (on a loaded machine it did), so wait for the state, a few seconds at most
            with grpc.insecure_channel(srv.target) as ch:
                check = health_pb2_grpc.HealthStub(ch).Check
                deadline = time.monotonic() + 10
                while (status := check(health_pb2.HealthCheckRequest(), timeout=5).status) \
                        != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
                    time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(UnavailableError):
                c.generate("All", max_new_tokens=5)
            unread.cancel()
        assert srv.proc.wait(15) == 1
        log = srv.log.read_text()
        assert "CRITICAL lstmgen.scheduler: generation worker failed and cannot go on" in log
        assert "InjectedCrash: injected worker crash" in log
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
