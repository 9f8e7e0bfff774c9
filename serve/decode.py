"""The decode rows of text generation, and the step over them as a value.

`DecodeRows` keeps every generating request in one row of a `RowPool`: its state tensors, its next
input token, its counts and its sampling settings as columns. `advance(logits, state)` turns one
model step's output into a `StepResult` (what each row emits, which rows finished, which failed)
and calls nothing back: the worker (serve/scheduler.py) delivers, releases and removes.

Bookkeeping is vectorised over the pool. A row whose reader takes everything at the end and that
has no stop strings, penalties, logprobs, bias or state to hand out (a "quiet" row: offline
sampling, a completion) costs no Python per token: its token ids go into a column block and
become text when it finishes (or every BLOCK tokens); its end (end-of-text, max_new_tokens) is
found by array compares. A quiet row's stop strings are checked only in the steps where its new
token can complete one (serve/quiet_stops.py). Other rows take a short per-row path (the stop
matcher, penalties' history, logprobs, snapshots, a streamed piece of text).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from lstmgen.serve.generation import DRAWS, Generation
from lstmgen.serve.logprobs import TopLogprobs
from lstmgen.serve.pool import RowPool
from lstmgen.serve.quiet_stops import StopEnds, first_stop, tail_before
from lstmgen.serve.records import Emitted, Finished, TokenLogprob
from lstmgen.serve.sampling import BatchSampling, choose_checked, token_logprobs
from lstmgen.serve.state_blob import GenerationState, rng_position
from lstmgen.serve.stopping import FinishReason

BLOCK = 256  # a quiet row's token ids held before they are made into text

COLUMNS = {
    "token": np.int64,  # the next input: the last sampled token (or a prompt's last token)
    "generated": np.int64,
    "max_new": np.int64,
    "per_token": np.bool_,  # Generation.per_token, or stop strings the quiet path cannot take
    "stops": np.bool_,  # a quiet row with stop strings
    "logprobs": np.bool_,
    # sampling settings (serve/sampling.py BatchSampling)
    "greedy": np.bool_, "inv_t": np.float32, "top_k": np.int64, "top_p": np.float64, "min_p": np.float64,
    "penalised": np.bool_, "repetition": np.float32, "frequency": np.float32, "presence": np.float32,
    "u": (np.float64, DRAWS), "used": np.int64,  # the row's block of uniforms, and how many were used
    "ids": (np.int32, BLOCK), "filled": np.int64,  # quiet rows: token ids not made into text yet
}


@dataclass(frozen=True)
class StepResult:
    out: list[Emitted]  # per row that has something for its sink this step (its end included)
    done: list[Generation]  # finished this step: their rows leave
    failed: list[Generation]  # non-finite logits: no distribution to sample from
    sample_seconds: float  # choosing the tokens (penalties, the sampler)


@dataclass(frozen=True)
class Joining:
    """Rows about to join, with everything they write built (building can fail; writing cannot)."""

    gens: list[Generation]
    state: tuple[np.ndarray, ...]  # each [L, R, H]
    values: dict[str, np.ndarray]  # a value [R] (or [R, width]) per column


class DecodeRows:
    def __init__(self, shapes: tuple[tuple[int, int], ...], max_rows: int, pieces: list[str],
                 eot_id: int | None, capacity: int = 64):
        self.pool = RowPool(shapes, COLUMNS, max_rows, capacity)
        self.pieces = pieces  # token id -> text
        self._pieces = np.array(pieces, dtype=object)  # token id -> text as an object array: "".join(a[ids])
        self.eot = -1 if eot_id is None else eot_id
        self._stop_ends = StopEnds(pieces)
        self._seen = -1  # the pool version the caches below were built for

    def __len__(self) -> int:
        return len(self.pool)

    @property
    def gens(self) -> list[Generation]:
        return self.pool.owners

    # -- joining and leaving ---------------------------------------------------------------------
    def joining(self, gens: list[Generation], tokens: list[int], state: tuple[np.ndarray, ...]) -> Joining:
        """`gens` with next inputs `tokens` and `state` (each [L, R, H]); changes nothing."""
        ps = [g.request.sampling for g in gens]
        blocks = [g.draws.block if len(g.draws.block) == DRAWS else np.zeros(DRAWS) for g in gens]
        stops = np.array([bool(g.stopper.stop) for g in gens], bool)
        for g, s in zip(gens, stops.tolist()):  # once per row: the tokens that can complete its stops
            g.stop_ends = self._stop_ends(g.stopper.stop) if s and not g.per_token else None
        per_token = np.array([g.per_token or (s and g.stop_ends is None) for g, s in zip(gens, stops.tolist())], bool)
        values = {
            "token": np.array(tokens, np.int64),
            "generated": np.array([g.stopper.generated for g in gens], np.int64),
            "max_new": np.array([g.stopper.max_new_tokens for g in gens], np.int64),
            "per_token": per_token,
            "stops": stops & ~per_token,
            "logprobs": np.array([bool(g.request.logprobs) for g in gens], bool),
            "greedy": np.array([p.is_greedy for p in ps], bool),
            "inv_t": 1.0 / np.array([1.0 if p.is_greedy else p.temperature for p in ps], np.float32),
            "top_k": np.array([p.top_k for p in ps], np.int64),
            "top_p": np.array([p.top_p for p in ps], np.float64),
            "min_p": np.array([p.min_p for p in ps], np.float64),
            "penalised": np.array([p.has_penalties for p in ps], bool),
            "repetition": np.array([p.repetition_penalty for p in ps], np.float32),
            "frequency": np.array([p.frequency_penalty for p in ps], np.float32),
            "presence": np.array([p.presence_penalty for p in ps], np.float32),
            "u": np.stack(blocks) if blocks else np.zeros((0, DRAWS)),
            "used": np.array([g.draws.used if len(g.draws.block) == DRAWS else DRAWS for g in gens], np.int64),
        }
        return Joining(gens, state, values)

    def commit(self, j: Joining) -> None:
        self.pool.add(j.gens, j.state, **j.values)

    def leave(self, gens: list[Generation]) -> None:
        """These rows leave the pool (each keeps its place in its generator)."""
        used = self.pool.cols["used"]
        for g in gens:
            g.draws.used = int(used[g.slot])
        self.pool.remove([g.slot for g in gens])

    def row_for_rejoin(self, g: Generation) -> tuple[int, tuple[np.ndarray, ...]]:
        """A row's next input token and a copy of its state (each [L, H]), to rejoin later."""
        return int(self.pool.cols["token"][g.slot]), self.pool.row_state(g.slot)

    def inputs(self) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """The next step's tokens int64 [n] and state tensors (each [L, n, H])."""
        return self.pool.col("token"), self.pool.state()

    # -- the step ----------------------------------------------------------------------------------
    def advance(self, logits: np.ndarray, state: tuple) -> StepResult:
        """One step's logits [n, V] and new state: each row's next token, text and end."""
        pool = self.pool
        pool.set_state(state)
        self._refresh()
        uniforms = self._uniforms()  # [n]
        lp_rows = self._lp_rows
        raw = logits[lp_rows] if lp_rows else None  # [R, V] copies: penalties and biases overwrite
        for i, ids, values in self._biases:
            logits[i, ids] += values
        t0 = time.perf_counter()
        tokens, finite = choose_checked(logits, self._sp, uniforms, self._histories, overwrite=True)  # [n], [n]
        seconds = time.perf_counter() - t0
        pool.col("generated")[:] += 1
        pool.col("token")[:] = tokens
        out: list[Emitted] = []
        done: list[Generation] = []
        failed: list[Generation] = []
        if len(self._quiet):
            self._advance_quiet(tokens, finite, out, done, failed)
        if self._loud:
            if raw is not None and not finite[lp_rows].all():
                keep = [j for j, i in enumerate(lp_rows) if finite[i]]
                lp_rows, raw = [lp_rows[j] for j in keep], raw[keep]
            logprobs = self._logprobs(lp_rows, raw, tokens)
            self._advance_loud(tokens, finite, logprobs, out, done, failed)
        return StepResult(out, done, failed, seconds)

    def _refresh(self) -> None:
        """Per-batch values, rebuilt only when rows joined or left."""
        pool = self.pool
        if self._seen == pool.version:
            return
        self._seen = pool.version
        c = pool.col
        self._sp = BatchSampling.from_columns(c("greedy"), c("inv_t"), c("top_k"), c("top_p"), c("min_p"),
                                              c("penalised"), c("repetition"), c("frequency"), c("presence"))
        gens = pool.owners
        self._histories = [g.history for g in gens] if self._sp.penalty_rows else None
        self._lp_rows = np.flatnonzero(c("logprobs")).tolist()
        self._biases = [(i, *g.bias) for i, g in enumerate(gens) if g.bias is not None]
        per = c("per_token")
        self._loud = np.flatnonzero(per).tolist()
        self._quiet = np.flatnonzero(~per)
        self._all_quiet = len(self._quiet) == len(gens)
        self._rows = np.arange(len(gens))
        self._stop_rows = np.flatnonzero(c("stops"))
        V = len(self.pieces)  # a key per (row, end token): row * V + token; rows ascending, ends sorted: sorted
        self._stop_keys = np.concatenate(
            [r * V + gens[r].stop_ends for r in self._stop_rows.tolist()] or [np.zeros(0, np.int64)])

    def _uniforms(self) -> np.ndarray:
        """One uniform per row from its own generator (a block of DRAWS refilled when used up)."""
        pool = self.pool
        used, u = pool.col("used"), pool.col("u")
        for i in np.flatnonzero(used >= DRAWS).tolist():
            u[i] = pool.owners[i].draws.refill()
            used[i] = 0
        uniforms = u[self._rows, used]
        used += 1
        return uniforms

    def _advance_quiet(self, tokens, finite, out, done, failed) -> None:
        """Quiet rows: token ids into their block; the rows that ended get their whole text."""
        c = self.pool.col
        q = None if self._all_quiet else self._quiet
        ids, filled, generated = c("ids"), c("filled"), c("generated")
        if q is None:
            tok, fin_ok, max_new = tokens, finite, c("max_new")
            ids[self._rows, filled] = tok
            filled += 1
            gen, n_filled = generated, filled
        else:
            tok, fin_ok, max_new = tokens[q], finite[q], c("max_new")[q]
            ids[q, filled[q]] = tok
            filled[q] += 1
            gen, n_filled = generated[q], filled[q]
        ended = (tok == self.eot) | (gen >= max_new) | ~fin_ok
        stopped = self._stops_hit(tokens, finite) if len(self._stop_keys) else {}
        if stopped:
            rows = np.fromiter(stopped, np.int64, len(stopped))
            ended[rows if q is None else np.searchsorted(q, rows)] = True
        gens = self.pool.owners
        for j in np.flatnonzero(ended).tolist():
            row = j if q is None else int(q[j])
            g = gens[row]
            if not fin_ok[j]:
                failed.append(g)
                continue
            eot = int(tok[j]) == self.eot
            n = int(n_filled[j]) - eot  # the end-of-text token has no text
            g.stopper.generated = count = int(gen[j])
            text = "".join(g.parts) + "".join(self._pieces[ids[row, :n]].tolist())
            reason, seq = FinishReason.END_OF_TEXT if eot else FinishReason.LENGTH, ""
            if row in stopped:  # a stop string wins over the length limit, as in StopChecker
                cut, seq = stopped[row]
                text, reason, g.stopper.matched = text[:len(text) - cut], FinishReason.STOP_SEQUENCE, seq
            out.append(Emitted(g, text, count, Finished(reason, g.prompt_tokens, count, g.request.sampling.seed, seq)))
            done.append(g)
        full = np.flatnonzero((n_filled >= BLOCK) & ~ended)
        for j in full.tolist():
            row = j if q is None else int(q[j])
            gens[row].parts.append("".join(self._pieces[ids[row]].tolist()))
            filled[row] = 0

    def _stops_hit(self, tokens: np.ndarray, finite: np.ndarray) -> dict[int, tuple[int, str]]:
        """Quiet rows whose new token completes a stop string: row -> (characters to cut from the
        end of its text, the string). Only rows whose token is one of their stops' end tokens are
        looked at; their ids (this token's included) are already in the block."""
        rows, keys = self._stop_rows, self._stop_keys
        codes = rows * len(self.pieces) + tokens[rows]
        at = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
        gens, ids, filled = self.pool.owners, self.pool.col("ids"), self.pool.col("filled")
        out = {}
        for row in rows[keys[at] == codes].tolist():
            tok = int(tokens[row])
            if not finite[row] or tok == self.eot:
                continue
            g, piece = gens[row], self.pieces[tok]
            stops = g.stopper.stop
            tail = tail_before(self._pieces, ids[row, :filled[row] - 1], g.parts, max(map(len, stops)) - 1) + piece
            hit = first_stop(tail, len(piece), stops)
            if hit is not None:
                out[row] = (len(tail) - hit[0], hit[1])
        return out

    def _advance_loud(self, tokens, finite, logprobs, out, done, failed) -> None:
        """Rows with Python of their own per token (Generation.per_token)."""
        gens, pieces = self.pool.owners, self.pieces
        all_rows = len(self._loud) == len(gens)
        toks = tokens.tolist() if all_rows else tokens[self._loud].tolist()
        oks = finite.tolist() if all_rows else finite[self._loud].tolist()
        for i, tok, ok in zip(self._loud, toks, oks):
            g = gens[i]
            if not ok:
                failed.append(g)
                continue
            if g.history is not None:
                g.history.add(tok)
            text, reason = g.stopper.add(tok, pieces[tok])
            fin = state = None
            if reason is not None:
                held = g.stopper.pending if g.request.return_state and reason is FinishReason.LENGTH else ""
                fin = Finished(reason, g.prompt_tokens, g.stopper.generated, g.request.sampling.seed,
                               g.stopper.matched, held)
                done.append(g)
            if g.want_state and (g.request.return_state if fin else
                                 g.request.state_every and g.stopper.generated % g.request.state_every == 0):
                state = self._snapshot(g, tok, fin)
            out.append(Emitted(g, text, 1, fin, logprobs.get(i), state))

    def _snapshot(self, g: Generation, token: int, fin: Finished | None) -> GenerationState:
        """Row g's state after sampling `token`: its state tensors (each [L, H], copied)."""
        g.draws.used = int(self.pool.cols["used"][g.slot])
        hist = g.history
        return GenerationState(
            self.pool.row_state(g.slot), token, g.request.sampling.seed, rng_position(g.draws.position()),
            g.stopper.pending if fin is None or fin.held_text else "",  # after a stop: nothing held
            (tuple(hist.ids.tolist()), tuple(hist.counts.tolist())) if hist is not None else None)

    def _logprobs(self, rows: list[int], raw: np.ndarray | None, tokens: np.ndarray) -> dict[int, TokenLogprob]:
        """Row -> its token's log-probability (and alternatives), for the rows that asked; raw:
        their logits [R, V] before any penalty or bias."""
        if not rows:
            return {}
        gens, pieces, out = self.pool.owners, self.pieces, {}
        n = max(gens[i].request.top_logprobs for i in rows)
        lp, top_ids, top_lp = token_logprobs(raw, tokens[rows], n)
        for j, i in enumerate(rows):
            k = gens[i].request.top_logprobs
            tok = int(tokens[i])
            out[i] = TokenLogprob(tok, pieces[tok], float(lp[j]), TopLogprobs(top_ids[j, :k], top_lp[j, :k], pieces))
        return out
