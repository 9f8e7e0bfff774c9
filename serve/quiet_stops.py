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

import numpy as np

MAX_SHARE = 0.25  # end tokens beyond this share of the vocabulary: the per-token path instead


class StopEnds:
    """Stop set -> the token ids that can complete one of its strings (None: too many). An index
    from each character to the tokens holding it is built once, so a new stop set costs a few
    array unions, not a pass over the vocabulary."""

    def __init__(self, pieces: list[str]):
        self._pieces = pieces
        self._by_char: dict[str, np.ndarray] | None = None

    def _index(self) -> dict[str, np.ndarray]:
        if self._by_char is None:
            holders: dict[str, list[int]] = {}
            for i, piece in enumerate(self._pieces):
                for ch in set(piece):
                    holders.setdefault(ch, []).append(i)
            self._by_char = {ch: np.array(ids, np.int64) for ch, ids in holders.items()}
        return self._by_char

    def __call__(self, stops: tuple[str, ...]) -> np.ndarray | None:
        index = self._index()
        found = [index[s[-1]] for s in stops if s[-1] in index]
        ids = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)  # sorted
        return ids if len(ids) <= MAX_SHARE * len(self._pieces) else None


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
