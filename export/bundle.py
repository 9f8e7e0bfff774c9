"""Checkpoint -> bundle folder: model.onnx (+ prompt.onnx for a language model, + sequence.onnx for
a frame model) + manifest.json, verified before it appears. Language models and frame models (LSTM
or GRU) share everything here but the graphs and the checks (onnx_graph.py / frame_graph.py,
parity.py / frame_parity.py). Everything is built in a temporary sibling folder and renamed into place at the end, so
`out_dir` is either the previous bundle or the complete new one, never half of one."""
from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import onnx

from lstmgen import __version__
from lstmgen.bundle import (MANIFEST, SEQUENCE_MODEL, FrameSpec, Manifest, StateTensor, graph_names, sha256_file,
                            write_manifest)
from lstmgen.errors import UsageError, UserError
from lstmgen.export import frame_parity, parity
from lstmgen.export.config import ExportConfig
from lstmgen.export.frame_graph import build_frame_step_graph, build_sequence_graph
from lstmgen.export.onnx_graph import build_prompt_graph, build_step_graph
from lstmgen.export.quantize import quantize_int8
from lstmgen.onnx_wire import external_tensors
from lstmgen.text import ValidationSplit
from lstmgen.train.checkpoint import Checkpoint, FrameCheckpoint, load_any, resolve_checkpoint

MODEL, PROMPT_MODEL = "model.onnx", "prompt.onnx"
INT8 = "int8-dynamic"  # Manifest.quantization of a --int8 bundle


class ExportError(UserError):
    """The export cannot go ahead (bad destination, invalid graph); the message says why."""


def export_bundle(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, cfg: ExportConfig = ExportConfig(),
                  **overrides) -> tuple[Manifest, parity.ParityReport | None]:
    """Export a checkpoint file or run directory into the bundle folder `out_dir` (replacing a
    previous bundle there). `overrides`: fields of `cfg` (export_bundle(run, out, verify=False)). Raises a
    UserError: CheckpointError, ExportError, ParityError, UsageError."""
    cfg = replace(cfg, **overrides)
    ckpt_path = resolve_checkpoint(checkpoint)
    ckpt = load_any(ckpt_path)
    _check_config(ckpt, cfg)
    out = Path(out_dir)
    _check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the bundle is for a server to read
    try:
        build = _build_frames if isinstance(ckpt, FrameCheckpoint) else _build_text
        manifest, report = build(ckpt, ckpt_path, tmp, cfg)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    return manifest, report


def _check_config(ckpt: Checkpoint | FrameCheckpoint, cfg: ExportConfig) -> None:
    if cfg.verify_steps < 1:
        raise UsageError(f"verify_steps must be at least 1, got {cfg.verify_steps}")
    if cfg.int8 and ckpt.model_config.cell == "gru":  # the LSTM variants are LSTM ops: they quantize
        raise UsageError(f"--int8 is for LSTM models; this is a {ckpt.model_config.cell.upper()}, and ONNX "
                         "Runtime's dynamic quantization has no quantized GRU op (the GRU layers would stay "
                         "fp32); export it without --int8")
    if isinstance(ckpt, FrameCheckpoint) and cfg.verify_prompt is not None:
        raise UsageError(f"--verify-prompt is for language models; this is a {ckpt.task} model over float "
                         "frames (its checks use random frames)")


def _state(num_layers: int, hidden_size: int, kind: str, cell: str) -> tuple[StateTensor, ...]:
    return tuple(StateTensor(n, (num_layers, hidden_size)) for n in graph_names(kind, cell)["inputs"][1:])


def _quantize(paths: list[Path | None]) -> None:
    for path in filter(None, paths):
        quantize_int8(path, path)
        _check_self_contained(path)


def _build_text(ckpt: Checkpoint, ckpt_path: Path, tmp: Path,
                cfg: ExportConfig) -> tuple[Manifest, parity.ParityReport | None]:
    mc = ckpt.model_config
    names = graph_names("text", mc.cell)
    first = (ckpt.vocab.encode(cfg.verify_prompt) if cfg.verify_prompt is not None
             else parity.default_prompt(mc.vocab_size))
    if not first:
        raise UsageError(f"the verification prompt {cfg.verify_prompt!r} holds no tokens")
    step_path = _save(build_step_graph(ckpt.state_dict, mc, cfg.opset), tmp / MODEL)
    prompt_path = (_save(build_prompt_graph(ckpt.state_dict, mc, cfg.opset), tmp / PROMPT_MODEL)
                   if cfg.prompt_graph else None)
    report = None
    model = ckpt.build_model() if cfg.verify else None
    if model is not None:  # fp32 first, always strict: int8 is only measured against it
        report = parity.ParityReport(parity.check_graphs(model, step_path, prompt_path, first, cfg.verify_steps))
    quantization = INT8 if cfg.int8 else "fp32"
    if cfg.int8:
        _quantize([step_path, prompt_path])
        if model is not None:
            report = replace(report, int8=parity.check_graphs(model, step_path, prompt_path, first,
                                                              cfg.verify_steps, quantization=INT8))
    manifest = Manifest(
        vocab=ckpt.vocab, num_layers=mc.num_layers, hidden_size=mc.hidden_size,
        embedding_size=mc.embedding_size, opset=cfg.opset,
        model_file=MODEL, model_sha256=sha256_file(step_path),
        prompt_model_file=PROMPT_MODEL if prompt_path else None,
        prompt_model_sha256=sha256_file(prompt_path) if prompt_path else None,
        quantization=quantization, inputs=names["inputs"], outputs=names["outputs"],
        prompt_inputs=names["prompt_inputs"], provenance=_provenance(ckpt, ckpt_path, cfg, report),
        kind="text", cell=mc.cell, state=_state(mc.num_layers, mc.hidden_size, "text", mc.cell),
        validation_split=_validation_split(ckpt),
    )
    write_manifest(tmp, manifest)
    return manifest, report


