"""Repetition, frequency and presence penalties, applied sparsely to the tokens a request has seen.

Semantics (serve/params.py `SamplingParams`): Hugging Face's repetition penalty over the prompt and
the generated tokens (a positive logit divided by it, a negative one multiplied), then OpenAI's
frequency penalty (x times generated) and presence penalty (once generated). Only the tokens a
request has seen are touched, so the cost is the number of distinct tokens, not the vocabulary.
"""
from __future__ import annotations

import numpy as np


class TokenHistory:
    """The distinct tokens one request has seen, with how often it generated each (prompt tokens
    count 0). Kept only for requests that use a penalty."""

    def __init__(self, prompt_ids: list[int]):
        ids = np.unique(np.asarray(prompt_ids, dtype=np.int64))
        cap = max(16, 2 * len(ids))
        self._ids = np.zeros(cap, np.int64)
        self._counts = np.zeros(cap, np.float32)
        self._ids[: len(ids)] = ids
        self._slot = {int(t): i for i, t in enumerate(ids)}
        self._n = len(ids)

    @classmethod
    def restore(cls, ids: tuple[int, ...], counts: tuple[float, ...], prompt_ids: list[int]) -> "TokenHistory":
        """A continued state's history, then a new prompt's tokens (count 0 when not seen yet)."""
        h = cls(list(ids) + list(prompt_ids))
        for t, n in zip(ids, counts):
            h._counts[h._slot[t]] = n
        return h

    def add(self, token: int) -> None:
        slot = self._slot.get(token)
        if slot is None:
            if self._n == len(self._ids):
                self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
            slot = self._slot[token] = self._n
            self._ids[slot] = token
            self._n += 1
        self._counts[slot] += 1

    @property
    def ids(self) -> np.ndarray:  # int64 [n]
        return self._ids[: self._n]

    @property
    def counts(self) -> np.ndarray:  # float32 [n], generated occurrences
        return self._counts[: self._n]


def apply_penalties(logits: np.ndarray, rows: list[int], histories: list[TokenHistory],
                    repetition: np.ndarray, frequency: np.ndarray, presence: np.ndarray) -> None:
    """In place on logits float32 [B, V]: rows[i] gets histories[i]'s penalties with the i-th
    repetition/frequency/presence values (float32 [R] each)."""
    if not rows:
        return
    sizes = [len(h.ids) for h in histories]
    r = np.repeat(np.asarray(rows, np.int64), sizes)  # [N] one entry per (row, seen token)
    t = np.concatenate([h.ids for h in histories])  # [N]
    n = np.concatenate([h.counts for h in histories])  # [N]
    rep = np.repeat(repetition, sizes)
    x = logits[r, t]
    x = np.where(x > 0, x / rep, x * rep)
    x -= np.repeat(frequency, sizes) * n + np.repeat(presence, sizes) * (n > 0)
    logits[r, t] = x
