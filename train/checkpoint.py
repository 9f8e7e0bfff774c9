"""Checkpoints: state_dict + config + vocabulary (never a pickled module), written atomically
and loaded with `weights_only=True`, so loading a checkpoint cannot run code."""
from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lstmgen.errors import UserError
from lstmgen.train.config import ModelConfig, TrainConfig
from lstmgen.train.model import StackedLSTM
from lstmgen.vocab import Vocab

FORMAT = "lstmgen-checkpoint"
VERSION = 1
BEST, LAST = "best.pt", "last.pt"  # file names inside a run directory


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    model_config: ModelConfig
    train_config: TrainConfig
    vocab: Vocab
    state_dict: dict[str, torch.Tensor]
    # Resume state: optimizer/scheduler state, epoch, step, RNG states, ... (plain containers)
    progress: dict = field(default_factory=dict)
    # Validation figures and history: best_val_loss, val_ppl / val_bpc, per-epoch rows ...
    metrics: dict = field(default_factory=dict)
    # Where the data came from: corpus path/URL, sha256, token counts, ...
    corpus: dict = field(default_factory=dict)

    def build_model(self) -> StackedLSTM:
        model = StackedLSTM(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": asdict(ckpt.model_config),
        "train_config": asdict(ckpt.train_config),
        "vocab": ckpt.vocab.to_dict(),
        "state_dict": ckpt.state_dict,
        "progress": ckpt.progress,
        "metrics": ckpt.metrics,
        "corpus": ckpt.corpus,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory (its best.pt, else last.pt)."""
    p = Path(path)
    if p.is_dir():
        for name in (BEST, LAST):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: run directory holds neither {BEST} nor {LAST}")
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    return p


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    p = resolve_checkpoint(path)
    if not zipfile.is_zipfile(p):  # torch.save writes a zip archive; torch.load's own errors read as internals
        raise CheckpointError(f"{p}: not an lstmgen checkpoint (expected best.pt or last.pt from `lstmgen train`)")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated / foreign / pickled-code files
        why = ("it holds Python objects that only unsafe loading could rebuild"
               if "weights only load failed" in str(e).lower() else "damaged or not written by `lstmgen train`")
        raise CheckpointError(f"{p}: cannot be read as an lstmgen checkpoint: {why}") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an lstmgen checkpoint (no format={FORMAT!r} marker)")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{p}: checkpoint version {raw.get('version')!r} is not supported (want {VERSION})")
    try:
        return Checkpoint(
            model_config=ModelConfig(**raw["model_config"]),
            train_config=TrainConfig(**raw["train_config"]),
            vocab=Vocab.from_dict(raw["vocab"]),
            state_dict=raw["state_dict"],
            progress=raw.get("progress", {}),
            metrics=raw.get("metrics", {}),
            corpus=raw.get("corpus", {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: malformed checkpoint: {e!r}") from e
