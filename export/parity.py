"""Parity: the exported graphs, run by ONNX Runtime, against the PyTorch language model they came from
(frame models: frame_parity.py). The state is a tuple: (h, c) for an LSTM, (h,) for a GRU.

Step graph vs PyTorch: both are stepped in lockstep over every row's prompt and then `steps` greedy
tokens, at each batch size (batch 1 and batch 7 by default, a different prompt of a different
length per row: rows still in their prompt are fed it, the others their argmax, as a serving
batch mixes them). Prompt graph vs step graph: one right-padded [B, T] call against stepping each
prompt token by token, from a random initial state. fp32 must match (identical argmax everywhere,
logits within tolerance); int8 is only measured.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np
import onnxruntime as ort
import torch

from lstmgen.bundle import STATE_NAMES, graph_names
from lstmgen.errors import UsageError, UserError
from lstmgen.export.config import DEFAULT_STEPS
from lstmgen.train.model import RecurrentLM

BATCH_SIZES = (1, 7)
LOGIT_TOL = 1e-3  # fp32 step graph vs PyTorch, relative to max(1, max |logit|)
PROMPT_TOL = 1e-4  # fp32 prompt graph vs fp32 step graph (same kernels: usually exactly 0)


class ParityError(UserError, AssertionError):
    """The exported graph does not compute what the PyTorch model computes."""


class GraphLoadError(UserError, RuntimeError):
    """ONNX Runtime refuses a graph just built: usually an --opset newer than this onnxruntime knows."""


@dataclass(frozen=True)
class StepParity:
    batch: int
    steps: int  # lockstep calls; every row generates at least the requested greedy steps
    max_logit_diff: float
    max_state_diff: float  # final state, every tensor
    token_agreement: float  # fraction of (step, row) where both argmaxes agree
    tokens_identical: bool


@dataclass(frozen=True)
class PromptParity:
    lengths: tuple[int, ...]
    max_logit_diff: float
    max_state_diff: float


@dataclass(frozen=True)
class GraphParity:
    """One exported precision: its step graph per batch size, and its prompt graph if any."""

    quantization: str  # "fp32" or "int8-dynamic"
    step: tuple[StepParity, ...]
    prompt: PromptParity | None

    def lines(self) -> list[str]:
        out = [f"{self.quantization} step graph vs PyTorch, batch {s.batch}, {s.steps} steps: "
               f"max |logit diff| {s.max_logit_diff:.3g}, state diff {s.max_state_diff:.3g}, "
               f"greedy tokens {'identical' if s.tokens_identical else 'DIFFER'} "
               f"(agreement {s.token_agreement:.1%})" for s in self.step]
        if self.prompt is not None:
            out.append(f"{self.quantization} prompt graph vs step graph, lengths {list(self.prompt.lengths)}: "
                       f"max |logit diff| {self.prompt.max_logit_diff:.3g}, "
                       f"state diff {self.prompt.max_state_diff:.3g}")
        return out


@dataclass(frozen=True)
class ParityReport:
    """fp32 (enforced) and int8 (measured) results: GraphParity for text, frame_parity's
    FrameGraphParity for frames; both have `lines()`."""

    fp32: GraphParity
    int8: GraphParity | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        return [line for gp in (self.fp32, self.int8) if gp is not None for line in gp.lines()]


def session(path: str | os.PathLike) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # Verification alternates ORT and PyTorch calls in one process: ORT's default intra-op pool
    # keeps spinning after each run and starves PyTorch's threads (100x slower on 2 cores)
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's pybind errors (Fail, InvalidGraph, ...) derive from Exception only
        raise GraphLoadError(f"{path}: ONNX Runtime cannot load the graph: {e}") from e


@contextmanager
def torch_single_thread() -> Iterator[None]:
    # One token per call is far too little work to share out, and PyTorch's pool waits for every
    # worker at each op: with another process on the cores, one step takes a scheduler tick per op
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def verification_prompts(first: Sequence[int], vocab_size: int, batch: int) -> list[list[int]]:
    """`batch` different prompts of different lengths: row r is `first` shortened by 2r tokens
    (at least 1 left) with every id shifted by r."""
    n = len(first)
    if n == 0:
        raise UsageError("the verification prompt holds no tokens")
    return [[(t + r) % vocab_size for t in first[:max(1, n - 2 * r)]] for r in range(batch)]


def default_prompt(vocab_size: int, length: int = 16, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(vocab_size, size=length).tolist()


def check_step(model: RecurrentLM, sess: ort.InferenceSession, prompts: list[list[int]],
               steps: int, strict: bool = True, logit_tol: float = LOGIT_TOL) -> StepParity:
    """Lockstep greedy decoding of PyTorch and ORT; both always get the same (PyTorch's) tokens,
    so the argmax comparison at every position is on identical inputs."""
    B = len(prompts)
    names = graph_names("text", model.cfg.cell)["inputs"]
    state_t = model.init_state(B)  # each [L, B, H]
    state_o = tuple(s.numpy() for s in state_t)
    tokens = np.array([p[0] for p in prompts], dtype=np.int64)  # [B]
    n_calls = max(len(p) for p in prompts) + steps - 1
    max_diff, agree = 0.0, 0
    with torch.inference_mode(), torch_single_thread():
        for t in range(n_calls):
            logits_t, state_t = model(torch.from_numpy(tokens)[None], state_t)
            ref = logits_t[0].numpy()  # [B, V]
            got, *state_o = sess.run(None, dict(zip(names, (tokens, *state_o))))
            diff = float(np.abs(got - ref).max())
            max_diff = max(max_diff, diff)
            want, have = ref.argmax(-1), got.argmax(-1)  # [B]
            agree += int((want == have).sum())
            if strict:
                _raise_on_mismatch(want, have, ref, got, diff, logit_tol, B, t)
            # rows still in their prompt get its next token, the others their greedy choice
            tokens = np.array([p[t + 1] if t + 1 < len(p) else want[r] for r, p in enumerate(prompts)],
                              dtype=np.int64)
    state_diff = max_diff_of(state_o, [s.numpy() for s in state_t])
    return StepParity(B, n_calls, max_diff, state_diff, agree / (n_calls * B), agree == n_calls * B)


def _raise_on_mismatch(want, have, ref, got, diff, logit_tol, batch, t) -> None:
    bad = np.flatnonzero(want != have)
    if bad.size:
        r = int(bad[0])
        top2 = np.sort(ref[r])[-2:]
        raise ParityError(
            f"batch {batch}, step {t}, row {r}: ONNX Runtime picks token {int(have[r])}, PyTorch "
            f"{int(want[r])} (max |logit diff| {diff:.3g}, PyTorch top-2 gap {top2[1] - top2[0]:.3g})")
    tol = logit_tol * max(1.0, float(np.abs(ref).max()))
    if diff > tol:
        r, v = np.unravel_index(int(np.abs(got - ref).argmax()), ref.shape)
        raise ParityError(f"batch {batch}, step {t}, row {r}, token {v}: |logit diff| {diff:.3g} "
                          f"exceeds {tol:.3g} (ONNX {got[r, v]:.6g}, PyTorch {ref[r, v]:.6g})")


def max_diff_of(a, b) -> float:
    """The largest |difference| over pairs of arrays (the tensors of two states)."""
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def random_state(cell: str, num_layers: int, batch: int, hidden_size: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A non-zero initial state, so a graph that ignored its state inputs would be caught."""
    rng = np.random.default_rng(seed)
    return tuple((0.5 * rng.standard_normal((num_layers, batch, hidden_size))).astype(np.float32)  # [L, B, H]
                 for _ in STATE_NAMES[cell])


def check_prompt(prompt_sess: ort.InferenceSession, step_sess: ort.InferenceSession,
                 prompts: list[list[int]], num_layers: int, hidden_size: int,
                 strict: bool = True, tol: float = PROMPT_TOL, seed: int = 0, cell: str = "lstm") -> PromptParity:
    """One right-padded [B, T] prompt-graph call against stepping each row alone at batch 1."""
    B, T = len(prompts), max(len(p) for p in prompts)
    names = graph_names("text", cell)
    state0 = random_state(cell, num_layers, B, hidden_size, seed)
    tokens = np.zeros((B, T), dtype=np.int64)  # padding id 0: must be ignored past each length
    for r, p in enumerate(prompts):
        tokens[r, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)  # [B]
    logits, *state = prompt_sess.run(None, dict(zip(names["prompt_inputs"], (tokens, lengths, *state0))))
    max_logit, max_state = 0.0, 0.0
    for r, p in enumerate(prompts):
        row = [s[:, r:r + 1] for s in state0]  # each [L, 1, H]
        for tok in p:
            lr, *row = step_sess.run(None, dict(zip(names["inputs"], (np.array([tok], np.int64), *row))))
        dl = float(np.abs(lr[0] - logits[r]).max())
        ds = max_diff_of(row, [s[:, r:r + 1] for s in state])
        if strict and max(dl, ds) > tol:
            what = "logits" if dl > tol else f"state ({'/'.join(names['outputs'][1:])})"
            raise ParityError(f"prompt graph row {r} (length {len(p)} of {T}): {what} differ from stepping "
                              f"the prompt token by token by {max(dl, ds):.3g} (tolerance {tol:g})")
        max_logit, max_state = max(max_logit, dl), max(max_state, ds)
    return PromptParity(tuple(int(n) for n in lengths), max_logit, max_state)


def check_graphs(model: RecurrentLM, step_path: str | os.PathLike,
                 prompt_path: str | os.PathLike | None, first_prompt: Sequence[int],
                 steps: int = DEFAULT_STEPS, batch_sizes: Sequence[int] = BATCH_SIZES,
                 quantization: str = "fp32") -> GraphParity:
    """All checks of one precision; fp32 raises ParityError on the first mismatch."""
    strict = quantization == "fp32"
    step_sess = session(step_path)
    V = model.cfg.vocab_size
    step = tuple(check_step(model, step_sess, verification_prompts(first_prompt, V, b), steps, strict)
                 for b in batch_sizes)
    prompt = None
    if prompt_path is not None:
        prompts = verification_prompts(first_prompt, V, max(batch_sizes))
        prompt = check_prompt(session(prompt_path), step_sess, prompts, model.cfg.num_layers,
                              model.cfg.hidden_size, strict, cell=model.cfg.cell)
    return GraphParity(quantization, step, prompt)
