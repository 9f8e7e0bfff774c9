"""Reading a request to its end, for callers that want the finished text: one helper for all.

`CompletionSink` is the sink of a request nobody reads token by token: the worker pushes into it and
its last push resolves a `concurrent.futures.Future`. No event loop is involved (a Ray actor, a
script); an async caller awaits it with `asyncio.wrap_future`. `completions` runs many requests
through one scheduler, at most `window` at once, and is what the in-process `Generator`, offline
sampling and its Ray actors all use, so the three read a request the same way.

The seed rule lives beside it (`nth_seed`): the k-th sample a call asks for, in order, samples with
seed + k (mod 2^64); gRPC, HTTP (any prompts, any n), Generator, `lstmgen sample` and `--ray` give
the same text for the same (prompt, seed, settings).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Hashable, Iterable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Callable

from lstmgen.serve.errors import GenerationError
from lstmgen.serve.records import Finished, TokenLogprob
from lstmgen.serve.state_blob import GenerationState


def nth_seed(seed: int, k: int) -> int:
    """The seed of a call's k-th sample (prompt i, choice j of n: k = i * n + j)."""
    return (seed + k) % 2**64


@dataclass(frozen=True)
class Completed:
    text: str
    finished: Finished
    logprobs: tuple[TokenLogprob, ...] = ()
    state: GenerationState | None = None  # with return_state
    first_token_at: float | None = None  # time.perf_counter() when its first token was made (TTFT)


class CompletionSink:
    """Collects one request's output; `future` resolves with a Completed (or the request's error).
    Cancelling the future ends the request at the worker's next step."""

    def __init__(self, on_close: Callable[[], None] | None = None):
        self.future: Future[Completed] = Future()
        self.seq = None  # the Generation (set at submission)
        self._parts: list[str] = []  # the worker's only
        self._logprobs: list[TokenLogprob] = []
        self._state: GenerationState | None = None
        self._on_close = on_close
        self._lock = threading.Lock()
        self.future.add_done_callback(self._done)

    def push(self, text: str, tokens: int, finished: Finished | None, error: GenerationError | None,
             logprob: TokenLogprob | None = None, state: GenerationState | None = None) -> int:
        """Worker thread: add output; the end resolves the future. Never asks to wake or park."""
        if text:
            self._parts.append(text)
        if logprob is not None:
            self._logprobs.append(logprob)
        self._state = state or self._state
        try:
            if error is not None:
                self.future.set_exception(error)
            elif finished is not None:
                self.future.set_result(Completed("".join(self._parts), finished, tuple(self._logprobs), self._state,
                                                 getattr(self.seq, "first_token_at", None)))
        except InvalidStateError:  # the caller cancelled meanwhile
            pass
        return 0

    def park(self) -> bool:
        return False  # never over its unread limit: it has none

    def cancel(self) -> None:
        self.future.cancel()

    def _done(self, future: Future) -> None:
        if future.cancelled() and self.seq is not None:
            self.seq.cancelled = True
        with self._lock:
            on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def completions(submit: Callable[[object], CompletionSink], requests: Iterable[tuple[Hashable, object]],
                window: int, ordered: bool = True, idle: Callable[[], float] | None = None,
                ) -> Iterator[tuple[Hashable, Completed | Exception]]:
    """(key, Completed or the request's error) for each (key, request), at most `window` running at
    once; in request order with `ordered` (holding at most `window` results back), else as they end.
    `submit` is a scheduler's `submit_completion`; an InvalidRequest it raises is that request's
    result. `idle` is called while no result comes and returns the seconds until it wants to be
    called again (a progress line). Stopping the iteration cancels what still runs."""
    done: queue.SimpleQueue = queue.SimpleQueue()
    running: dict[int, tuple[Hashable, CompletionSink]] = {}
    held: dict[int, tuple[Hashable, Completed | Exception]] = {}
    items = iter(enumerate(requests))
    fed = given = 0
    exhausted = False
    try:
        while True:
            while not exhausted and len(running) + len(held) < window:
                nxt = next(items, None)
                if nxt is None:
                    exhausted = True
                    break
                k, (key, req) = nxt
                fed += 1
                try:
                    sink = submit(req)
                except Exception as e:  # refused at once (InvalidRequest, ...): its result, not the call's
                    done.put((k, key, e))
                    running[k] = (key, None)
                    continue
                running[k] = (key, sink)
                sink.future.add_done_callback(lambda f, k=k, key=key: done.put((k, key, f)))
            if given == fed and exhausted:
                return
            k, key, f = _next(done, idle)
            running.pop(k, None)
            result = f if isinstance(f, Exception) else _outcome(f)
            if not ordered:
                given += 1
                yield key, result
                continue
            held[k] = (key, result)
            while given in held:
                yield held.pop(given)
                given += 1
    finally:
        for _, sink in running.values():
            if sink is not None:
                sink.cancel()


def _next(done: queue.SimpleQueue, idle: Callable[[], float] | None):
    if idle is None:
        return done.get()
    wait = idle()
    while True:
        try:
            return done.get(timeout=max(wait, 0.001))
        except queue.Empty:
            wait = idle()


def _outcome(f: Future) -> Completed | Exception:
    if f.cancelled():
        return GenerationError("cancelled")
    e = f.exception()
    return f.result() if e is None else e
