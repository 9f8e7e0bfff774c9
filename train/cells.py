"""LSTM variants that torch's nn.LSTM lacks, as stacked modules with nn.LSTM's interface.

  peephole (Gers & Schmidhuber 2000; the ONNX LSTM op's optional input P):
      i_t = sigmoid(W_i x + R_i h_{t-1} + b_i + p_i * c_{t-1})
      f_t = sigmoid(W_f x + R_f h_{t-1} + b_f + p_f * c_{t-1})
      g_t = tanh(W_g x + R_g h_{t-1} + b_g)
      c_t = f_t * c_{t-1} + i_t * g_t
      o_t = sigmoid(W_o x + R_o h_{t-1} + b_o + p_o * c_t)      <- the new cell state, as ONNX says
      h_t = o_t * tanh(c_t)
  cifg, coupled input and forget gates (Greff et al. 2017, "LSTM: A Search Space Odyssey"): the
      plain LSTM with i_t = 1 - f_t and no input gate of its own; no peepholes.

Parameters per layer k, named like nn.LSTM's so export reads them the same way: weight_ih_l{k}
[G*H, in], weight_hh_l{k} [G*H, H], bias_ih_l{k}, bias_hh_l{k} [G*H], gate blocks in torch's order
(i, f, g, o) for peephole (G = 4) and (f, g, o) for cifg (G = 3: the input gate has no weights);
peephole also weight_peep_l{k} [3H], blocks (i, f, o). Every parameter starts uniform in
[-1/sqrt(H), 1/sqrt(H)] as in nn.LSTM, the peepholes too (so the model's own init_scale, which
re-draws every parameter, treats them like any other weight).

Speed: the input projection of all T steps is one matmul per layer; only the recurrence loops, over
xw.unbind(0) (indexing xw[t] made training 5x slower: each select's backward writes a zero gradient
of the whole [T, B, G*H]). Measured against nn.LSTM in docs/results.md. Not TorchScript: scripting
the loop changed nothing measurable here (autograd's per-op work dominates, not Python's), and
torch.jit.script is deprecated in torch 2.13; a hand-written backward (one GEMM for the recurrent
weights' gradient) gained 15-20% at a small shape and nothing at the char-rnn one, not worth its code.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

VARIANTS = ("peephole", "cifg")
GATES = {"peephole": 4, "cifg": 3}  # gate blocks in weight_ih / weight_hh


def _scan(xw: Tensor, w_hh: Tensor, h: Tensor, c: Tensor, mask: Tensor | None,
          gates: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """The recurrence both cells share: per step a = x_t W_ih^T + b + h W_hh^T, then the cell's own
    `gates(a, c) -> (h, c)`; rows past their length (mask false) keep their state."""
    w_t = w_hh.t()
    masks = mask.unbind(0) if mask is not None else None  # each [B, 1]
    ys: list[Tensor] = []
    for t, x_t in enumerate(xw.unbind(0)):  # not xw[t]: see the module's docstring
        h_new, c_new = gates(torch.addmm(x_t, h, w_t), c)
        if masks is not None:
            h_new = torch.where(masks[t], h_new, h)
            c_new = torch.where(masks[t], c_new, c)
        h, c = h_new, c_new
        ys.append(h)
    return torch.stack(ys), h, c


def peephole_scan(xw: Tensor, w_hh: Tensor, peep: Tensor, h: Tensor, c: Tensor,
                  mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """xw [T, B, 4H]: x W_ih^T + both biases, gates (i, f, g, o); w_hh [4H, H]; peep [3H] (i, f, o);
    h, c [B, H]; mask [T, B, 1] bool or None (rows past their length keep their state).
    Returns y [T, B, H], h, c."""
    p_i, p_f, p_o = peep.chunk(3)

    def gates(a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:  # a [B, 4H]
        a_i, a_f, a_g, a_o = a.chunk(4, 1)
        i = torch.sigmoid(a_i + p_i * c)
        f = torch.sigmoid(a_f + p_f * c)
        c_new = f * c + i * torch.tanh(a_g)
        return torch.sigmoid(a_o + p_o * c_new) * torch.tanh(c_new), c_new

    return _scan(xw, w_hh, h, c, mask, gates)


def cifg_scan(xw: Tensor, w_hh: Tensor, h: Tensor, c: Tensor,
              mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """xw [T, B, 3H]: x W_ih^T + both biases, gates (f, g, o); w_hh [3H, H]; h, c [B, H]; mask as
    in peephole_scan. Returns y [T, B, H], h, c."""
    def gates(a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:  # a [B, 3H]
        a_f, a_g, a_o = a.chunk(3, 1)
        c_new = c + (1.0 - torch.sigmoid(a_f)) * (torch.tanh(a_g) - c)  # f * c + (1 - f) * g
        return torch.sigmoid(a_o) * torch.tanh(c_new), c_new

    return _scan(xw, w_hh, h, c, mask, gates)


class VariantLSTM(nn.Module):
    """A stack of peephole or cifg layers, called like nn.LSTM (sequence first): input [T, B, I] or a
    PackedSequence, state (h, c) each [L, B, H] -> output [T, B, H] (or packed), (h, c). Dropout on
    each layer's output but the last, in training, as nn.LSTM does."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        if cell not in VARIANTS:
            raise ValueError(f"cell must be one of {', '.join(VARIANTS)} (got {cell!r})")
        self.cell, self.input_size, self.hidden_size = cell, input_size, hidden_size
        self.num_layers, self.dropout = num_layers, dropout
        G, H = GATES[cell], hidden_size
        for k in range(num_layers):
            n_in = input_size if k == 0 else H
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(G * H, n_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(G * H, H)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(G * H)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(G * H)))
            if cell == "peephole":
                self.register_parameter(f"weight_peep_l{k}", nn.Parameter(torch.empty(3 * H)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.cell}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"dropout={self.dropout}")

    def layer(self, k: int) -> dict[str, Tensor]:
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + (("weight_peep",) if self.cell == "peephole" else ())
        return {n: getattr(self, f"{n}_l{k}") for n in names}

    def forward(self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        packed = isinstance(input, PackedSequence)
        mask = None
        if packed:
            # padded, in the caller's row order (as nn.LSTM takes hx); past a row's length the state
            # is held, so (h, c) come out at each row's last valid step
            x, lengths = pad_packed_sequence(input)  # [T, B, I], [B]
            mask = (torch.arange(x.size(0))[:, None] < lengths[None, :]).to(x.device)[:, :, None]  # [T, B, 1]
        else:
            x = input
        if hx is None:
            zeros = x.new_zeros(self.num_layers, x.size(1), self.hidden_size)
            hx = (zeros, zeros)
        h0, c0 = hx  # [L, B, H] each
        hs, cs = [], []
        for k in range(self.num_layers):
            p = self.layer(k)
            xw = F.linear(x, p["weight_ih"], p["bias_ih"] + p["bias_hh"])  # [T, B, G*H], all steps at once
            if self.cell == "peephole":
                x, h, c = peephole_scan(xw, p["weight_hh"], p["weight_peep"], h0[k], c0[k], mask)
            else:
                x, h, c = cifg_scan(xw, p["weight_hh"], h0[k], c0[k], mask)
            hs.append(h)
            cs.append(c)
            if k < self.num_layers - 1 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
        out = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        return out, (torch.stack(hs), torch.stack(cs))
