"""Frame models served frame by frame: the frames of many streams share one model step.

Each stream (one client's sequence) owns its state tensors (each [L, H]) and a queue of frames not
run yet. Each iteration the worker thread takes up to `frames_per_step` pending frames of every
stream that has any (a stream with none waits without holding anyone up), pads them into x
[B, T, D_in], gathers the rows' states into [L, B, H], runs ONE call of the whole-sequence graph
(the step graph when T is 1), scatters the new states back and hands each stream its outputs.
Streams join and leave between calls; the event loop never blocks on the model. A live source
sending a frame at a time gets one step per frame; a client sending a recording catches up in
calls of many frames instead of one call per frame (measured in docs/results.md).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lstmgen.serve.errors import GenerationError, InvalidRequest, Overloaded, StepFailed, Unavailable

log = logging.getLogger("lstmgen.frames")


@dataclass(frozen=True)
class FrameLimits:
    max_streams: int = 512  # streams open at once; more get RESOURCE_EXHAUSTED
    max_frames_per_message: int = 1024
    max_pending_frames: int = 4096  # per stream: past this the edge stops reading (gRPC flow control)
    # Per stream: outputs the client has not read yet. At this many the row is not stepped, so its
    # frames pile up to max_pending_frames and the edge stops reading its input: a client that sends
    # and never reads holds both buffers, no more.
    max_pending_outputs: int = 4096
    frames_per_step: int = 64  # most frames of one stream in one model call
    idle_timeout_s: float = 300.0  # a stream whose client neither sends nor reads this long ends; 0: never


@dataclass(frozen=True)
class FrameSpecView:
    """What the scheduler needs to know of a frame model (from the manifest)."""

    task: str  # "regression" | "classification"
    input_size: int
    output_size: int
    mean: np.ndarray | None = None  # "global" standardisation: x -> (x - mean) / std, per feature
    std: np.ndarray | None = None


@dataclass(frozen=True)
class FrameOutput:
    values: np.ndarray  # float32 [n, D_out]: one row per frame, in order
    frames_total: int  # frames of this stream processed so far
    finished: bool = False


class FrameStream:
    """One client's sequence. The edge feeds frames (event loop); the worker runs them; the edge
    reads the outputs as they come."""

    def __init__(self, state: tuple[np.ndarray, ...], final_only: bool, frames_before: int = 0,
                 max_outputs: int = FrameLimits.max_pending_outputs):
        self.state = state  # the worker's while frames run; the edge's once the stream is drained
        self.final_only = final_only
        self.max_outputs = max_outputs
        self._lock = threading.Lock()
        self._pending: deque[np.ndarray] = deque()  # chunks of frames [n, D_in] not run yet; guarded by _lock
        self._n_pending = 0  # frames in _pending
        self._running = 0  # frames taken by the worker whose output is not in yet; guarded by _lock
        self._input_done = False  # the client half-closed; guarded by _lock
        self._outputs: deque[np.ndarray] = deque()  # output chunks [n, D_out] not read yet; guarded by _lock
        self._n_outputs = 0  # rows in _outputs
        self._last: np.ndarray | None = None  # final_only: the newest output row
        self._error: GenerationError | None = None
        self._total = frames_before  # frames read, those before a continued state included
        self._ended = False
        self.cancelled = False
        self._ready = asyncio.Event()  # event-loop side: outputs, an error, or the end
        self._room = asyncio.Event()  # event-loop side: the pending queue has room again
        self._room.set()

    # -- worker thread --------------------------------------------------------------------------
    def take_frames(self, most: int) -> np.ndarray | None:
        """Up to `most` of the oldest pending frames [n, D_in] (fewer if the unread outputs would
        pass their cap), or None."""
        with self._lock:
            most = min(most, self._output_room())
            if not self._pending or most <= 0:
                return None
            taken = _take(self._pending, most)
            n = len(taken)
            self._n_pending -= n
            self._running += n
            return taken

    def add_outputs(self, rows: np.ndarray) -> None:
        """The outputs [n, D_out] of the n frames taken last, in order."""
        with self._lock:
            self._running -= len(rows)
            self._total += len(rows)
            if self.final_only:
                self._last = rows[-1]
            else:
                self._outputs.append(rows)
                self._n_outputs += len(rows)

    @property
    def drained(self) -> bool:
        """Input closed and every frame run: the stream's last output can go."""
        with self._lock:
            return self._input_done and not self._pending and not self._running

    def fail(self, error: GenerationError) -> None:
        with self._lock:
            self._error = self._error or error
            self._pending.clear()  # nothing more runs for a failed stream
            self._n_pending = self._running = 0

    def runnable(self) -> bool:
        """Frames to run and room for their outputs, or an end to announce (worker thread, under
        the scheduler's lock)."""
        if self.cancelled or self._error is not None:
            return False
        if self._pending:
            return self._output_room() > 0
        return self._input_done and not self._ended

    def _output_room(self) -> int:
        """Outputs the worker may still add before the client reads (under _lock)."""
        if self.final_only:  # keeps only its newest output row
            return self.max_outputs
        return self.max_outputs - self._n_outputs - self._running

    # -- event loop -----------------------------------------------------------------------------
    def pending(self) -> int:
        with self._lock:
            return self._n_pending

    async def wait_ready(self) -> None:
        """Until the worker has new output, an error or the end for this stream."""
        await self._ready.wait()
        self._ready.clear()

    async def wait_room(self) -> None:
        """Until the stream's pending frames are below the limit (the edge may read on)."""
        await self._room.wait()

    def wake(self) -> None:
        """Event loop: make the reader look again (an error or a broken input was recorded)."""
        self._ready.set()

    def next_output(self, most: int) -> tuple[FrameOutput | None, bool]:
        """Up to `most` of the outputs computed since the last read (raises the stream's error), or
        None: nothing yet; and whether the read gave room to a row held back by its unread outputs."""
        with self._lock:
            if self._error is not None:
                raise self._error
            held = bool(self._pending) and self._output_room() <= 0
            values = _take(self._outputs, most) if self._outputs else None
            n = 0 if values is None else len(values)
            self._n_outputs -= n
            done = self._input_done and not self._pending and not self._running and not self._outputs
            if self.final_only and done and self._last is not None:
                values = self._last[None]
            if values is None and not done:
                return None, False
            if values is None:
                values = np.zeros((0, 0), np.float32)
            return FrameOutput(values, self._total - self._n_outputs, done), held and n > 0


