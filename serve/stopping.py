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
    """`pending`: text an earlier generation held back (a continued state's), matched and released
    as if generated first. `hold_at_length`: at max_new_tokens keep the held-back tail (`pending`)
    instead of releasing it, because the state carries it on to a continuation."""

    def __init__(self, max_new_tokens: int, stop: tuple[str, ...] = (), eot_id: int | None = None,
                 pending: str = "", hold_at_length: bool = False):
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self.eot_id = eot_id
        self.hold_at_length = hold_at_length
        self.generated = 0
        self.matched: str = ""  # the stop sequence that ended generation
        self._text = pending  # all generated text (needed only with stop sequences)
        self._sent = 0  # chars of _text already released

    @property
    def pending(self) -> str:
        """Generated text not released yet (the tail that may begin a stop sequence)."""
        return self._text[self._sent:]

    def add(self, token_id: int, piece: str) -> tuple[str, FinishReason | None]:
        self.generated += 1
        if token_id == self.eot_id:
            return self._flush(), FinishReason.END_OF_TEXT
        if not self.stop:  # fast path: release every piece at once
            done = self.generated >= self.max_new_tokens
            if self._text:  # a continued state's held-back text goes out first
                piece, self._text = self._text + piece, ""
            return piece, FinishReason.LENGTH if done else None
        self._text += piece
        hit = self._find_stop(len(piece))
        if hit is not None:
            idx, seq = hit
            out, self._sent, self.matched = self._text[self._sent:idx], idx, seq
            return out, FinishReason.STOP_SEQUENCE
        safe = len(self._text) - self._held_back()
        if self.generated >= self.max_new_tokens:
            return (self._release(safe) if self.hold_at_length else self._flush()), FinishReason.LENGTH
        return self._release(safe), None

    def _release(self, upto: int) -> str:
        out, self._sent = self._text[self._sent:upto], max(self._sent, upto)
        return out

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
