"""The fast sampler draws from exactly the distribution serve/sampling.py defines.

The reference below is the definition written the slow, obvious way: float64, a full stable sort
of the vocabulary, masks, a cumulative sum. The fast path (numba kernels, no sort) must keep the
same tokens and, for the same uniform draw, pick the same token, except where float32 rounding
puts u within a hair of a CDF boundary.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lstmgen.serve.params import SamplingParams
from lstmgen.serve.penalties import TokenHistory
from lstmgen.serve.sampling import BatchSampling, choose
from lstmgen.serve.sampling_kernels import SMALL_VOCAB, _cut_picked, _cut_sorted, kept_sets, weights


def reference_kept(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """float64 [V]: the unnormalised kept distribution of one row (0 for dropped tokens)."""
    x = logits.astype(np.float64)
    probs = np.exp((x - x.max()) / p.temperature)
    v = len(probs)
    order = np.lexsort((np.arange(v), -probs))  # p descending, token id ascending
    kept = probs > 0
    if 0 < p.top_k < kept.sum():
        kept &= probs >= probs[order[p.top_k - 1]]  # ties at the k-th value stay
    if p.top_p < 1.0:
        in_order = order[kept[order]]
        mass = probs[in_order]
        before = np.cumsum(mass) - mass
        nucleus = np.zeros(v, bool)
        nucleus[in_order[before < p.top_p * mass.sum()]] = True
        kept &= nucleus
    if p.min_p > 0.0:
        kept &= probs >= p.min_p * probs.max()
    return np.where(kept, probs, 0.0)


def reference_token(kept: np.ndarray, u: float) -> int:
    cdf = np.cumsum(kept)
    return int(np.searchsorted(cdf, u * cdf[-1], side="right"))


def fast_weights(logits: np.ndarray, inv_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' weights of every row, float32 [B, V] (0 for a row without a distribution), and ok [B]."""
    logits = np.ascontiguousarray(logits, np.float32)
    w, ok = np.zeros(logits.shape, np.float32), np.zeros(len(logits), bool)
    weights(logits, np.asarray(inv_t, np.float32), w, ok)
    return w, ok


def fast_kept(logits: np.ndarray, params: list[SamplingParams]) -> np.ndarray:
    """bool [B, V]: the tokens the kernels keep, from their (vc, ties) description."""
    sp = BatchSampling.from_params(params)
    probs = fast_weights(logits, sp.inv_temperature)[0]  # as the kernels compute them
    b = len(params)
    vc, ties = np.zeros(b, np.float32), np.zeros(b, np.int64)
    kept_sets(probs, sp.top_k, sp.top_p, sp.min_p, np.arange(b), vc, ties)
    out = np.zeros(probs.shape, bool)
    for r in range(b):
        row = probs[r]
        eq = row == vc[r]
        keep_eq = eq if ties[r] < 0 else eq & (np.cumsum(eq) <= ties[r])
        out[r] = ((row > vc[r]) | keep_eq) & (row > 0)
    return out


def check(logits: np.ndarray, params: list[SamplingParams], n_draws: int = 200, seed: int = 0) -> None:
    logits = np.asarray(logits, np.float32)
    kept = fast_kept(logits, params)
    refs = [reference_kept(logits[r], p) for r, p in enumerate(params)]
    for r, p in enumerate(params):
        if (kept[r] == (refs[r] > 0)).all():
            continue
        # only float32 rounding at a boundary may differ: the fast set lies between the reference
        # sets of a hair smaller and a hair larger top_p / min_p
        tight = reference_kept(logits[r], replace(p, top_p=p.top_p * (1 - 1e-6), min_p=p.min_p * (1 + 1e-6))) > 0
        loose = reference_kept(logits[r], replace(p, top_p=min(1.0, p.top_p * (1 + 1e-6)),
                                                  min_p=p.min_p * (1 - 1e-6))) > 0
        assert (tight <= kept[r]).all() and (kept[r] <= loose).all(), (
            f"row {r} {p}: fast keeps {np.flatnonzero(kept[r])[:20]} ({kept[r].sum()}), "
            f"reference {np.flatnonzero(refs[r])[:20]} ({(refs[r] > 0).sum()})")
    rng = np.random.default_rng(seed)
    sp = BatchSampling.from_params(params)
    mismatches = 0
    for _ in range(n_draws):
        u = rng.random(len(params))
        got = choose(logits, sp, u)
        for r in range(len(params)):
            want = reference_token(refs[r], u[r])
            if got[r] != want:
                cdf = np.cumsum(refs[r]) / refs[r].sum()
                assert np.min(np.abs(cdf - u[r])) < 1e-5, f"row {r} {params[r]} u={u[r]}: {got[r]} != {want}"
                mismatches += 1
    assert mismatches <= n_draws * len(params) // 100


