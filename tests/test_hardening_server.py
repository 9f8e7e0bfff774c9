"""Hardening through the real server process: admission control and message size, cancelled and
timed-out streams freed, shutdown after the grace period, and fault isolation (test hook); plus
one in-process check that an unexpected error becomes INTERNAL."""
from __future__ import annotations

import asyncio
import random
import re
import signal
import time

import grpc
import pytest

from lstmgen.serve.service import GeneratorService
from lstmgen.tools.scrape import scrape_metrics
from lstmgen_client import (AsyncClient, Client, DeadlineExceededError, InternalError, OverloadedError,
                            RequestTooLargeError, UnavailableError)
from tests.conftest import start_server
from tests.test_metrics import metrics_url, wait_idle


@pytest.fixture(scope="module")
def small(bundles, tmp_path_factory):
    """2 concurrent + 2 queued streams, requests of at most 4 KiB."""
    log = tmp_path_factory.mktemp("logs") / "small.log"
    s = start_server(bundles["char"], log, "--max-concurrent", "2", "--max-queued", "2", "--max-request-bytes", "4096",
                     "--max-new-tokens", "1000000", "--metrics-port", "0")
    yield s
    s.stop()


def test_limits_reported_and_oversized_message_refused(small):
    with Client(small.target, timeout=10) as c:
        lim = c.model_info().limits
        assert (lim.max_concurrent_streams, lim.max_queued_streams, lim.max_request_bytes) == (2, 2, 4096)
        with pytest.raises(RequestTooLargeError, match="larger than max"):
            c.generate("First " * 1000, max_new_tokens=5)  # 6000 bytes
        assert c.generate("First " * 600, max_new_tokens=5).finished.generated_tokens == 5  # 3600 bytes


def test_overload_answered_at_once(small):
    """With 2 running + 2 queued, every further stream gets RESOURCE_EXHAUSTED right away."""
    url = metrics_url(small)
    before = wait_idle(url)

    async def main():
        async with AsyncClient(small.target, timeout=60) as c:
            async def hold(seed):
                async for _ in c.generate_stream("All", max_new_tokens=1_000_000, seed=seed):
                    pass
            held = [asyncio.ensure_future(hold(i)) for i in range(4)]
            for _ in range(500):  # two generate, two wait in the queue
                m = scrape_metrics(url)
                if m["lstmgen_streams_in_system"] == 4 and m["lstmgen_active_rows"] == 2:
                    break
                await asyncio.sleep(0.02)
            waits = []
            for _ in range(50):
                t0 = time.perf_counter()
                with pytest.raises(OverloadedError, match="limit is 2 concurrent"):
                    await c.generate("All", max_new_tokens=5)
                waits.append(time.perf_counter() - t0)
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            return waits

    waits = asyncio.run(main())
    assert max(waits) < 0.5, sorted(waits)[-5:]  # typically ~1 ms; generous for 2 noisy cores
    after = wait_idle(url)
    assert after['lstmgen_rejections_total{reason="overloaded"}'] - \
        before['lstmgen_rejections_total{reason="overloaded"}'] == 50
    assert after["lstmgen_active_rows"] == after["lstmgen_streams_in_system"] == 0


