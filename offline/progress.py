"""Progress of a long sampling job: samples/s, tokens/s and ETA.

On a terminal one line is redrawn in place a few times a second; anywhere else (a log file, a
pipe, CI) a plain line is printed every `interval` seconds, so a log of a day-long run stays small.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    def __init__(self, total: int, already: int = 0, stream: TextIO = sys.stderr, interval: float | None = None,
                 enabled: bool = True):
        self.total, self.already = total, already  # `already`: finished by an earlier run (resume)
        self.samples = self.tokens = 0
        self.stream, self.enabled = stream, enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.t0 = self._last = time.monotonic()

    def update(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.t0, 1e-9)
        done = self.already + self.samples
        rate = self.samples / elapsed
        left = self.total - done
        eta = _duration(left / rate) if rate > 0 else "?"
        pct = f" ({done / self.total:.1%})" if self.total else ""
        return (f"{done:,}/{self.total:,} samples{pct}  {rate:,.0f} samples/s  "
                f"{self.tokens / elapsed:,.0f} tokens/s  elapsed {_duration(elapsed)}  ETA {eta}")

    def _show(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line(now))
        else:
            self.stream.write("lstmgen sample: " + self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._show(time.monotonic())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
