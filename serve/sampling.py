"""Vectorised next-token choice for a batch of rows, each with its own parameters and generator.

Like TGI's NextTokenChooser, each processing stage runs only when some row needs it. Every stage
is row-wise, and each row's randomness is one uniform draw from that request's own generator, so
a row's token depends only on its own logits and seed, never on what shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lstmgen.serve.params import SamplingParams


@dataclass(frozen=True)
class BatchSampling:
    """Per-row sampling parameters as arrays, plus which stages any row needs; built once when
    the batch changes, not once per step."""

    greedy: np.ndarray  # bool [B]
    inv_temperature: np.ndarray  # float32 [B, 1] (1 for greedy rows)
    top_k: np.ndarray  # int64 [B], 0 = off
    top_p: np.ndarray  # float32 [B], 1 = off
    all_greedy: bool
    any_greedy: bool
    unit_temperature: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def from_params(cls, params: list[SamplingParams]) -> "BatchSampling":
        greedy = np.array([p.is_greedy for p in params], dtype=bool)
        temp = np.array([1.0 if p.is_greedy else p.temperature for p in params], dtype=np.float32)
        top_k = np.array([p.top_k for p in params], dtype=np.int64)
        top_p = np.array([p.top_p for p in params], dtype=np.float32)
        return cls(greedy=greedy, inv_temperature=(1.0 / temp)[:, None], top_k=top_k, top_p=top_p,
                   all_greedy=bool(greedy.all()), any_greedy=bool(greedy.any()),
                   unit_temperature=bool((temp == 1.0).all()), any_top_k=bool((top_k > 0).any()),
                   any_top_p=bool((top_p < 1.0).any()))


def apply_top_k(logits: np.ndarray, top_k: np.ndarray) -> np.ndarray:
    """Mask all but each row's k largest logits (k = 0: row untouched). Ties at the k-th value stay."""
    v = logits.shape[1]
    k = np.where((top_k > 0) & (top_k < v), top_k, v)  # [B]
    if (k == v).all():
        return logits
    neg = -logits
    # One partition when every row asks for the same k (the usual case); a full sort otherwise.
    part = np.partition(neg, k[0] - 1, axis=1) if (k == k[0]).all() else np.sort(neg, axis=1)
    thresh = -np.take_along_axis(part, (k - 1)[:, None], axis=1)  # [B, 1] each row's k-th largest
    return np.where(logits < thresh, -np.inf, logits)


def apply_top_p(probs: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always >= 1 token)."""
    active = top_p < 1.0
    if not active.any():
        return probs
    order = np.argsort(-probs, axis=1, kind="stable")  # [B, V]
    sorted_p = np.take_along_axis(probs, order, axis=1)
    cum_before = np.cumsum(sorted_p, axis=1) - sorted_p  # mass strictly before each token
    drop_sorted = (cum_before >= top_p[:, None]) & active[:, None]
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=1)
    return np.where(drop, 0.0, probs)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def choose(logits: np.ndarray, sp: BatchSampling, uniforms: np.ndarray) -> np.ndarray:
    """logits float32 [B, V], uniforms float64 [B] in [0, 1) -> token ids int64 [B]."""
    if sp.all_greedy:
        return logits.argmax(axis=1)
    x = logits if sp.unit_temperature else logits * sp.inv_temperature  # [B, V]
    if sp.any_top_k:
        x = apply_top_k(x, sp.top_k)
    weights = np.exp(x - x.max(axis=1, keepdims=True))  # unnormalised probabilities [B, V]
    if sp.any_top_p:
        weights = apply_top_p(weights / weights.sum(axis=1, keepdims=True), sp.top_p)
    cdf = np.cumsum(weights, axis=1)  # [B, V]; the target below rescales, so no normalising
    sampled = (cdf <= uniforms[:, None] * cdf[:, -1:]).sum(axis=1)  # first index past the target
    sampled = np.minimum(sampled, logits.shape[1] - 1)
    return np.where(sp.greedy, logits.argmax(axis=1), sampled) if sp.any_greedy else sampled