class FrameScheduler:
    def __init__(self, engine, spec: FrameSpecView, limits: FrameLimits = FrameLimits(),
                 on_fatal: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.spec = spec
        self.limits = limits
        self.on_fatal = on_fatal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cv = threading.Condition()
        self._streams: list[FrameStream] = []  # open streams; guarded by _cv
        self._accepting = True
        self._closing = False
        self._thread: threading.Thread | None = None
        self._abort_message = "server stopped before this stream finished"
        self.steps = self.frames = 0

    # -- lifecycle (event loop) -------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lstmgen-frames", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    @property
    def open_streams(self) -> int:
        with self._cv:
            return len(self._streams)

    async def drain(self, timeout: float) -> bool:
        """Wait until every open stream has ended; False if the time ran out."""
        deadline = time.monotonic() + timeout
        while self.open_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.open_streams == 0

    async def close(self, message: str | None = None) -> None:
        """Stop the worker; streams still open end with UNAVAILABLE and `message`."""
        self._abort_message = message or self._abort_message
        with self._cv:
            self._accepting, self._closing = False, True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # -- the edge (event loop) ---------------------------------------------------------------------
    def open(self, final_only: bool = False, state: tuple[tuple[np.ndarray, ...], int] | None = None) -> FrameStream:
        """A new stream, from the empty state or from `state` (tensors, frames read before)."""
        if final_only and self.spec.task != "classification":
            raise InvalidRequest("options.final_only", "is only for classification models; this one does "
                                                       f"{self.spec.task}")
        tensors, before = state if state is not None else (self.engine.zeros_row(), 0)
        stream = FrameStream(tensors, final_only, before, self.limits.max_pending_outputs)
        with self._cv:
            if not self._accepting:
                raise Unavailable("server is shutting down; not accepting new streams")
            if len(self._streams) >= self.limits.max_streams:
                raise Overloaded(f"{len(self._streams)} frame streams open; the limit is {self.limits.max_streams}; "
                                 "retry later")
            self._streams.append(stream)
        return stream

    def check_frames(self, values, n_seen: int) -> np.ndarray:
        """A message's floats -> frames [n, D_in], standardised as the model was trained; the
        errors name the problem and the frame (counted from the stream's start)."""
        d = self.spec.input_size
        x = np.asarray(values, dtype=np.float32)
        if x.size % d:
            raise InvalidRequest("values", f"holds {x.size} floats, not a whole number of frames of input_size {d}")
        x = x.reshape(-1, d)  # [n, D_in]
        if len(x) > self.limits.max_frames_per_message:
            raise InvalidRequest("values", f"holds {len(x)} frames; allowed 0..{self.limits.max_frames_per_message} "
                                           "per message")
        bad = ~np.isfinite(x)
        if bad.any():
            i, j = map(int, np.argwhere(bad)[0])
            raise InvalidRequest("values", f"frame {n_seen + i} holds a non-finite value ({x[i, j]}) at feature {j}")
        if self.spec.mean is not None:
            x = (x - self.spec.mean) / self.spec.std
        return x

    def feed(self, stream: FrameStream, frames: np.ndarray) -> None:
        with stream._lock:
            stream._pending.append(frames)
            stream._n_pending += len(frames)
            if stream._n_pending >= self.limits.max_pending_frames:
                stream._room.clear()
        with self._cv:
            self._cv.notify()

    def end_input(self, stream: FrameStream) -> None:
        with stream._lock:
            stream._input_done = True
        with self._cv:
            self._cv.notify()

    def read(self, stream: FrameStream) -> FrameOutput | None:
        """The stream's next outputs, at most a message's worth; a row held back by its unread
        outputs is stepped again once the client reads them."""
        out, freed = stream.next_output(self.limits.max_frames_per_message)
        if freed:
            with self._cv:
                self._cv.notify()
        return out

    def release(self, stream: FrameStream) -> None:
        """The edge is done with the stream (ended, failed or cancelled): its row goes."""
        stream.cancelled = True
        with self._cv:
            if stream in self._streams:
                self._streams.remove(stream)

    # -- the worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closing and not any(s.runnable() for s in self._streams):
                        self._cv.wait()
                    if self._closing:
                        break
                    streams = list(self._streams)
                self._iterate(streams)
        except BaseException as e:  # the loop itself broke: every stream ends, the server stops
            log.critical("frame worker failed and cannot go on", exc_info=e)
            self._abort(Unavailable("the server's frame worker failed; retry on another server"))
            if self.on_fatal is not None and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.on_fatal, e)
            return
        self._abort(Unavailable(self._abort_message))

    def _iterate(self, streams: list[FrameStream]) -> None:
        rows, frames = [], []
        for s in streams:
            if s.cancelled:
                continue
            x = s.take_frames(self.limits.frames_per_step)
            if x is not None:
                rows.append(s)
                frames.append(x)
        woken = set()
        if rows:
            try:
                self._step(rows, frames)
            except Exception as e:  # only these rows fail; the others go on
                log.exception("frame step failed for %d stream(s); ending them", len(rows))
                for s in rows:
                    s.fail(StepFailed(f"model step failed: {type(e).__name__}: {e}"))
            woken.update(rows)
        for s in streams:  # a stream whose input ended and whose frames all ran: its end can go
            if not s._ended and s.drained:
                s._ended = True
                woken.add(s)
        self._wake(woken)

    def _step(self, rows: list[FrameStream], frames: list[np.ndarray]) -> None:
        """Each stream's frames [n_i, D_in] -> its outputs [n_i, D_out], its state n_i frames on."""
        state = tuple(np.stack([s.state[k] for s in rows], axis=1)  # each [L, B, H]
                      for k in range(len(rows[0].state)))
        lengths = np.array([len(f) for f in frames])  # [B]
        t = int(lengths.max())
        x = np.zeros((len(rows), t, self.spec.input_size), np.float32)  # [B, T, D_in] right-padded
        for i, f in enumerate(frames):
            x[i, : len(f)] = f
        y, new = self.engine.run(x, lengths, state)  # [B, T, D_out]
        # copies: a view would keep the whole batch's y alive while one stream's outputs wait unread
        outs = [y[i, :n].copy() for i, n in enumerate(lengths.tolist())]
        if not all(np.isfinite(o).all() for o in outs):
            raise FloatingPointError("the model produced non-finite outputs")
        self.steps += 1
        self.frames += int(lengths.sum())
        refilled = []
        for i, s in enumerate(rows):
            s.state = tuple(np.ascontiguousarray(t_[:, i]) for t_ in new)
            s.add_outputs(outs[i])
            if not s._room.is_set() and s.pending() < self.limits.max_pending_frames:
                refilled.append(s._room)  # the edge may read the client's next message again
        if refilled:
            self._loop.call_soon_threadsafe(_set_all, refilled)

    def _wake(self, streams) -> None:
        if streams and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_set_all, [s._ready for s in streams])

    def _abort(self, error: GenerationError) -> None:
        with self._cv:
            streams = list(self._streams)
        for s in streams:
            s.fail(error)
        self._wake(streams)


def _take(chunks: deque[np.ndarray], most: int) -> np.ndarray:
    """Up to `most` rows from the front of a non-empty queue of chunks [n, D]; a chunk split in
    two leaves its rest first in line."""
    taken, n = [], 0
    while chunks and n < most:
        chunk = chunks.popleft()
        if n + len(chunk) > most:
            chunks.appendleft(chunk[most - n:])
            chunk = chunk[: most - n]
        taken.append(chunk)
        n += len(chunk)
    return taken[0] if len(taken) == 1 else np.concatenate(taken)


def _set_all(events: list[asyncio.Event]) -> None:
    for e in events:
        e.set()
