"""Continuous batching: every active request shares one model step per iteration.

A worker thread owns the model and the batch. Each iteration it (1) admits waiting requests,
(2) primes new prompts a chunk at a time through the prompt graph, all but their last token,
(3) runs ONE step for every generating row and samples each row's next token with its own
parameters and generator, then (4) appends the output to each request's Stream and wakes the
event loop once, for the readers that wait (see Stream). A prompt's last token is read by the
decode step its row joins, like a generated token: every sampled token comes from the step graph
(whatever priming, chunking or the prefix cache did before), and a one-token prompt (a word
model's typical short prompt, a continued state's) costs no prompt call of its own. Requests join
and leave between steps; cancelled ones leave at the next. The event loop never blocks on the
model: ORT and numpy run on the worker thread.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Protocol

import numpy as np

from lstmgen.serve.batch import Batch, Sequence, host
from lstmgen.serve.engine import Engine
from lstmgen.serve.errors import GenerationError, Overloaded, StepFailed, Unavailable
from lstmgen.serve.logprobs import TopLogprobs
from lstmgen.serve.params import GenerationRequest, Limits, check_bias_ids, encode_prompt, validate
from lstmgen.serve.penalties import TokenHistory
from lstmgen.serve.prefix_cache import PrefixCache
from lstmgen.serve.sampling import choose_checked, token_logprobs, warm_up
from lstmgen.serve.state_blob import GenerationState, codec_for, rng_at, rng_position
from lstmgen.serve.stopping import FinishReason, StopChecker

log = logging.getLogger("lstmgen.scheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    prefill_chunk: int = 512  # prompt tokens per row per priming call (bounds others' stall)
    max_prefill_rows: int = 64  # prompts primed together in one call
    state_key: bytes | None = None  # sign and check state blobs (--state-key); None: check only
    # States after prompt prefixes, kept at every `prefix_cache_every` tokens (serve/prefix_cache.py):
    # prompts are then primed in chunks ending there. 0 MiB: off.
    prefix_cache_mb: float = 64.0
    prefix_cache_every: int = 64
    # While a decode batch runs, new prompts wait up to this many decode steps for company (or
    # until `prime_together` of them wait): a prompt call costs about what a whole decode step
    # does even for one short prompt (1.3 ms for 3 characters on char-rnn at 2 cores), and at 64
    # streams requests end one by one (one call per request cost char-rnn 11-13% at 64 streams).
    # As TGI's max_waiting_tokens, at a smaller scale. A prompt already begun (chunks, a prefix
    # cache hit, a continued state) never waits.
    prime_wait_steps: int = 8
    prime_together: int = 8


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int
    stop_sequence: str = ""
    held_text: str = ""  # with return_state at LENGTH: text kept in the state, not sent


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely alternatives."""

    token_id: int
    text: str
    logprob: float
    # (token id, text, logprob), most likely first: a tuple, or packed (serve/logprobs.py)
    top: tuple[tuple[int, str, float], ...] | TopLogprobs = ()


@dataclass(frozen=True)
class Chunk:
    text: str
    token_count: int
    finished: Finished | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked for them
    state: GenerationState | None = None  # the state right after this chunk's last token


class Output(NamedTuple):
    """What one step hands one stream (the worker thread -> Stream.push)."""

    sink: "Stream"
    text: str
    tokens: int
    finished: Finished | None = None
    error: GenerationError | None = None
    logprob: TokenLogprob | None = None
    state: GenerationState | None = None


@dataclass(frozen=True)
class Stats:
    active_rows: int  # priming + generating
    generating_rows: int
    queued: int
    steps: int
    tokens_generated: int
    prompt_tokens: int
    parked: int = 0  # streams whose generation waits for their reader (backpressure)