SETTINGS = [
    SamplingParams(),
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=0.8, top_k=40),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=1),
    SamplingParams(min_p=0.05),
    SamplingParams(temperature=0.7, top_p=0.95, min_p=0.02),
    SamplingParams(top_k=200, top_p=0.5, min_p=0.1),
    SamplingParams(top_p=1e-6),
    SamplingParams(top_p=0.999999),
]


@pytest.mark.parametrize("vocab", [1, 2, 7, 83, 1000, 10_000, 33_278])
@pytest.mark.parametrize("scale", [0.1, 3.0, 8.0])
def test_random_logits_match_reference(vocab, scale):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((len(SETTINGS), vocab)).astype(np.float32) * scale
    check(logits, SETTINGS, n_draws=30 if vocab > 5000 else 100)


def test_trained_like_zipf_logits():
    """A word model's rows: a heavy head and a long tail (Zipf), shuffled over the ids."""
    rng = np.random.default_rng(3)
    v = 10_000
    rows = []
    for _ in range(len(SETTINGS)):
        z = -1.1 * np.log(np.arange(1, v + 1)) + rng.normal(0, 0.3, v)
        rows.append(rng.permutation(z))
    check(np.array(rows, np.float32), SETTINGS, n_draws=50)


def test_ties_at_the_kth_value_all_stay():
    logits = np.array([[5, 4, 3, 3, 3, 3, 1, 0]] * 3, np.float32)
    params = [SamplingParams(top_k=3), SamplingParams(top_k=4), SamplingParams(top_k=6)]
    kept = fast_kept(logits, params)
    assert kept.sum(axis=1).tolist() == [6, 6, 6]
    check(logits, params)


def test_ties_at_the_nucleus_edge_kept_in_id_order():
    """Ten equal tokens after a leader: the nucleus ends inside the tie; lowest ids stay."""
    rng = np.random.default_rng(0)
    rows, params = [], []
    for top_p in (0.35, 0.52, 0.81, 0.9):
        row = np.zeros(300, np.float32) - 30
        idx = rng.permutation(300)[:11]
        row[idx[0]] = 1.0
        row[idx[1:]] = 0.0
        rows.append(row)
        params.append(SamplingParams(top_p=top_p))
    check(np.array(rows), params)
    # the same on char-sized rows, whose nucleus is walked value by value (_cut_picked)
    short = np.zeros((len(params), 83), np.float32) - 30
    for row in short:
        idx = rng.permutation(83)[:11]
        row[idx[0]], row[idx[1:]] = 1.0, 0.0
    check(short, params)
    # a big tie spread over a large vocabulary: the band never shrinks, the exact path sorts it
    big = np.zeros((2, 5000), np.float32)
    big[:, 17] = 2.0
    check(big, [SamplingParams(top_p=0.5), SamplingParams(top_k=70, top_p=0.5)])


@pytest.mark.parametrize("leaders,tail", [(12, -5.0), (12, -6.8), (12, -7.0), (12, -9.0), (12, -9.6),
                                          (12, -10.5), (1, -10.5)])
