"""The worker: continuous batching of every request over one pool of decode rows.

A worker thread owns the model, the prompts being read and the decode rows. Each iteration it
(1) admits waiting requests, (2) reads new prompts a chunk at a time through the prompt graph
(serve/prefill.py), (3) runs ONE step for every decode row and turns its output into a StepResult
(serve/decode.py), then (4) hands each row's output to its sink and wakes the event loop once, for
the readers that wait (serve/stream.py). Requests join and leave between steps, one row each
(serve/pool.py); cancelled ones leave at the next. The event loop never blocks on the model: ONNX
Runtime and numpy run on the worker thread. A failure in one part of an iteration ends only the
requests that part touched (`_isolated`, `_charged`).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lstmgen.config_args import option
from lstmgen.serve.admission import admit
from lstmgen.serve.completion import CompletionSink
from lstmgen.serve.decode import DecodeRows, StepResult
from lstmgen.serve.engine import Engine
from lstmgen.serve.errors import GenerationError, Overloaded, StepFailed
from lstmgen.serve.generation import Generation
from lstmgen.serve.params import GenerationRequest, RequestLimits
from lstmgen.serve.prefix_cache import PrefixCache
from lstmgen.serve.prefill import Prefiller
from lstmgen.serve.records import Emitted, NoObserver, Stats, StepObserver
from lstmgen.serve.sampling import warm_up
from lstmgen.serve.stream import Stream, wake_all
from lstmgen.serve.worker import Worker

log = logging.getLogger("lstmgen.scheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    # prompt tokens per row per prefill call (bounds others' stall)
    prefill_chunk: int = option(512, "prompt tokens read per prompt call per request")
    max_prefill_rows: int = option(64, "prompts prefilled together in one prompt call")
    state_key: bytes | None = None  # the edge's state codec signs and checks blobs (--state-key); None: check only
    # States after prompt prefixes, kept at every `prefix_cache_every` tokens (serve/prefix_cache.py):
    # prompts are then prefilled in chunks ending there. 0 MiB: off.
    prefix_cache_mb: float = option(64.0, "memory for states after prompt prefixes, so a prompt that begins "
                                          "like an earlier one skips that part (0: off)")
    prefix_cache_every: int = option(64, "keep a prefix state every this many prompt tokens (prompts are "
                                         "prefilled in chunks ending there)")
    # While a decode batch runs, new prompts wait up to this many decode steps for company (or
    # until `prefill_together` of them wait): a prompt call costs about what a whole decode step
    # does even for one short prompt (1.3 ms for 3 characters on char-rnn at 2 cores), and at 64
    # streams requests end one by one (one call per request cost char-rnn 11-13% at 64 streams).
    # As TGI's max_waiting_tokens, at a smaller scale. A prompt already begun (chunks, a prefix
    # cache hit, a continued state) never waits.
    prefill_wait_steps: int = option(8, "while a decode batch runs, a new prompt waits up to this many decode "
                                      "steps for others to be read in the same prompt call: fewer, a sooner "
                                      "first token; more, fewer calls (docs/benchmark.md)",
                                      aliases=("--prime-wait-steps",))
    prefill_together: int = option(8, "waiting prompts are read at once when this many wait "
                                    "(before --prefill-wait-steps is up)")


def _ids(gens) -> str:
    return ",".join(g.request.request_id or "-" for g in gens)


class Scheduler(Worker):
    """Text generation over one pool of decode rows (the worker's lifecycle: serve/worker.py)."""

    thread_name, what = "lstmgen-scheduler", "generation worker"

    def __init__(self, engine: Engine, limits: RequestLimits = RequestLimits(), cfg: SchedulerConfig = SchedulerConfig(),
                 observer: StepObserver | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None):
        super().__init__(on_fatal)
        self.engine = engine
        self.limits = limits
        self.cfg = cfg
        self.observer = observer or NoObserver()
        self.vocab = engine.manifest.vocab
        m = engine.manifest
        # owned by the worker thread (stats() excepted)
        self.prefix_cache = (PrefixCache(int(cfg.prefix_cache_mb * 2**20), cfg.prefix_cache_every,
                                         f"{m.model_sha256}/{m.prompt_model_sha256}".encode())
                             if cfg.prefix_cache_mb > 0 else None)
        self._prefiller = Prefiller(engine, cfg.prefill_chunk, self.prefix_cache)
        self._rows = DecodeRows(engine.state_shapes, limits.max_concurrent_streams,
                                [self.vocab.piece(i) for i in range(len(self.vocab))], self.vocab.eot_id)
        warm_up()  # the sampler's kernels compile (or load) now, not on the first request
        self._incoming: list[Generation] = []  # guarded by _cv
        self._unparked: list[Generation] = []  # parked rows whose reader made room; guarded by _cv
        self._in_system = 0  # accepted and not finished; guarded by _cv
        self._open = 0  # accepted and not yet closed by its reader (Stream.close); guarded by _cv
        # owned by the worker thread
        self._waiting: deque[Generation] = deque()
        self._prefilling: list[Generation] = []
        self._parked: list[Generation] = []  # out of the pool until their reader takes (Stream.park)
        self._over: list[Generation] = []  # rows whose stream passed max_unread in the last delivery
        self._fresh: list[Generation] = []  # rows that joined since the last decode step: their first token is next
        self._steps = self._tokens_generated = self._prompt_tokens = 0
        self._last_step_end: float | None = None  # None: no decode step since the pool was empty
        self._prefill_waited = 0  # decode steps the waiting prompts have waited for company

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

    def _room(self, gen: Generation) -> None:
        """A parked row's reader took its output (or cancelled): the worker takes it back."""
        with self._cv:
            self._unparked.append(gen)
            self._cv.notify()

    def stats(self) -> Stats:
        generating = len(self._rows)
        return Stats(generating + len(self._prefilling), generating, len(self._waiting) + len(self._incoming),
                     self._steps, self._tokens_generated, self._prompt_tokens, len(self._parked))

    # -- submission (any thread but the worker) -------------------------------------------------------
    def submit(self, req: GenerationRequest, whole: bool = False) -> Stream:
        """Validate and enqueue; raises InvalidRequest, Overloaded or Unavailable at once. With
        `whole`, the stream yields one delta holding everything once generation ends (Stream)."""
        stream = Stream(on_close=self._stream_closed, whole=whole, max_unread=self.limits.max_unread_output,
                        on_room=self._room)
        stream.seq = admit(req, self.limits, self.vocab, stream, quiet=whole)
        self._enqueue(stream.seq)
        return stream

    def submit_completion(self, req: GenerationRequest) -> CompletionSink:
        """Like submit, for a reader of the finished text only (serve/completion.py): its future
        resolves with the Completed or the request's error. Needs no event loop."""
        sink = CompletionSink(on_close=self._stream_closed)
        sink.seq = admit(req, self.limits, self.vocab, sink, quiet=True)
        self._enqueue(sink.seq)
        return sink

    def _enqueue(self, gen: Generation) -> None:
        with self._cv:
            if (refused := self._refusing()) is not None:
                raise refused
            # Open streams, not just generating ones: a finished stream its client has not read
            # yet still holds its output here, so it keeps its slot (Stream.close gives it back).
            cap = self.limits.max_concurrent_streams + self.limits.max_queued_streams
            if self._open >= cap:
                raise Overloaded(f"{self._open} streams open (running, queued or not yet read); the limit is "
                                 f"{self.limits.max_concurrent_streams} concurrent + "
                                 f"{self.limits.max_queued_streams} queued; retry later")
            self._open += 1
            self._in_system += 1
            self._incoming.append(gen)
            self._cv.notify()

    # -- the worker thread ----------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._incoming or self._unparked or self._waiting or self._prefilling or len(self._rows))

    def _take_incoming(self) -> None:
        self._unpark(self._unparked)
        self._unparked.clear()
        self._waiting.extend(self._incoming)
        self._incoming.clear()

    def _iterate(self) -> None:
        self._drop_cancelled()
        if self._over:
            self._park()
        if not len(self._rows):
            self._last_step_end = None  # an idle spell is not an inter-token gap
        room = self.limits.max_concurrent_streams - len(self._prefilling) - len(self._rows)
        rejoining, joining = [], []
        while room > 0 and self._waiting:
            gen = self._waiting.popleft()
            if gen.rejoin is not None:
                rejoining.append(gen)
            else:
                self._prefiller.start(gen)
                (joining if gen.prompt_left == 1 else self._prefilling).append(gen)
            room -= 1
        if rejoining:
            self._charged(rejoining, "state restore", self._rejoin)
        if joining:
            self._charged(joining, "prompt step", lambda rows: self._join(rows, self._prefiller.states(rows)))
        if self._prefilling and (not len(self._rows) or len(self._prefilling) >= self.cfg.prefill_together
                              or self._prefill_waited >= self.cfg.prefill_wait_steps
                              or any(g.partial is not None for g in self._prefilling)):  # mid-prompt: go on
            self._prefill_waited = 0
            self._charged(self._prefilling[: self.cfg.max_prefill_rows], "prompt step", self._prefill_step)
        elif self._prefilling:
            self._prefill_waited += 1
        if len(self._rows):
            self._isolated(list(self._rows.gens), "decode step", self._decode_step)

    # -- failure isolation (serve/worker.py: _isolated, _charged) ---------------------------------------
    def _end(self, gens: list[Generation], what: str, error: Exception) -> None:
        """`gens` end with INTERNAL after `error` in a part of the iteration (one log line with their ids)."""
        log.error("%s failed for %d request(s) request_ids=%s; ending them", what, len(gens), _ids(gens),
                  exc_info=error)
        self._leave([g for g in gens if g.slot >= 0])
        self._last_step_end = None
        self._fail(gens, StepFailed(f"internal error in the {what}: {type(error).__name__}: {error}"))

    # -- rows leaving: cancelled, parked ------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        # `cancelled` is set from the consumer's thread at any moment: read each flag ONCE, so a
        # row dropped is a row released and vice versa (reading it twice, a cancel landing in
        # between released a row that stayed in the pool, and released it again a step later).
        gone: list[Generation] = []
        if self._waiting or self._prefilling:
            waiting = [(g, g.cancelled) for g in self._waiting]
            prefill = [(g, g.cancelled) for g in self._prefilling]
            dropped = [g for g, c in waiting + prefill if c]
            if dropped:
                self._waiting = deque(g for g, c in waiting if not c)
                self._prefilling = [g for g, c in prefill if not c]
                gone += dropped
        if self._parked:  # Stream.cancel hands a parked row back; this is the guard behind it
            parked = [(g, g.cancelled) for g in self._parked]
            gone += [g for g, c in parked if c]
            self._parked = [g for g, c in parked if not c]
        if len(self._rows):
            rows = [g for g in self._rows.gens if g.cancelled]
            if rows:
                self._leave(rows)
                gone += rows
        if gone:
            self._release(gone)

    def _park(self) -> None:
        """Rows whose reader is behind leave the pool with their next input token and state, as a
        pure continuation does (`rejoin`); they come back through `_unpark` when the reader takes."""
        over, self._over = self._over, []
        parked = [g for g in over if g.slot >= 0 and not g.cancelled and g.sink.park()]
        for g in parked:
            g.rejoin = self._rows.row_for_rejoin(g)
        if parked:
            self._leave(parked)
            self._parked += parked

    def _unpark(self, gens: list[Generation]) -> None:
        """Under _cv: parked rows with room again go first in the queue (cancelled ones are dropped
        there, by _drop_cancelled)."""
        back = {id(g) for g in gens}
        self._parked = [g for g in self._parked if id(g) not in back]
        self._waiting.extendleft(reversed([g for g in gens if g.rejoin is not None]))

    def _leave(self, gens: list[Generation]) -> None:
        self._rows.leave(gens)
        if not len(self._rows):
            self._last_step_end = None

    # -- rows joining ---------------------------------------------------------------------------------------
    def _rejoin(self, rows: list[Generation]) -> None:
        """Pure continuations (and parked rows) join the decode rows with their token and state:
        their next token comes from the same step call it would have come from had they never left."""
        state = tuple(np.stack([g.rejoin[1][k] for g in rows], axis=1)  # each [L, R, H]
                      for k in range(len(rows[0].rejoin[1])))
        self._rows.commit(self._rows.joining(rows, [g.rejoin[0] for g in rows], state))
        for g in rows:
            g.rejoin = None
        self._fresh += rows

    def _join(self, rows: list[Generation], state: tuple) -> None:
        """Rows whose prompt has one token left join the decode rows with it as their input and
        `state` (each [L, R, H]): the next step reads it and samples their first token."""
        self._commit_join(rows, self._rows.joining(rows, [g.prompt_ids[-1] for g in rows], state))

    def _commit_join(self, rows: list[Generation], joining) -> None:
        """Assignments and row writes only: `rows` (built into `joining`) are in the decode rows."""
        self._rows.commit(joining)
        for g in rows:
            g.prefilled, g.partial = len(g.prompt_ids), None
        self._prompt_tokens += len(rows)  # each one's last prompt token, read by the next step
        self._fresh += rows

    def _prefill_step(self, rows: list[Generation]) -> None:
        """One prompt-graph call advancing `rows` (up to max_prefill_rows prompts) by a chunk each;
        a row with one prompt token left joins the decode rows."""
        call = self._prefiller.read(rows)  # a failure up to the commit changes nothing (_charged)
        done = call.joining()
        idx = np.asarray(done, dtype=np.int64)
        joined = (self._rows.joining([rows[i] for i in done], [rows[i].prompt_ids[-1] for i in done],
                                     tuple(x[:, idx] for x in call.state)) if done else None)
        # commit: assignments and row writes only
        self._prefiller.commit(call, set(done))
        n_tokens = int(call.lengths.sum())
        self._prompt_tokens += n_tokens
        self.observer.on_prefill(len(rows), n_tokens, call.seconds)
        self._prefiller.keep_prefixes(call)
        if done:
            finished = {id(rows[i]) for i in done}
            self._prefilling = [g for g in self._prefilling if id(g) not in finished]
            self._commit_join([rows[i] for i in done], joined)

    # -- the decode step -----------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        rows = self._rows
        fresh, self._fresh = self._fresh, []
        tokens, state = rows.inputs()
        t0 = time.perf_counter()
        try:
            logits, new = self.engine.step(tokens, state)
        except Exception as e:
            gens = list(rows.gens)
            log.exception("model step failed for %d request(s) request_ids=%s", len(gens), _ids(gens))
            self._leave(gens)
            self._fail(gens, StepFailed(f"model step failed: {e}"))
            return
        t1 = time.perf_counter()
        for g in fresh:
            g.first_token_at = g.first_token_at or t1
        gap = None if self._last_step_end is None else t1 - self._last_step_end
        self.observer.on_decode(len(rows), t1 - t0, gap)
        self._steps += 1
        n = len(rows)
        result: StepResult = rows.advance(logits, new)
        self.observer.on_sample(n, result.sample_seconds)
        self._tokens_generated += n
        self._last_step_end = t1
        if result.done or result.failed:
            self._leave(result.done + result.failed)
        if result.done:
            self._release(result.done)
        self._deliver(result.out)
        if result.failed:
            log.error("non-finite logits for %d request(s) request_ids=%s; ending them", len(result.failed),
                      _ids(result.failed))
            self._fail(result.failed, StepFailed("the model produced non-finite logits; generation stopped"))

    # -- delivery ----------------------------------------------------------------------------------------------
    def _fail(self, gens: list[Generation], error: GenerationError) -> None:
        ids = {id(g) for g in gens}
        self._prefilling = [g for g in self._prefilling if id(g) not in ids]
        self._release(gens)
        self._deliver([Emitted(g, "", 0) for g in gens], error)

    def _abort_all(self, error: GenerationError) -> None:
        gens = list(self._waiting) + self._prefilling + list(self._rows.gens) + self._parked
        with self._cv:
            gens += self._incoming
            self._incoming.clear()
            self._unparked.clear()
        self._waiting.clear()
        self._parked = []
        if len(self._rows):
            self._rows.leave(list(self._rows.gens))
        if gens:
            self._fail(gens, error)

    def _release(self, gens: list[Generation]) -> None:
        """Give back the admission count of `gens`, each once (a part that fails after finishing
        some rows ends them again with the rest)."""
        n = 0
        for g in gens:
            n += not g.released
            g.released = True
        if n:
            with self._cv:
                self._in_system -= n

    def _deliver(self, out: list[Emitted], error: GenerationError | None = None) -> None:
        """Hand output to the sinks; one loop wake-up per step, and none when no reader waits."""
        woken = []
        for o in out:
            sink = o.gen.sink
            flags = sink.push(o.text, o.tokens, o.finished, error, o.logprob, o.state)
            if flags & 1:
                woken.append(sink)
            if flags & Stream.OVER:
                self._over.append(o.gen)
        if woken and self._loop is not None:
            self._on_loop(wake_all, woken)
