"""The worker thread every kind of model shares: lifecycle, the wait for work, the fatal path.

A worker owns one model and its rows on one thread; the event loop (or a caller without one) hands
it work under `_cv` and never blocks on the model. A kind of model (text: serve/scheduler.py,
frames: serve/frame_scheduler.py) says when it has work, takes what arrived, runs one iteration, and ends
everything it holds with an error when it must stop.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

from lstmgen.serve.errors import GenerationError, Unavailable

log = logging.getLogger("lstmgen.scheduler")


class Worker:
    thread_name = "lstmgen-worker"
    what = "worker"  # in the log line and the error of a worker that cannot go on

    def __init__(self, on_fatal: Callable[[BaseException], None] | None = None):
        self.on_fatal = on_fatal  # called on the event loop (or the worker, without one) if the worker cannot go on
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cv = threading.Condition()
        self._accepting = True  # guarded by _cv, as is _closing
        self._closing = False
        self._thread: threading.Thread | None = None
        self._abort_message = "server stopped before this stream finished"

    # -- what a kind of model says -------------------------------------------------------------------
    @property
    def open_streams(self) -> int:
        """Streams accepted and not yet done with by their reader."""
        raise NotImplementedError

    def _has_work(self) -> bool:
        """Under _cv: something arrived or something runs."""
        raise NotImplementedError

    def _take_incoming(self) -> None:
        """Under _cv: move what the other threads handed in to the worker's own lists."""

    def _iterate(self) -> None:
        """One iteration on the worker thread (outside _cv)."""
        raise NotImplementedError

    def _abort_all(self, error: GenerationError) -> None:
        """End everything held with `error` (the worker stops)."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread; from an event loop, its readers are woken there."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    @property
    def accepting(self) -> bool:
        with self._cv:
            return self._accepting

    async def drain(self, timeout: float) -> bool:
        """Wait until every accepted stream has been read to its end (generating is not enough:
        a slow reader gets the whole `timeout` to take its output); False if the time ran out."""
        deadline = time.monotonic() + timeout
        while self.open_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.open_streams == 0

    async def close(self, message: str | None = None) -> None:
        """Stop the worker; streams still running end with UNAVAILABLE and `message`."""
        await asyncio.to_thread(self.shutdown, message)

    def shutdown(self, message: str | None = None) -> None:
        """close() for callers without an event loop."""
        if message:
            self._abort_message = message
        with self._cv:
            self._accepting = False
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def _refusing(self) -> Unavailable | None:
        """Under _cv: the error a new stream gets while the worker stops."""
        return None if self._accepting else Unavailable("server is shutting down; not accepting new streams")

    # -- failure isolation -------------------------------------------------------------------------------
    def _isolated(self, rows: list, what: str, part: Callable[[], None]) -> None:
        """Run one part of an iteration (model call, sampling, stop checks, delivery). If anything
        in it raises, only `rows` end (INTERNAL, one log line with their ids) and the loop goes on;
        a failure here that cannot be contained ends the worker (`_run`)."""
        error = self._tried(part)
        if error is not None:
            self._end(rows, what, error)

    @staticmethod
    def _tried(part: Callable[[], None]) -> Exception | None:
        try:
            part()
        except Exception as e:
            return e
        return None

    def _end(self, rows: list, what: str, error: Exception) -> None:
        """`rows` end after `error` in a part of the iteration."""
        raise NotImplementedError

    def _charged(self, rows: list, what: str, part: Callable[[list], None]) -> None:
        """`_isolated` for a part that brings `rows` into a shared call (prefill, joining the pool),
        where one request's value can fail the call for all. On a failure the rows are tried in
        halves and the failing half is split again, so the failure ends only the request that
        caused it (about 2 log2(N) calls); when both halves fail the cause is shared (a model that
        cannot run), and the group ends at once. `part` changes nothing before it can fail (it
        builds, then commits), so a retry starts from where the first try did."""
        error = self._tried(lambda: part(rows))
        while error is not None and len(rows) > 1:
            half = len(rows) // 2
            first, second = rows[:half], rows[half:]
            e1 = self._tried(lambda: part(first))
            e2 = self._tried(lambda: part(second))
            if e1 is not None and e2 is not None:
                break  # both halves: not one request's value
            rows, error = (first, e1) if e1 is not None else (second, e2)
        if error is not None:
            self._end(rows, what, error)

    # -- the thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._closing or self._has_work()):
                        self._cv.wait()
                    if self._closing:
                        break
                    self._take_incoming()
                self._iterate()
        except BaseException as e:  # not one iteration's rows: the loop itself broke
            self._die(e)
            return
        self._abort_all(Unavailable(self._abort_message))

    def _die(self, error: BaseException) -> None:
        """The worker cannot go on: refuse new streams, end every held one with UNAVAILABLE and
        tell the server (`on_fatal`), which turns NOT_SERVING and exits non-zero."""
        log.critical("%s failed and cannot go on; ending every stream", self.what, exc_info=error)
        with self._cv:
            self._accepting = False
        try:
            self._abort_all(Unavailable(f"the server's {self.what} failed; retry on another server"))
        finally:
            if self.on_fatal is not None:
                self._on_loop(self.on_fatal, error)

    def _on_loop(self, fn: Callable, *args) -> None:
        """Call fn on the event loop (now, on this thread, without one)."""
        if self._loop is None:
            fn(*args)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)
