"""What the generation core hands out: output records, counters, and the observer of model calls."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from lstmgen.serve.logprobs import TopLogprobs
from lstmgen.serve.state_blob import GenerationState
from lstmgen.serve.stopping import FinishReason


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
class Delta:
    """What a stream's reader takes at once: the text (and tokens) made since its last read."""

    text: str
    token_count: int
    finished: Finished | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked for them
    state: GenerationState | None = None  # the state right after this delta's last token


class Emitted(NamedTuple):
    """What one step hands one generation's sink (a NamedTuple: made per row per step)."""

    gen: object  # the Generation (serve/generation.py)
    text: str
    tokens: int
    finished: Finished | None = None
    logprob: TokenLogprob | None = None
    state: GenerationState | None = None


@dataclass(frozen=True)
class Stats:
    active_rows: int  # prefill + generating
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

    def on_prefill(self, rows: int, tokens: int, seconds: float) -> None:
        """One prompt call prefilled `tokens` prompt tokens over `rows` rows in `seconds`."""

    def on_sample(self, rows: int, seconds: float) -> None:
        """Choosing the next tokens of one decode step's `rows` rows (penalties, the sampler) took
        `seconds`."""


class NoObserver:
    def on_decode(self, rows: int, seconds: float, gap_s: float | None) -> None:
        pass

    def on_prefill(self, rows: int, tokens: int, seconds: float) -> None:
        pass

    def on_sample(self, rows: int, seconds: float) -> None:
        pass
