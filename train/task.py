"""What a training task is to the loop (train/loop.py): the records it returns and the protocol it
implements. Two tasks implement it: the language model (train/lm_task.py) and the frame models
(train/frame_task.py); a new kind of model is a new task, not a branch in the loop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from lstmgen.train.config import AnyTrainConfig

State = tuple[torch.Tensor, ...]  # the recurrent state, each [L, B, H]


@dataclass(frozen=True)
class Step:
    """One update's forward pass, as the task computes it."""

    loss: torch.Tensor  # mean loss of the batch (what the window and the metrics average)
    n: int  # what the mean is over: tokens, frames x features, sequences
    items: int  # what throughput counts: tokens or frames
    state: State | None  # the state after the batch (carried on when the task's data are streams)
    scale: float = 1.0  # the gradient is of loss * scale (the loss summed over time: Zaremba)


@dataclass(frozen=True)
class Validation:
    loss: float  # mean loss over what was read
    figures: dict[str, float]  # the task's figures without prefix: loss, ppl | bpc | mse | accuracy
    fraction: float = 1.0  # share of the split read: < 1 for a planned prefix or a pass cut short
    cut: bool = False  # stopped before its plan by the time limit

    def note(self, limit: str) -> str:
        """Only a language model's pass is ever planned as a prefix or cut (frame passes are whole)."""
        if self.fraction >= 1:
            return ""
        if self.cut:
            return f"; cut at {self.fraction:.0%} of the validation text by {limit}"
        return f"; the first {self.fraction:.0%} of the validation text"


class Task(Protocol):
    """What the loop asks of a task (train/lm_task.py, train/frame_task.py)."""

    cfg: AnyTrainConfig
    kind: str  # char | word | regression | classification: how figures and curves read
    unit: str  # what throughput counts: "tok" or "frames"
    model: torch.nn.Module
    n_batches: int  # updates per epoch (this process)
    test_on_stop: bool  # score best.pt on the test split also when a limit stopped the run

    def batches(self, epoch: int, start: int) -> Iterator: ...  # this epoch's batches from update `start`
    def forward(self, net: torch.nn.Module, batch, state: State | None) -> Step: ...
    def zero_state(self) -> State | None: ...  # an epoch's first state (None: each batch starts at zero)
    def valid_chunks(self) -> int | None: ...  # chunks a validation pass reads (None: not chunked)
    def score(self, model, split: str, chunks: int | None, stop: Callable[[], bool] | None) -> dict[str, float]: ...
    def figures(self, sums: dict[str, float]) -> dict[str, float]: ...  # sums over all ranks -> figures
    def describe_val(self, val: Validation, note: str) -> str: ...
    def metrics(self) -> dict: ...  # what a checkpoint's metrics hold besides the loop's
    def checkpoint(self, state_dict: dict, progress: dict, metrics: dict): ...
    def has_split(self, split: str) -> bool: ...
    def preview(self, step: int) -> tuple[str, str] | None: ...  # (how, text) to log (--sample-every), or None
