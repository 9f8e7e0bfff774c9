"""Recurrent state_dicts -> ONNX graphs, built node by node with `onnx.helper`.

The language model's two graphs share one layout of initializers:
  step   (model.onnx):  tokens int64 [B], *state [L, B, H] -> logits [B, V], *state_out [L, B, H]
  prompt (prompt.onnx): tokens int64 [B, T], lengths int32 [B], *state -> the same outputs, taken at
                        each row's last valid token (rows are right-padded).
The state is (h, c) for an LSTM and its variants, (h,) for a GRU (lstmgen/bundle.py graph_names).
The frame model's graphs (frame_graph.py) reuse the recurrent stack built here.

Built by hand rather than with torch.onnx.export so that the names and the symbolic batch dim are
exactly the bundle contract, each layer is one ONNX `LSTM` or `GRU` op whose W/R are plain
initializers (quantize_dynamic turns LSTM ones into DynamicQuantizeLSTM), and `sequence_lens`
batches prompts of different lengths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lstmgen import __version__
from lstmgen.bundle import graph_names
from lstmgen.errors import UsageError, UserError
from lstmgen.export.config import DEFAULT_OPSET
from lstmgen.train.config import ModelConfig

MIN_OPSET = 14  # Squeeze/Unsqueeze take axes as an input from 13, LSTM and GRU gained `layout` in 14
BATCH, TIME = "batch", "time"  # symbolic dim names
EMBED = "embed.weight"

# PyTorch stacks the LSTM gate blocks as (i, f, g, o); ONNX expects (i, o, f, c).
TORCH_TO_ONNX_GATES = (0, 3, 1, 2)
# PyTorch stacks the GRU's as (r, z, n); ONNX expects (z, r, h). nn.GRU applies the reset gate after
# the recurrent matmul and its bias (n = tanh(W_in x + b_in + r * (W_hn h + b_hn))): ONNX GRU's
# linear_before_reset=1, whose Rbh sits inside the reset product the same way.
TORCH_TO_ONNX_GRU_GATES = (1, 0, 2)
# The peephole cell (train/cells.py) stacks its peepholes as (i, f, o); ONNX's P is (i, o, f).
TORCH_TO_ONNX_PEEPHOLES = (0, 2, 1)
LSTM_OPS = ("lstm", "peephole", "cifg")  # cells exported as the ONNX LSTM op
CELL_NAMES = {"lstm": "LSTM", "gru": "GRU", "peephole": "peephole LSTM", "cifg": "CIFG LSTM"}  # for docs


class GraphError(UserError, ValueError):
    """The state_dict does not fit the model config (missing or misshapen tensors)."""


@dataclass(frozen=True)
class RNNWeights:
    """One stack of nn.LSTM / nn.GRU / VariantLSTM layers as ONNX initializers (float32, ONNX gate
    order)."""

    cell: str  # "lstm" | "gru" | "peephole" | "cifg"
    hidden_size: int
    w: tuple[np.ndarray, ...]  # per layer [1, G*H, in] (G = 4 gates for an LSTM op, 3 for a GRU)
    r: tuple[np.ndarray, ...]  # per layer [1, G*H, H]
    b: tuple[np.ndarray, ...]  # per layer [1, 2*G*H] = (Wb, Rb)
    p: tuple[np.ndarray, ...] = ()  # peephole only: per layer [1, 3H] = (p_i, p_o, p_f)

    @property
    def num_layers(self) -> int:
        return len(self.w)

    @property
    def op_type(self) -> str:
        return "LSTM" if self.cell in LSTM_OPS else "GRU"


@dataclass(frozen=True)
class _Weights:
    """The language model's state_dict as ONNX initializers."""

    embed: np.ndarray  # [V, E]
    rnn: RNNWeights
    head_w: np.ndarray | None  # [V, H]; None when tied to the embedding
    head_b: np.ndarray  # [V]


