"""One request inside the engine: what it asked for, how far it has got, where its output goes.

A `Generation` is made at admission (serve/admission.py), prefilled (serve/prefill.py), then holds a
row of the decode pool (serve/decode.py) until it finishes, fails, is cancelled or is parked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lstmgen.serve.params import GenerationRequest
from lstmgen.serve.penalties import TokenHistory
from lstmgen.serve.stopping import StopChecker

# Uniform draws taken from a row's generator at a time: per-row Python once per this many steps,
# not once per step (256 scalar draws cost 0.1 ms a step, 1.5% of a char-rnn step at batch 256).
DRAWS = 64


class Draws:
    """A generator's uniforms taken DRAWS at a time, giving exactly the numbers, and the position,
    that one `rng.random()` per step would: `Generator.random(n)` fills with n single draws."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.block = np.empty(0)  # float64 [DRAWS]: the current block
        self.used = 0  # draws of the block consumed
        self._start: dict | None = None  # the bit generator's state before the block

    def refill(self) -> np.ndarray:
        self._start = self.rng.bit_generator.state
        self.block, self.used = self.rng.random(DRAWS), 0
        return self.block

    def position(self) -> np.random.Generator:
        """A generator where one per-step draw would be now (for a state snapshot)."""
        if self._start is None:
            return self.rng
        bg = np.random.PCG64()
        bg.state = self._start
        bg.advance(self.used)  # one 64-bit draw per double
        return np.random.Generator(bg)


@dataclass(eq=False)
class Generation:
    request: GenerationRequest
    prompt_ids: list[int]
    draws: Draws
    stopper: StopChecker
    sink: object  # where its output goes: a Stream or a CompletionSink (push/park/seq); opaque here
    prefilled: int = 0  # prompt tokens consumed so far
    # State after `prefilled` tokens while a long prompt is prefilled in chunks: each state tensor [L, H]
    partial: tuple[np.ndarray, ...] | None = None
    cancelled: bool = False  # set by the consumer's thread; read by the worker between steps
    released: bool = False  # its admission count was given back (Scheduler._release): once only
    history: TokenHistory | None = None  # seen tokens, for requests with a penalty
    carried: int = 0  # 1 when prompt_ids[0] is a continued state's last token (not the prompt's)
    # A pure continuation (a state and no prompt), or a parked row: its next input token and state
    # (each [L, H]); the row joins the decode pool directly, as if it had never left it.
    rejoin: tuple[int, tuple[np.ndarray, ...]] | None = None
    want_state: bool = False  # return_state or state_every: outputs may carry the state
    bias: tuple[np.ndarray, np.ndarray] | None = None  # logit_bias as (ids int64 [K], values float32 [K])
    # Quiet: its reader takes everything at the end (offline, a completion), so the decode step
    # keeps its token ids in an array and makes its text once, when it finishes.
    quiet: bool = False
    slot: int = -1  # its row in the decode pool, -1 when it holds none (kept by RowPool)
    parts: list[str] = field(default_factory=list)  # quiet: text made from full token blocks
    # quiet with stop strings: the token ids that can complete one (serve/quiet_stops.py), set on joining
    stop_ends: np.ndarray | None = None
    first_token_at: float | None = None  # time.perf_counter() at the end of the step that made its first token

    @property
    def prompt_tokens(self) -> int:
        """Tokens read from this request's prompt (a carried token is not the prompt's)."""
        return len(self.prompt_ids) - self.carried

    @property
    def prompt_left(self) -> int:
        return len(self.prompt_ids) - self.prefilled

    @property
    def per_token(self) -> bool:
        """Needs Python of its own at every token: held text, penalties, logprobs, a bias, states
        to hand out, or a reader that takes text as it comes. (A quiet row's stop strings are
        matched in the pool when they can be: serve/decode.py decides.)"""
        return not self.quiet or bool(self.stopper.pending or self.history is not None
                                      or self.request.logprobs or self.want_state or self.bias is not None)
