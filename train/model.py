"""The stacked LSTM language model: embedding -> N x LSTM (dropout between) -> linear to vocab."""
from __future__ import annotations

import torch
from torch import nn

from lstmgen.train.config import ModelConfig

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each [L, B, H]


class StackedLSTM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.tie_weights and cfg.embedding_size != cfg.hidden_size:
            raise ValueError("tie_weights needs embedding_size == hidden_size "
                             f"(got {cfg.embedding_size} and {cfg.hidden_size})")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embedding_size)
        # Dropout on the non-recurrent connections only (Zaremba et al. 2014): the input of
        # every layer and the output of the last one; nn.LSTM applies it between layers.
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.embedding_size, cfg.hidden_size, cfg.num_layers,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_weights:
            self.head.weight = self.embed.weight
        self.reset_parameters(cfg.init_scale)

    def reset_parameters(self, scale: float) -> None:
        if scale > 0:  # Zaremba: every weight uniform in [-scale, scale]
            for p in self.parameters():
                nn.init.uniform_(p, -scale, scale)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.cfg.num_layers, batch_size, self.cfg.hidden_size)  # [L, B, H]
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        # tokens [T, B] (sequence first, as the ONNX LSTM op); state (h, c) [L, B, H]
        x = self.drop(self.embed(tokens))  # [T, B, E]
        y, (h, c) = self.lstm(x, state)  # y [T, B, H]
        logits = self.head(self.drop(y))  # [T, B, V]
        return logits, (h, c)
