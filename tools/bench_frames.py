"""Frames per second served against raw ONNX Runtime, side by side in one run (docs/results.md).

    python tools/bench_frames.py [--shape acoustic|row-digits] [--seconds 6] [--streams 1,64]
                                 [--json docs/bench-frames.json]

Shapes: "acoustic" is a realistic streaming model, 2 x 256 LSTM over 40-dim frames with one output
of 40 (an acoustic-feature regressor), trained one epoch on random frames, clients sending 10
frames per message; "row-digits" is the row-by-row digits classifier (1 x 128), trained one epoch
on builtin:digits, clients sending 64 frames per message. The weights do not matter for speed.
It measures:
raw ORT, the step graph alone at batch B (B frames per call, the state carried) and the sequence
graph at batch B reading a message's frames per row per call (what the server runs when every
stream has sent a message), and the real server under N concurrent streams (AsyncClient in this
process, each stream sending its messages and reading every output), for N in --streams; the
server at N streams is compared with raw ORT at batch N. The 2-core figure includes the client's own CPU, as a load generator's would.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's launcher of a real server

from conftest import start_server  # noqa: E402


def raw_ort(bundle: Path, batch: int, seconds: float, frames: int = 1) -> float:
    """Frames/s of the bare graphs at this batch: the step graph (frames=1), or the sequence graph
    reading `frames` frames per row per call."""
    from lstmgen.serve.engine import EngineConfig
    from lstmgen.serve.frame_engine import FrameEngine

    engine = FrameEngine(bundle, EngineConfig(device="cpu"))
    d_in = engine.manifest.frames.input_size
    x = np.random.default_rng(0).normal(size=(batch, frames, d_in)).astype(np.float32)
    lengths = np.full(batch, frames)
    state = tuple(np.zeros((l, batch, h), np.float32) for l, h in engine.state_shapes)
    call = (lambda st: engine.step(x[:, 0], st)) if frames == 1 else (lambda st: engine.run(x, lengths, st))
    for _ in range(10):
        _, state = call(state)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, state = call(state)
        n += 1
    return batch * frames * n / (time.perf_counter() - t0)


async def served(target: str, streams: int, seconds: float, d_in: int, per_message: int) -> float:
    from lstmgen_client import AsyncClient

    frames = np.random.default_rng(1).normal(size=(512, d_in)).astype(np.float32)
    done = 0
    end = time.perf_counter() + seconds

    async def one(client) -> None:
        nonlocal done
        while time.perf_counter() < end:
            async for _ in client.stream_frames(frames, frames_per_message=per_message):
                done += 1

    async with AsyncClient(target, stream_timeout=None) as client:
        await client.model_info()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(streams)))
        return done / (time.perf_counter() - t0)


SHAPES = {  # name: (preset overrides, data, frames per message)
    "acoustic": (dict(task="regression", projection_size=0, hidden_size=256, num_layers=2, batch_size=16,
                      bptt=50, eval_batch_size=16), "random:40", 10),
    "row-digits": (dict(task="classification"), "builtin:digits", 64),
}


def random_frames(path: Path, d: int) -> Path:
    """64 sequences of 200 random d-dim frames with d-dim targets, as a .npz (train/frame_data.py)."""
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(64, 200, d)).astype(np.float32),
             y=rng.normal(size=(64, 200, d)).astype(np.float32))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="acoustic")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--streams", default="1,64")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from lstmgen.export.bundle import export_bundle
    from lstmgen.tools.bench import cpu_model
    from lstmgen.train.config import preset
    from lstmgen.train.trainer import train

    overrides, data, per_message = SHAPES[args.shape]
    base = "sin-cos" if overrides["task"] == "regression" else "row-digits"
    counts = [int(n) for n in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if data.startswith("random:"):
            data = str(random_frames(Path(tmp) / "frames.npz", int(data.split(":")[1])))
        best = train(preset(base, **overrides, epochs=1, device="cpu"), data, Path(tmp) / "run",
                     log=lambda line: None, progress_bar=False)
        bundle = Path(tmp) / "bundle"
        export_bundle(best, bundle)
        from lstmgen.bundle import load_manifest
        m = load_manifest(bundle)
        raw = {n: raw_ort(bundle, n, args.seconds / 2) for n in counts}
        raw_seq = {n: raw_ort(bundle, n, args.seconds / 2, frames=per_message) for n in counts}
        srv = start_server(bundle, Path(tmp) / "server.log", "--threads", "0", "--max-concurrent", str(max(counts)))
        try:
            server = {n: asyncio.run(served(srv.target, n, args.seconds, m.frames.input_size, per_message))
                      for n in counts}
        finally:
            srv.stop()
    result = {"shape": args.shape, "cell": m.cell, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
              "input_size": m.frames.input_size, "output_size": m.frames.output_size,
              "frames_per_message": per_message, "cpu_model": cpu_model(),
              "raw_ort_step_frames_per_s": raw, "raw_ort_sequence_frames_per_s": raw_seq,
              "server_frames_per_s": server, "server_vs_raw_step": {n: server[n] / raw[n] for n in counts},
              "server_vs_raw_sequence": {n: server[n] / raw_seq[n] for n in counts}}
    for n in counts:
        print(f"{args.shape} {n:>3} stream(s): server {server[n]:>9,.0f} frames/s | raw ORT at batch {n}: step "
              f"graph {raw[n]:>9,.0f} frames/s ({server[n] / raw[n]:.0%}), sequence graph {per_message} "
              f"frames/call {raw_seq[n]:>9,.0f} ({server[n] / raw_seq[n]:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
