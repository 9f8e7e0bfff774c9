"""Ctrl-C (SIGINT) and SIGTERM during training: finish the update under way, save last.pt, stop.

While the loop runs, both signals only raise a flag that it reads after every update (validation
after every chunk), so the weights, the optimizer and the LSTM state are never caught half-way and
last.pt can hold the exact point a resumed run starts from. Before the loop (reading the corpus)
and at a second signal they interrupt at once, as Python's default Ctrl-C does. A repeat within
REPEAT_S of the first is the same one delivered twice (a terminal signals the whole process group,
and torchrun forwards it to its workers again), not a second Ctrl-C.

Handlers are installed from the main thread only (Python delivers signals there); elsewhere the
run simply cannot be signalled, as before.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as a shell reports it
REPEAT_S = 0.5


class TrainInterrupted(KeyboardInterrupt):
    """Training stopped by a signal. `checkpoint`: the last.pt saved at `step`; None when no
    update had finished (nothing to save). A KeyboardInterrupt, so code that catches Ctrl-C still does."""

    def __init__(self, signal_name: str, step: int = 0, checkpoint: Path | None = None):
        super().__init__(signal_name)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class StopSignals:
    """`with StopSignals() as s:` installs the handlers and restores the previous ones after;
    `with s.deferred():` marks the stretch where a signal only sets `s.received`."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name, once one came while deferred
        self._received_at = 0.0
        self._deferring = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; the default is closest
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator["StopSignals"]:
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    def _handle(self, signum: int, frame) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if self._deferring and self.received is None:
            self.received, self._received_at = name, now  # the loop stops after this update and saves
            return
        if self._deferring and now - self._received_at < REPEAT_S:
            return  # the first signal again, by another route
        raise TrainInterrupted(name)  # nothing to finish first, or asked twice: stop now
