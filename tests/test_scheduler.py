"""The batching scheduler on a real tiny ONNX model (in process, no gRPC)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from lstmgen.serve.engine import Engine, EngineConfig
from lstmgen.serve.errors import Overloaded, StepFailed
from lstmgen.serve.params import GenerationRequest, RequestLimits, SamplingParams
from lstmgen.serve.scheduler import Scheduler, SchedulerConfig


def req(prompt, n=30, seed=1, **sampling):
    return GenerationRequest(prompt, n, SamplingParams(seed=seed, **sampling), seed_given=True)


async def collect(stream):
    parts, fin = [], None
    async for chunk in stream:
        parts.append(chunk.text)
        fin = chunk.finished or fin
    return "".join(parts), fin


def run_all(engine, requests, limits=RequestLimits(), cfg=SchedulerConfig(), stagger=0.0):
    async def main():
        s = Scheduler(engine, limits, cfg)
        s.start()
        try:
            tasks = []
            for r in requests:
                tasks.append(asyncio.ensure_future(collect(s.submit(r))))
                if stagger:
                    await asyncio.sleep(stagger)
            return await asyncio.gather(*tasks)
        finally:
            await s.close()
    return asyncio.run(main())


@pytest.fixture(scope="module")
def engine(bundles):
    return Engine(bundles["char"], EngineConfig(device="cpu", intra_op_threads=1))


PROMPTS = ["First Citizen:", "All", "You are all resolved", "S", "Before we proceed any further, hear me speak."]


def test_batched_equals_alone_with_staggered_arrivals(engine):
    reqs = [req(p, n=25 + 5 * i, seed=i, temperature=0.8, top_k=i % 3, top_p=0.9 + 0.02 * i)
            for i, p in enumerate(PROMPTS)]
    alone = [run_all(engine, [r])[0] for r in reqs]
    together = run_all(engine, reqs, stagger=0.002)
    assert together == alone
    assert all(fin.generated_tokens == r.max_new_tokens for (_, fin), r in zip(together, reqs))


def test_chunked_prefill_matches_one_call(engine):
    reqs = [req(p * 3, seed=4) for p in PROMPTS]
    whole = run_all(engine, reqs)
    chunked = run_all(engine, reqs, cfg=SchedulerConfig(prefill_chunk=4, max_prefill_rows=2))
    assert chunked == whole


def test_prompt_graph_and_step_fallback_agree(engine, bundles):
    no_prompt_graph = Engine(bundles["char"], EngineConfig(device="cpu"))
    no_prompt_graph.prompt_session = None  # forces prefill through the step graph
    reqs = [req(p, seed=9) for p in PROMPTS]
    assert run_all(no_prompt_graph, reqs) == run_all(engine, reqs)


def test_cancel_leaves_batch_others_unchanged(engine):
    reqs = [req("First", n=400, seed=s) for s in range(3)]
    alone = [run_all(engine, [r])[0] for r in reqs[1:]]

    async def main():
        s = Scheduler(engine)
        s.start()
        try:
            streams = [s.submit(r) for r in reqs]
            await streams[0].next()
            await streams[0].next()
            assert s.stats().active_rows == 3
            streams[0].cancel()
            others = asyncio.gather(*(collect(st) for st in streams[1:]))
            for _ in range(500):
                if s.stats().active_rows == 2:
                    break
                await asyncio.sleep(0.001)
            assert s.stats().active_rows == 2
            res = await others
            assert s.stats().active_rows == 0 and s.in_system == 0
            return res
        finally:
            await s.close()

    assert asyncio.run(main()) == alone


def test_admission_limits(engine):
    async def main():
        s = Scheduler(engine, RequestLimits(max_concurrent_streams=1, max_queued_streams=1))
        s.start()
        try:
            a, b = s.submit(req("All", n=50)), s.submit(req("All", n=50))
            with pytest.raises(Overloaded, match="limit"):
                s.submit(req("All"))
            await collect(a), await collect(b)
            await collect(s.submit(req("All", n=5)))  # room again
        finally:
            await s.close()
    asyncio.run(main())


class FlakyEngine:
    """Wraps a real engine; the next `fail_steps` step calls raise, or return NaN logits."""

    def __init__(self, engine, fail_steps=0, nan_rows=()):
        self.engine, self.fail_steps, self.nan_rows = engine, fail_steps, set(nan_rows)
        self.manifest = engine.manifest
        self.state_shapes = engine.state_shapes

    def zeros(self, b):
        return self.engine.zeros(b)

    def prefill(self, *a):
        return self.engine.prefill(*a)

    def step(self, tokens, state):
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("injected ORT failure")
        logits, state = self.engine.step(tokens, state)
        for r in self.nan_rows:
            if r < len(logits):
                logits[r] = np.nan
        self.nan_rows = set()
        return logits, state


def test_step_failure_fails_only_that_step(engine):
    flaky = FlakyEngine(engine, fail_steps=1)

    async def main():
        s = Scheduler(flaky)
        s.start()
        try:
            with pytest.raises(StepFailed, match="injected"):
                await collect(s.submit(req("All", n=20)))
            text, fin = await collect(s.submit(req("All", n=20)))  # the server goes on
            assert fin.generated_tokens == 20
        finally:
            await s.close()
    asyncio.run(main())


def test_non_finite_logits_end_that_request_only(engine):
    flaky = FlakyEngine(engine, nan_rows=[0])
    alone = run_all(engine, [req("Before", n=20, seed=2)])[0]

    async def main():
        s = Scheduler(flaky)
        s.start()
        try:
            a, b = s.submit(req("All", n=20)), s.submit(req("Before", n=20, seed=2))
            results = await asyncio.gather(collect(a), collect(b), return_exceptions=True)
            return results
        finally:
            await s.close()
    first, second = asyncio.run(main())
    assert isinstance(first, StepFailed) and "non-finite" in str(first)
    assert second == alone


def test_io_binding_path_matches_plain_run(bundles, engine):
    """The IO-binding code path (used for CUDA, state kept as OrtValues between steps) gives
    the same text; exercised here on the CPU provider."""
    bound = Engine(bundles["char"], EngineConfig(device="cpu", intra_op_threads=1, io_binding="on"))
    assert bound.io_binding
    reqs = [req(p, n=20 + 3 * i, seed=i) for i, p in enumerate(PROMPTS)]
    assert run_all(bound, reqs, stagger=0.001) == run_all(engine, reqs)


def test_reader_that_lags_gets_fewer_larger_chunks_and_the_same_text(engine):
    """A reader takes everything piled up since its last read in one chunk: one that pauses 20 ms
    between reads gets a few large chunks, and the same text as one that reads at once."""
    async def read(stream, pause):
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            await asyncio.sleep(pause)
        return chunks

    async def main():
        s = Scheduler(engine)
        s.start()
        try:
            fast = await read(s.submit(req("All", n=200, seed=5, temperature=0.9)), 0)
            slow = await read(s.submit(req("All", n=200, seed=5, temperature=0.9)), 0.02)
        finally:
            await s.close()
        return fast, slow

    fast, slow = asyncio.run(main())
    for chunks in (fast, slow):
        assert sum(c.token_count for c in chunks) == 200 and chunks[-1].finished.generated_tokens == 200
    assert "".join(c.text for c in fast) == "".join(c.text for c in slow)
    # one token per chunk (no coalescing) would take 200 reads; the tiny model needs ~10 ms in all
    assert len(slow) < 20 and max(c.token_count for c in slow) > 10
    assert len(fast) >= len(slow)


def test_spin_modes_reach_onnx_runtime(bundles):
    """--spin on|run|off: the session options ORT actually got; anything else is refused by name."""
    def entry(opts, key):  # None when unset (ORT's default)
        try:
            return opts.get_session_config_entry(key)
        except RuntimeError:
            return None

    want = {"on": (None, None), "run": (None, "1"), "off": ("0", None)}
    for mode, expected in want.items():
        opts = Engine(bundles["char"], EngineConfig(device="cpu", spin=mode)).step_session.get_session_options()
        got = (entry(opts, "session.intra_op.allow_spinning"), entry(opts, "session.force_spinning_stop"))
        assert got == expected, mode
    with pytest.raises(ValueError, match="spin must be one of on, run, off"):
        Engine(bundles["char"], EngineConfig(device="cpu", spin="sometimes"))


def test_a_cancel_racing_the_worker_releases_each_row_once(engine):
    """The consumer's thread may cancel between two reads of the flag by the worker: whatever it
    reads, each admitted row is released exactly once (streams-in-system never goes negative)."""
    from lstmgen.serve.generation import Generation

    class CancelledOnSecondRead(Generation):
        @property
        def cancelled(self):
            self.reads = getattr(self, "reads", 0) + 1
            return self.reads > 1

        @cancelled.setter
        def cancelled(self, value):
            pass

    s = Scheduler(engine)
    s.submit(req("All", seed=1))
    s.submit(req("All", seed=2))
    a, b = s._incoming
    s._incoming.clear()
    a.cancelled = True
    b.__class__ = CancelledOnSecondRead
    s._rows.commit(s._rows.joining([a, b], [0, 0], engine.zeros(2)))
    for _ in range(3):
        s._drop_cancelled()
    assert len(s._rows) == 0 and s.in_system == 0


def test_whole_stream_wakes_its_reader_once_with_everything(engine):
    """Offline sampling's streams: one chunk at the end, the same text as a streamed read."""
    r = req("First Citizen:", n=60, seed=4, temperature=0.8, top_p=0.9)

    async def main():
        s = Scheduler(engine)
        s.start()
        try:
            chunks = [c async for c in s.submit(r, whole=True)]
            streamed = await collect(s.submit(r))
        finally:
            await s.close()
        return chunks, streamed

    chunks, (text, fin) = asyncio.run(main())
    assert len(chunks) == 1 and chunks[0].finished is not None
    assert chunks[0].text == text and chunks[0].token_count == fin.generated_tokens == 60