@pytest.fixture(scope="module")
def roomy(bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "roomy.log"
    s = start_server(bundles["char"], log, "--metrics-port", "0", "--max-new-tokens", "100000")
    yield s
    s.stop()


def test_cancelled_and_timed_out_streams_free_their_rows(roomy):
    """300 streams: abandoned after random token counts, cancelled at random times (before or after
    the first token), cut by short deadlines, or run to the end. Afterwards no row is held."""
    url = metrics_url(roomy)
    rng = random.Random(5)
    outcomes = {"done": 0, "abandoned": 0, "cancelled": 0, "deadline": 0}

    async def one(c: AsyncClient, i: int) -> None:
        kind = rng.choice(["abandon", "cancel", "deadline", "finish"])
        long = dict(max_new_tokens=50_000, seed=i, request_id=f"{kind}-{i}")  # ids show in the server log
        if kind == "finish":
            r = await c.generate("First", max_new_tokens=rng.randint(1, 40), seed=i, request_id=f"{kind}-{i}")
            outcomes["done"] += r.finished is not None
        elif kind == "abandon":
            stop_at, got = rng.randint(1, 300), 0
            async for chunk in c.generate_stream("All", **long):
                got += chunk.token_count
                if got >= stop_at:
                    break  # leaving the loop cancels the call
            outcomes["abandoned"] += 1
        elif kind == "cancel":
            task = asyncio.ensure_future(c.generate("All", **long))
            await asyncio.sleep(rng.uniform(0, 1.0))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            outcomes["cancelled"] += 1
        else:
            with pytest.raises(DeadlineExceededError):
                await c.generate("All", timeout=rng.uniform(0.001, 1.0), **long)
            outcomes["deadline"] += 1

    async def main():
        async with AsyncClient(roomy.target, timeout=60) as c:
            await asyncio.gather(*(one(c, i) for i in range(300)))

    before = wait_idle(url)
    asyncio.run(main())
    after = wait_idle(url)
    assert sum(outcomes.values()) == 300 and min(outcomes.values()) > 40, outcomes
    assert after["lstmgen_active_rows"] == after["lstmgen_queued_streams"] == 0
    assert after["lstmgen_streams_in_system"] == after["lstmgen_open_streams"] == 0
    ended = {k: after[f'lstmgen_requests_total{{status="{k}"}}'] - before[f'lstmgen_requests_total{{status="{k}"}}']
             for k in ("OK", "CANCELLED", "DEADLINE_EXCEEDED")}
    # calls cancelled or timed out very early may never reach the server
    assert outcomes["done"] + outcomes["abandoned"] <= sum(ended.values()) <= 300, (ended, outcomes)
    assert ended["OK"] == outcomes["done"] and ended["DEADLINE_EXCEEDED"] > 0, (ended, outcomes)
    seen = re.findall(r"request_id=([a-z]+)-\d+ status=(\w+)", roomy.log.read_text())
    by_kind = {kind: {st for k, st in seen if k == kind} for kind in ("finish", "abandon", "cancel", "deadline")}
    # (a cancel that lands before the call reaches the handler is settled inside gRPC: no log line)
    assert by_kind["finish"] == {"OK"} and by_kind["abandon"] == {"CANCELLED"}, by_kind
    assert by_kind["cancel"] <= {"CANCELLED"} and by_kind["deadline"] <= {"DEADLINE_EXCEEDED", "CANCELLED"}, by_kind


def test_streams_past_the_grace_period_end_unavailable(bundles, tmp_path):
    srv = start_server(bundles["char"], tmp_path / "grace.log", "--grace", "1", "--max-new-tokens", "10000000")
    try:
        async def main():
            async with AsyncClient(srv.target, timeout=60) as c:
                async def consume(seed):
                    async for _ in c.generate_stream("All", max_new_tokens=10_000_000, seed=seed):
                        pass
                tasks = [asyncio.ensure_future(consume(s)) for s in range(3)]
                await asyncio.sleep(0.3)  # streaming by now
                srv.proc.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                return results, time.monotonic() - t0

        results, took = asyncio.run(main())
        for r in results:
            assert isinstance(r, UnavailableError), r
            assert "grace period ran out" in r.message and "1s" in r.message
        assert 0.9 < took < 10
        assert srv.proc.wait(15) == 0
        assert "grace period of 1.0s over; 3 stream(s) end with UNAVAILABLE" in srv.log.read_text()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_injected_step_failure_fails_only_that_steps_requests(bundles, tmp_path):
    """Test hook: every 20th decode step raises. Exactly the requests in a failed step end with
    INTERNAL (the log names their ids); the rest finish; the server goes on serving."""
    srv = start_server(bundles["char"], tmp_path / "faults.log", "--inject-step-failure-every", "20")
    try:
        async def main():
            async with AsyncClient(srv.target, timeout=30) as c:
                async def one(i):
                    await asyncio.sleep(0.003 * i)
                    try:
                        await c.generate("First", max_new_tokens=3 + i % 12, seed=i, request_id=f"fi-{i}")
                        return f"fi-{i}", "OK"
                    except InternalError as e:
                        assert "injected step failure" in e.message
                        return f"fi-{i}", "INTERNAL"
                return dict(await asyncio.gather(*(one(i) for i in range(60))))

        status = asyncio.run(main())
        failed = {rid for rid, st in status.items() if st == "INTERNAL"}
        assert failed and len(failed) < len(status)
        deadline = time.monotonic() + 5
        while True:  # the log line is written just after the status went out
            log = srv.log.read_text()
            lines = re.findall(r"model step failed for \d+ request\(s\) request_ids=(\S+)", log)
            in_failed_steps = {rid for ids in lines for rid in ids.split(",")}
            if in_failed_steps >= failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert in_failed_steps == failed
        assert "InjectedFault" in log  # the traceback is logged
        with Client(srv.target, timeout=10) as c:
            assert c.model_info().vocab_size > 0
            assert any(_try(c, i) for i in range(5))  # 3 tokens = 2 steps: most attempts miss a failure
        assert srv.proc.poll() is None
    finally:
        srv.stop()


def _try(c: Client, seed: int) -> bool:
    try:
        return c.generate("All", max_new_tokens=3, seed=seed).finished.generated_tokens == 3
    except InternalError:
        return False


def test_unexpected_error_is_internal_and_logged(caplog):
    """A bug (not a request error) ends that call with INTERNAL and a traceback under its id."""
    class Broken:
        def submit(self, request):
            raise RuntimeError("boom")

    async def main():
        server = grpc.aio.server()
        GeneratorService(Broken(), codec=None).add_to_server(server)  # no state in this call
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=10) as c:
                with pytest.raises(InternalError, match="RuntimeError.*request_id=bug-1"):
                    await c.generate("x", request_id="bug-1")
        finally:
            await server.stop(0)

    asyncio.run(main())
    assert "unexpected error request_id=bug-1" in caplog.text and "boom" in caplog.text
