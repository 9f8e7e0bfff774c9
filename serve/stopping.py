"""Stopping criteria and the text a stream may release so far.

`StopChecker.add` returns `(text_to_send, reason)`: generated text is held back while its tail
could still become a stop sequence, so a client never receives part of a stop string. Stop
strings are matched literally (never as patterns).
"""
from __future__ import annotations

import enum


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    END_OF_TEXT = "end_of_text"


class StopChecker:
    def __init__(self, max_new_tokens: int, stop: tuple[str, ...] = (), eot_id: int | None = None):
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self.eot_id = eot_id
        self.generated = 0
        self.matched: str = ""  # the stop sequence that ended generation
        self._text = ""  # all generated text (needed only with stop sequences)
        self._sent = 0  # chars of _text already released

    def add(self, token_id: int, piece: str) -> tuple[str, FinishReason | None]:
        self.generated += 1
        if token_id == self.eot_id:
            return self._flush(), FinishReason.END_OF_TEXT
        if not self.stop:  # fast path: release every piece at once
            done = self.generated >= self.max_new_tokens
            return piece, FinishReason.LENGTH if done else None
        self._text += piece
        hit = self._find_stop(len(piece))
        if hit is not None:
            idx, seq = hit
            out, self._sent, self.matched = self._text[self._sent:idx], idx, seq
            return out, FinishReason.STOP_SEQUENCE
        if self.generated >= self.max_new_tokens:
            return self._flush(), FinishReason.LENGTH
        safe = len(self._text) - self._held_back()
        out, self._sent = self._text[self._sent:safe], max(self._sent, safe)
        return out, None

    def _flush(self) -> str:
        out, self._sent = self._text[self._sent:], len(self._text)
        return out

    def _find_stop(self, new_chars: int) -> tuple[int, str] | None:
        """Earliest stop sequence ending inside the newest piece."""
        best: tuple[int, str] | None = None
        for seq in self.stop:
            start = max(0, len(self._text) - new_chars - len(seq) + 1)
            idx = self._text.find(seq, start)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, seq)
        return best

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        tail = self._text[self._sent:]
        for n in range(min(len(tail), max(len(s) for s in self.stop) - 1), 0, -1):
            end = tail[-n:]
            if any(s.startswith(end) for s in self.stop):
                return n
        return 0
