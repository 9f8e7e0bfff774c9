"""The consumer's end of one streamed request: output piles up under a lock, the reader takes it.

Pacing, backpressure and the state cuts are described on `Stream`; `whole` streams (one delta at
the end) serve readers that want the finished text only (serve/completion.py has the lighter
sink for callers without an event loop).
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable

from lstmgen.serve.errors import GenerationError
from lstmgen.serve.generation import Generation
from lstmgen.serve.records import Delta, Finished, TokenLogprob
from lstmgen.serve.state_blob import GenerationState


class Stream:
    """The consumer's end of one request. The worker thread appends output under a lock; the
    reader takes everything piled up since its last read, so a reader that falls behind (or
    paces itself) gets fewer, larger messages instead of a backlog. The event loop is woken only
    for a reader that is waiting: a pacing reader costs the loop nothing per token.

    The stream holds its admission slot until its reader is done with it (`on_close`, called
    once): it asked past the last message, took the error, or cancelled. At the gRPC edge the
    reader asks past the end only once the last message is written, so a client that stops
    reading keeps its slot (and its unread output is bounded by the admission limits).

    With `whole`, the reader gets one delta with everything, once the stream has ended: offline
    sampling reads no text token by token, and at batch 256 a wake-up per token per row would
    take the cores ONNX Runtime needs.

    A state pushed with the output (state_every) cuts the pile there: the reader's delta ends at
    the newest state and carries it, and what came after waits for the next read (the stream's end
    included). So a delta with a state holds exactly the text up to that state, which is what a
    resuming client needs, and every delta that spans a state_every boundary carries one.

    Backpressure: past `max_unread` entries unread (a token, a logprob and each alternative
    count one), `push` says so and the worker parks the row (its state kept, out of the batch);
    the reader's next take that leaves room calls `on_room`, and the row rejoins. So what a reader
    that stops reading makes the server hold is bounded, not its max_new_tokens x logprobs."""

    OVER = 2  # push's flag: past max_unread (1: the reader waits and must be woken)

    def __init__(self, seq: Generation | None = None, on_close: Callable[[], None] | None = None,
                 whole: bool = False, max_unread: int = 0, on_room: Callable[[Generation], None] | None = None):
        self.seq = seq
        self.whole = whole
        self._on_close = on_close  # guarded by _lock; None once called
        self._max_unread = 0 if whole else max_unread  # 0: unbounded (offline's whole streams: its window bounds it)
        self._on_room = on_room
        self._unread = 0  # entries pushed and not yet taken; guarded by _lock, as is parked
        self.parked = False  # the worker parked the row until the reader takes (set by the worker)
        self._lock = threading.Lock()
        self._text: list[str] = []  # guarded by _lock, as are the four below
        self._tokens = 0
        self._logprobs: list[TokenLogprob] = []
        self._finished: Finished | None = None
        self._error: GenerationError | None = None
        self._cut: tuple[int, int, int, GenerationState] | None = None  # (texts, tokens, logprobs, state)
        self._reader_waiting = False  # the reader awaits _ready; the next push must wake it
        self._wake_on_end = False  # the reader rests (pacing): only the end must wake it
        self._ready = asyncio.Event()  # event-loop side only
        self.done = False

    def push(self, text: str, tokens: int, finished: Finished | None, error: GenerationError | None,
             logprob: TokenLogprob | None = None, state: GenerationState | None = None) -> bool:
        """Worker thread: add output. Flags: 1 when the reader is waiting and must be woken, OVER
        when the stream holds more than max_unread entries and its row should wait for the reader."""
        with self._lock:
            if text:
                self._text.append(text)
            if logprob is not None:
                self._logprobs.append(logprob)
                self._unread += 1 + len(logprob.top)
            self._tokens += tokens
            self._unread += tokens
            if state is not None:
                self._cut = (len(self._text), self._tokens, len(self._logprobs), state)
            self._finished = finished or self._finished
            if self._finished is None:  # an end already pushed stands (a later failure of its step cannot undo it)
                self._error = error or self._error
            over = self.OVER if self._max_unread and self._unread > self._max_unread and not (
                self._finished or self._error) else 0
            if self.whole and not (self._finished or self._error):
                return 0
            wake, self._reader_waiting = self._reader_waiting, False
            if self._wake_on_end and (self._finished or self._error or over):  # a full pile ends a rest too
                wake, self._wake_on_end = True, False
        return int(wake) | over

    def park(self) -> bool:
        """Worker thread: the row leaves the batch until the reader takes; False (stay) when the
        reader took meanwhile."""
        with self._lock:  # a cancel sets its flag under this lock: a cancelled row is never parked
            self.parked = self._unread > self._max_unread // 2 and not self.seq.cancelled
            return self.parked

    def _take(self) -> Delta | None:
        """Everything since the last read, or None (and the reader marked waiting) when empty."""
        with self._lock:
            error = self._error
            if error is None:
                if not (self._tokens or self._text or self._finished) or (self.whole and not self._finished):
                    self._reader_waiting = True
                    return None
                delta = self._delta()
                room = self.parked and self._unread <= self._max_unread // 2
                self.parked = self.parked and not room
        if error is not None:
            self.done = True
            self.close()  # the error is the reader's last message
            raise error
        if room:
            self._on_room(self.seq)
        self.done = delta.finished is not None
        return delta

    def _delta(self) -> Delta:
        """Under _lock: everything piled up, or up to the newest state (see the class docstring)."""
        cut, self._cut = self._cut, None
        at_end = cut is not None and cut[:3] == (len(self._text), self._tokens, len(self._logprobs))
        # an ended stream's pile is cut too (its end comes in the next delta): a reader that fell
        # behind must still get the latest state (only `whole` readers take everything at once)
        if cut is None or at_end or (self._finished is not None and self.whole):
            delta = Delta("".join(self._text), self._tokens, self._finished, tuple(self._logprobs),
                          cut[3] if at_end else None)
            self._text, self._tokens, self._logprobs, self._unread = [], 0, [], 0
            return delta
        n_text, n_tokens, n_logprobs, state = cut
        delta = Delta("".join(self._text[:n_text]), n_tokens, None, tuple(self._logprobs[:n_logprobs]), state)
        self._text, self._logprobs = self._text[n_text:], self._logprobs[n_logprobs:]
        self._tokens -= n_tokens
        self._unread = self._tokens + sum(1 + len(lp.top) for lp in self._logprobs)
        return delta

    async def next(self) -> Delta | None:
        """The next delta of output; None once the stream has ended. Raises the request's error."""
        while not self.done:
            delta = self._take()
            if delta is not None:
                return delta
            await self._ready.wait()
            self._ready.clear()
        self.close()  # asked past the last message: the reader has all of it
        return None

    async def rest(self, seconds: float) -> None:
        """Pause up to `seconds` between messages (pacing), ending early if the stream ends: its
        last message, and the client's next request, must not wait out the interval (at 64
        streams one is 128 ms, ten steps of a word model with the row empty)."""
        with self._lock:
            if self._finished is not None or self._error is not None:
                return
            self._wake_on_end = True
        timer = asyncio.get_running_loop().call_later(seconds, self._ready.set)
        try:
            await self._ready.wait()
        finally:
            timer.cancel()
            self._ready.clear()
            with self._lock:
                self._wake_on_end = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        delta = await self.next()
        if delta is None:
            raise StopAsyncIteration
        return delta

    def cancel(self) -> None:
        """The consumer went away: the row leaves the batch at the next step (a parked row is
        handed back to the worker, which drops it)."""
        if self.seq is not None:
            with self._lock:
                self.seq.cancelled = True
                room, self.parked = self.parked, False
            if room:
                self._on_room(self.seq)
        self.close()

    def close(self) -> None:
        """The reader is done with this stream: give back its admission slot (once)."""
        with self._lock:
            on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def wake_all(streams: list[Stream]) -> None:
    """On the event loop: wake each stream's waiting reader."""
    for stream in streams:
        stream._ready.set()
