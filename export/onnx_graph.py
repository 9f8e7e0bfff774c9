"""StackedLSTM state_dict -> ONNX graphs, built node by node with `onnx.helper`.

Two graphs share one layout of initializers:
  step   (model.onnx):  tokens int64 [B], h, c [L, B, H] -> logits [B, V], h_out, c_out [L, B, H]
  prompt (prompt.onnx): tokens int64 [B, T], lengths int32 [B], h, c -> the same outputs, taken at
                        each row's last valid token (rows are right-padded).

Built by hand rather than with torch.onnx.export so that the names and the symbolic batch dim are
exactly the bundle contract, each layer is one ONNX `LSTM` op whose W/R are plain initializers
(quantize_dynamic turns those into DynamicQuantizeLSTM), and `sequence_lens` batches prompts of
different lengths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lstmgen import __version__
from lstmgen.bundle import PROMPT_INPUTS, STEP_INPUTS, STEP_OUTPUTS
from lstmgen.errors import UsageError, UserError
from lstmgen.train.config import ModelConfig

DEFAULT_OPSET = 17
MIN_OPSET = 14  # Squeeze/Unsqueeze take axes as an input from 13, LSTM gained `layout` in 14
BATCH, TIME = "batch", "time"  # symbolic dim names
EMBED = "embed.weight"

# PyTorch stacks the LSTM gate blocks as (i, f, g, o); ONNX expects (i, o, f, c).
TORCH_TO_ONNX_GATES = (0, 3, 1, 2)


class GraphError(UserError, ValueError):
    """The state_dict does not fit the model config (missing or misshapen tensors)."""


@dataclass(frozen=True)
class _Weights:
    """The state_dict as ONNX initializers: float32 numpy arrays in ONNX layout."""

    embed: np.ndarray  # [V, E]
    w: tuple[np.ndarray, ...]  # per layer [1, 4H, in]
    r: tuple[np.ndarray, ...]  # per layer [1, 4H, H]
    b: tuple[np.ndarray, ...]  # per layer [1, 8H] = (Wb, Rb)
    head_w: np.ndarray | None  # [V, H]; None when tied to the embedding
    head_b: np.ndarray  # [V]


def reorder_gates(a: np.ndarray, hidden_size: int) -> np.ndarray:
    """Reorder the 4 gate blocks along axis 0 from PyTorch's (i, f, g, o) to ONNX's (i, o, f, c)."""
    blocks = a.reshape(4, hidden_size, *a.shape[1:])
    return blocks[list(TORCH_TO_ONNX_GATES)].reshape(a.shape)


def _array(state_dict: Mapping, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in state_dict:
        raise GraphError(f"state_dict has no {key!r}")
    t = state_dict[key]
    a = (t.detach().cpu().float().numpy() if hasattr(t, "detach") else np.asarray(t)).astype(np.float32)
    if a.shape != shape:
        raise GraphError(f"state_dict[{key!r}] has shape {list(a.shape)}, the config wants {list(shape)}")
    return a


def _weights(state_dict: Mapping, cfg: ModelConfig) -> _Weights:
    V, E, H, L = cfg.vocab_size, cfg.embedding_size, cfg.hidden_size, cfg.num_layers
    w, r, b = [], [], []
    for k in range(L):
        n_in = E if k == 0 else H
        w.append(reorder_gates(_array(state_dict, f"lstm.weight_ih_l{k}", (4 * H, n_in)), H)[None])
        r.append(reorder_gates(_array(state_dict, f"lstm.weight_hh_l{k}", (4 * H, H)), H)[None])
        b_ih = reorder_gates(_array(state_dict, f"lstm.bias_ih_l{k}", (4 * H,)), H)
        b_hh = reorder_gates(_array(state_dict, f"lstm.bias_hh_l{k}", (4 * H,)), H)
        b.append(np.concatenate([b_ih, b_hh])[None])  # [1, 8H]
    head_w = None if cfg.tie_weights else _array(state_dict, "head.weight", (V, H))
    return _Weights(_array(state_dict, EMBED, (V, E)), tuple(w), tuple(r), tuple(b),
                    head_w, _array(state_dict, "head.bias", (V,)))


class _Builder:
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


def _lstm_stack(g: _Builder, wt: _Weights, x: str, h: str, c: str, seq_lens: str,
                num_layers: int, hidden_size: int) -> str:
    """The layers over x [T, B, E]; writes h_out/c_out [L, B, H]; returns the last Y_h [B, H]."""
    ys_h, ys_c = [], []
    for k in range(num_layers):
        if num_layers == 1:  # the whole state is this layer's; no slicing, no concat
            h0, c0, yh, yc = h, c, STEP_OUTPUTS[1], STEP_OUTPUTS[2]
        else:
            idx = g.init(f"layer{k}.index", np.array([k], dtype=np.int64))
            # Gather with a 1-element index keeps axis 0: [1, B, H], the LSTM op's initial_h
            [h0] = g.op("Gather", [h, idx], [f"layer{k}.h0"], axis=0)
            [c0] = g.op("Gather", [c, idx], [f"layer{k}.c0"], axis=0)
            yh, yc = f"layer{k}.Y_h", f"layer{k}.Y_c"
        last = k == num_layers - 1
        y = "" if last else f"layer{k}.Y"  # the top layer's Y is not needed: logits come from Y_h
        g.op("LSTM", [x, g.init(f"lstm.W_l{k}", wt.w[k]), g.init(f"lstm.R_l{k}", wt.r[k]),
                      g.init(f"lstm.B_l{k}", wt.b[k]), seq_lens, h0, c0],
             [y, yh, yc], hidden_size=hidden_size, direction="forward")
        if not last:
            # Y [T, 1, B, H] -> [T, B, H]; past a row's length it is zero, and the next layer
            # stops at the same length, so the padding never reaches a state
            [x] = g.op("Squeeze", [y, g.init("axis1", np.array([1], dtype=np.int64))],
                       [f"layer{k}.out"])
        ys_h.append(yh)
        ys_c.append(yc)
    if num_layers > 1:
        g.op("Concat", ys_h, [STEP_OUTPUTS[1]], axis=0)  # [L, B, H]
        g.op("Concat", ys_c, [STEP_OUTPUTS[2]], axis=0)
    axis0 = g.init("axis0", np.array([0], dtype=np.int64))
    [top] = g.op("Squeeze", [ys_h[-1], axis0], ["top.h"])  # [B, H]
    return top


def _head(g: _Builder, wt: _Weights, top: str) -> None:
    # Tied: the head reads the embedding initializer itself, so the matrix is stored once
    weight = EMBED if wt.head_w is None else g.init("head.weight", wt.head_w)
    g.op("Gemm", [top, weight, g.init("head.bias", wt.head_b)], [STEP_OUTPUTS[0]], transB=1)  # [B, V]


def _state_io(cfg: ModelConfig) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    L, H, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    f32 = TensorProto.FLOAT
    state_in = [helper.make_tensor_value_info(n, f32, [L, BATCH, H], doc_string=f"{n} state [L, B, H]")
                for n in STEP_INPUTS[1:]]
    outputs = [helper.make_tensor_value_info(STEP_OUTPUTS[0], f32, [BATCH, V], doc_string="next-token logits [B, V]")]
    outputs += [helper.make_tensor_value_info(n, f32, [L, BATCH, H], doc_string="state after the input [L, B, H]")
                for n in STEP_OUTPUTS[1:]]
    return state_in, outputs


def _model(g: _Builder, name: str, doc: str, inputs, outputs, cfg: ModelConfig, kind: str,
           opset: int) -> onnx.ModelProto:
    if opset < MIN_OPSET:
        raise UsageError(f"opset {opset} is too old; lstmgen exports opset {MIN_OPSET} or newer")
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits, doc_string=doc)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lstmgen",
                              producer_version=__version__, doc_string=doc,
                              ir_version=helper.find_min_ir_version_for(opsets))
    meta = {"lstmgen.graph": kind, "lstmgen.vocab_size": cfg.vocab_size,
            "lstmgen.embedding_size": cfg.embedding_size, "lstmgen.hidden_size": cfg.hidden_size,
            "lstmgen.num_layers": cfg.num_layers, "lstmgen.tie_weights": cfg.tie_weights}
    helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    return model


def build_step_graph(state_dict: Mapping, cfg: ModelConfig, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """One LSTM step for a batch: tokens [B], (h, c) [L, B, H] -> logits [B, V], (h_out, c_out)."""
    wt = _weights(state_dict, cfg)
    g = _Builder()
    [emb] = g.op("Gather", [g.init(EMBED, wt.embed), STEP_INPUTS[0]], ["embedded"], axis=0)  # [B, E]
    [x] = g.op("Unsqueeze", [emb, g.init("axis0", np.array([0], dtype=np.int64))], ["x"])  # [1, B, E]
    top = _lstm_stack(g, wt, x, STEP_INPUTS[1], STEP_INPUTS[2], "", cfg.num_layers, cfg.hidden_size)
    _head(g, wt, top)
    state_in, outputs = _state_io(cfg)
    tokens = helper.make_tensor_value_info(STEP_INPUTS[0], TensorProto.INT64, [BATCH], doc_string="token ids [B]")
    doc = ("lstmgen step graph: one token per row -> next-token logits and the new LSTM state. "
           "Feed h_out/c_out back as h/c; rows are independent, so a batch is any stack of states.")
    return _model(g, "lstmgen_step", doc, [tokens, *state_in], outputs, cfg, "step", opset)


def build_prompt_graph(state_dict: Mapping, cfg: ModelConfig, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """A whole right-padded prompt batch: tokens [B, T], lengths [B], (h, c) -> logits at each
    row's last valid token [B, V] and the state after it (h_out, c_out) [L, B, H]."""
    wt = _weights(state_dict, cfg)
    g = _Builder()
    # ONNX Runtime runs the LSTM op only time-major (layout=0): transpose the ids, not the floats
    [tt] = g.op("Transpose", [PROMPT_INPUTS[0]], ["tokens.T"], perm=[1, 0])  # [T, B]
    [x] = g.op("Gather", [g.init(EMBED, wt.embed), tt], ["x"], axis=0)  # [T, B, E]
    top = _lstm_stack(g, wt, x, PROMPT_INPUTS[2], PROMPT_INPUTS[3], PROMPT_INPUTS[1],
                      cfg.num_layers, cfg.hidden_size)
    _head(g, wt, top)
    state_in, outputs = _state_io(cfg)
    tokens = helper.make_tensor_value_info(PROMPT_INPUTS[0], TensorProto.INT64, [BATCH, TIME],
                                           doc_string="token ids [B, T], right-padded")
    lengths = helper.make_tensor_value_info(PROMPT_INPUTS[1], TensorProto.INT32, [BATCH],
                                            doc_string="valid tokens per row [B], 1 <= lengths <= T")
    doc = ("lstmgen prompt graph: a right-padded batch of prompts in one call -> the logits after "
           "each row's last valid token and the state there (continue with the step graph).")
    return _model(g, "lstmgen_prompt", doc, [tokens, lengths, *state_in], outputs, cfg, "prompt", opset)
