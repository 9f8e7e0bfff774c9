"""The core's row pool, uniform blocks and quiet rows (serve/pool.py, serve/generation.py,
serve/decode.py): a row's text never depends on how it is read or on who shares its steps."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from lstmgen.serve.completion import completions
from lstmgen.serve.engine import Engine, EngineConfig
from lstmgen.serve.generation import DRAWS, Draws
from lstmgen.serve.params import GenerationRequest, RequestLimits, SamplingParams
from lstmgen.serve.pool import RowPool
from lstmgen.serve.scheduler import Scheduler
from test_scheduler import collect


class Owner:
    slot = -1

    def __init__(self, name):
        self.name = name


def test_pool_join_writes_one_slot_and_leave_moves_the_last_row():
    pool = RowPool(((2, 3),), {"token": np.int64, "block": (np.float64, 4)}, max_rows=16, capacity=2)
    owners = [Owner(i) for i in range(5)]
    state = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)  # [L, R, H]
    pool.add(owners, (state,), token=np.arange(5) * 10, block=np.tile(np.arange(5.0)[:, None], (1, 4)))
    assert pool.capacity == 8 and len(pool) == 5  # grew by doubling
    pool.remove([1, 3])  # rows 4 then 3 fill the holes from the end
    assert [o.name for o in pool.owners] == [0, 4, 2]
    assert [o.slot for o in pool.owners] == [0, 1, 2] and owners[1].slot == owners[3].slot == -1
    np.testing.assert_array_equal(pool.col("token"), [0, 40, 20])
    np.testing.assert_array_equal(pool.col("block")[:, 0], [0, 4, 2])
    np.testing.assert_array_equal(pool.state()[0], state[:, [0, 4, 2]])
    np.testing.assert_array_equal(pool.row_state(1)[0], state[:, 4])
    new = np.ones((2, 3, 3), np.float32)
    pool.scatter(np.array([0, 2]), (new[:, :2],))
    np.testing.assert_array_equal(pool.gather(np.array([0, 2]))[0], new[:, :2])
    with pytest.raises(ValueError, match="at most 16 rows"):
        pool.add([Owner(9) for _ in range(14)], (np.zeros((2, 14, 3), np.float32),))


def test_a_full_pool_takes_the_step_output_as_its_storage():
    pool = RowPool(((1, 2),), {}, max_rows=2, capacity=2)
    pool.add([Owner(0), Owner(1)], (np.zeros((1, 2, 2), np.float32),))
    out = np.ones((1, 2, 2), np.float32)
    pool.set_state((out,))
    assert np.shares_memory(pool.state()[0], out)  # adopted, not copied


def test_draws_give_the_numbers_and_positions_of_single_draws():
    single = np.random.Generator(np.random.PCG64(7))
    draws = Draws(np.random.Generator(np.random.PCG64(7)))
    got = []
    for _ in range(2 * DRAWS + 5):
        if draws.used == len(draws.block):
            draws.refill()
        got.append(draws.block[draws.used])
        draws.used += 1
    want = [single.random() for _ in range(2 * DRAWS + 5)]
    assert got == want
    assert draws.position().bit_generator.state == single.bit_generator.state


@pytest.fixture(scope="module")
def engine(bundles):
    return Engine(bundles["char"], EngineConfig(device="cpu", intra_op_threads=1))


def req(prompt, n, seed, stop=(), **sampling):
    return GenerationRequest(prompt, n, SamplingParams(seed=seed, **sampling), seed_given=True, stop=tuple(stop))


def test_quiet_and_streamed_rows_sharing_steps_give_their_own_text(engine):
    """Quiet rows (read to their end: token ids in the pool, text made at the end, past one block
    of 256 too) beside streamed rows and quiet rows with stop strings, arriving together: each
    gets the text it gets alone, however it is read."""
    reqs = [req("First", 300, 1, temperature=0.8), req("All", 40, 2, top_p=0.9), req("You", 120, 3, stop=["e "]),
            req("Be", 600, 4, top_k=5), req("S", 9, 5, greedy=True)]

    def alone(r):
        s = Scheduler(engine, RequestLimits(max_new_tokens=1000))
        s.start()
        try:
            [(_, done)] = completions(s.submit_completion, [(0, r)], 1)
            return done.text, done.finished
        finally:
            s.shutdown()

    async def mixed():
        s = Scheduler(engine, RequestLimits(max_new_tokens=1000))
        s.start()
        try:
            streamed = [s.submit(r) for r in reqs[::2]]
            quiet = [s.submit_completion(r) for r in reqs[1::2]] + [s.submit_completion(r) for r in reqs[::2]]

            texts = await asyncio.gather(*(collect(st) for st in streamed))
            done = [await asyncio.wrap_future(q.future) for q in quiet]
            return texts, [(d.text, d.finished) for d in done]
        finally:
            await s.close()

    want = [alone(r) for r in reqs]
    streamed, quiet = asyncio.run(mixed())
    assert streamed == want[::2]
    assert quiet == want[1::2] + want[::2]
    assert want[3][1].generated_tokens == 600 and len(want[3][0]) > 256  # past a block of token ids


def test_io_binding_keeps_the_state_as_ortvalues_until_the_rows_change(bundles):
    """Under IO binding (CUDA's path, exercised on the CPU provider) the step's new state stays an
    OrtValue in the pool from step to step; it comes back to the host only when a row joins,
    leaves or is read, and the values are the step's."""
    import onnxruntime as ort

    from lstmgen.serve.decode import DecodeRows

    bound = Engine(bundles["char"], EngineConfig(device="cpu", intra_op_threads=1, io_binding="on"))
    plain = Engine(bundles["char"], EngineConfig(device="cpu", intra_op_threads=1, io_binding="off"))
    rows = DecodeRows(bound.state_shapes, 8, ["x"] * bound.manifest.vocab_size, None)
    rows.pool.add([Owner(i) for i in range(3)], bound.zeros(3))
    tokens = np.array([1, 2, 3], np.int64)
    state, want = rows.pool.state(), plain.zeros(3)
    for _ in range(3):
        _, new = bound.step(tokens, state)
        rows.pool.set_state(new)
        state = rows.pool.state()
        assert all(isinstance(x, ort.OrtValue) for x in state)  # kept on the device between steps
        _, want = plain.step(tokens, want)
    np.testing.assert_allclose(rows.pool.row_state(1)[0], want[0][:, 1], rtol=1e-6, atol=1e-6)  # read: host
    assert all(isinstance(x, np.ndarray) for x in rows.pool.state())
    np.testing.assert_allclose(rows.pool.state()[1], want[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ordered", [False, True])
def test_results_taken_as_they_end_let_short_requests_pass_a_long_one(engine, ordered):
    """Two rows, a 1,000-token request first and ten 20-token ones after it. Taken as they end
    (what Generator does), the short ones share the second row while the long one runs and all
    come out before it. Taken in order, a finished short one waits behind the long one and holds
    the window, so the rest cannot start until the long one ends: at least 1,000 + 4 x 20 steps.
    (Counts of steps and the order of results, not times: slack of 800 steps either way.)"""
    s = Scheduler(engine, RequestLimits(max_concurrent_streams=2))
    s.start()
    try:
        reqs = [req("First", 1000, 1)] + [req("All", 20, 2 + i) for i in range(10)]
        got = list(completions(s.submit_completion, enumerate(reqs), 2, ordered=ordered))
        steps = s.stats().steps
    finally:
        s.shutdown()
    assert sorted(got[k][1].finished.generated_tokens for k in range(11)) == [20] * 10 + [1000]
    if ordered:
        assert [k for k, _ in got] == list(range(11)) and steps >= 1000 + 4 * 20, steps
    else:
        assert got[-1][0] == 0 and steps < 1000 + 4 * 20, steps  # the long one last, nothing after it


@pytest.mark.parametrize("kind, stops", [
    ("char", [["\n"], ["e "], ["zzz", "ak"], ["Citizen:\n", "!"], ["eak", "ea", "k"], ["q"]]),
    ("word", [["cat"], ["dog ate"], ["the cat", "mat\n"], ["\n"], ["a"], ["zebra"]]),
])
def test_quiet_rows_match_stop_strings_as_the_streamed_matcher_does(bundles, kind, stops):
    """A quiet row's stop strings are checked only when its new token can complete one
    (serve/quiet_stops.py); it ends where the per-token StopChecker ends a streamed row, with the
    same text and the same matched string, across token blocks of 256 too. Stops that span
    tokens, that overlap, whose last character many tokens hold ("a": the per-token path), or
    that never occur."""
    eng = Engine(bundles[kind], EngineConfig(device="cpu", intra_op_threads=1))
    reqs = [req("the" if kind == "word" else "Fir", 400, seed, stop=stop, temperature=1.3)
            for seed in range(4) for stop in stops]

    async def both():
        s = Scheduler(eng, RequestLimits(max_new_tokens=1000))
        s.start()
        try:
            streamed = [s.submit(r) for r in reqs]
            quiet = [s.submit_completion(r) for r in reqs]
            texts = await asyncio.gather(*(collect(st) for st in streamed))
            done = [await asyncio.wrap_future(q.future) for q in quiet]
            return texts, [(d.text, d.finished) for d in done]
        finally:
            await s.close()

    streamed, quiet = asyncio.run(both())
    assert quiet == streamed
    reasons = [fin.reason.value for _, fin in quiet]
    assert reasons.count("stop_sequence") >= len(reqs) // 3
    assert any(len(fin.stop_sequence) > 1 for _, fin in quiet)  # one that spans tokens
    never = quiet[len(stops) - 1::len(stops)]  # the last stop set never occurs: past a block of 256
    assert all(fin.reason.value == "length" and fin.generated_tokens == 400 for _, fin in never)


def test_stop_ends_are_the_tokens_that_can_complete_a_stop():
    from lstmgen.serve.quiet_stops import StopEnds, first_stop, tail_before

    pieces = ["a", "b", "ab ", "", "\n", "c", "d", "e", "f", "g"]
    ends = StopEnds(pieces)
    assert ends(("xb",)).tolist() == [1, 2] and ends(("\n\n", "zc")).tolist() == [4, 5]
    assert ends(("a", "b")) is None  # 3 of 10 tokens: the per-token path
    assert first_stop("xxab", 1, ("ab", "b")) == (2, "ab") and first_stop("abx", 1, ("ab",)) is None
    ids = np.array([0, 3, 3, 1])  # "a", "", "", "b": empty pieces do not count towards the tail
    assert tail_before(np.array(pieces, dtype=object), ids, ["xyz"], 3) == "zab"


def test_a_rows_stop_tokens_are_found_once_when_it_joins(engine, monkeypatch):
    """Rows joining and leaving do not look their stop sets up again: with hundreds of distinct
    stop sets in the pool (per-prompt stops offline) each is read from the vocabulary once."""
    from lstmgen.serve import quiet_stops

    calls = []
    real = quiet_stops.StopEnds.__call__
    monkeypatch.setattr(quiet_stops.StopEnds, "__call__", lambda self, stops: calls.append(stops) or real(self, stops))
    reqs = [req("Fir", 5 + i % 40, i, stop=[f"zq{i}"]) for i in range(300)]
    s = Scheduler(engine, RequestLimits(max_new_tokens=1000, max_concurrent_streams=512, max_queued_streams=512))
    s.start()
    try:
        done = list(completions(s.submit_completion, list(enumerate(reqs)), 300))
    finally:
        s.shutdown()
    assert len(done) == 300 and sorted(calls) == sorted((f"zq{i}",) for i in range(300))