def test_windows_and_the_whole_row_agree_with_reference(leaders, tail):
    """The kernels search only the tokens within a factor 4^5 (WINDOW) or else 4^7 (WIDE_WINDOW)
    of the most likely one when those hold the boundary, and the whole row otherwise. A few
    leaders in (-0.5, 0) and a flat tail at e^tail: above WINDOW (-5), around it (-6.8, -7.0:
    4^-5 = e^-6.93), inside the wide one (-9, -9.6) or below both (-10.5: 4^-7 = e^-9.70). So the
    kept set lies inside a window, on its edge, or spills out of both (one leader and the tail
    below both: the tail holds 30% of the mass, a 0.9 nucleus reaches into it)."""
    rng = np.random.default_rng(7)
    rows, params = [], []
    for top_k, top_p in ((0, 0.3), (0, 0.5), (0, 0.9), (12, 1.0), (12, 0.5), (13, 1.0), (40, 1.0), (40, 0.9),
                         (5, 0.5)):
        row = np.full(10_000, tail, np.float32)
        row[rng.permutation(10_000)[:leaders]] = rng.uniform(-0.5, 0.0, leaders)
        rows.append(row)
        params.append(SamplingParams(top_k=top_k, top_p=top_p))
    check(np.array(rows), params, n_draws=50)


def test_short_rows_walked_value_by_value_cut_where_sorting_cuts():
    """On rows up to SMALL_VOCAB long, top_p alone is cut by picking the largest values one pass
    at a time; wherever that walk finishes it must give the sorted walk's (vc, ties) exactly."""
    rng = np.random.default_rng(11)
    walked = 0
    for trial in range(3000):
        v = int(rng.integers(1, SMALL_VOCAB + 1))
        logits = rng.standard_normal(v) * rng.choice([0.5, 3.0, 12.0])
        if trial % 3 == 0:
            logits = np.round(logits)  # few distinct values: ties everywhere
        logits[rng.random(v) < 0.05] = -np.inf
        if not np.isfinite(logits).any():
            continue
        p = np.exp(logits - logits.max()).astype(np.float32)
        top_p, min_p = float(rng.choice([1e-6, 0.3, 0.9, 0.999999])), float(rng.choice([0.0, 0.0, 0.05]))
        vc, ties, done = _cut_picked(p, top_p, min_p)
        if done:
            walked += 1
            assert (vc, ties) == _cut_sorted(p, 0, top_p, min_p), (v, top_p, min_p)
    assert walked > 1000  # the walk is the usual path, not a corner


@pytest.mark.parametrize("vocab", [1, 5, 4096])
def test_all_equal_rows(vocab):
    logits = np.full((len(SETTINGS), vocab), 0.25, np.float32)
    check(logits, SETTINGS, n_draws=50)
    # every weight is exactly 1: the nucleus mass lands exactly on top_p x total, where "the mass
    # before a token < target" and "<=" part ways
    exact = [SamplingParams(top_p=0.5), SamplingParams(top_p=0.25), SamplingParams(top_k=2, top_p=0.5)]
    check(np.zeros((3, max(vocab, 4)), np.float32), exact, n_draws=50)


def test_minus_infinity_and_huge_ranges():
    v = 500
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(6, v)).astype(np.float32)
    rows[0, ::2] = -np.inf  # half the vocabulary impossible
    rows[1, :] = -np.inf
    rows[1, 42] = 0.0  # one possible token
    rows[2] *= 1e30  # huge range: (x - max) / T must not overflow
    rows[3] = rows[3] * 1e-30  # tiny range: nearly uniform
    rows[4, :] = 3e38
    rows[4, 7] = 3.4e38
    rows[5, 3] = 80.0  # one token dominates
    params = [SamplingParams(temperature=0.8, top_k=40, top_p=0.9)] * 6
    check(rows, params)
    params = [SamplingParams(temperature=0.05, top_p=0.3, min_p=0.5)] * 6
    check(rows, params)


def test_top_k_larger_than_vocab_and_top_p_one_are_off():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 50)).astype(np.float32)
    kept = fast_kept(logits, [SamplingParams(top_k=500), SamplingParams(top_p=1.0)])
    assert kept.all()


def test_tiny_temperature_is_greedy_and_never_nan():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 100)).astype(np.float32)
    params = [SamplingParams(temperature=1e-40), SamplingParams(temperature=1e-5, top_p=0.5),
              SamplingParams(temperature=2e-4, top_k=3)]
    sp = BatchSampling.from_params(params)
    for u in (0.0, 0.5, 0.999999):
        out = choose(logits, sp, np.full(3, u))
        assert out[:2].tolist() == logits[:2].argmax(axis=1).tolist()
        assert out[2] == logits[2].argmax()  # 2e-4: the leader's weight is e^(gap/2e-4)