class StepObserver(Protocol):
    """Told about every model call from the worker thread (metrics). Called once per call, never
    per row or token, so it must stay cheap and must not block."""

    def on_decode(self, rows: int, seconds: float, gap_s: float | None) -> None:
        """One decode step for `rows` rows took `seconds`; `gap_s` is the time since the previous
        step's end (what each continuing row waited between tokens), None after an idle spell."""

    def on_prime(self, rows: int, tokens: int, seconds: float) -> None:
        """One prompt call primed `tokens` prompt tokens over `rows` rows in `seconds`."""

    def on_sample(self, rows: int, seconds: float) -> None:
        """Choosing the next tokens of one decode step's `rows` rows (penalties, the sampler) took
        `seconds`."""


class NoObserver:
    def on_decode(self, rows: int, seconds: float, gap_s: float | None) -> None:
        pass

    def on_prime(self, rows: int, tokens: int, seconds: float) -> None:
        pass

    def on_sample(self, rows: int, seconds: float) -> None:
        pass


def _ids(seqs) -> str:
    return ",".join(s.request.request_id or "-" for s in seqs)


class Stream:
    """The consumer's end of one request. The worker thread appends output under a lock; the
    reader takes everything piled up since its last read, so a reader that falls behind (or
    paces itself) gets fewer, larger messages instead of a backlog. The event loop is woken only
    for a reader that is waiting: a pacing reader costs the loop nothing per token.

    The stream holds its admission slot until its reader is done with it (`on_close`, called
    once): it asked past the last message, took the error, or cancelled. At the gRPC edge the
    reader asks past the end only once the last message is written, so a client that stops
    reading keeps its slot (and its unread output is bounded by the admission limits).

    With `whole`, the reader gets one chunk with everything, once the stream has ended: offline
    sampling reads no text token by token, and at batch 256 a wake-up per token per row would
    take the cores ONNX Runtime needs.

    A state pushed with the output (state_every) cuts the pile there: the reader's chunk ends at
    the newest state and carries it, and what came after waits for the next read (the stream's end
    included). So a chunk with a state holds exactly the text up to that state, which is what a
    resuming client needs, and every chunk that spans a state_every boundary carries one.

    Backpressure: past `max_unread` entries unread (a token, a logprob and each alternative
    count one), `push` says so and the worker parks the row (its state kept, out of the batch);
    the reader's next take that leaves room calls `on_room`, and the row rejoins. So what a reader
    that stops reading makes the server hold is bounded, not its max_new_tokens x logprobs."""

    OVER = 2  # push's flag: past max_unread (1: the reader waits and must be woken)

    def __init__(self, seq: Sequence | None = None, on_close: Callable[[], None] | None = None,
                 whole: bool = False, max_unread: int = 0, on_room: Callable[[Sequence], None] | None = None):
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

    def _take(self) -> Chunk | None:
        """Everything since the last read, or None (and the reader marked waiting) when empty."""
        with self._lock:
            error = self._error
            if error is None:
                if not (self._tokens or self._text or self._finished) or (self.whole and not self._finished):
                    self._reader_waiting = True
                    return None
                chunk = self._chunk()
                room = self.parked and self._unread <= self._max_unread // 2
                self.parked = self.parked and not room
        if error is not None:
            self.done = True
            self.close()  # the error is the reader's last message
            raise error
        if room:
            self._on_room(self.seq)
        self.done = chunk.finished is not None
        return chunk

    def _chunk(self) -> Chunk:
        """Under _lock: everything piled up, or up to the newest state (see the class docstring)."""
        cut, self._cut = self._cut, None
        at_end = cut is not None and cut[:3] == (len(self._text), self._tokens, len(self._logprobs))
        # an ended stream's pile is cut too (its end comes in the next chunk): a reader that fell
        # behind must still get the latest state (only `whole` readers take everything at once)
        if cut is None or at_end or (self._finished is not None and self.whole):
            chunk = Chunk("".join(self._text), self._tokens, self._finished, tuple(self._logprobs),
                          cut[3] if at_end else None)
            self._text, self._tokens, self._logprobs, self._unread = [], 0, [], 0
            return chunk
        n_text, n_tokens, n_logprobs, state = cut
        chunk = Chunk("".join(self._text[:n_text]), n_tokens, None, tuple(self._logprobs[:n_logprobs]), state)
        self._text, self._logprobs = self._text[n_text:], self._logprobs[n_logprobs:]
        self._tokens -= n_tokens
        self._unread = self._tokens + sum(1 + len(lp.top) for lp in self._logprobs)
        return chunk

    async def next(self) -> Chunk | None:
        """The next chunk of output; None once the stream has ended. Raises the request's error."""
        while not self.done:
            chunk = self._take()
            if chunk is not None:
                return chunk
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

    async def __anext__(self) -> Chunk:
        chunk = await self.next()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

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


