"""Next-token choice for a batch of rows, each with its own parameters and generator.

The distribution each row samples from is defined exactly (tests/test_sampling_exact.py holds a
float64 full-sort reference that the fast path must match):

1. penalties (serve/penalties.py) change the logits of tokens the request has seen;
2. greedy rows (greedy, or temperature < MIN_TEMPERATURE) take the first argmax;
3. p = softmax(logits / temperature) over the whole vocabulary;
4. top_k keeps the tokens with p >= the k-th largest p (ties at the k-th value stay, as in Hugging
   Face and vLLM); top_p then keeps the shortest prefix of the kept tokens, ordered by (p
   descending, token id ascending), whose mass reaches top_p of the kept mass (a token stays when
   the mass before it is < top_p x kept mass); min_p then keeps p >= min_p x max p;
5. one uniform u from the request's own generator picks the kept token where the cumulative mass,
   in token-id order, first exceeds u x kept mass.

Like TGI's NextTokenChooser, a stage runs only when some row needs it; every stage is row-wise,
so a row's token depends only on its own logits, history and seed, never on what shares the
batch. Each sampled row goes from its logits to its token in numba kernels without the GIL
(serve/sampling_kernels.py): a few passes over the vocabulary, never a sort of it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from lstmgen.serve.params import SamplingParams
from lstmgen.serve.penalties import TokenHistory, apply_penalties
from lstmgen.serve.sampling_kernels import sample_logits, sample_logits_parallel


@dataclass(frozen=True)
class BatchSampling:
    """Per-row sampling parameters as arrays, plus which stages any row needs; built once when
    the batch changes, not once per step."""

    greedy: np.ndarray  # bool [B]
    inv_temperature: np.ndarray  # float32 [B] (1 for greedy rows)
    top_k: np.ndarray  # int64 [B], 0 = off
    top_p: np.ndarray  # float64 [B], 1 = off
    min_p: np.ndarray  # float64 [B], 0 = off
    penalty_rows: tuple[int, ...]  # rows with any penalty
    repetition: np.ndarray  # float32 [len(penalty_rows)]
    frequency: np.ndarray  # float32 [len(penalty_rows)]
    presence: np.ndarray  # float32 [len(penalty_rows)]
    all_greedy: bool
    any_greedy: bool
    sampled_rows: np.ndarray  # int64 [S]: the rows that are not greedy

    @classmethod
    def from_params(cls, params: list[SamplingParams]) -> "BatchSampling":
        greedy = np.array([p.is_greedy for p in params], dtype=bool)
        temp = np.array([1.0 if p.is_greedy else p.temperature for p in params], dtype=np.float32)
        pen = tuple(i for i, p in enumerate(params) if p.has_penalties)
        f32 = lambda name: np.array([getattr(params[i], name) for i in pen], np.float32)  # noqa: E731
        return cls(greedy=greedy, inv_temperature=1.0 / temp,
                   top_k=np.array([p.top_k for p in params], dtype=np.int64),
                   top_p=np.array([p.top_p for p in params], dtype=np.float64),
                   min_p=np.array([p.min_p for p in params], dtype=np.float64),
                   penalty_rows=pen, repetition=f32("repetition_penalty"), frequency=f32("frequency_penalty"),
                   presence=f32("presence_penalty"), all_greedy=bool(greedy.all()), any_greedy=bool(greedy.any()),
                   sampled_rows=np.flatnonzero(~greedy).astype(np.int64))


    @classmethod
    def from_columns(cls, greedy: np.ndarray, inv_temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
                     min_p: np.ndarray, penalised: np.ndarray, repetition: np.ndarray, frequency: np.ndarray,
                     presence: np.ndarray) -> "BatchSampling":
        """From per-row columns [B] (a decode pool's; serve/decode.py), vectorised."""
        pen = np.flatnonzero(penalised)
        return cls(greedy=greedy, inv_temperature=inv_temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   penalty_rows=tuple(pen.tolist()), repetition=repetition[pen], frequency=frequency[pen],
                   presence=presence[pen], all_greedy=bool(greedy.all()), any_greedy=bool(greedy.any()),
                   sampled_rows=np.flatnonzero(~greedy).astype(np.int64))


def unnormalised_probs(logits: np.ndarray, inv_temperature: np.ndarray) -> np.ndarray:
    """exp((logits - row max) / T), float32 [B, V], inv_temperature [B]: the weights the kernels
    compute (sampling_kernels.weights_row), in numpy, for tests and tools. The max is taken first,
    so huge logits or a tiny temperature underflow to 0 instead of overflowing to inf (and NaN)."""
    with np.errstate(over="ignore", invalid="ignore"):
        z = logits - logits.max(axis=1, keepdims=True)  # [B, V], <= 0
        z *= inv_temperature[:, None]
        return np.exp(z, out=z)


# Batches this large (rows x vocabulary) share their rows among the cores: top_p at batch 64 x
# 10,000 takes 0.83 ms on 2 cores against 1.35 on one (plain sampling about evens out); below
# about 8 rows of 10,000 waking the threads costs more than it saves (docs/benchmark.md).
PARALLEL_MIN_WORK = 100_000
# numba's workqueue threading layer (its fallback where OpenMP is missing) must not be entered by
# two threads at once (two schedulers in one process): one parallel call at a time.
_parallel = threading.Lock()


def choose(logits: np.ndarray, sp: BatchSampling, uniforms: np.ndarray,
           histories: list[TokenHistory | None] | None = None, overwrite: bool = False) -> np.ndarray:
    """logits float32 [B, V] with a finite max per row, uniforms float64 [B] in [0, 1),
    histories: each row's TokenHistory (rows with penalties need one) -> token ids int64 [B].
    The penalties change the logits in place with `overwrite` (the scheduler's own step output),
    else in a copy."""
    return choose_checked(logits, sp, uniforms, histories, overwrite)[0]


def choose_checked(logits: np.ndarray, sp: BatchSampling, uniforms: np.ndarray,
                   histories: list[TokenHistory | None] | None = None,
                   overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """choose() for any logits -> (token ids int64 [B], ok bool [B]). A row with a NaN, a +inf or
    nothing but -inf has no distribution: not ok, and its token means nothing. The check rides on
    passes made anyway (the greedy argmax, the kernels' row max): a pass of its own over
    [64, 10,000] cost 6-8% of a word model's iteration in the server."""
    if sp.penalty_rows:
        if not overwrite:  # a copy of [B, V] costs as much as the kernels' exp: only when needed
            logits = np.array(logits, dtype=np.float32)
        apply_penalties(logits, list(sp.penalty_rows), [histories[i] for i in sp.penalty_rows],
                        sp.repetition, sp.frequency, sp.presence)
    b = len(logits)
    if sp.all_greedy:
        out = logits.argmax(axis=1)  # a NaN is the argmax of its row; +inf too; all -inf: -inf
        return out, np.isfinite(logits[np.arange(b), out])
    ok = np.ones(b, bool)
    out = np.zeros(b, np.int64)
    if sp.any_greedy:  # the greedy rows' argmax only: a pass over the whole batch cost 0.1 ms at 64 x 10,000
        greedy = np.flatnonzero(sp.greedy)
        rows = logits[greedy]  # [G, V]
        out[greedy] = top = rows.argmax(axis=1)
        ok[greedy] = np.isfinite(rows[np.arange(len(greedy)), top])
    rows = sp.sampled_rows
    args = (np.ascontiguousarray(logits, np.float32), sp.inv_temperature,  # [B, V], [B]
            np.ascontiguousarray(uniforms, np.float64), sp.top_k, sp.top_p, sp.min_p, rows, out, ok)
    if len(rows) * logits.shape[1] >= PARALLEL_MIN_WORK and len(rows) > 1:
        with _parallel:
            sample_logits_parallel(*args)
    else:
        sample_logits(*args)
    return out, ok


def token_logprobs(logits: np.ndarray, tokens: np.ndarray, top_n: int):
    """The model's log-probabilities (log-softmax of the raw logits [R, V]) of tokens [R], and the
    top_n most likely tokens per row (ties by lower id) -> (float32 [R], int64 [R, n], float32 [R, n])."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)  # [R, 1]
    lse = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))  # [R, 1]
    rows = np.arange(len(x))
    chosen = (x[rows, tokens] - lse[:, 0]).astype(np.float32)
    n = min(top_n, x.shape[1])
    if n == 0:
        return chosen, np.zeros((len(x), 0), np.int64), np.zeros((len(x), 0), np.float32)
    cand = np.argpartition(-x, n - 1, axis=1)[:, :n] if n < x.shape[1] else np.tile(np.arange(n), (len(x), 1))
    vals = np.take_along_axis(x, cand, axis=1)
    # a tie at the n-th value may have left out a lower id: settle ties among the chosen by id
    order = np.lexsort((cand, -vals), axis=1)
    ids = np.take_along_axis(cand, order, axis=1)
    return chosen, ids, (np.take_along_axis(vals, order, axis=1) - lse).astype(np.float32)


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) every kernel path now, so the first request
    does not wait for it: seconds the first time on a machine, under one after."""
    from lstmgen.serve.params import SamplingParams as P

    params = [P(), P(top_k=2), P(top_p=0.5), P(top_k=3, top_p=0.5), P(min_p=0.1), P(greedy=True),
              P(repetition_penalty=1.2, frequency_penalty=0.5)]
    logits = np.linspace(-1, 1, 8 * len(params), dtype=np.float32).reshape(len(params), 8)
    histories = [TokenHistory([1, 2])] * len(params)
    choose(logits, BatchSampling.from_params(params), np.full(len(params), 0.5), histories)
    wide = np.tile(np.linspace(-1, 1, PARALLEL_MIN_WORK, dtype=np.float32), (len(params), 1))
    choose(wide, BatchSampling.from_params(params), np.full(len(params), 0.5), histories)  # the parallel path