def test_greedy_is_exactly_the_first_argmax():
    logits = np.array([[1, 3, 3, 0], [7, 7, 7, 7]], np.float32)
    out = choose(logits, BatchSampling.from_params([SamplingParams(greedy=True)] * 2), np.array([0.9, 0.9]))
    assert out.tolist() == [1, 0]


def test_penalties_match_definition():
    """HF repetition penalty over prompt + generated; OpenAI frequency/presence over generated."""
    logits = np.array([[2.0, -1.0, 0.5, 3.0, 0.0]], np.float32)
    hist = TokenHistory([0, 1])  # prompt tokens 0 and 1
    for t in (3, 3, 2):
        hist.add(t)
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, greedy=True)
    sp = BatchSampling.from_params([p])
    work = logits.copy()
    choose(work, sp, np.zeros(1), [hist])
    assert (work == logits).all()  # the caller's array is untouched
    from lstmgen.serve.penalties import apply_penalties
    apply_penalties(work, [0], [hist], sp.repetition, sp.frequency, sp.presence)
    want = [2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 - 0.25, 3.0 / 2 - 2 * 0.5 - 0.25, 0.0]
    assert np.allclose(work[0], want)
    assert choose(logits, sp, np.zeros(1), [hist])[0] == 0  # 1.0 beats 0.25


def test_distribution_is_sampled_in_proportion():
    """Frequencies over many seeded draws follow the kept distribution (a chi-square bound)."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(1, 30)).astype(np.float32) * 2
    p = SamplingParams(temperature=0.9, top_k=12, top_p=0.8)
    ref = reference_kept(logits[0], p)
    ref /= ref.sum()
    sp = BatchSampling.from_params([p])
    n = 20_000
    draws = np.array([choose(logits, sp, rng.random(1))[0] for _ in range(n)])
    counts = np.bincount(draws, minlength=30)
    assert (counts[ref == 0] == 0).all()
    expected = ref[ref > 0] * n
    chi2 = float((((counts[ref > 0] - expected) ** 2) / expected).sum())
    assert chi2 < 3 * (ref > 0).sum() + 30


@pytest.mark.parametrize("vocab", [1, 7, 83, 1000, 10_000, 33_278])
def test_weights_are_exp_and_batch_independent(vocab):
    """The kernels' weights are exp((logits - max) / T) within 2 ulp of exp of that float32
    argument, largest exactly 1, subnormals where they belong; and a row's weights are bitwise
    the same alone and at any place in any batch (so a request's text never depends on what
    shares its batch)."""
    rng = np.random.default_rng(vocab)
    rows = rng.normal(0, 3, (70, vocab)).astype(np.float32)
    rows[3, : vocab // 2] = -np.inf
    rows[4] *= 1e30
    inv_t = rng.uniform(0.5, 3.0, 70).astype(np.float32)
    alone = [fast_weights(rows[i:i + 1], inv_t[i:i + 1])[0][0] for i in range(70)]
    for b, start in ((64, 0), (64, 6), (7, 30), (70, 0)):
        w, ok = fast_weights(rows[start:start + b], inv_t[start:start + b])
        assert ok.all()
        for j in range(b):
            assert np.array_equal(w[j], alone[start + j])
    with np.errstate(invalid="ignore", over="ignore"):
        arg = (rows - rows.max(axis=1, keepdims=True)) * inv_t[:, None]  # float32, as the kernel forms it
    ref = np.exp(arg.astype(np.float64))
    w, _ = fast_weights(rows, inv_t)
    assert (w.max(axis=1) == 1).all()
    normal = ref >= np.finfo(np.float32).tiny
    assert (np.abs(w[normal] - ref[normal]) <= 2 * np.spacing(ref[normal].astype(np.float32))).all()  # 2 ulp
    assert (np.abs(w[~normal] - ref[~normal]) <= 2 * 2.0 ** -149).all()  # subnormal: to its spacing
    assert (w[3, : vocab // 2] == 0).all()


def test_a_weight_does_not_depend_on_its_place_in_the_row():
    """The vectorised body and the scalar tail of the exp loop give the same bits (the kernel's
    fused multiply-adds included): the same logit, at another index or in a row of another
    length, gets the same weight."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, 400).astype(np.float32)
    x[0] = 50.0  # the row's max, in every slice below
    inv_t = np.array([1.3], np.float32)
    ref = fast_weights(x[None], inv_t)[0][0]
    for n in range(1, 120):
        assert np.array_equal(fast_weights(x[None, :n], inv_t)[0][0], ref[:n])
        shift = 1 + n % 13
        y = np.concatenate([x[:1], x[shift:]])  # every value but the max moves by shift - 1
        assert np.array_equal(fast_weights(y[None], inv_t)[0][0][1:], ref[shift:])


