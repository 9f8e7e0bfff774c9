"""ONNX Runtime engine: one bundle, one step graph (+ the prompt graph when the bundle has one).

The execution provider comes from `device`: "cpu", "cuda" (required), or "auto" (CUDA when
onnxruntime-gpu finds a GPU, else CPU, saying why). The provider each session got is logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lstmgen.bundle import BundleError, Manifest, load_manifest, read_graph
from lstmgen.config_args import option
from lstmgen.errors import UsageError
from lstmgen.serve.state_blob import state_layout

log = logging.getLogger("lstmgen.engine")

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# Cells whose LSTM nodes ONNX Runtime's CUDA provider does not run. It hands an LSTM node with
# peepholes (input P) or input_forget != 0 back to the CPU provider (cuDNN has neither:
# onnxruntime/core/providers/cuda/cuda_execution_provider.cc, RNNNeedFallbackToCPU), so the whole
# recurrence would run on the CPU, the state copied across at every step, while the engine said
# CUDA. A cifg bundle is a plain LSTM node (export/onnx_graph.py cifg_gates): cuDNN runs it.
CUDA_UNSUPPORTED_CELLS = {"peephole": "an LSTM with peepholes (the ONNX LSTM op's input P), which cuDNN lacks"}


SPIN_MODES = ("on", "run", "off")


@dataclass(frozen=True)
class EngineConfig:
    device: str = option("auto", "execution provider: auto = CUDA when onnxruntime-gpu finds a GPU, else CPU",
                         choices=("auto", "cpu", "cuda"))
    # 0: ONNX Runtime's default (one per physical core)
    intra_op_threads: int = option(0, "ONNX Runtime intra-op threads (0: its default)", flag="--threads")
    # ORT's pool threads busy-wait for work instead of sleeping. "on" (ORT's default): also between
    # calls, which steals the cores an event loop, the sampler's threads and other processes need
    # (offline sampling on the word model lost 12 points of the raw step to it); "run": only inside
    # a call (session.force_spinning_stop), most of the latency gain at batch 1 without the theft;
    # "off": never. The one default of every command, the server's and the API's.
    spin: str = option("run", "ONNX Runtime threads busy-wait for work: on = also between steps (only with cores "
                              "to spare, see --threads), run = only inside a step, off = never", choices=SPIN_MODES)
    # IO binding keeps (h, c) on the device between steps: "auto" = on for CUDA.
    io_binding: str = option("auto", "keep the model's state on the device between steps (ONNX Runtime IO "
                                     "binding): auto = on for CUDA", choices=("auto", "on", "off"))
    verify_checksums: bool = option(True, "check each graph's bytes against the manifest's sha256 before ONNX "
                                          "Runtime loads them")


def choose_providers(device: str, cell: str = "lstm") -> tuple[list[str], str]:
    """Providers to ask ONNX Runtime for a bundle of `cell`, and a line saying why."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU], "CPU requested (--device cpu)"
    if device == "cuda" and cell in CUDA_UNSUPPORTED_CELLS:
        raise UsageError(f"--device cuda: this bundle's cell is {cell!r}, {CUDA_UNSUPPORTED_CELLS[cell]}; ONNX "
                         f"Runtime's {CUDA} does not run its LSTM nodes and would fall back to the CPU for "
                         "every step. Serve it with --device cpu")
    if device == "cuda":
        if CUDA not in available:
            raise UsageError(f"--device cuda: this onnxruntime build has no CUDA provider "
                               f"(available: {', '.join(available)}); install the 'gpu' extra (onnxruntime-gpu)")
        return [CUDA, CPU], "CUDA requested (--device cuda)"
    if device != "auto":
        raise UsageError(f"device must be auto, cpu or cuda, got {device!r}")
    if CUDA in available and cell in CUDA_UNSUPPORTED_CELLS:
        return [CPU], f"auto: CPU because {CUDA} cannot run a {cell!r} cell's LSTM nodes"
    if CUDA in available:
        return [CUDA, CPU], "auto: onnxruntime offers CUDA"
    return [CPU], f"auto: CPU because this onnxruntime build offers no CUDA provider (available: {', '.join(available)})"


