"""Checkpoint -> bundle folder: model.onnx (+ prompt.onnx) + manifest.json, verified before it
appears. Everything is built in a temporary sibling folder and renamed into place at the end, so
`out_dir` is either the previous bundle or the complete new one, never half of one."""
from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnx

from lstmgen import __version__
from lstmgen.bundle import MANIFEST, Manifest, sha256_file, write_manifest
from lstmgen.errors import UsageError, UserError
from lstmgen.export import parity
from lstmgen.export.onnx_graph import DEFAULT_OPSET, build_prompt_graph, build_step_graph
from lstmgen.export.quantize import quantize_int8
from lstmgen.onnx_wire import external_tensors
from lstmgen.train.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint

MODEL, PROMPT_MODEL = "model.onnx", "prompt.onnx"
INT8 = "int8-dynamic"  # Manifest.quantization of a --int8 bundle


class ExportError(UserError):
    """The export cannot go ahead (bad destination, invalid graph); the message says why."""


@dataclass(frozen=True)
class ExportConfig:
    opset: int = DEFAULT_OPSET
    prompt_graph: bool = True
    verify: bool = True
    verify_steps: int = parity.DEFAULT_STEPS
    verify_prompt: str | None = None  # text in the model's vocabulary; None: fixed random ids
    int8: bool = False


def export_bundle(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                  opset: int = DEFAULT_OPSET, prompt_graph: bool = True, verify: bool = True,
                  verify_steps: int = parity.DEFAULT_STEPS, verify_prompt: str | None = None,
                  int8: bool = False) -> tuple[Manifest, parity.ParityReport | None]:
    """Export a checkpoint file or run directory into the bundle folder `out_dir` (replacing a
    previous bundle there). Raises a UserError: CheckpointError, ExportError, ParityError, UsageError."""
    cfg = ExportConfig(opset, prompt_graph, verify, verify_steps, verify_prompt, int8)
    ckpt_path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    out = Path(out_dir)
    _check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the bundle is for a server to read
    try:
        manifest, report = _build(ckpt, ckpt_path, tmp, cfg)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    return manifest, report


def _build(ckpt: Checkpoint, ckpt_path: Path, tmp: Path,
           cfg: ExportConfig) -> tuple[Manifest, parity.ParityReport | None]:
    mc = ckpt.model_config
    if cfg.verify_steps < 1:
        raise UsageError(f"verify_steps must be at least 1, got {cfg.verify_steps}")
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
        for path in filter(None, (step_path, prompt_path)):
            quantize_int8(path, path)
            _check_self_contained(path)
        if model is not None:
            report = replace(report, int8=parity.check_graphs(model, step_path, prompt_path, first,
                                                              cfg.verify_steps, quantization=INT8))
    manifest = Manifest(
        vocab=ckpt.vocab, num_layers=mc.num_layers, hidden_size=mc.hidden_size,
        embedding_size=mc.embedding_size, opset=cfg.opset,
        model_file=MODEL, model_sha256=sha256_file(step_path),
        prompt_model_file=PROMPT_MODEL if prompt_path else None,
        prompt_model_sha256=sha256_file(prompt_path) if prompt_path else None,
        quantization=quantization,
        provenance=_provenance(ckpt, ckpt_path, cfg, report),
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


def _provenance(ckpt: Checkpoint, ckpt_path: Path, cfg: ExportConfig,
                report: parity.ParityReport | None) -> dict:
    import onnxruntime
    import torch

    return _jsonable({  # JSON types only, so the manifest read back equals the one returned
        "checkpoint": str(ckpt_path.resolve()),
        "checkpoint_sha256": sha256_file(ckpt_path),
        "corpus": _jsonable(ckpt.corpus),
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
