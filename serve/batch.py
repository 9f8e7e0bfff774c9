"""Per-request generation state, and the batch of rows that share one model step.

As in TGI v0.4.0, a `Batch` owns the per-step arrays plus ONE list of per-request objects, and
`filter`/`concatenate` return new batches. A recurrent model's whole context for a row is its
column of the state tensors (an LSTM's (h, c), a GRU's h; the manifest says which), so joining
and leaving is indexing along axis 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lstmgen.serve.params import GenerationRequest
from lstmgen.serve.penalties import TokenHistory
from lstmgen.serve.sampling import BatchSampling
from lstmgen.serve.stopping import StopChecker


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: what it asked for and how far it has got."""

    request: GenerationRequest
    prompt_ids: list[int]
    rng: np.random.Generator
    stopper: StopChecker
    sink: object  # where its output goes (scheduler.Stream); opaque here
    primed: int = 0  # prompt tokens consumed so far
    # State after `primed` tokens while a long prompt is primed in chunks: each state tensor [L, H]
    partial: tuple[np.ndarray, ...] | None = None
    cancelled: bool = False  # set by the consumer's thread; read by the scheduler between steps
    released: bool = False  # its admission count was given back (Scheduler._release): once only
    history: TokenHistory | None = None  # seen tokens, for requests with a penalty
    carried: int = 0  # 1 when prompt_ids[0] is a continued state's last token (not the prompt's)
    # A pure continuation (a state and no prompt): its last token and state (each [L, H]); the
    # row joins the decode batch directly, as if it had never left it.
    rejoin: tuple[int, tuple[np.ndarray, ...]] | None = None
    want_state: bool = False  # return_state or state_every: outputs may carry the state
    bias: tuple[np.ndarray, np.ndarray] | None = None  # logit_bias as (ids int64 [K], values float32 [K])

    @property
    def prompt_tokens(self) -> int:
        """Tokens read from this request's prompt (a carried token is not the prompt's)."""
        return len(self.prompt_ids) - self.carried

    @property
    def prompt_left(self) -> int:
        return len(self.prompt_ids) - self.primed


def host(x) -> np.ndarray:
    """A state array on the host: device-resident OrtValues (IO binding) are copied back."""
    return x if isinstance(x, np.ndarray) else x.numpy()


@dataclass(frozen=True)
class Batch:
    seqs: list[Sequence]
    tokens: np.ndarray  # int64 [B]: each row's last sampled token, the next step's input
    # the state tensors, each float32 [L, B, H] (OrtValues on the device between steps with IO binding)
    state: tuple
    sampling: BatchSampling = field(repr=False)
    # per batch, not per step: the rows that report logprobs, and each row's penalty history
    logprob_rows: list[int] = field(default_factory=list, repr=False)
    histories: list[TokenHistory | None] = field(default_factory=list, repr=False)
    # rows with a logit_bias: (row, token ids int64 [K], values float32 [K])
    biases: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.seqs)

    @classmethod
    def create(cls, seqs: list[Sequence], tokens: np.ndarray, state: tuple) -> "Batch":
        return cls(seqs, tokens, state, BatchSampling.from_params([s.request.sampling for s in seqs]),
                   [i for i, s in enumerate(seqs) if s.request.logprobs], [s.history for s in seqs],
                   [(i, *s.bias) for i, s in enumerate(seqs) if s.bias is not None])

    def filter(self, keep: list[int]) -> "Batch | None":
        """The rows at `keep`, in that order; None when nothing is kept."""
        if not keep:
            return None
        if len(keep) == len(self.seqs):
            return self
        idx = np.asarray(keep)
        # Rows leave: the one time state crosses back to the host under IO binding.
        return Batch.create([self.seqs[i] for i in keep], self.tokens[idx],
                            tuple(host(x)[:, idx] for x in self.state))  # each [L, B', H]

    @staticmethod
    def concatenate(batches: list["Batch | None"]) -> "Batch | None":
        batches = [b for b in batches if b is not None and len(b)]
        if not batches:
            return None
        if len(batches) == 1:
            return batches[0]
        return Batch.create([s for b in batches for s in b.seqs],
                            np.concatenate([b.tokens for b in batches]),
                            tuple(np.concatenate([host(b.state[k]) for b in batches], axis=1)  # [L, B1+B2, H]
                                  for k in range(len(batches[0].state))))