class Engine:
    """Runs the bundle's graphs on numpy arrays. Not thread-safe per call order: the scheduler
    calls it from one worker thread."""

    def __init__(self, bundle_dir: str | Path, cfg: EngineConfig = EngineConfig()):
        self.bundle_dir = Path(bundle_dir)
        # The checksums are checked on the bytes ONNX Runtime loads (_open), not on the files before
        self.manifest: Manifest = load_manifest(self.bundle_dir, verify_checksums=False)
        self._verify = cfg.verify_checksums
        providers, why = choose_providers(cfg.device, self.manifest.cell)
        opts = ort.SessionOptions()
        if cfg.intra_op_threads:
            opts.intra_op_num_threads = cfg.intra_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if cfg.spin not in SPIN_MODES:
            raise UsageError(f"spin must be one of {', '.join(SPIN_MODES)}, got {cfg.spin!r}")
        if cfg.spin == "off":
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif cfg.spin == "run":
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        self._opts, self._providers = opts, providers  # for the graphs a subclass opens
        self.step_session = self._open(self.manifest.model_file, self.manifest.model_sha256, opts, providers)
        self.provider = self.step_session.get_providers()[0]
        if cfg.device == "cuda" and self.provider != CUDA:
            raise UsageError(f"--device cuda: the session fell back to {self.provider} (CUDA libraries missing?)")
        if providers[0] == CUDA and self.provider != CUDA:
            why += f"; CUDA session failed to start, fell back to {self.provider}"
        log.info("execution provider %s (%s)", self.provider, why)
        self.prompt_session = (self._open(self.manifest.prompt_model_file, self.manifest.prompt_model_sha256 or "",
                                          opts, providers)
                               if self.manifest.prompt_model_file else None)
        # The state tensors, in the graphs' order (the step graph's inputs after the tokens): (h, c)
        # for an LSTM, (h,) for a GRU; one row's shape each, [L, H] (the graphs hold [L, B, H]).
        layout = state_layout(self.manifest)
        self.state_names: tuple[str, ...] = tuple(name for name, _ in layout)
        self.state_shapes: tuple[tuple[int, int], ...] = tuple(shape for _, shape in layout)
        self._check_contract()
        self.io_binding = cfg.io_binding == "on" or (cfg.io_binding == "auto" and self.provider == CUDA)
        self._state_device = "cuda" if self.provider == CUDA else "cpu"
        if self.io_binding:
            log.info("IO binding on: (h, c) stay on %s between steps; only logits come back", self._state_device)

    def _open(self, fname: str, sha256: str, opts: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
        path = self.bundle_dir / fname
        # Bytes, not the path: ORT then loads exactly what was checked, and nothing beside it
        data = read_graph(self.bundle_dir, fname, sha256 if self._verify else None)
        try:
            return ort.InferenceSession(data, opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise BundleError(f"{path}: ONNX Runtime cannot load it: {e}") from e

    def _check_contract(self) -> None:
        """The graphs must take and give what the manifest says (names, ranks, widths), so a
        mismatched bundle fails at start naming the file, not on the first request."""
        m = self.manifest
        self._check_graph(self.step_session, m.model_file, m.inputs, rank=1)
        if self.prompt_session is not None:
            self._check_graph(self.prompt_session, m.prompt_model_file, m.prompt_inputs, rank=2)

    def _check_graph(self, session: ort.InferenceSession, fname: str, want_inputs: tuple[str, ...],
                     rank: int) -> None:
        m = self.manifest
        path = self.bundle_dir / fname
        ins = {i.name: i for i in session.get_inputs()}
        outs = {o.name: o for o in session.get_outputs()}
        if tuple(ins) != want_inputs or tuple(outs) != m.outputs:
            raise BundleError(f"{path}: graph inputs {list(ins)} / outputs {list(outs)} differ from the "
                              f"manifest's {list(want_inputs)} / {list(m.outputs)}")
        n = len(self.state_names)
        if tuple(want_inputs[-n:]) != self.state_names:
            raise BundleError(f"{path}: the manifest's inputs {list(want_inputs)} do not end with its state "
                              f"tensors {list(self.state_names)}")
        tokens, logits = ins[want_inputs[0]], outs[m.outputs[0]]
        if len(tokens.shape) != rank:
            raise BundleError(f"{path}: expected tokens {'[B]' if rank == 1 else '[B, T]'}; got {tokens.shape}")
        for name, (layers, hidden) in zip(self.state_names, self.state_shapes):
            shape = ins[name].shape
            if len(shape) != 3 or shape[0] != layers or shape[2] != hidden:
                raise BundleError(f"{path}: input {name} has shape {shape}; the manifest says "
                                  f"[{layers}, B, {hidden}] (num_layers, hidden_size)")
        if logits.shape[-1] != m.vocab_size:
            raise BundleError(f"{path}: logits width {logits.shape[-1]} differs from the vocabulary "
                              f"size {m.vocab_size} in the manifest")

    # -- running -------------------------------------------------------------------------------
    def zeros(self, batch: int) -> tuple[np.ndarray, ...]:
        """The empty state of `batch` rows: one float32 [L, B, H] array per state tensor."""
        return tuple(np.zeros((layers, batch, hidden), np.float32) for layers, hidden in self.state_shapes)

    def step(self, tokens: np.ndarray, state: tuple) -> tuple[np.ndarray, tuple]:
        """tokens int64 [B], the state (each [L, B, H]) -> logits [B, V] (numpy), the new state.

        With IO binding, the state may hold OrtValues from the previous step and the new one comes
        back as OrtValues on the device; the row pool keeps them there until its rows change
        (serve/pool.py)."""
        names = self.manifest.inputs
        if not self.io_binding:
            logits, *new = self.step_session.run(None, {names[0]: tokens, **dict(zip(names[1:], state))})
            return logits, tuple(new)
        io = self.step_session.io_binding()
        io.bind_cpu_input(names[0], tokens)
        for name, x in zip(names[1:], state):
            if isinstance(x, ort.OrtValue):
                io.bind_ortvalue_input(name, x)  # already on the device: no copy
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(x))  # a pool's [:, :n] view may be strided
        out = self.manifest.outputs
        io.bind_output(out[0], "cpu")  # sampling needs the logits on the host
        for name in out[1:]:
            io.bind_output(name, self._state_device)
        self.step_session.run_with_iobinding(io)
        logits, *new = io.get_outputs()
        return logits.numpy(), tuple(new)

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, state: tuple) -> tuple[np.ndarray, tuple]:
        """Right-padded prompts tokens int64 [B, T], lengths [B] (1..T), the state to start from
        -> logits at each row's last token [B, V], and the state after it."""
        if self.prompt_session is not None:
            names = self.manifest.prompt_inputs
            logits, *new = self.prompt_session.run(None, {
                names[0]: tokens, names[1]: lengths.astype(np.int32), **dict(zip(names[2:], state))})
            return logits, tuple(new)
        return self._prefill_by_steps(tokens, lengths, state)

    def _prefill_by_steps(self, tokens, lengths, state):
        """Fallback for bundles without a prompt graph: one step call per prompt position."""
        logits = None
        for t in range(tokens.shape[1]):
            live = lengths > t  # rows whose prompt still has a token at t  [B]
            step_logits, new = self.step(tokens[:, t], state)
            if logits is None:
                logits = np.zeros_like(step_logits)
            logits[live] = step_logits[live]
            state = tuple(np.where(live[None, :, None], x2, x) for x2, x in zip(new, state))
        return logits, state