class Scheduler:
    def __init__(self, engine: Engine, limits: Limits = Limits(), cfg: SchedulerConfig = SchedulerConfig(),
                 observer: StepObserver | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.limits = limits
        self.cfg = cfg
        self.observer = observer or NoObserver()
        self.on_fatal = on_fatal  # called on the event loop if the worker thread cannot go on
        self.vocab = engine.manifest.vocab
        self._pieces = [self.vocab.piece(i) for i in range(len(self.vocab))]  # token id -> text
        m = engine.manifest
        self.codec = codec_for(m, cfg.state_key)
        # owned by the worker thread (stats() excepted)
        self.prefix_cache = (PrefixCache(int(cfg.prefix_cache_mb * 2**20), cfg.prefix_cache_every,
                                         f"{m.model_sha256}/{m.prompt_model_sha256}".encode())
                             if cfg.prefix_cache_mb > 0 else None)
        warm_up()  # the sampler's kernels compile (or load) now, not on the first request
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cv = threading.Condition()
        self._incoming: list[Sequence] = []  # guarded by _cv
        self._unparked: list[Sequence] = []  # parked rows whose reader made room; guarded by _cv
        self._in_system = 0  # accepted and not finished; guarded by _cv
        self._open = 0  # accepted and not yet closed by its reader (Stream.close); guarded by _cv
        self._accepting = True
        self._closing = False
        self._thread: threading.Thread | None = None
        # owned by the worker thread
        self._waiting: deque[Sequence] = deque()
        self._priming: list[Sequence] = []
        self._batch: Batch | None = None
        self._parked: list[Sequence] = []  # out of the batch until their reader takes (Stream.park)
        self._over: list[Sequence] = []  # rows whose stream passed max_unread in the last delivery
        self._steps = self._tokens_generated = self._prompt_tokens = 0
        self._last_step_end: float | None = None  # None: no decode step since the batch was empty
        self._prime_waited = 0  # decode steps the waiting prompts have waited for company
        self._abort_message = "server stopped before this stream finished"

    # -- lifecycle (event-loop thread) ----------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lstmgen-scheduler", daemon=True)
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
        """Stop the worker; requests still running end with UNAVAILABLE and `message`."""
        if message:
            self._abort_message = message
        with self._cv:
            self._accepting = False
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    @property
    def in_system(self) -> int:
        with self._cv:
            return self._in_system

    @property
    def open_streams(self) -> int:
        """Accepted streams whose reader is not done yet: generating, queued or unread."""
        with self._cv:
            return self._open

    def _stream_closed(self) -> None:
        with self._cv:
            self._open -= 1

    def _room(self, seq: Sequence) -> None:
        """A parked row's reader took its output (or cancelled): the worker takes it back."""
        with self._cv:
            self._unparked.append(seq)
            self._cv.notify()

    def stats(self) -> Stats:
        batch = self._batch
        generating = len(batch) if batch is not None else 0
        return Stats(generating + len(self._priming), generating, len(self._waiting) + len(self._incoming),
                     self._steps, self._tokens_generated, self._prompt_tokens, len(self._parked))

    # -- submission (event-loop thread) ---------------------------------------------------------
    def submit(self, req: GenerationRequest, whole: bool = False) -> Stream:
        """Validate and enqueue; raises InvalidRequest, Overloaded or Unavailable at once. With
        `whole`, the stream yields one chunk holding everything once generation ends (Stream)."""
        max_new = validate(req, self.limits)
        check_bias_ids(req, len(self.vocab))
        state = self.codec.decode(req.state) if req.state else None
        prompt_ids = encode_prompt(req, self.vocab)
        if state is not None and (not req.seed_given or req.sampling.seed == state.seed):
            rng = rng_at(state.rng)  # the state's generator goes on where it stopped
            req = replace(req, sampling=replace(req.sampling, seed=state.seed))
        else:
            if not req.seed_given:  # < 2^53: a client reading it as a double (JavaScript) can replay it
                req = replace(req, sampling=replace(req.sampling, seed=secrets.randbits(53)))
            rng = np.random.Generator(np.random.PCG64(req.sampling.seed))
        # Held-back text goes on only in a pure continuation; after new prompt text it belonged to the
        # previous turn, which reported it (Finished.held_text).
        pending = state.pending if state is not None and not prompt_ids else ""
        stopper = StopChecker(max_new, req.stop, self.vocab.eot_id, pending, hold_at_length=req.return_state)
        history = None
        if state is not None and state.history is not None:
            history = TokenHistory.restore(*state.history, prompt_ids)
        elif req.sampling.has_penalties:
            history = TokenHistory(prompt_ids)
            if state is not None:
                history.add(state.token)  # generated before the state was taken
        stream = Stream(on_close=self._stream_closed, whole=whole, max_unread=self.limits.max_unread_output,
                        on_room=self._room)
        seq = Sequence(req, prompt_ids, rng, stopper, stream, history=history,
                       want_state=req.return_state or req.state_every > 0, bias=_bias_arrays(req))
        if state is not None:
            if prompt_ids:  # read the state's last token, then the new text, from the state
                seq.prompt_ids, seq.carried, seq.partial = [state.token, *prompt_ids], 1, state.tensors
            else:
                seq.rejoin = (state.token, state.tensors)
        stream.seq = seq
        with self._cv:
            if not self._accepting:
                raise Unavailable("server is shutting down; not accepting new streams")
            # Open streams, not just generating ones: a finished stream its client has not read
            # yet still holds its output here, so it keeps its slot (Stream.close gives it back).
            cap = self.limits.max_concurrent_streams + self.limits.max_queued_streams
            if self._open >= cap:
                raise Overloaded(f"{self._open} streams open (running, queued or not yet read); the limit is "
                                 f"{self.limits.max_concurrent_streams} concurrent + "
                                 f"{self.limits.max_queued_streams} queued; retry later")
            self._open += 1
            self._in_system += 1
            self._incoming.append(seq)
            self._cv.notify()
        return stream

    # -- the worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._incoming or self._unparked or self._waiting or self._priming or self._batch
                               or self._closing):
                        self._cv.wait()
                    if self._closing:
                        break
                    self._unpark(self._unparked)
                    self._unparked.clear()
                    self._waiting.extend(self._incoming)
                    self._incoming.clear()
                self._iterate()
        except BaseException as e:  # not one iteration's rows: the loop itself broke
            self._die(e)
            return
        self._abort_all(Unavailable(self._abort_message))

    def _iterate(self) -> None:
        self._drop_cancelled()
        if self._over:
            self._park()
        if self._batch is None:
            self._last_step_end = None  # an idle spell is not an inter-token gap
        room = self.limits.max_concurrent_streams - len(self._priming) - (len(self._batch) if self._batch else 0)
        rejoining, joining = [], []
        while room > 0 and self._waiting:
            seq = self._waiting.popleft()
            if seq.rejoin is not None:
                rejoining.append(seq)
            else:
                if self.prefix_cache is not None and not seq.carried:
                    seq.primed, seq.partial = self.prefix_cache.lookup(seq.prompt_ids)
                (joining if seq.prompt_left == 1 else self._priming).append(seq)
            room -= 1
        if rejoining:
            self._charged(rejoining, "state restore", self._rejoin)
        if joining:
            self._charged(joining, "prompt step", lambda rows: self._join(rows, self._column_states(rows)))
        if self._priming and (self._batch is None or len(self._priming) >= self.cfg.prime_together
                              or self._prime_waited >= self.cfg.prime_wait_steps
                              or any(s.partial is not None for s in self._priming)):  # mid-prompt: go on
            self._prime_waited = 0
            self._charged(self._priming[: self.cfg.max_prefill_rows], "prompt step", self._prime_chunk)
        elif self._priming:
            self._prime_waited += 1
        if self._batch is not None:
            self._isolated(self._batch.seqs, "decode step", self._decode_step)

    def _isolated(self, seqs: list[Sequence], what: str, part: Callable[[], list]) -> None:
        """Run one part of an iteration (model call, sampling, stop checks) and deliver its output.
        If anything in it raises, only `seqs` end (INTERNAL, one log line with their ids) and the
        loop goes on; a failure here that cannot be contained ends the worker (`_run`)."""
        error = self._tried(part)
        if error is not None:
            self._end(seqs, what, error)

    def _tried(self, part: Callable[[], list]) -> Exception | None:
        try:
            self._deliver(part())
        except Exception as e:
            return e
        return None

    def _end(self, seqs: list[Sequence], what: str, error: Exception) -> None:
        """`seqs` end with INTERNAL after `error` in a part of the iteration (one log line with their ids)."""
        log.error("%s failed for %d request(s) request_ids=%s; ending them", what, len(seqs), _ids(seqs),
                  exc_info=error)
        ids = {id(s) for s in seqs}
        if self._batch is not None:
            self._batch = self._batch.filter([i for i, s in enumerate(self._batch.seqs) if id(s) not in ids])
        self._last_step_end = None
        self._deliver(self._fail(seqs, StepFailed(f"internal error in the {what}: {type(error).__name__}: {error}")))

    def _charged(self, rows: list[Sequence], what: str, part: Callable[[list[Sequence]], list]) -> None:
        """`_isolated` for a part that brings `rows` into a shared call (priming, joining the batch),
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

    def _die(self, error: BaseException) -> None:
        """The worker cannot go on: refuse new streams, end every held one with UNAVAILABLE and
        tell the server (`on_fatal`), which turns NOT_SERVING and exits non-zero."""
        log.critical("scheduler worker failed and cannot go on; ending every stream", exc_info=error)
        with self._cv:
            self._accepting = False
        try:
            self._abort_all(Unavailable("the server's generation worker failed; retry on another server"))
        finally:
            if self.on_fatal is not None and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.on_fatal, error)

    def _drop_cancelled(self) -> None:
        # `cancelled` is set from the event-loop thread at any moment: read each flag ONCE, so a
        # row dropped is a row released and vice versa (reading it twice, a cancel landing in
        # between released a row that stayed in the batch, and released it again a step later).
        gone: list[Sequence] = []
        if self._waiting or self._priming:
            waiting = [(s, s.cancelled) for s in self._waiting]
            priming = [(s, s.cancelled) for s in self._priming]
            dropped = [s for s, c in waiting + priming if c]
            if dropped:
                self._waiting = deque(s for s, c in waiting if not c)
                self._priming = [s for s, c in priming if not c]
                gone += dropped
        if self._parked:  # Stream.cancel hands a parked row back; this is the guard behind it
            parked = [(s, s.cancelled) for s in self._parked]
            gone += [s for s, c in parked if c]
            self._parked = [s for s, c in parked if not c]
        if self._batch is not None:
            flags = [s.cancelled for s in self._batch.seqs]
            if any(flags):
                gone += [s for s, c in zip(self._batch.seqs, flags) if c]
                self._batch = self._batch.filter([i for i, c in enumerate(flags) if not c])
        if gone:
            self._release(gone)

    def _park(self) -> None:
        """Rows whose reader is behind leave the batch with their next input token and state, as a
        pure continuation does (`rejoin`); they come back through `_unpark` when the reader takes."""
        over, self._over = {id(s) for s in self._over}, []
        if self._batch is None:
            return
        keep, states = [], None
        for i, s in enumerate(self._batch.seqs):
            if id(s) not in over or s.cancelled or not s.sink.park():
                keep.append(i)
                continue
            states = states or tuple(host(x) for x in self._batch.state)  # each [L, B, H]
            s.rejoin = (int(self._batch.tokens[i]), tuple(x[:, i].copy() for x in states))
            self._parked.append(s)
        if len(keep) != len(self._batch):
            self._batch = self._batch.filter(keep)
            self._last_step_end = None if self._batch is None else self._last_step_end

    def _unpark(self, seqs: list[Sequence]) -> None:
        """Under _cv: parked rows with room again go first in the queue (cancelled ones are dropped
        there, by _drop_cancelled)."""
        back = {id(s) for s in seqs}
        self._parked = [s for s in self._parked if id(s) not in back]
        self._waiting.extendleft(reversed([s for s in seqs if s.rejoin is not None]))

    def _rejoin(self, rows: list[Sequence]) -> list:
        """Pure continuations join the decode batch with their state's token and (h, c): their next
        token comes from the same step call it would have come from had the stream never left."""
        tokens = np.array([s.rejoin[0] for s in rows], dtype=np.int64)  # [R]
        state = tuple(np.stack([s.rejoin[1][k] for s in rows], axis=1)  # each [L, R, H]
                      for k in range(len(rows[0].rejoin[1])))
        self._batch = Batch.concatenate([self._batch, Batch.create(rows, tokens, state)])
        for s in rows:
            s.rejoin = None
        return []

    def _column_states(self, rows: list[Sequence]) -> tuple[np.ndarray, ...]:
        """The state of `rows` (each its `partial`, or empty), each tensor [L, R, H]."""
        state = self.engine.zeros(len(rows))
        for i, s in enumerate(rows):
            if s.partial is not None:
                for x, row in zip(state, s.partial):
                    x[:, i] = row
        return state

    def _join(self, rows: list[Sequence], state: tuple) -> list:
        """Rows whose prompt has one token left join the decode batch with it as their input and
        `state` (each [L, R, H]): the next step reads it and samples their first token."""
        self._commit_join(rows, self._joined(rows, state))
        return []

    def _joined(self, rows: list[Sequence], state: tuple) -> Batch:
        """The decode batch with `rows` added; changes nothing (each row's sampling arrays are
        built here, so this is where a request's values meet everyone's)."""
        tokens = np.array([s.prompt_ids[-1] for s in rows], dtype=np.int64)  # [R]
        return Batch.concatenate([self._batch, Batch.create(rows, tokens, state)])

    def _commit_join(self, rows: list[Sequence], batch: Batch) -> None:
        for s in rows:
            s.primed, s.partial = len(s.prompt_ids), None
        self._prompt_tokens += len(rows)
        self._batch = batch

    def _prime_chunk(self, rows: list[Sequence]) -> list:
        """One prompt-graph call advancing `rows` (up to max_prefill_rows prompts) by a chunk each;
        a row with one prompt token left joins the decode batch (_join)."""
        lengths = np.array([self._chunk_len(s) for s in rows], dtype=np.int64)  # [R]
        t = int(lengths.max())
        tokens = np.zeros((len(rows), t), dtype=np.int64)  # [R, T] right-padded
        state = self._column_states(rows)  # each [L, R, H]
        for i, s in enumerate(rows):
            tokens[i, : lengths[i]] = s.prompt_ids[s.primed : s.primed + lengths[i]]
        t0 = time.perf_counter()
        # A failure up to the commit changes nothing, so _charged can retry these rows in halves.
        _, state = self.engine.prime(tokens, lengths, state)  # the logits: the step graph's job
        seconds = time.perf_counter() - t0
        done = [i for i, s in enumerate(rows) if s.prompt_left - int(lengths[i]) <= 1]
        idx = np.asarray(done, dtype=np.int64)
        joined = self._joined([rows[i] for i in done], tuple(x[:, idx] for x in state)) if done else None
        joining = set(done)
        partials = {i: tuple(x[:, i].copy() for x in state) for i in range(len(rows)) if i not in joining}
        # commit: assignments only, nothing that can fail
        for i, s in enumerate(rows):
            s.primed += int(lengths[i])
            s.partial = partials.get(i, s.partial)
        n_tokens = int(lengths.sum())
        self._prompt_tokens += n_tokens
        self.observer.on_prime(len(rows), n_tokens, seconds)
        self._keep_prefixes(rows, state)
        if done:
            finished = {id(rows[i]) for i in done}
            self._priming = [s for s in self._priming if id(s) not in finished]
            self._commit_join([rows[i] for i in done], joined)
        return []

    def _keep_prefixes(self, rows: list[Sequence], state: tuple) -> None:
        """The prefix cache takes the state of rows that stopped at one of its checkpoints; it is an
        optimisation, so a failure here (memory) is logged and costs nothing else."""
        cache = self.prefix_cache
        if cache is None:
            return
        try:
            for i, s in enumerate(rows):
                if not s.carried and s.primed % cache.every == 0 and s.prompt_left:
                    cache.store(s.prompt_ids, s.primed, tuple(x[:, i] for x in state))
        except Exception:
            log.warning("prefix cache: a prompt state was not kept", exc_info=True)

    def _chunk_len(self, s: Sequence) -> int:
        """Prompt tokens row `s` reads in the next priming call: a chunk, cut at the next prefix-cache
        checkpoint so that the state there can be kept."""
        n = min(self.cfg.prefill_chunk, s.prompt_left - 1)  # the last token: _join
        if self.prefix_cache is not None and not s.carried:
            nxt = self.prefix_cache.boundaries(s.primed, len(s.prompt_ids))
            if nxt:
                n = min(n, nxt[0] - s.primed)
        return n

    def _decode_step(self) -> list:
        batch = self._batch
        t0 = time.perf_counter()
        try:
            logits, state = self.engine.step(batch.tokens, batch.state)
        except Exception as e:
            log.exception("model step failed for %d request(s) request_ids=%s", len(batch), _ids(batch.seqs))
            self._batch = self._last_step_end = None
            return self._fail(batch.seqs, StepFailed(f"model step failed: {e}"))
        t1 = time.perf_counter()
        gap = None if self._last_step_end is None else t1 - self._last_step_end
        self.observer.on_decode(len(batch), t1 - t0, gap)
        self._steps += 1
        out, self._batch = self._sample_and_advance(replace(batch, state=state), logits)
        self._last_step_end = t1 if self._batch is not None else None
        return out

    def _sample_and_advance(self, batch: Batch, logits: np.ndarray) -> tuple[list[Output], Batch | None]:
        """Choose each row's next token from logits [B, V]; emit text; drop finished rows."""
        uniforms = np.array([s.rng.random() for s in batch.seqs])  # [B], one draw per row
        lp_rows = batch.logprob_rows
        raw = logits[lp_rows] if lp_rows else None  # [R, V] copies: the penalties overwrite
        for i, ids, values in batch.biases:  # after the raw copy: logprobs stay the model's own
            logits[i, ids] += values
        # finite: False for a row with a NaN, a +inf or nothing but -inf (-inf logits alone are
        # just impossible tokens): it has no distribution and fails below
        t0 = time.perf_counter()
        next_tokens, finite = choose_checked(logits, batch.sampling, uniforms, batch.histories,
                                             overwrite=True)  # [B], [B]
        self.observer.on_sample(len(batch), time.perf_counter() - t0)
        if raw is not None and not finite[lp_rows].all():
            keep = [j for j, i in enumerate(lp_rows) if finite[i]]
            lp_rows, raw = [lp_rows[j] for j in keep], raw[keep]
        logprobs = self._logprobs(batch, lp_rows, raw, next_tokens)
        out, keep, failed, done = [], [], [], []
        pieces = self._pieces
        states = None  # the state tensors on the host, [L, B, H] each, once a row needs its state
        # Python lists: indexing numpy arrays one element at a time costs more than the loop body.
        for i, (s, ok, tok) in enumerate(zip(batch.seqs, finite.tolist(), next_tokens.tolist())):
            if not ok:
                failed.append(s)
                continue
            if s.history is not None:
                s.history.add(tok)
            text, reason = s.stopper.add(tok, pieces[tok])
            fin = state = None
            if reason is not None:
                held = s.stopper.pending if s.request.return_state and reason is FinishReason.LENGTH else ""
                fin = Finished(reason, s.prompt_tokens, s.stopper.generated, s.request.sampling.seed,
                               s.stopper.matched, held)
                done.append(s)
            else:
                keep.append(i)
            if s.want_state and (s.request.return_state if fin else
                                 s.request.state_every and s.stopper.generated % s.request.state_every == 0):
                states = states or tuple(host(x) for x in batch.state)
                state = self._snapshot(s, tok, tuple(x[:, i] for x in states), fin)
            out.append(Output(s.sink, text, 1, fin, None, logprobs.get(i), state))
        self._tokens_generated += len(batch)
        if done:
            self._release(done)
        if failed:
            log.error("non-finite logits for %d request(s) request_ids=%s; ending them", len(failed), _ids(failed))
            out += self._fail(failed, StepFailed("the model produced non-finite logits; generation stopped"))
        return out, replace(batch, tokens=next_tokens).filter(keep)

    @staticmethod
    def _snapshot(s: Sequence, token: int, tensors: tuple, fin: Finished | None) -> GenerationState:
        """Row `s`'s state after sampling `token`: its state tensors, each [L, H] (copied out of the batch)."""
        hist = s.history
        return GenerationState(
            tuple(x.copy() for x in tensors), token, s.request.sampling.seed, rng_position(s.rng),
            s.stopper.pending if fin is None or fin.held_text else "",  # after a stop: nothing held
            (tuple(hist.ids.tolist()), tuple(hist.counts.tolist())) if hist is not None else None)

    def _logprobs(self, batch: Batch, rows: list[int], raw: np.ndarray | None,
                  tokens: np.ndarray) -> dict[int, TokenLogprob]:
        """Row -> its token's log-probability (and alternatives), for the rows that asked; raw:
        their logits [R, V] before any penalty."""
        if not rows:
            return {}
        n = max(batch.seqs[i].request.top_logprobs for i in rows)
        lp, top_ids, top_lp = token_logprobs(raw, tokens[rows], n)
        pieces, out = self._pieces, {}
        for j, i in enumerate(rows):
            k = batch.seqs[i].request.top_logprobs
            top = TopLogprobs(top_ids[j, :k], top_lp[j, :k], pieces)
            tok = int(tokens[i])
            out[i] = TokenLogprob(tok, pieces[tok], float(lp[j]), top)
        return out

    def _fail(self, seqs: list[Sequence], error: GenerationError) -> list:
        ids = {id(s) for s in seqs}
        self._priming = [s for s in self._priming if id(s) not in ids]
        self._release(seqs)
        return [Output(s.sink, "", 0, None, error) for s in seqs]

    def _abort_all(self, error: GenerationError) -> None:
        seqs = list(self._waiting) + self._priming + (self._batch.seqs if self._batch else []) + self._parked
        with self._cv:
            seqs += self._incoming
            self._incoming.clear()
            self._unparked.clear()
        self._waiting.clear()
        self._parked = []
        self._batch = None
        if seqs:
            self._deliver(self._fail(seqs, error))

    def _release(self, seqs: list[Sequence]) -> None:
        """Give back the admission count of `seqs`, each once (a part that fails after finishing
        some rows ends them again with the rest)."""
        n = 0
        for s in seqs:
            n += not s.released
            s.released = True
        if n:
            with self._cv:
                self._in_system -= n

    def _deliver(self, out: list) -> None:
        """Hand output to the streams; one loop wake-up per step, and none when no reader waits."""
        woken = []
        for o in out:
            flags = o.sink.push(o.text, o.tokens, o.finished, o.error, o.logprob, o.state)
            if flags & 1:
                woken.append(o.sink)
            if flags & Stream.OVER:
                self._over.append(o.sink.seq)
        if woken and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_wake_all, woken)


def _bias_arrays(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray] | None:
    if not req.logit_bias:
        return None
    ids, values = zip(*req.logit_bias)
    return np.array(ids, dtype=np.int64), np.array(values, dtype=np.float32)  # [K], [K]


def _wake_all(streams: list[Stream]) -> None:
    for stream in streams:
        stream._ready.set()