def reorder_gates(a: np.ndarray, hidden_size: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """Reorder the gate blocks along axis 0 from PyTorch's order to ONNX's; `order` defaults to the
    LSTM's (i, f, g, o) -> (i, o, f, c)."""
    order = TORCH_TO_ONNX_GATES if order is None else order  # read at call time: tests patch it
    blocks = a.reshape(len(order), hidden_size, *a.shape[1:])
    return blocks[list(order)].reshape(a.shape)


def array_of(state_dict: Mapping, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """state_dict[key] as float32 numpy, which must have `shape`."""
    if key not in state_dict:
        raise GraphError(f"state_dict has no {key!r}")
    t = state_dict[key]
    a = (t.detach().cpu().float().numpy() if hasattr(t, "detach") else np.asarray(t)).astype(np.float32)
    if a.shape != shape:
        raise GraphError(f"state_dict[{key!r}] has shape {list(a.shape)}, the config wants {list(shape)}")
    return a


def cifg_gates(a: np.ndarray, hidden_size: int) -> np.ndarray:
    """A CIFG cell's gate blocks (f, g, o) along axis 0 -> the LSTM op's four (i, o, f, c), with the
    negated forget-gate rows in the input gate's slot: sigmoid(-a_f) = 1 - f, so the plain op
    computes the CIFG's i = 1 - f (Greff et al.).

    Not input_forget=1: the ONNX spec gives that attribute no equation, ONNX Runtime's CPU kernel
    reads it the other way round (f = 1 - i), onnx's ReferenceEvaluator ignores it and ORT's CUDA
    provider sends such a node back to the CPU (tests/test_lstm_variants_ort.py, docs/results.md).
    With input_forget=0 the node is a plain LSTM every runtime computes alike, at no cost: W, R
    and B have four gate blocks either way (under input_forget=1 the forget slot would be unused)."""
    f, g, o = a.reshape(3, hidden_size, *a.shape[1:])
    return np.concatenate([-f, o, f, g]).reshape(4 * hidden_size, *a.shape[1:])


def rnn_weights(state_dict: Mapping, cell: str, input_size: int, hidden_size: int,
                num_layers: int) -> RNNWeights:
    """The `{cell}.*_l{k}` tensors of nn.LSTM / nn.GRU / VariantLSTM in ONNX layout."""
    H = hidden_size
    gates = {"gru": 3, "cifg": 3}.get(cell, 4)  # torch's blocks: (r, z, n), (f, g, o), else (i, f, g, o)
    order = TORCH_TO_ONNX_GRU_GATES if cell == "gru" else TORCH_TO_ONNX_GATES

    def to_onnx(a: np.ndarray, H: int) -> np.ndarray:
        return cifg_gates(a, H) if cell == "cifg" else reorder_gates(a, H, order)

    w, r, b, p = [], [], [], []
    for k in range(num_layers):
        n_in = input_size if k == 0 else H
        w.append(to_onnx(array_of(state_dict, f"{cell}.weight_ih_l{k}", (gates * H, n_in)), H)[None])
        r.append(to_onnx(array_of(state_dict, f"{cell}.weight_hh_l{k}", (gates * H, H)), H)[None])
        b_ih = to_onnx(array_of(state_dict, f"{cell}.bias_ih_l{k}", (gates * H,)), H)
        b_hh = to_onnx(array_of(state_dict, f"{cell}.bias_hh_l{k}", (gates * H,)), H)
        b.append(np.concatenate([b_ih, b_hh])[None])  # [1, 2GH]: G = 4 for the LSTM op, 3 for the GRU
        if cell == "peephole":
            peep = array_of(state_dict, f"{cell}.weight_peep_l{k}", (3 * H,))
            p.append(reorder_gates(peep, H, TORCH_TO_ONNX_PEEPHOLES)[None])  # [1, 3H]
    return RNNWeights(cell, H, tuple(w), tuple(r), tuple(b), tuple(p))


def _weights(state_dict: Mapping, cfg: ModelConfig) -> _Weights:
    V, E, H = cfg.vocab_size, cfg.embedding_size, cfg.hidden_size
    rnn = rnn_weights(state_dict, cfg.cell, E, H, cfg.num_layers)
    head_w = None if cfg.tie_weights else array_of(state_dict, "head.weight", (V, H))
    return _Weights(array_of(state_dict, EMBED, (V, E)), rnn, head_w, array_of(state_dict, "head.bias", (V,)))


class Builder:
    """Collects nodes and initializers; `op` returns the output name(s) of the node it adds."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def init(self, name: str, value: np.ndarray) -> str:
        if name not in self._names:  # shared constants (axes) are stored once
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str], **attrs) -> list[str]:
        name = f"{op_type}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs

    def axis(self, k: int) -> str:
        return self.init(f"axis{k}", np.array([k], dtype=np.int64))


def rnn_stack(g: Builder, rnn: RNNWeights, x: str, state_in: tuple[str, ...], state_out: tuple[str, ...],
              seq_lens: str, top_sequence: bool = False) -> tuple[str, str | None]:
    """The layers over x [T, B, in]; writes `state_out` ([L, B, H] each, from `state_in`). Returns
    the top layer's last output [B, H] and, with `top_sequence`, its output at every step
    [T, 1, B, H] (zero past each row's length)."""
    L, op_type = rnn.num_layers, rnn.op_type
    attrs = {"linear_before_reset": 1} if rnn.cell == "gru" else {}
    finals: list[list[str]] = [[] for _ in state_in]  # per state tensor, each layer's final value
    top_y = None
    for k in range(L):
        if L == 1:  # the whole state is this layer's; no slicing, no concat
            init, outs = list(state_in), list(state_out)
        else:
            idx = g.init(f"layer{k}.index", np.array([k], dtype=np.int64))
            # Gather with a 1-element index keeps axis 0: [1, B, H], the op's initial_h / initial_c
            init = [g.op("Gather", [s, idx], [f"layer{k}.{s}0"], axis=0)[0] for s in state_in]
            outs = [f"layer{k}.Y_{s}" for s in state_in]
        last = k == L - 1
        # the top layer's Y is only needed for per-step outputs: the text head reads Y_h
        y = f"layer{k}.Y" if not last else ("top.Y" if top_sequence else "")
        # P, the peepholes, is the LSTM op's 8th input, after initial_h and initial_c
        peep = [g.init(f"{rnn.cell}.P_l{k}", rnn.p[k])] if rnn.p else []
        g.op(op_type, [x, g.init(f"{rnn.cell}.W_l{k}", rnn.w[k]), g.init(f"{rnn.cell}.R_l{k}", rnn.r[k]),
                       g.init(f"{rnn.cell}.B_l{k}", rnn.b[k]), seq_lens, *init, *peep],
             [y, *outs], hidden_size=rnn.hidden_size, direction="forward", **attrs)
        if not last:
            # Y [T, 1, B, H] -> [T, B, H]; past a row's length it is zero, and the next layer
            # stops at the same length, so the padding never reaches a state
            [x] = g.op("Squeeze", [y, g.axis(1)], [f"layer{k}.out"])
        else:
            top_y = y or None
        for final, o in zip(finals, outs):
            final.append(o)
    if L > 1:
        for final, name in zip(finals, state_out):
            g.op("Concat", final, [name], axis=0)  # [L, B, H]
    [top] = g.op("Squeeze", [finals[0][-1], g.axis(0)], ["top.h"])  # [B, H]
    return top, top_y


def state_io(num_layers: int, hidden_size: int, state_in: tuple[str, ...], state_out: tuple[str, ...],
             state_doc: str = "state after the input [L, B, H]"
             ) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Value infos of the state inputs and outputs, each float32 [L, B, H]."""
    L, H, f32 = num_layers, hidden_size, TensorProto.FLOAT
    ins = [helper.make_tensor_value_info(n, f32, [L, BATCH, H], doc_string=f"{n} state [L, B, H]")
           for n in state_in]
    outs = [helper.make_tensor_value_info(n, f32, [L, BATCH, H], doc_string=state_doc) for n in state_out]
    return ins, outs


def make_model(g: Builder, name: str, doc: str, inputs, outputs, meta: dict, opset: int) -> onnx.ModelProto:
    """The graph as a model of `opset`, with lstmgen's metadata props (`meta`, as strings)."""
    if opset < MIN_OPSET:
        raise UsageError(f"opset {opset} is too old; lstmgen exports opset {MIN_OPSET} or newer")
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits, doc_string=doc)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lstmgen",
                              producer_version=__version__, doc_string=doc,
                              ir_version=helper.find_min_ir_version_for(opsets))
    helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    return model


# -- the language model ---------------------------------------------------------------------------
def _head(g: Builder, wt: _Weights, top: str, out: str) -> None:
    # Tied: the head reads the embedding initializer itself, so the matrix is stored once
    weight = EMBED if wt.head_w is None else g.init("head.weight", wt.head_w)
    g.op("Gemm", [top, weight, g.init("head.bias", wt.head_b)], [out], transB=1)  # [B, V]


def _text_io(cfg: ModelConfig, names: dict) -> tuple[list, list]:
    state_in, state_out = state_io(cfg.num_layers, cfg.hidden_size, names["inputs"][1:], names["outputs"][1:])
    logits = helper.make_tensor_value_info(names["outputs"][0], TensorProto.FLOAT, [BATCH, cfg.vocab_size],
                                           doc_string="next-token logits [B, V]")
    return state_in, [logits, *state_out]


def _text_meta(cfg: ModelConfig, kind: str) -> dict:
    meta = {"lstmgen.graph": kind, "lstmgen.vocab_size": cfg.vocab_size,
            "lstmgen.embedding_size": cfg.embedding_size, "lstmgen.hidden_size": cfg.hidden_size,
            "lstmgen.num_layers": cfg.num_layers, "lstmgen.tie_weights": cfg.tie_weights}
    if cfg.cell != "lstm":  # LSTM graphs keep the props (and bytes) they had before the GRU
        meta["lstmgen.cell"] = cfg.cell
    return meta


def build_step_graph(state_dict: Mapping, cfg: ModelConfig, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """One step for a batch: tokens [B], state [L, B, H] each -> logits [B, V], the new state."""
    wt = _weights(state_dict, cfg)
    names = graph_names("text", cfg.cell)
    ins, outs = names["inputs"], names["outputs"]
    g = Builder()
    [emb] = g.op("Gather", [g.init(EMBED, wt.embed), ins[0]], ["embedded"], axis=0)  # [B, E]
    [x] = g.op("Unsqueeze", [emb, g.axis(0)], ["x"])  # [1, B, E]
    top, _ = rnn_stack(g, wt.rnn, x, ins[1:], outs[1:], "")
    _head(g, wt, top, outs[0])
    state_in, outputs = _text_io(cfg, names)
    tokens = helper.make_tensor_value_info(ins[0], TensorProto.INT64, [BATCH], doc_string="token ids [B]")
    doc = (f"lstmgen step graph: one token per row -> next-token logits and the new {CELL_NAMES[cfg.cell]} state. "
           f"Feed {'/'.join(outs[1:])} back as {'/'.join(ins[1:])}; rows are independent, so a batch is "
           "any stack of states.")
    return make_model(g, "lstmgen_step", doc, [tokens, *state_in], outputs, _text_meta(cfg, "step"), opset)


def build_prompt_graph(state_dict: Mapping, cfg: ModelConfig, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """A whole right-padded prompt batch: tokens [B, T], lengths [B], state -> logits at each
    row's last valid token [B, V] and the state after it [L, B, H] each."""
    wt = _weights(state_dict, cfg)
    names = graph_names("text", cfg.cell)
    ins, outs = names["prompt_inputs"], names["outputs"]
    g = Builder()
    # ONNX Runtime runs the LSTM/GRU ops only time-major (layout=0): transpose the ids, not the floats
    [tt] = g.op("Transpose", [ins[0]], ["tokens.T"], perm=[1, 0])  # [T, B]
    [x] = g.op("Gather", [g.init(EMBED, wt.embed), tt], ["x"], axis=0)  # [T, B, E]
    top, _ = rnn_stack(g, wt.rnn, x, ins[2:], outs[1:], ins[1])
    _head(g, wt, top, outs[0])
    state_in, outputs = _text_io(cfg, names)
    tokens = helper.make_tensor_value_info(ins[0], TensorProto.INT64, [BATCH, TIME],
                                           doc_string="token ids [B, T], right-padded")
    lengths = helper.make_tensor_value_info(ins[1], TensorProto.INT32, [BATCH],
                                            doc_string="valid tokens per row [B], 1 <= lengths <= T")
    doc = ("lstmgen prompt graph: a right-padded batch of prompts in one call -> the logits after "
           "each row's last valid token and the state there (continue with the step graph).")
    return make_model(g, "lstmgen_prompt", doc, [tokens, lengths, *state_in], outputs,
                      _text_meta(cfg, "prompt"), opset)
