"""The stacked recurrent language model: embedding -> N x LSTM, GRU or an LSTM variant (dropout
between) -> linear to vocab."""
from __future__ import annotations

import torch
from torch import nn

from lstmgen.manifest_schema import STATE_NAMES  # the manifest's names, one definition
from lstmgen.train.cells import VARIANTS, VariantLSTM
from lstmgen.train.config import ModelConfig

# The recurrent state as a tuple of named tensors, each [L, B, H]: (h, c) for an LSTM (and its
# variants), (h,) for a GRU.
State = tuple[torch.Tensor, ...]


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float) -> nn.Module:
    """nn.LSTM or nn.GRU, sequence first, or for "peephole" / "cifg" the hand-written VariantLSTM
    (train/cells.py) with nn.LSTM's interface. torch's own modules where they exist: export maps
    nn.LSTM and the variants onto the ONNX LSTM op, and nn.GRU onto ONNX GRU with
    linear_before_reset=1 (torch applies the reset gate after the recurrent matmul)."""
    if cell not in STATE_NAMES:
        raise ValueError(f"cell must be one of {', '.join(STATE_NAMES)} (got {cell!r})")
    dropout = dropout if num_layers > 1 else 0.0
    if cell in VARIANTS:
        return VariantLSTM(cell, input_size, hidden_size, num_layers, dropout)
    kind = nn.LSTM if cell == "lstm" else nn.GRU
    return kind(input_size, hidden_size, num_layers, dropout=dropout)


def run_rnn(rnn: nn.Module, cell: str, x, state: State) -> tuple[object, State]:
    """One call of the recurrent stack with the state as a tuple whatever the cell."""
    if len(STATE_NAMES[cell]) == 2:  # (h, c): the LSTM and its variants
        y, (h, c) = rnn(x, state)
        return y, (h, c)
    y, h = rnn(x, state[0])
    return y, (h,)


class RecurrentLM(nn.Module):
    """The language model: embedding -> a stack of the configured cell -> linear to the vocabulary.
    Its weights sit under the cell's name (`lstm.*`, `gru.*`, `peephole.*`, `cifg.*`), so an LSTM
    checkpoint's keys are those of nn.LSTM whatever the class is called."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.tie_weights and cfg.embedding_size != cfg.hidden_size:
            raise ValueError("tie_weights needs embedding_size == hidden_size "
                             f"(got {cfg.embedding_size} and {cfg.hidden_size})")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embedding_size)
        # Dropout on the non-recurrent connections only (Zaremba et al. 2014): the input of
        # every layer and the output of the last one; the torch module applies it between layers.
        self.drop = nn.Dropout(cfg.dropout)
        # named after the cell, so an LSTM's state_dict keys (lstm.weight_ih_l0, ...) never change
        setattr(self, cfg.cell, make_rnn(cfg.cell, cfg.embedding_size, cfg.hidden_size, cfg.num_layers,
                                         cfg.dropout))
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_weights:
            self.head.weight = self.embed.weight
        self.reset_parameters(cfg.init_scale)

    @property
    def rnn(self) -> nn.Module:
        return getattr(self, self.cfg.cell)

    def reset_parameters(self, scale: float) -> None:
        if scale > 0:  # Zaremba: every weight uniform in [-scale, scale]
            for p in self.parameters():
                nn.init.uniform_(p, -scale, scale)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.cfg.num_layers, batch_size, self.cfg.hidden_size)  # [L, B, H]
        return tuple(torch.zeros(shape, device=device) for _ in STATE_NAMES[self.cfg.cell])

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        # tokens [T, B] (sequence first, as the ONNX LSTM op); state (h, c) or (h,), each [L, B, H]
        x = self.drop(self.embed(tokens))  # [T, B, E]
        y, state = run_rnn(self.rnn, self.cfg.cell, x, state)  # y [T, B, H]
        logits = self.head(self.drop(y))  # [T, B, V]
        return logits, state


StackedLSTM = RecurrentLM  # its earlier name (it may be a GRU), kept for code that imports it
