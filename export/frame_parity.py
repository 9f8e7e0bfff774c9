"""Parity of a frame model's graphs (frame_graph.py) with the PyTorch FrameModel they came from.

Step graph vs PyTorch: random frames stepped one at a time from a random state, at batch 1 and 7,
against PyTorch's output at every frame (one call over the sequence) and its final state.
Sequence graph: one right-padded call (lengths from T down to 1, the padding filled with large
values that must change nothing; zeros for int8) against stepping each row alone through the step graph, and
against PyTorch's packed forward. fp32 must match within the tolerances of the text path; int8 is
only measured (and for a classifier, how often the argmax still agrees).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnxruntime as ort
import torch

from lstmgen.bundle import graph_names
from lstmgen.export.parity import (LOGIT_TOL, PROMPT_TOL, ParityError, max_diff_of, random_state, session,
                                   torch_single_thread)
from lstmgen.train.frame_model import FrameModel

BATCH_SIZES = (1, 7)
SEQUENCE_BATCH = 7
SEQUENCE_FRAMES = 32  # longest row of the sequence check (at most the step check's frames)
PAD = 1e3  # fp32: padded frames hold this, so a graph that read them would be far off. int8 pads with
# zeros: its activations are quantized per call over the whole tensor, padding included


@dataclass(frozen=True)
class FrameStepParity:
    batch: int
    frames: int
    max_output_diff: float  # |y diff| over every frame and row
    max_state_diff: float  # final state, every tensor
    argmax_agreement: float | None  # classification: fraction of (frame, row) whose argmax agrees


@dataclass(frozen=True)
class SequenceParity:
    lengths: tuple[int, ...]
    max_output_diff: float  # vs stepping each row alone through the step graph (valid frames)
    max_state_diff: float
    torch_output_diff: float  # vs PyTorch's packed forward
    torch_state_diff: float


@dataclass(frozen=True)
class FrameGraphParity:
    quantization: str  # "fp32" or "int8-dynamic"
    step: tuple[FrameStepParity, ...]
    sequence: SequenceParity | None

    def lines(self) -> list[str]:
        q = self.quantization
        out = [f"{q} frame step graph vs PyTorch, batch {s.batch}, {s.frames} frames: max |y diff| "
               f"{s.max_output_diff:.3g}, state diff {s.max_state_diff:.3g}"
               + (f", argmax agreement {s.argmax_agreement:.1%}" if s.argmax_agreement is not None else "")
               for s in self.step]
        if self.sequence is not None:
            s = self.sequence
            out.append(f"{q} sequence graph, lengths {list(s.lengths)}: vs step graph max |y diff| "
                       f"{s.max_output_diff:.3g}, state diff {s.max_state_diff:.3g}; vs PyTorch "
                       f"{s.torch_output_diff:.3g}, state diff {s.torch_state_diff:.3g}")
        return out


def _check(strict: bool, diff: float, ref: np.ndarray, rel_tol: float, what: str) -> None:
    tol = rel_tol * max(1.0, float(np.abs(ref).max()))
    if strict and diff > tol:
        raise ParityError(f"{what}: |diff| {diff:.3g} exceeds {tol:.3g}")


def _torch_run(model: FrameModel, x: np.ndarray, state: tuple, lengths: np.ndarray | None = None):
    """PyTorch over x [T, B, D_in] -> (y [T, B, D_out], final state), numpy."""
    with torch.inference_mode(), torch_single_thread():
        lens = None if lengths is None else torch.from_numpy(lengths.astype(np.int64))
        y, st = model(torch.from_numpy(x), tuple(torch.from_numpy(s) for s in state), lens)
    return y.numpy(), [s.numpy() for s in st]


def check_frame_step(model: FrameModel, sess: ort.InferenceSession, batch: int, frames: int,
                     strict: bool = True, tol: float = LOGIT_TOL, seed: int = 0) -> FrameStepParity:
    cfg = model.cfg
    names = graph_names("frames", cfg.cell)["inputs"]
    rng = np.random.default_rng(seed + batch)
    x = rng.standard_normal((frames, batch, cfg.input_size)).astype(np.float32)  # [T, B, D_in]
    state0 = random_state(cfg.cell, cfg.num_layers, batch, cfg.hidden_size, seed + batch)
    ref, ref_state = _torch_run(model, x, state0)  # [T, B, D_out]
    state, max_diff, agree = state0, 0.0, 0
    for t in range(frames):
        got, *state = sess.run(None, dict(zip(names, (x[t], *state))))  # [B, D_out]
        diff = float(np.abs(got - ref[t]).max())
        max_diff = max(max_diff, diff)
        agree += int((got.argmax(-1) == ref[t].argmax(-1)).sum())
        _check(strict, diff, ref[t], tol, f"frame step graph, batch {batch}, frame {t}: y")
    state_diff = max_diff_of(state, ref_state)
    _check(strict, state_diff, np.stack(ref_state), tol, f"frame step graph, batch {batch}: final state")
    agreement = agree / (frames * batch) if cfg.task == "classification" else None
    return FrameStepParity(batch, frames, max_diff, state_diff, agreement)


def check_sequence(model: FrameModel, seq_sess: ort.InferenceSession, step_sess: ort.InferenceSession,
                   frames: int = SEQUENCE_FRAMES, batch: int = SEQUENCE_BATCH, strict: bool = True,
                   seed: int = 0) -> SequenceParity:
    cfg = model.cfg
    names = graph_names("frames", cfg.cell)
    lengths = np.linspace(frames, 1, batch).round().astype(np.int32)  # [B], longest first, down to 1
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, frames, cfg.input_size)).astype(np.float32)  # [B, T, D_in]
    x[np.arange(frames)[None, :] >= lengths[:, None]] = PAD if strict else 0.0
    state0 = random_state(cfg.cell, cfg.num_layers, batch, cfg.hidden_size, seed)
    y, *state = seq_sess.run(None, dict(zip(names["sequence_inputs"], (x, lengths, *state0))))  # [B, T, D_out]
    max_out = max_state = 0.0
    for r, n in enumerate(lengths):
        row = [s[:, r:r + 1] for s in state0]  # each [L, 1, H]
        outs = []
        for t in range(n):
            out, *row = step_sess.run(None, dict(zip(names["inputs"], (x[r, t:t + 1], *row))))
            outs.append(out[0])
        ref = np.stack(outs)  # [n, D_out]
        do, ds = float(np.abs(y[r, :n] - ref).max()), max_diff_of(row, [s[:, r:r + 1] for s in state])
        where = f"sequence graph row {r} (length {n} of {frames})"
        _check(strict, do, ref, PROMPT_TOL, f"{where}: y differs from stepping the row frame by frame")
        _check(strict, ds, np.stack(row), PROMPT_TOL, f"{where}: state differs from stepping the row")
        max_out, max_state = max(max_out, do), max(max_state, ds)
    ref_y, ref_state = _torch_run(model, np.ascontiguousarray(x.transpose(1, 0, 2)), state0, lengths)  # [T, B, D]
    valid = np.arange(frames)[:, None] < lengths[None, :]  # [T, B]
    t_out = float(np.abs(y.transpose(1, 0, 2)[valid] - ref_y[valid]).max())
    t_state = max_diff_of(state, ref_state)
    _check(strict, t_out, ref_y[valid], LOGIT_TOL, "sequence graph vs PyTorch: y")
    _check(strict, t_state, np.stack(ref_state), LOGIT_TOL, "sequence graph vs PyTorch: final state")
    return SequenceParity(tuple(int(n) for n in lengths), max_out, max_state, t_out, t_state)


def check_frame_graphs(model: FrameModel, step_path: str | os.PathLike, sequence_path: str | os.PathLike | None,
                       frames: int, batch_sizes: Sequence[int] = BATCH_SIZES,
                       quantization: str = "fp32") -> FrameGraphParity:
    """All checks of one precision; fp32 raises ParityError on the first mismatch."""
    strict = quantization == "fp32"
    step_sess = session(step_path)
    step = tuple(check_frame_step(model, step_sess, b, frames, strict) for b in batch_sizes)
    sequence = None
    if sequence_path is not None:
        sequence = check_sequence(model, session(sequence_path), step_sess, min(frames, SEQUENCE_FRAMES),
                                  strict=strict)
    return FrameGraphParity(quantization, step, sequence)
