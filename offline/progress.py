"""Progress of a long sampling job: samples, tokens, their rates and the ETA.

On a terminal one line is redrawn in place a few times a second; anywhere else (a log file, a
pipe, CI) a plain line is printed every `interval` seconds, so a log of a day-long run stays small.
A long sample finishes only at its end, so tokens are counted as they are made (the scheduler's
counter, unfinished samples included), and the ETA is the tokens this run still may make (the
max_new_tokens of its samples, less what they made or gave up by stopping early) over the token
rate of this run alone: samples an earlier run finished before --resume take no time here.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def _duration(s: float) -> str:
    if s < 10:
        return f"{s:.1f}s"  # a short run's ETA: "0s" would say it is over
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _rate(x: float) -> str:
    return f"{x:,.1f}" if x < 10 else f"{x:,.0f}"  # 0.4 samples/s is not "0"


class Progress:
    def __init__(self, total: int, already: int = 0, stream: TextIO = sys.stderr, interval: float | None = None,
                 enabled: bool = True, budget: int | None = None):
        self.total, self.already = total, already  # `already`: finished by an earlier run (resume)
        # tokens this run may make: the max_new_tokens of its samples (None: unknown, ETA by samples)
        self.budget = budget
        self.samples = 0
        self._finished_tokens = self._live_tokens = 0
        self._first: tuple[float, int] | None = None  # (time, tokens) when tokens were first seen
        self.stream, self.enabled = stream, enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.t0 = self._last = time.monotonic()

    @property
    def tokens(self) -> int:
        """Tokens made by this run, those of unfinished samples included once `generated` is fed."""
        return max(self._live_tokens, self._finished_tokens)

    def update(self, samples: int, tokens: int, unused: int = 0) -> None:
        """`samples` finished (or were given up, samples=0) with `tokens` made; `unused`: the part of
        their max_new_tokens they did not make (stopped early, failed), which no longer lies ahead."""
        self.samples += samples
        self._finished_tokens += tokens
        if self.budget is not None:
            self.budget -= unused
        self._maybe_show()

    def generated(self, tokens: int) -> None:
        """The scheduler's count of tokens made in this run, unfinished samples included."""
        self._live_tokens = tokens
        self._maybe_show()

    def follow(self, generated: Callable[[], int]) -> Callable[[], float]:
        """A callable for the sampling loop's idle time (serve/completion.py): it feeds `generated()`
        (the scheduler's token count) when a line is due, so lines come on their interval even while
        no sample finishes, and says how long until the next one."""
        def tick() -> float:
            if not self.enabled:
                return 3600.0
            if time.monotonic() >= self._last + self.interval:
                self.generated(generated())
            # a hair past the due time: a timer may fire a little early, and the line would wait a whole interval
            return max(self._last + self.interval - time.monotonic(), 0.0) + 0.001
        return tick

    def _maybe_show(self) -> None:
        now = time.monotonic()
        if self._first is None and self.tokens:
            self._first = (now, self.tokens)
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._show(now)

    def eta(self, now: float) -> float | None:
        """Seconds left at this run's rate, or None before there is a rate."""
        if self.budget is None:
            rate, left = self.samples / max(now - self.t0, 1e-9), self.total - self.already - self.samples
        else:
            # the rate since tokens first came: the engine's warm-up and the first prompts'
            # prefill are paid once, and would make the first minutes' ETA far too long
            t, n = self._first or (now, self.tokens)
            rate, left = (self.tokens - n) / max(now - t, 1e-9), max(self.budget - self.tokens, 0)
        return left / rate if rate > 0 else (0.0 if left <= 0 else None)

    def line(self, now: float | None = None) -> str:
        now = now or time.monotonic()
        elapsed = max(now - self.t0, 1e-9)
        done = self.already + self.samples
        eta = self.eta(now)
        pct = f" ({done / self.total:.1%})" if self.total else ""
        return (f"{done:,}/{self.total:,} samples{pct}  {self.tokens:,} tokens  {_rate(self.samples / elapsed)} "
                f"samples/s  {self.tokens / elapsed:,.0f} tokens/s  elapsed {_duration(elapsed)}  "
                f"ETA {'?' if eta is None else _duration(eta)}")

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