class CountingEngine(FlakyEngine):
    """A real engine that counts prompt calls and the rows in each."""

    def __init__(self, engine):
        super().__init__(engine)
        self.prime_rows: list[int] = []

    def prefill(self, tokens, lengths, state):
        self.prime_rows.append(len(tokens))
        return self.engine.prefill(tokens, lengths, state)


@pytest.mark.parametrize("wait_steps", [0, 10_000])
def test_new_prompts_wait_for_company_while_a_batch_runs(engine, wait_steps):
    """While a decode batch runs, prompts arriving one by one are read in one call once
    `prefill_together` of them wait (or after `prefill_wait_steps`); with no wait, one call each.
    The text is the same either way."""
    counting = CountingEngine(engine)
    cfg = SchedulerConfig(prefill_wait_steps=wait_steps, prefill_together=3)
    late = [req(p, n=10, seed=i) for i, p in enumerate(["First", "You are", "Before we"])]

    async def main():
        s = Scheduler(counting, cfg=cfg)
        s.start()
        try:
            long = asyncio.ensure_future(collect(s.submit(req("All", n=3000))))  # keeps a batch running
            while s.stats().generating_rows == 0:
                await asyncio.sleep(0.001)
            tasks = []
            for r in late:
                tasks.append(asyncio.ensure_future(collect(s.submit(r))))
                await asyncio.sleep(0.02)  # many decode steps apart
            out = await asyncio.gather(*tasks)
            long.cancel()
            return out
        finally:
            await s.close()

    together = asyncio.run(main())
    assert counting.prime_rows[1:] == ([3] if wait_steps else [1, 1, 1])
    assert together == [run_all(engine, [r])[0] for r in late]
