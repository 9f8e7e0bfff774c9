"""The frame model: [linear input layer] -> N x LSTM, GRU or an LSTM variant -> linear head.

Regression predicts D_out values at every frame; classification reads the head's output at each
sequence's last valid frame (the row-by-row MNIST tutorial's "last output"). Sequences of different
lengths are packed (pack_padded_sequence), so padded frames never enter the recurrence nor the
state a batch hands on, and the losses below count valid frames only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstmgen.train.model import STATE_NAMES, State, make_rnn, run_rnn


@dataclass(frozen=True)
class FrameModelConfig:
    task: Literal["regression", "classification"]
    input_size: int  # D_in
    output_size: int  # D_out (regression) or the number of classes
    hidden_size: int = 128
    num_layers: int = 2
    cell: Literal["lstm", "gru", "peephole", "cifg"] = "lstm"
    projection_size: int = 0  # > 0: linear D_in -> P before the recurrent stack (no activation)
    dropout: float = 0.0


class FrameModel(nn.Module):
    def __init__(self, cfg: FrameModelConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.projection_size or cfg.input_size
        self.proj = nn.Linear(cfg.input_size, cfg.projection_size) if cfg.projection_size else None
        self.drop = nn.Dropout(cfg.dropout)
        # named after the cell, as in RecurrentLM: weights under lstm.*, gru.*, peephole.* or cifg.*
        setattr(self, cfg.cell, make_rnn(cfg.cell, width, cfg.hidden_size, cfg.num_layers, cfg.dropout))
        self.head = nn.Linear(cfg.hidden_size, cfg.output_size)

    @property
    def rnn(self) -> nn.Module:
        return getattr(self, self.cfg.cell)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.cfg.num_layers, batch_size, self.cfg.hidden_size)  # [L, B, H]
        return tuple(torch.zeros(shape, device=device) for _ in STATE_NAMES[self.cfg.cell])

    def forward(self, x: torch.Tensor, state: State,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """x [T, B, D_in] (time first, as ONNX); lengths [B] (None: every row is T frames long).
        Returns the head's output at every frame, [T, B, D_out or C] (zeros' image past a row's
        length: mask it), and the state after each row's last valid frame."""
        z = self.proj(x) if self.proj is not None else x  # [T, B, P]
        z = self.drop(z)
        if lengths is None or bool((lengths == x.size(0)).all()):
            y, state = run_rnn(self.rnn, self.cfg.cell, z, state)  # [T, B, H]
        else:
            packed = pack_padded_sequence(z, lengths.cpu(), enforce_sorted=False)
            y, state = run_rnn(self.rnn, self.cfg.cell, packed, state)
            y, _ = pad_packed_sequence(y, total_length=x.size(0))  # [T, B, H], zeros past each length
        return self.head(self.drop(y)), state


def frame_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """[T, B] bool: True where frame t of row b is a real frame."""
    return torch.arange(steps, device=lengths.device)[:, None] < lengths[None, :]


def last_valid(out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """out [T, B, C] -> [B, C]: each row's output at its last valid frame."""
    idx = (lengths - 1).view(1, -1, 1).expand(1, out.size(1), out.size(2))  # [1, B, C]
    return out.gather(0, idx).squeeze(0)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """Squared error over the valid frames only: mean (or sum) over frames and features."""
    mask = frame_mask(lengths, pred.size(0))  # [T, B]
    err = (pred - target)[mask]  # [F, D_out]: padded frames are not selected at all
    return err.pow(2).mean() if reduction == "mean" else err.pow(2).sum()


def classification_loss(out: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor,
                        reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of the last valid frame's logits, the number of correct predictions)."""
    logits = last_valid(out, lengths)  # [B, C]
    return F.cross_entropy(logits, labels, reduction=reduction), (logits.argmax(1) == labels).sum()
