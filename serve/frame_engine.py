"""ONNX Runtime engine of a frame model (manifest kind "frames"): x float32 [B, D_in] and the
manifest's state tensors in, y [B, D_out] and the new state out. Everything else (providers,
checksums, threads, IO binding) is the text engine's."""
from __future__ import annotations

import numpy as np

from lstmgen.bundle import BundleError
from lstmgen.errors import UsageError
from lstmgen.serve.engine import Engine, EngineConfig
from lstmgen.serve.frame_stream import FrameSpecView


class FrameEngine(Engine):
    def __init__(self, bundle_dir, cfg: EngineConfig = EngineConfig()):
        super().__init__(bundle_dir, cfg)
        spec = self.manifest.frames
        # The whole-sequence graph reads many frames of many streams in one call (a stream with a
        # backlog catches up in one call instead of one per frame)
        self.sequence_session = (self._open(spec.sequence_model_file, spec.sequence_model_sha256 or "",
                                            self._opts, self._providers)
                                 if spec.sequence_model_file else None)
        if self.sequence_session is not None:
            names = tuple(i.name for i in self.sequence_session.get_inputs())
            if names != spec.sequence_inputs:
                raise BundleError(f"{self.bundle_dir / spec.sequence_model_file}: inputs {list(names)} differ from "
                                  f"the manifest's {list(spec.sequence_inputs)}")

    def run(self, x: np.ndarray, lengths: np.ndarray, state: tuple, graph: str = "auto") -> tuple[np.ndarray, tuple]:
        """Right-padded frames x [B, T, D_in], lengths [B] (1..T), the state (each [L, B, H]) -> y
        [B, T, D_out] (rows past their length: unspecified) and the state after each row's last frame.
        graph: "auto" takes the whole-sequence graph when there is one and T > 1; "sequence" or "step"
        choose one (evaluation scores each, lstmgen/evaluate_frames.py)."""
        if graph == "step" or (graph == "auto" and (x.shape[1] == 1 or self.sequence_session is None)):
            return self._run_by_steps(x, lengths, state)
        if self.sequence_session is None:
            raise UsageError(f"{self.bundle_dir}: the bundle has no whole-sequence graph (frames.sequence_model_file)")
        names = self.manifest.frames.sequence_inputs
        y, *new = self.sequence_session.run(None, {names[0]: x, names[1]: lengths.astype(np.int32),
                                                   **dict(zip(names[2:], state))})
        return y, tuple(new)

    def _run_by_steps(self, x, lengths, state):
        ys = []
        for t in range(x.shape[1]):
            live = lengths > t  # [B]
            y, new = self.step(x[:, t], state)
            ys.append(y)
            state = tuple(np.where(live[None, :, None], n, s) for n, s in zip(new, state))
        return np.stack(ys, axis=1), state

    def _check_contract(self) -> None:
        m, spec = self.manifest, self.manifest.frames
        path = self.bundle_dir / m.model_file
        if m.kind != "frames" or spec is None:
            raise BundleError(f"{self.bundle_dir / 'manifest.json'}: kind {m.kind!r} is not a frame model")
        ins = {i.name: i for i in self.step_session.get_inputs()}
        outs = {o.name: o for o in self.step_session.get_outputs()}
        if tuple(ins) != m.inputs or tuple(outs) != m.outputs:
            raise BundleError(f"{path}: graph inputs {list(ins)} / outputs {list(outs)} differ from the "
                              f"manifest's {list(m.inputs)} / {list(m.outputs)}")
        x, y = ins[m.inputs[0]].shape, outs[m.outputs[0]].shape
        if len(x) != 2 or x[1] != spec.input_size or len(y) != 2 or y[1] != spec.output_size:
            raise BundleError(f"{path}: expected x [B, {spec.input_size}] and y [B, {spec.output_size}] "
                              f"(the manifest's input_size, output_size); got {x} and {y}")
        for name, (layers, hidden) in zip(self.state_names, self.state_shapes):
            shape = ins[name].shape
            if len(shape) != 3 or shape[0] != layers or shape[2] != hidden:
                raise BundleError(f"{path}: input {name} has shape {shape}; the manifest says [{layers}, B, {hidden}]")

    def zeros_row(self) -> tuple[np.ndarray, ...]:
        """One stream's empty state: each state tensor [L, H]."""
        return tuple(np.zeros(shape, np.float32) for shape in self.state_shapes)

    def spec_view(self) -> FrameSpecView:
        spec = self.manifest.frames
        std = spec.standardize or {}
        mean = np.asarray(std["mean"], np.float32) if std.get("mode") == "global" else None
        scale = None
        if mean is not None:
            scale = np.maximum(np.asarray(std["std"], np.float32), np.float32(std.get("std_floor", 1e-6)))
        return FrameSpecView(spec.task, spec.input_size, spec.output_size, mean, scale)
