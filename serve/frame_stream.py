"""One frame stream: the frames a client sent and the model has not run yet, and the outputs it
has not read yet, each bounded (serve/frame_scheduler.py runs them)."""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lstmgen.config_args import option
from lstmgen.serve.errors import GenerationError


@dataclass(frozen=True)
class FrameLimits:
    """A frame model's streams (`lstmgen serve` flags --frame-*; max_streams is --max-concurrent)."""

    max_streams: int = 512  # streams open at once; more get RESOURCE_EXHAUSTED
    max_frames_per_message: int = option(1024, "frame models: most frames in one message (more: INVALID_ARGUMENT)",
                                         flag="--frame-max-per-message")
    # per stream: past this the edge stops reading (gRPC flow control)
    max_pending_frames: int = option(4096, "frame models: frames a stream holds unread by the model before "
                                           "the server stops reading its input", flag="--frame-max-pending")
    # Per stream: outputs the client has not read yet. At this many the row is not stepped, so its
    # frames pile up to max_pending_frames and the edge stops reading its input: a client that sends
    # and never reads holds both buffers, no more.
    max_pending_outputs: int = option(4096, "frame models: outputs a stream holds unread by its client before "
                                            "its row stops stepping", flag="--frame-max-unread")
    frames_per_step: int = option(64, "frame models: most frames of one stream in one model call",
                                  flag="--frame-per-step")
    # a stream whose client neither sends nor reads this long ends; 0: never
    idle_timeout_s: float = option(
        300.0, "frame models: end a stream whose client has neither sent a frame nor read an output for this "
               "long, with DEADLINE_EXCEEDED, freeing its slot (0: never)", flag="--frame-idle-timeout",
        metavar="SECONDS")


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
        # Each [L, H]: the state it starts from; while it runs, its row of the worker's pool holds
        # it, and the worker writes the final one back when the stream has drained.
        self.state = state
        self.slot = -1  # its row in the worker's pool (serve/pool.py), -1 when it holds none
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

    def end(self, final_state: Callable[[], tuple[np.ndarray, ...]]) -> bool:
        """Worker: True once, when the input has ended and every frame has run; the stream then
        takes its final state (each [L, H]) and its reader may see the end (not before: the
        state must be in place when the edge reads it)."""
        with self._lock:
            if self._ended or not (self._input_done and not self._pending and not self._running):
                return False
            self.state = final_state()
            self._ended = True
            return True

    def room_to_announce(self, max_pending: int) -> asyncio.Event | None:
        """Worker: the edge's room event, when it is clear and the pending frames fell below the
        limit (the event loop sets it: the edge may read the client's next message)."""
        with self._lock:
            return self._room if not self._room.is_set() and self._n_pending < max_pending else None

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

    # -- event loop -------------------------------------------------------------------------------
    def feed(self, frames: np.ndarray, max_pending: int) -> None:
        """Frames [n, D_in] to run; past `max_pending` the edge waits for room (wait_room)."""
        with self._lock:
            self._pending.append(frames)
            self._n_pending += len(frames)
            if self._n_pending >= max_pending:
                self._room.clear()

    def end_input(self) -> None:
        with self._lock:
            self._input_done = True

    # -- event loop, reading -----------------------------------------------------------------------------
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
            done = self._ended and not self._outputs  # the worker saw it drained and wrote its state
            if self.final_only and done and self._last is not None:
                values = self._last[None]
            if values is None and not done:
                return None, False
            if values is None:
                values = np.zeros((0, 0), np.float32)
            return FrameOutput(values, self._total - self._n_outputs, done), held and n > 0


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