def _validation_split(ckpt: Checkpoint) -> ValidationSplit | None:
    """What training validated on, as train/data.py recorded it in the corpus (None: a checkpoint
    written before it was recorded, or by hand)."""
    recorded = ckpt.corpus.get("validation")
    return ValidationSplit.from_dict(recorded) if isinstance(recorded, dict) else None


def _build_frames(ckpt: FrameCheckpoint, ckpt_path: Path, tmp: Path,
                  cfg: ExportConfig) -> tuple[Manifest, parity.ParityReport | None]:
    mc = ckpt.model_config
    names = graph_names("frames", mc.cell)
    step_path = _save(build_frame_step_graph(ckpt.state_dict, mc, cfg.opset), tmp / MODEL)
    seq_path = (_save(build_sequence_graph(ckpt.state_dict, mc, cfg.opset), tmp / SEQUENCE_MODEL)
                if cfg.prompt_graph else None)
    report = None
    model = ckpt.build_model() if cfg.verify else None
    if model is not None:  # fp32 first, always strict: int8 is only measured against it
        report = parity.ParityReport(frame_parity.check_frame_graphs(model, step_path, seq_path, cfg.verify_steps))
    if cfg.int8:
        _quantize([step_path, seq_path])
        if model is not None:
            report = replace(report, int8=frame_parity.check_frame_graphs(model, step_path, seq_path,
                                                                          cfg.verify_steps, quantization=INT8))
    spec = FrameSpec(
        task=mc.task, input_size=mc.input_size, output_size=mc.output_size,
        class_names=tuple(str(c) for c in ckpt.class_names), standardize=_jsonable(ckpt.standardize),
        sequence_model_file=SEQUENCE_MODEL if seq_path else None,
        sequence_model_sha256=sha256_file(seq_path) if seq_path else None,
        sequence_inputs=names["sequence_inputs"],
    )
    manifest = Manifest(
        vocab=None, num_layers=mc.num_layers, hidden_size=mc.hidden_size,
        embedding_size=mc.projection_size or mc.input_size, opset=cfg.opset,
        model_file=MODEL, model_sha256=sha256_file(step_path), quantization=INT8 if cfg.int8 else "fp32",
        inputs=names["inputs"], outputs=names["outputs"], prompt_inputs=(),
        provenance=_provenance(ckpt, ckpt_path, cfg, report),
        kind="frames", cell=mc.cell, state=_state(mc.num_layers, mc.hidden_size, "frames", mc.cell), frames=spec,
    )
    write_manifest(tmp, manifest)
    return manifest, report


def _save(model: onnx.ModelProto, path: Path) -> Path:
    part = path.with_name(path.name + ".part")
    onnx.save(model, part)
    _check_self_contained(part, path.name)
    try:
        onnx.checker.check_model(str(part), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name}: the built ONNX graph is invalid: {e}") from e
    os.replace(part, path)
    return path


def _check_self_contained(path: Path, name: str | None = None) -> None:
    """The manifest checksums one file per graph, and the server refuses graphs with external data
    (lstmgen/bundle.py read_graph): a graph that keeps tensors elsewhere must not become a bundle."""
    external = external_tensors(path.read_bytes())
    if external:
        raise ExportError(f"{name or path.name}: the graph keeps tensor(s) {', '.join(map(repr, external[:3]))} "
                          "in external data files; a bundle's graphs must be self-contained (under 2 GB)")


def _check_destination(out: Path) -> None:
    # Replacing a folder deletes it: only ever an earlier bundle, or an empty folder
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"{out}: folder is not empty and holds no {MANIFEST}; "
                          "refusing to replace something that is not a bundle")


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    os.replace(out, old)  # two renames: a reader sees the old bundle, nothing, or the new one
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _provenance(ckpt: Checkpoint | FrameCheckpoint, ckpt_path: Path, cfg: ExportConfig,
                report: parity.ParityReport | None) -> dict:
    import onnxruntime
    import torch

    source = {"data": ckpt.data} if isinstance(ckpt, FrameCheckpoint) else {"corpus": ckpt.corpus}
    return _jsonable({  # JSON types only, so the manifest read back equals the one returned
        "checkpoint": str(ckpt_path.resolve()),
        "checkpoint_sha256": sha256_file(ckpt_path),
        **source,  # where the training data came from
        "training": _scalars(ckpt.progress),  # epoch, step, ... (not optimizer/RNG state)
        "validation": _scalars(ckpt.metrics),  # best/last validation figures, not the history
        "model_config": asdict(ckpt.model_config),
        "train_config": asdict(ckpt.train_config),
        "export": asdict(cfg),
        "parity": report.to_dict() if report else None,
        "versions": {"lstmgen": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })


def _scalars(d: dict) -> dict:
    """The top-level numbers and strings of a dict, as JSON values."""
    out = {}
    for k, v in d.items():
        v = _jsonable(v)
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[str(k)] = v
    return out


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if hasattr(v, "tolist"):  # tensors, numpy arrays and numpy scalars
        return _jsonable(v.tolist())
    return str(v)
