"""A frame bundle's figures on held-out data, through the serving engine (serve/frame_engine.py: ONNX
Runtime, no torch), so what is measured is what a server runs: its checksum checks, its contract
checks of the graphs against the manifest, its provider choice (`device`, as `lstmgen eval`).

The data is read and split exactly as the trainer does (train/frame_data.py `load_frames`, torch-free:
the same fixed held-out parts, e.g. builtin:digits' every-fifth image, builtin:sin-cos' test wave),
left unstandardised, then standardised from the *manifest's* `frames.standardize` - what a server
must do, so the figure also checks that the manifest is enough. Then:
  regression, continuous stream (builtin:sin-cos): the split cut into the trainer's eval_batch_size
      contiguous streams, each run from a zero state to its end (the trainer's bptt chunks carry the
      state, so they change only the float rounding); MSE over every frame and feature.
  otherwise: batches of whole sequences from a zero state; regression MSE over the valid frames,
      classification accuracy (and cross-entropy) of the last valid frame's logits.
`graph="sequence"` runs sequence.onnx (one call per batch); `graph="step"` the step graph frame by
frame, as a server streams them (FrameEngine.run's two paths).

    python -m lstmgen.evaluate_frames BUNDLE DATA [--split test|valid] [--graph sequence|step] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from lstmgen.bundle import Manifest, load_manifest
from lstmgen.errors import UsageError, UserError
from lstmgen.serve.engine import EngineConfig
from lstmgen.serve.frame_engine import FrameEngine
from lstmgen.train.frame_data import Sequences, Standardizer, load_frames, to_streams

GRAPHS = ("sequence", "step")


def evaluate_frames(bundle_dir: str | Path, data_spec: str, *, split: str = "test", graph: str = "sequence",
                    targets: str | None = None, batch_size: int = 256, streams: int | None = None,
                    threads: int = 1, device: str = "auto") -> dict:
    """{"mse"} (regression) or {"accuracy", "correct", "loss"} (classification) of the bundle on the
    `split` of `data_spec` (a `--data` spec: builtin:NAME, mnist:DIR, FILE.npz, FILE.npy + targets),
    with what was measured. `streams`: for continuous-stream data, how many streams (default: the
    trainer's eval_batch_size, from the manifest's provenance). `device`: auto | cpu | cuda."""
    # Read first so a text bundle or a missing graph fails as usage; the engine checks the checksums,
    # on the bytes it loads
    m = load_manifest(bundle_dir, verify_checksums=False)
    if m.kind != "frames":
        raise UsageError(f"{bundle_dir}: a {m.kind} model; evaluate_frames needs a frames bundle (lstmgen eval "
                         "scores text)")
    if graph not in GRAPHS or (graph == "sequence" and m.frames.sequence_model_file is None):
        raise UsageError(f"graph must be 'step' or 'sequence' (and the bundle must hold sequence.onnx); got {graph!r}")
    train_cfg = m.provenance.get("train_config", {})
    data = load_frames(data_spec, m.frames.task, targets=targets, standardize="none",
                       valid_fraction=train_cfg.get("valid_fraction", 0.1),
                       stream=bool(m.provenance.get("data", {}).get("stream", False)))
    seqs = {"test": data.test, "valid": data.valid, "train": data.train}.get(split)
    if seqs is None:
        raise UsageError(f"{data_spec}: no {split!r} split (choose test, valid or train; test needs held-out data)")
    if data.input_size != m.frames.input_size:
        raise UsageError(f"{data_spec}: frames of {data.input_size} features; the model reads {m.frames.input_size}")
    seqs = _standardizer(m).apply(seqs)
    engine = FrameEngine(bundle_dir, EngineConfig(device=device, intra_op_threads=threads))

    def run(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:  # y [B, T, D_out], from a zero state
        return engine.run(x, lengths, engine.zeros(len(lengths)), graph)[0]

    t0 = time.monotonic()
    n = None
    if data.stream:
        n = streams or train_cfg.get("eval_batch_size", 10)
        x, y = to_streams(seqs, n, data_spec)  # [N, B, D], time first
        x, y = x.transpose(1, 0, 2), y.transpose(1, 0, 2)  # [B, N, D]
        figures = _regression([(x, np.full(n, x.shape[1]), y)], run)
    else:
        batches = [_batch(seqs, i, batch_size) for i in range(0, len(seqs), batch_size)]
        figures = _regression(batches, run) if m.frames.task == "regression" else _classification(batches, run)
    pytorch = m.provenance.get("validation", {}).get(f"{split}_{next(iter(figures))}")
    return {"bundle": str(bundle_dir), "data": data_spec, "split": split, "task": m.frames.task, "graph": graph,
            "provider": engine.provider, "quantization": m.quantization, "sequences": len(seqs),
            "frames": seqs.frames(), "streams": n, **figures,
            "pytorch_at_training": pytorch, "seconds": round(time.monotonic() - t0, 3)}


def _standardizer(m: Manifest) -> Standardizer:
    std = m.frames.standardize
    return Standardizer(std["mode"], tuple(std.get("mean", ())), tuple(std.get("std", ())))


def _batch(seqs: Sequences, i: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    part = seqs.take(np.arange(i, min(i + size, len(seqs))))
    return part.x, part.lengths, part.y  # [b, T, D_in], [b], [b, T, D_out] or [b]


def _regression(batches, run: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict:
    total, count = 0.0, 0
    for x, lengths, target in batches:
        y = run(x, lengths)  # [B, T, D_out]
        valid = np.arange(x.shape[1])[None, :] < lengths[:, None]  # [B, T]
        err = (y[valid].astype(np.float64) - target[valid]) ** 2  # [F, D_out]
        total, count = total + float(err.sum()), count + err.size
    return {"mse": total / count}


def _classification(batches, run: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict:
    correct, loss, count = 0, 0.0, 0
    for x, lengths, labels in batches:
        y = run(x, lengths)  # [B, T, C]
        last = y[np.arange(len(lengths)), lengths - 1].astype(np.float64)  # [B, C]
        shifted = last - last.max(1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        loss -= float(log_p[np.arange(len(labels)), labels].sum())
        correct += int((last.argmax(1) == labels).sum())
        count += len(labels)
    return {"accuracy": correct / count, "correct": correct, "loss": loss / count}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lstmgen.evaluate_frames", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("data", help="builtin:sin-cos, builtin:digits, mnist:DIR, FILE.npz or FILE.npy (--targets)")
    p.add_argument("--targets")
    p.add_argument("--split", default="test", choices=("test", "valid", "train"))
    p.add_argument("--graph", default="sequence", choices=GRAPHS)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="ONNX Runtime device: auto = CUDA when onnxruntime-gpu finds a GPU, else CPU")
    args = p.parse_args(argv)
    try:
        result = evaluate_frames(args.bundle, args.data, split=args.split, graph=args.graph, targets=args.targets,
                                 threads=args.threads, device=args.device)
    except UserError as e:
        print(f"evaluate_frames: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
