"""Stop strings for quiet rows, matched without Python per token.

A stop string can only be completed by a token whose text holds the string's last character (a
match must end inside the newest piece: serve/stopping.py). So a quiet row with stop strings
(offline sampling, a completion with `stop`) keeps its token ids in the pool like any quiet row;
each step one array lookup finds the rows whose new token is such an "end" token, and only those
rows have their text's tail checked. On a char model with stop "\n\n" that is the rows that just
sampled a newline, not every row. Matching gives exactly what `StopChecker` gives (tests hold the
two to one text). A stop set whose end tokens are a large share of the vocabulary (a stop "e")
gains nothing from this: such rows stay on the per-token path.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

CACHED = 256  # stop sets whose end tokens are kept (an LRU: clients choose the stop strings)
MAX_SHARE = 0.25  # end tokens beyond this share of the vocabulary: the per-token path instead


class StopEnds:
    """Stop set -> the token ids that can complete one of its strings (None: too many)."""

    def __init__(self, pieces: list[str]):
        self._pieces = pieces
        self._cache: OrderedDict[tuple[str, ...], np.ndarray | None] = OrderedDict()

    def __call__(self, stops: tuple[str, ...]) -> np.ndarray | None:
        if stops in self._cache:
            self._cache.move_to_end(stops)
            return self._cache[stops]
        last = {s[-1] for s in stops}
        ids = np.array([i for i, p in enumerate(self._pieces) if any(ch in p for ch in last)], np.int64)
        ends = ids if len(ids) <= MAX_SHARE * len(self._pieces) else None
        self._cache[stops] = ends
        if len(self._cache) > CACHED:
            self._cache.popitem(last=False)
        return ends


def first_stop(tail: str, new_chars: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest stop string in `tail` that ends inside its last `new_chars` characters, as
    (index in tail, string); `tail` holds at least max(len(s)) - 1 characters before them, or all
    the text there is. The rule of StopChecker._find_stop."""
    best: tuple[int, str] | None = None
    for seq in stops:
        idx = tail.find(seq, max(0, len(tail) - new_chars - len(seq) + 1))
        if idx >= 0 and (best is None or idx < best[0]):
            best = (idx, seq)
    return best


def tail_before(pieces: np.ndarray, ids: np.ndarray, parts: list[str], want: int) -> str:
    """At least `want` characters of text ending just before the newest token: `ids` are the
    row's unjoined token ids before it, `parts` its text made from earlier blocks."""
    out: list[str] = []
    have, k = 0, len(ids)
    while have < want and k > 0:  # pieces one by one: some may be empty
        k -= 1
        piece = pieces[ids[k]]
        out.append(piece)
        have += len(piece)
    j = len(parts)
    while have < want and j > 0:
        j -= 1
        part = parts[j][-(want - have):]
        out.append(part)
        have += len(part)
    return "".join(reversed(out))
