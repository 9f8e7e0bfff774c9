"""`--max-seconds`: one session's wall time, validation and saving included.

Training stops when what is left only just holds the validation pass and the saves that follow a
stop, so the session ends close to the limit rather than a whole validation past it. The pass is
estimated before the first update (a timed chunk or two) and measured at every validation; a pass
that would take more than VALID_SHARE of the limit reads a prefix of the validation streams
instead, the same one at every validation, so the figures still compare. As a backstop a pass that
overruns its estimate is cut GRACE_S past the limit (a loaded machine, a slow first save).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

VALID_SHARE = 0.25
GRACE_S = 1.0


@dataclass
class TimeBudget:
    seconds: float  # the limit; 0: none
    t0: float  # when the session's training started (time.monotonic())
    valid_s: float = 0.0  # a validation pass as planned
    save_s: float = 1.0  # saving and plotting after a validation; measured once one has run

    @property
    def deadline(self) -> float:
        return self.t0 + self.seconds if self.seconds else math.inf

    def spent(self) -> float:
        return time.monotonic() - self.t0

    def time_to_stop(self) -> bool:
        """True once the time left holds no more than the closing validation and saves."""
        return bool(self.seconds) and self.deadline - time.monotonic() <= self.valid_s + self.save_s

    def overrun(self) -> bool:
        """True once a validation (or the test pass) must stop short to keep to the limit."""
        return time.monotonic() > self.deadline + GRACE_S


def plan_validation(chunks: int, chunk_s: float, seconds: float) -> int:
    """How many of a validation pass's `chunks` (each `chunk_s` long) fit in its share of the limit;
    all of them without a limit."""
    if not seconds or chunks * chunk_s <= VALID_SHARE * seconds:
        return chunks
    return max(1, min(chunks, int(VALID_SHARE * seconds / max(chunk_s, 1e-9))))