def test_parallel_and_serial_kernels_pick_the_same_tokens():
    """Large batches share rows among threads; a row's token must not depend on which ran it."""
    from lstmgen.serve.sampling_kernels import sample_logits, sample_logits_parallel

    rng = np.random.default_rng(9)
    params = (SETTINGS * 6)[:64]
    sp = BatchSampling.from_params(params)
    logits = rng.normal(0, 3, (64, 4096)).astype(np.float32)
    logits[5, 7] = np.nan
    for _ in range(5):
        u = rng.random(64)
        a, b = np.zeros(64, np.int64), np.zeros(64, np.int64)
        ok_a, ok_b = np.ones(64, bool), np.ones(64, bool)
        sample_logits(logits, sp.inv_temperature, u, sp.top_k, sp.top_p, sp.min_p, sp.sampled_rows, a, ok_a)
        sample_logits_parallel(logits, sp.inv_temperature, u, sp.top_k, sp.top_p, sp.min_p, sp.sampled_rows, b,
                               ok_b)
        assert (a == b).all() and (ok_a == ok_b).all() and not ok_a[5] and ok_a.sum() == 63


@pytest.mark.parametrize("vocab", [83, 10_000, 33_278])
def test_rows_without_a_distribution_are_flagged_and_the_rest_sample_as_alone(vocab):
    """choose_checked: a row with one NaN anywhere, a +inf, or nothing but -inf is not ok (greedy
    or sampled, with a penalty or not); every other row, huge and -inf values included, gets the
    token it gets alone. The server fails exactly the rows flagged (tests/test_scheduler.py)."""
    from lstmgen.serve.sampling import choose_checked

    rng = np.random.default_rng(11)
    logits = rng.normal(0, 3, (12, vocab)).astype(np.float32)
    logits[0, rng.integers(vocab)] = np.nan  # one NaN (ONNX Runtime's ReduceMax may skip it)
    logits[1, vocab - 1] = np.nan
    logits[2, 5] = np.inf
    logits[3] = -np.inf
    logits[4, : vocab // 2] = -np.inf  # impossible tokens, still a distribution
    logits[5] *= 1e6  # huge range: fine
    logits[6, 3] = np.nan  # greedy row with a NaN
    logits[7] = -np.inf  # greedy row with nothing
    bad = {0, 1, 2, 3, 6, 7}
    greedy = SamplingParams(greedy=True)
    sampled = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.7, top_k=40),
               SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, repetition_penalty=1.3)]
    params = [sampled[i % 4] if i not in (6, 7, 8) else greedy for i in range(12)]
    histories = [TokenHistory([1, 2, 3]) for _ in range(12)]
    u = rng.random(12)
    tokens, ok = choose_checked(logits.copy(), BatchSampling.from_params(params), u, histories)
    assert [i for i in range(12) if not ok[i]] == sorted(bad)
    for i in sorted(set(range(12)) - bad):
        alone = choose(logits[i:i + 1].copy(), BatchSampling.from_params([params[i]]), u[i:i + 1],
                       [TokenHistory([1, 2, 3])])
        assert tokens[i] == alone[0], i
    # an all-greedy batch takes the argmax path
    tokens, ok = choose_checked(logits.copy(), BatchSampling.from_params([greedy] * 12), u)
    assert [i for i in range(12) if not ok[i]] == sorted(bad)
    assert (tokens[~ok] >= 0).all() and (tokens[ok] == np.nanargmax(np.where(ok[:, None], logits, 0), axis=1)[ok]).all()
