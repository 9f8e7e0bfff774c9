"""Parity: the exported graphs, run by ONNX Runtime, against the PyTorch model they came from.

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

from lstmgen.bundle import PROMPT_INPUTS, STEP_INPUTS
from lstmgen.errors import UsageError, UserError
from lstmgen.train.model import StackedLSTM

BATCH_SIZES = (1, 7)
DEFAULT_STEPS = 200
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
    max_state_diff: float  # final (h, c)
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


@dataclass(frozen=True)
class ParityReport:
    fp32: GraphParity
    int8: GraphParity | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = []
        for gp in (self.fp32, self.int8):
            if gp is None:
                continue
            for s in gp.step:
                out.append(f"{gp.quantization} step graph vs PyTorch, batch {s.batch}, {s.steps} steps: "
                           f"max |logit diff| {s.max_logit_diff:.3g}, state diff {s.max_state_diff:.3g}, "
                           f"greedy tokens {'identical' if s.tokens_identical else 'DIFFER'} "
                           f"(agreement {s.token_agreement:.1%})")
            if gp.prompt is not None:
                out.append(f"{gp.quantization} prompt graph vs step graph, lengths {list(gp.prompt.lengths)}: "
                           f"max |logit diff| {gp.prompt.max_logit_diff:.3g}, "
                           f"state diff {gp.prompt.max_state_diff:.3g}")
        return out


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
def _torch_single_thread() -> Iterator[None]:
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


def check_step(model: StackedLSTM, sess: ort.InferenceSession, prompts: list[list[int]],
               steps: int, strict: bool = True, logit_tol: float = LOGIT_TOL) -> StepParity:
    """Lockstep greedy decoding of PyTorch and ORT; both always get the same (PyTorch's) tokens,
    so the argmax comparison at every position is on identical inputs."""
    B, L, H = len(prompts), model.cfg.num_layers, model.cfg.hidden_size
    h_t, c_t = model.init_state(B)  # [L, B, H]
    h_o, c_o = h_t.numpy(), c_t.numpy()
    tokens = np.array([p[0] for p in prompts], dtype=np.int64)  # [B]
    n_calls = max(len(p) for p in prompts) + steps - 1
    max_diff, agree = 0.0, 0
    with torch.inference_mode(), _torch_single_thread():
        for t in range(n_calls):
            logits_t, (h_t, c_t) = model(torch.from_numpy(tokens)[None], (h_t, c_t))
            ref = logits_t[0].numpy()  # [B, V]
            got, h_o, c_o = sess.run(None, {STEP_INPUTS[0]: tokens, STEP_INPUTS[1]: h_o, STEP_INPUTS[2]: c_o})
            diff = float(np.abs(got - ref).max())
            max_diff = max(max_diff, diff)
            want, have = ref.argmax(-1), got.argmax(-1)  # [B]
            agree += int((want == have).sum())
            if strict:
                _raise_on_mismatch(want, have, ref, got, diff, logit_tol, B, t)
            # rows still in their prompt get its next token, the others their greedy choice
            tokens = np.array([p[t + 1] if t + 1 < len(p) else want[r] for r, p in enumerate(prompts)],
                              dtype=np.int64)
    state_diff = max(float(np.abs(h_o - h_t.numpy()).max()), float(np.abs(c_o - c_t.numpy()).max()))
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


def check_prompt(prompt_sess: ort.InferenceSession, step_sess: ort.InferenceSession,
                 prompts: list[list[int]], num_layers: int, hidden_size: int,
                 strict: bool = True, tol: float = PROMPT_TOL, seed: int = 0) -> PromptParity:
    """One right-padded [B, T] prompt-graph call against stepping each row alone at batch 1."""
    B, T = len(prompts), max(len(p) for p in prompts)
    rng = np.random.default_rng(seed)
    h0 = (0.5 * rng.standard_normal((num_layers, B, hidden_size))).astype(np.float32)  # [L, B, H]
    c0 = (0.5 * rng.standard_normal((num_layers, B, hidden_size))).astype(np.float32)
    tokens = np.zeros((B, T), dtype=np.int64)  # padding id 0: must be ignored past each length
    for r, p in enumerate(prompts):
        tokens[r, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)  # [B]
    logits, h, c = prompt_sess.run(None, dict(zip(PROMPT_INPUTS, (tokens, lengths, h0, c0))))
    max_logit, max_state = 0.0, 0.0
    for r, p in enumerate(prompts):
        hr, cr = h0[:, r:r + 1], c0[:, r:r + 1]  # [L, 1, H]
        for tok in p:
            lr, hr, cr = step_sess.run(None, dict(zip(STEP_INPUTS, (np.array([tok], np.int64), hr, cr))))
        dl = float(np.abs(lr[0] - logits[r]).max())
        ds = max(float(np.abs(hr[:, 0] - h[:, r]).max()), float(np.abs(cr[:, 0] - c[:, r]).max()))
        if strict and max(dl, ds) > tol:
            what = "logits" if dl > tol else "state (h_out/c_out)"
            raise ParityError(f"prompt graph row {r} (length {len(p)} of {T}): {what} differ from stepping "
                              f"the prompt token by token by {max(dl, ds):.3g} (tolerance {tol:g})")
        max_logit, max_state = max(max_logit, dl), max(max_state, ds)
    return PromptParity(tuple(int(n) for n in lengths), max_logit, max_state)


def check_graphs(model: StackedLSTM, step_path: str | os.PathLike,
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
                              model.cfg.hidden_size, strict)
    return GraphParity(quantization, step, prompt)
