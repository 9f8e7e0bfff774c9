"""Reading prompts: a chunk of each new prompt per call of the prompt graph, many prompts a call.

A prompt's last token is not read here: the decode step its row joins reads it, like a generated
token, so every sampled token comes from the step graph (whatever chunking or the prefix cache did
before) and a one-token prompt costs no prompt call. `Prefiller.read` changes nothing; the worker
commits what it returns (so a failing call can be retried in halves, serve/scheduler.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from lstmgen.serve.engine import Engine
from lstmgen.serve.generation import Generation
from lstmgen.serve.prefix_cache import PrefixCache

log = logging.getLogger("lstmgen.scheduler")


@dataclass(frozen=True)
class PrefillCall:
    """One prompt call's result for `rows`: tokens read per row, and the state after them."""

    rows: list[Generation]
    lengths: np.ndarray  # int64 [R]
    state: tuple[np.ndarray, ...]  # each [L, R, H]
    seconds: float

    def joining(self) -> list[int]:
        """Rows (indices) with one prompt token left after this chunk: they join the decode rows."""
        return [i for i, g in enumerate(self.rows) if g.prompt_left - int(self.lengths[i]) <= 1]


class Prefiller:
    def __init__(self, engine: Engine, prefill_chunk: int, cache: PrefixCache | None):
        self.engine, self.prefill_chunk, self.cache = engine, prefill_chunk, cache

    def start(self, g: Generation) -> None:
        """A new prompt begins where the prefix cache has its longest stored prefix, if any."""
        if self.cache is not None and not g.carried:
            g.prefilled, g.partial = self.cache.lookup(g.prompt_ids)

    def states(self, rows: list[Generation]) -> tuple[np.ndarray, ...]:
        """The state of `rows` (each its `partial`, or empty), each tensor [L, R, H]."""
        state = self.engine.zeros(len(rows))
        for i, g in enumerate(rows):
            if g.partial is not None:
                for x, row in zip(state, g.partial):
                    x[:, i] = row
        return state

    def read(self, rows: list[Generation]) -> PrefillCall:
        """One prompt-graph call advancing each row by its next chunk; changes nothing."""
        lengths = np.array([self._chunk_len(g) for g in rows], dtype=np.int64)  # [R]
        tokens = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)  # [R, T] right-padded
        for i, g in enumerate(rows):
            tokens[i, : lengths[i]] = g.prompt_ids[g.prefilled : g.prefilled + lengths[i]]
        t0 = time.perf_counter()
        _, state = self.engine.prefill(tokens, lengths, self.states(rows))  # the logits: the step graph's job
        return PrefillCall(rows, lengths, state, time.perf_counter() - t0)

    def commit(self, c: PrefillCall, joining: set[int]) -> None:
        """Assignments only: each row moves on by its chunk; rows not joining keep their state."""
        partials = {i: tuple(x[:, i].copy() for x in c.state) for i in range(len(c.rows)) if i not in joining}
        for i, g in enumerate(c.rows):
            g.prefilled += int(c.lengths[i])
            g.partial = partials.get(i, g.partial)

    def keep_prefixes(self, c: PrefillCall) -> None:
        """The prefix cache takes the state of rows that stopped at one of its checkpoints; it is an
        optimisation, so a failure here (memory) is logged and costs nothing else."""
        cache = self.cache
        if cache is None:
            return
        try:
            for i, g in enumerate(c.rows):
                if not g.carried and g.prefilled % cache.every == 0 and g.prompt_left:
                    cache.store(g.prompt_ids, g.prefilled, tuple(x[:, i] for x in c.state))
        except Exception:
            log.warning("prefix cache: a prompt state was not kept", exc_info=True)

    def _chunk_len(self, g: Generation) -> int:
        """Prompt tokens row g reads in the next call: a chunk, cut at the next prefix-cache
        checkpoint so that the state there can be kept."""
        n = min(self.prefill_chunk, g.prompt_left - 1)  # the last token: the decode step's
        if self.cache is not None and not g.carried:
            nxt = self.cache.boundaries(g.prefilled, len(g.prompt_ids))
            if nxt:
                n = min(n, nxt[0] - g.prefilled)
        return n
