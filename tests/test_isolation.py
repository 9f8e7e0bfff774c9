"""One request never hurts another (issue 25), on the scheduler with a real tiny ONNX model (in
process, no gRPC): a value that fails a shared call ends only its own request, and a reader that
falls behind pauses its own row (backpressure) without changing a token of what it gets."""
from __future__ import annotations

import asyncio

import pytest

from lstmgen.serve import admission as scheduler_module
from lstmgen.serve.engine import Engine, EngineConfig
from lstmgen.serve.errors import InvalidRequest, StepFailed
from lstmgen.serve.params import GenerationRequest, RequestLimits, SamplingParams, validate
from lstmgen.serve.scheduler import Scheduler
from test_scheduler import collect


def req(prompt, n=30, seed=1, **kw):
    sampling = {k: kw.pop(k) for k in list(kw) if k in SamplingParams.__dataclass_fields__}
    return GenerationRequest(prompt, n, SamplingParams(seed=seed, **sampling), seed_given=True, **kw)


@pytest.fixture(scope="module")
def engine(bundles):
    return Engine(bundles["char"], EngineConfig(device="cpu", intra_op_threads=1))


async def wait_until(cond, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting for the scheduler's state"
        await asyncio.sleep(0.005)


def run(engine, requests, limits=RequestLimits()):
    async def main():
        s = Scheduler(engine, limits)
        s.start()
        try:
            streams = [s.submit(r) for r in requests]  # all before the worker's next iteration
            results = await asyncio.gather(*(collect(x) for x in streams), return_exceptions=True)
            await wait_until(lambda: s.in_system == 0)  # every row given back, once (never below 0)
            assert s.in_system == 0 and s.open_streams == 0
            return results
        finally:
            await s.close()
    return asyncio.run(main())


@pytest.mark.parametrize("top_k", [10**20, -(10**20), 2**31])
def test_validation_refuses_what_the_kernels_cannot_take(top_k):
    with pytest.raises(InvalidRequest) as e:
        validate(req("First", top_k=top_k), RequestLimits())
    assert e.value.field == "top_k" and "0..2147483647" in str(e.value)


@pytest.mark.parametrize("field,value", [("max_new_tokens", 10**30), ("seed", -1), ("seed", 2**64),
                                         ("top_logprobs", 10**20), ("state_every", 10**20),
                                         ("temperature", 10**400), ("top_p", "0.5"), ("max_new_tokens", True)])
def test_every_numeric_field_is_range_checked(field, value):
    if field in SamplingParams.__dataclass_fields__:
        r = req("First", **{field: value})
    else:
        r = req("First", logprobs=field == "top_logprobs", **{field: value}) if field != "max_new_tokens" else \
            GenerationRequest("First", value)
    with pytest.raises(InvalidRequest) as e:
        validate(r, RequestLimits())
    assert e.value.field == field


@pytest.mark.parametrize("prompt", ["First Citizen", "F"])  # prefilled through the prompt graph / joined at once
def test_a_value_that_fails_a_shared_call_ends_only_its_request(engine, monkeypatch, prompt):
    """A request whose value passed validation but fails inside the call it shares with others
    (as top_k = 10^20 did before validation knew the kernels' range) ends alone, with INTERNAL;
    the requests prefilled beside it get exactly the text they get alone."""
    good = [req(prompt, n=20, seed=i, temperature=0.8, top_k=5) for i in range(7)]
    alone = [run(engine, [r])[0] for r in good]
    monkeypatch.setattr(scheduler_module, "validate", lambda r, limits: r.max_new_tokens)  # a validation gap
    bad = req(prompt, n=20, seed=99, top_k=10**20)
    results = run(engine, good[:3] + [bad] + good[3:])
    assert isinstance(results[3], StepFailed), results[3]
    assert results[:3] + results[4:] == alone


def test_a_reader_that_falls_behind_parks_its_row_and_loses_nothing(engine):
    """Past max_unread_output entries unread, the row leaves the batch; once read it rejoins and
    goes on exactly where it was: the text is the same token for token as a reader that kept up."""
    r = req("First Citizen:", n=300, seed=5, temperature=0.9, logprobs=True, top_logprobs=3)
    (want, fin), = run(engine, [r], RequestLimits(max_unread_output=100_000))

    async def main():
        s = Scheduler(engine, RequestLimits(max_unread_output=40))  # 5 entries a token: parks within ~8 tokens
        s.start()
        try:
            stream = s.submit(r)
            other = asyncio.ensure_future(collect(s.submit(req("All", n=200, seed=1))))
            await wait_until(lambda: s.stats().parked == 1)
            made = s.stats().tokens_generated
            first = await stream.next()
            assert first.token_count <= 40 // 5 + 1  # what was held is bounded by the limit
            # read a pile: it goes on, then parks again
            await wait_until(lambda: s.stats().tokens_generated > made and s.stats().parked == 1)
            rest = await collect(stream)
            return first.text + rest[0], rest[1], await other
        finally:
            await s.close()

    text, got_fin, other = asyncio.run(main())
    assert text == want and got_fin == fin
    assert other == run(engine, [req("All", n=200, seed=1)])[0]


def test_cancelling_a_parked_stream_frees_its_row(engine):
    async def main():
        s = Scheduler(engine, RequestLimits(max_unread_output=10))
        s.start()
        try:
            stream = s.submit(req("First", n=400))
            await wait_until(lambda: s.stats().parked == 1)
            stream.cancel()
            await wait_until(lambda: s.in_system == 0 and s.stats().parked == 0)
            assert s.open_streams == 0
            # and the server goes on serving
            return await collect(s.submit(req("All", n=10)))
        finally:
            await s.close()

    text, fin = asyncio.run(main())
    assert fin.generated_tokens == 10


class _BrokenPrime:
    """The engine with a prompt graph that always fails (a model that cannot run), counting calls."""

    def __init__(self, engine):
        self._engine, self.calls = engine, 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prefill(self, *args):
        self.calls += 1
        raise RuntimeError("the prompt graph cannot run")


def test_a_failure_every_row_shares_ends_the_group_in_few_calls(engine, caplog):
    """Bisecting is for one request's value; when both halves fail too the cause is shared, and
    the 16 rows end after 3 calls with one log line (not 31 calls and 16 tracebacks)."""
    broken = _BrokenPrime(engine)
    results = run(broken, [req("First Citizen", n=5, seed=i) for i in range(16)])
    assert all(isinstance(r, StepFailed) for r in results)
    assert broken.calls == 3
    assert len([r for r in caplog.records if "prompt step failed" in r.getMessage()]) == 1


def test_a_cancelled_stream_is_never_parked(engine):
    async def main():
        s = Scheduler(engine, RequestLimits(max_unread_output=4))
        stream = s.submit(req("First", n=50))
        stream.cancel()
        flags = stream.push("abcdefgh", 8, None, None)
        return flags & stream.OVER, stream.park()

    over, parked = asyncio.run(main())
    assert over and not parked
