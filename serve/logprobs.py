"""A token's most likely alternatives, packed: what an unread stream holds per token with logprobs.

As Python tuples, 20 alternatives cost about 2 KB a token (a tuple and a float object each); a
stream that holds its output unread (--max-unread-output) held 0.30 MB of them, and CPython's
allocator kept that memory after the streams ended. Packed here, int32 ids and float32 logprobs
in one bytes object, a token's alternatives cost about 200 bytes. They read as the tuple of
(token id, text, logprob) they stand for: iterated, indexed, compared, deep-copied (which is
what `dataclasses.asdict` does) into that tuple.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TopLogprobs(Sequence):
    __slots__ = ("_packed", "_pieces")

    def __init__(self, ids: np.ndarray, logprobs: np.ndarray, pieces: list[str]):
        """ids [K] and logprobs [K], most likely first; pieces: token id -> text (shared, not copied)."""
        self._packed = ids.astype(np.int32).tobytes() + logprobs.astype(np.float32).tobytes()
        self._pieces = pieces

    def items(self) -> tuple[tuple[int, str, float], ...]:
        n = len(self)
        ids = np.frombuffer(self._packed, np.int32, n).tolist()
        lps = np.frombuffer(self._packed, np.float32, n, offset=4 * n).tolist()
        return tuple((t, self._pieces[t], v) for t, v in zip(ids, lps))

    def __len__(self) -> int:
        return len(self._packed) // 8

    def __getitem__(self, i):
        return self.items()[i]

    def __iter__(self):
        return iter(self.items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TopLogprobs):
            return self._packed == other._packed and self._pieces is other._pieces or self.items() == other.items()
        return isinstance(other, (tuple, list)) and self.items() == tuple(map(tuple, other))

    def __hash__(self) -> int:
        return hash(self._packed)

    def __deepcopy__(self, memo) -> tuple:
        return self.items()

    def __repr__(self) -> str:
        return repr(self.items())
