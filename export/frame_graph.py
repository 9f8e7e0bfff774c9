"""FrameModel state_dict -> ONNX graphs (train/frame_model.py: [linear input layer] -> N x LSTM, GRU
or an LSTM variant -> linear head), on the recurrent stack of onnx_graph.py.

  step     (model.onnx):    x float32 [B, D_in], *state [L, B, H] -> y [B, D_out], *state_out
  sequence (sequence.onnx): x float32 [B, T, D_in] right-padded, lengths int32 [B], *state ->
                            y [B, T, D_out] at every frame, the state after each row's last valid
                            frame. y past a row's length is unspecified (the head of a zero output).
y is the head's output: the regression values, or the class logits (a classifier reads the last
valid frame's). The inputs are already standardised (the manifest's frames.standardize).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from lstmgen.bundle import graph_names
from lstmgen.export.onnx_graph import (BATCH, CELL_NAMES, DEFAULT_OPSET, TIME, Builder, RNNWeights, array_of,
                                       make_model, rnn_stack, rnn_weights, state_io)
from lstmgen.train.frame_model import FrameModelConfig


@dataclass(frozen=True)
class FrameWeights:
    proj_w: np.ndarray | None  # [P, D_in]; None without an input layer
    proj_b: np.ndarray | None  # [P]
    rnn: RNNWeights
    head_w: np.ndarray  # [D_out, H]
    head_b: np.ndarray  # [D_out]


def frame_weights(state_dict: Mapping, cfg: FrameModelConfig) -> FrameWeights:
    D, P, H = cfg.input_size, cfg.projection_size, cfg.hidden_size
    proj_w = array_of(state_dict, "proj.weight", (P, D)) if P else None
    proj_b = array_of(state_dict, "proj.bias", (P,)) if P else None
    rnn = rnn_weights(state_dict, cfg.cell, P or D, H, cfg.num_layers)
    return FrameWeights(proj_w, proj_b, rnn, array_of(state_dict, "head.weight", (cfg.output_size, H)),
                        array_of(state_dict, "head.bias", (cfg.output_size,)))


def _io(cfg: FrameModelConfig, y_dims: list, state_doc: str) -> tuple[list, list]:
    names = graph_names("frames", cfg.cell)
    state_in, state_out = state_io(cfg.num_layers, cfg.hidden_size, names["inputs"][1:], names["outputs"][1:],
                                   state_doc)
    what = "regression values" if cfg.task == "regression" else "class logits"
    shape = "[B, T, D_out]" if len(y_dims) == 3 else "[B, D_out]"
    y = helper.make_tensor_value_info(names["outputs"][0], TensorProto.FLOAT, y_dims, doc_string=f"{what} {shape}")
    return state_in, [y, *state_out]


def _meta(cfg: FrameModelConfig, kind: str) -> dict:
    return {"lstmgen.graph": kind, "lstmgen.task": cfg.task, "lstmgen.input_size": cfg.input_size,
            "lstmgen.output_size": cfg.output_size, "lstmgen.projection_size": cfg.projection_size,
            "lstmgen.hidden_size": cfg.hidden_size, "lstmgen.num_layers": cfg.num_layers, "lstmgen.cell": cfg.cell}


def build_frame_step_graph(state_dict: Mapping, cfg: FrameModelConfig, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """One frame per row: x [B, D_in], state [L, B, H] each -> y [B, D_out], the new state."""
    wt = frame_weights(state_dict, cfg)
    names = graph_names("frames", cfg.cell)
    ins, outs = names["inputs"], names["outputs"]
    g = Builder()
    x = ins[0]  # [B, D_in]
    if wt.proj_w is not None:
        [x] = g.op("Gemm", [x, g.init("proj.weight", wt.proj_w), g.init("proj.bias", wt.proj_b)],
                   ["projected"], transB=1)  # [B, P]
    [x] = g.op("Unsqueeze", [x, g.axis(0)], ["frame"])  # [1, B, P]
    top, _ = rnn_stack(g, wt.rnn, x, ins[1:], outs[1:], "")
    g.op("Gemm", [top, g.init("head.weight", wt.head_w), g.init("head.bias", wt.head_b)], [outs[0]],
         transB=1)  # [B, D_out]
    state_in, outputs = _io(cfg, [BATCH, cfg.output_size], "state after the frame [L, B, H]")
    x_info = helper.make_tensor_value_info(ins[0], TensorProto.FLOAT, [BATCH, cfg.input_size],
                                           doc_string="one standardised frame per row [B, D_in]")
    doc = (f"lstmgen frame step graph: one frame per row -> the {cfg.task} output and the new "
           f"{CELL_NAMES[cfg.cell]} state. Feed {'/'.join(outs[1:])} back as {'/'.join(ins[1:])}; rows are "
           "independent, so a batch is any stack of states.")
    return make_model(g, "lstmgen_frame_step", doc, [x_info, *state_in], outputs, _meta(cfg, "frames-step"), opset)


def build_sequence_graph(state_dict: Mapping, cfg: FrameModelConfig, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Right-padded sequences in one call: x [B, T, D_in], lengths [B], state -> y [B, T, D_out] at
    every frame, and the state after each row's last valid frame."""
    wt = frame_weights(state_dict, cfg)
    names = graph_names("frames", cfg.cell)
    ins, outs = names["sequence_inputs"], names["outputs"]
    g = Builder()
    # ONNX Runtime runs the LSTM/GRU ops only time-major (layout=0)
    [x] = g.op("Transpose", [ins[0]], ["x.T"], perm=[1, 0, 2])  # [T, B, D_in]
    if wt.proj_w is not None:
        [x] = g.op("MatMul", [x, g.init("proj.weight_t", np.ascontiguousarray(wt.proj_w.T))], ["x.proj_mm"])
        [x] = g.op("Add", [x, g.init("proj.bias", wt.proj_b)], ["x.proj"])  # [T, B, P]
    _, top_y = rnn_stack(g, wt.rnn, x, ins[2:], outs[1:], ins[1], top_sequence=True)  # [T, 1, B, H]
    [top] = g.op("Squeeze", [top_y, g.axis(1)], ["top.out"])  # [T, B, H]
    [y] = g.op("MatMul", [top, g.init("head.weight_t", np.ascontiguousarray(wt.head_w.T))], ["y.mm"])
    [y] = g.op("Add", [y, g.init("head.bias", wt.head_b)], ["y.T"])  # [T, B, D_out]
    g.op("Transpose", [y], [outs[0]], perm=[1, 0, 2])  # [B, T, D_out]
    state_in, outputs = _io(cfg, [BATCH, TIME, cfg.output_size], "state after each row's last valid frame [L, B, H]")
    x_info = helper.make_tensor_value_info(ins[0], TensorProto.FLOAT, [BATCH, TIME, cfg.input_size],
                                           doc_string="standardised frames [B, T, D_in], right-padded")
    lengths = helper.make_tensor_value_info(ins[1], TensorProto.INT32, [BATCH],
                                            doc_string="valid frames per row [B], 1 <= lengths <= T")
    doc = (f"lstmgen frame sequence graph: a right-padded batch of sequences in one call -> the {cfg.task} "
           "output at every frame and the state after each row's last valid frame (continue with the "
           "step graph).")
    return make_model(g, "lstmgen_frame_sequence", doc, [x_info, lengths, *state_in], outputs,
                      _meta(cfg, "frames-sequence"), opset)
