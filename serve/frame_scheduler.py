"""Frame models served frame by frame: the frames of many streams share one model step.

Each stream (one client's sequence, serve/frame_stream.py) holds a row of the worker's pool of
state tensors (serve/pool.py, as text rows do) and a queue of frames not run yet. Each iteration
the worker takes up to `frames_per_step` pending frames of every stream that has any (a stream with
none keeps its row and holds nobody up), pads them into x [B, T, D_in], runs ONE call of the
whole-sequence graph (the step graph when T is 1) over those rows' states, writes the new states
back and hands each stream its outputs. When every row has frames, the pool's own arrays are the
call's input, with nothing gathered. Streams join and leave between calls, one row each; the event
loop never blocks on the model. A live source sending a frame at a time gets one step per frame; a
client sending a recording catches up in calls of many frames instead of one call per frame.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from lstmgen.serve.errors import GenerationError, InvalidRequest, Overloaded, StepFailed
from lstmgen.serve.frame_stream import FrameLimits, FrameOutput, FrameSpecView, FrameStream
from lstmgen.serve.pool import RowPool
from lstmgen.serve.worker import Worker

log = logging.getLogger("lstmgen.frames")

__all__ = ["FrameLimits", "FrameOutput", "FrameScheduler", "FrameSpecView", "FrameStream"]


class FrameScheduler(Worker):
    thread_name, what = "lstmgen-frames", "frame worker"

    def __init__(self, engine, spec: FrameSpecView, limits: FrameLimits = FrameLimits(),
                 on_fatal: Callable[[BaseException], None] | None = None):
        super().__init__(on_fatal)
        self.engine = engine
        self.spec = spec
        self.limits = limits
        self._streams: list[FrameStream] = []  # open streams; guarded by _cv
        self._incoming: list[FrameStream] = []  # opened, not yet in the pool; guarded by _cv
        self._pool = RowPool(engine.state_shapes, {}, limits.max_streams)  # the worker's
        self.steps = self.frames = 0

    @property
    def open_streams(self) -> int:
        with self._cv:
            return len(self._streams)

    # -- the edge (event loop) ---------------------------------------------------------------------
    def open(self, final_only: bool = False, state: tuple[tuple[np.ndarray, ...], int] | None = None) -> FrameStream:
        """A new stream, from the empty state or from `state` (tensors, frames read before)."""
        if final_only and self.spec.task != "classification":
            raise InvalidRequest("options.final_only", "is only for classification models; this one does "
                                                       f"{self.spec.task}")
        tensors, before = state if state is not None else (self.engine.zeros_row(), 0)
        stream = FrameStream(tensors, final_only, before, self.limits.max_pending_outputs)
        with self._cv:
            if (refused := self._refusing()) is not None:
                raise refused
            if len(self._streams) >= self.limits.max_streams:
                raise Overloaded(f"{len(self._streams)} frame streams open; the limit is {self.limits.max_streams}; "
                                 "retry later")
            self._streams.append(stream)
            self._incoming.append(stream)
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
        stream.feed(frames, self.limits.max_pending_frames)
        with self._cv:
            self._cv.notify()

    def end_input(self, stream: FrameStream) -> None:
        stream.end_input()
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
            self._cv.notify()

    # -- the worker thread ----------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._incoming) or any(s.runnable() or s.cancelled for s in self._pool.owners)

    def _take_incoming(self) -> None:
        self._drop_cancelled()  # first: a released stream's row is what a new stream may take
        streams, self._incoming = [s for s in self._incoming if not s.cancelled], []
        if streams:  # one row each; open() keeps the open streams (rows or not) to the pool's size
            self._pool.add(streams, tuple(np.stack([s.state[k] for s in streams], axis=1)  # each [L, R, H]
                                          for k in range(len(self.engine.state_shapes))))

    def _drop_cancelled(self) -> None:
        gone = [s.slot for s in self._pool.owners if s.cancelled]
        if gone:
            self._pool.remove(gone)

    def _iterate(self) -> None:
        pool = self._pool
        self._drop_cancelled()
        rows, frames = [], []
        for s in pool.owners:  # slot order: when every row runs, the pool's arrays are the input as they are
            x = s.take_frames(self.limits.frames_per_step)
            if x is not None:
                rows.append(s)
                frames.append(x)
        woken = set()
        if rows:
            self._isolated(rows, "frame step", lambda: self._step(rows, frames))  # only these rows fail
            woken.update(rows)
        # input ended and every frame ran: the stream takes its final state, and its end can go
        ended = [s for s in pool.owners if s.end(lambda s=s: pool.row_state(s.slot))]
        if ended:
            pool.remove([s.slot for s in ended])
            woken.update(ended)
        self._wake(woken)

    def _step(self, rows: list[FrameStream], frames: list[np.ndarray]) -> None:
        """Each stream's frames [n_i, D_in] -> its outputs [n_i, D_out], its state n_i frames on."""
        slots = np.array([s.slot for s in rows])  # ascending
        lengths = np.array([len(f) for f in frames])  # [B]
        t = int(lengths.max())
        x = np.zeros((len(rows), t, self.spec.input_size), np.float32)  # [B, T, D_in] right-padded
        for i, f in enumerate(frames):
            x[i, : len(f)] = f
        y, new = self.engine.run(x, lengths, self._pool.gather(slots))  # [B, T, D_out]
        # copies: a view would keep the whole batch's y alive while one stream's outputs wait unread
        outs = [y[i, :n].copy() for i, n in enumerate(lengths.tolist())]
        if not all(np.isfinite(o).all() for o in outs):
            raise FloatingPointError("the model produced non-finite outputs")
        self._pool.scatter(slots, new)
        self.steps += 1
        self.frames += int(lengths.sum())
        refilled = []
        for i, s in enumerate(rows):
            s.add_outputs(outs[i])
            if (room := s.room_to_announce(self.limits.max_pending_frames)) is not None:
                refilled.append(room)  # the edge may read the client's next message again
        if refilled:
            self._on_loop(_set_all, refilled)

    def _end(self, rows: list[FrameStream], what: str, error: Exception) -> None:
        log.error("%s failed for %d stream(s); ending them", what, len(rows), exc_info=error)
        for s in rows:
            s.fail(StepFailed(f"model step failed: {type(error).__name__}: {error}"))

    def _wake(self, streams) -> None:
        if streams and self._loop is not None:
            self._on_loop(_set_all, [s._ready for s in streams])

    def _abort_all(self, error: GenerationError) -> None:
        with self._cv:
            streams = list(self._streams)
        for s in streams:
            s.fail(error)
        self._wake(streams)


def _set_all(events) -> None:
    for e in events:
        e.set()
