"""Checkpoints: state_dict + config + vocabulary (never a pickled module), written atomically
and loaded with `weights_only=True`, so loading a checkpoint cannot run code.

Two kinds share the format: a language model's (`task` absent or "lm": Checkpoint) and a frame
model's (`task` "regression" or "classification": FrameCheckpoint, with the class names, the input
standardisation and the data's description in place of a vocabulary). `load_checkpoint` returns
language models only, so a tool written for them refuses a frame model by name; `load_any` returns
either."""
from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lstmgen.errors import UserError
from lstmgen.train.config import FrameTrainConfig, ModelConfig, TrainConfig, config_from_dict
from lstmgen.train.frame_model import FrameModel, FrameModelConfig
from lstmgen.train.model import RecurrentLM
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

    def build_model(self) -> RecurrentLM:
        model = RecurrentLM(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.eval()


@dataclass
class FrameCheckpoint:
    """A frame model (train/frame_model.py): what export needs besides the weights is here."""

    model_config: FrameModelConfig  # task, input_size, output_size, hidden_size, num_layers, cell, ...
    train_config: FrameTrainConfig
    state_dict: dict[str, torch.Tensor]
    class_names: list[str] = field(default_factory=list)  # classification: class index -> name
    # frames.Standardizer.describe(): {"mode": none|global|sequence, "applies_to": "inputs",
    # "std_floor", "ddof", and for global "mean", "std" per input feature}
    standardize: dict = field(default_factory=lambda: {"mode": "none"})
    data: dict = field(default_factory=dict)  # the data's description (frames.load_frames)
    progress: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.model_config.task

    def build_model(self) -> FrameModel:
        model = FrameModel(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(ckpt: Checkpoint | FrameCheckpoint, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "model_config": asdict(ckpt.model_config),
               "train_config": asdict(ckpt.train_config)}
    if isinstance(ckpt, FrameCheckpoint):
        payload.update(task=ckpt.task, class_names=list(ckpt.class_names), standardize=ckpt.standardize,
                       data=ckpt.data, state_dict=ckpt.state_dict, progress=ckpt.progress, metrics=ckpt.metrics)
    else:
        payload.update(vocab=ckpt.vocab.to_dict(), state_dict=ckpt.state_dict, progress=ckpt.progress,
                       metrics=ckpt.metrics, corpus=ckpt.corpus)
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
    """A language model's checkpoint; a frame model's is refused, naming its task."""
    ckpt = load_any(path)
    if isinstance(ckpt, FrameCheckpoint):
        raise CheckpointError(f"{resolve_checkpoint(path)}: a {ckpt.task} model over float frames, not a "
                              "language model; this command works on language models only")
    return ckpt


def load_frame_checkpoint(path: str | os.PathLike) -> FrameCheckpoint:
    ckpt = load_any(path)
    if not isinstance(ckpt, FrameCheckpoint):
        raise CheckpointError(f"{resolve_checkpoint(path)}: a language model, not a frame model "
                              "(--task regression or classification)")
    return ckpt


def load_any(path: str | os.PathLike) -> Checkpoint | FrameCheckpoint:
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
    task = raw.get("task", "lm")  # absent: written before frame models existed
    try:
        if task != "lm":
            return FrameCheckpoint(
                model_config=FrameModelConfig(**raw["model_config"]),
                train_config=config_from_dict(raw["train_config"]),
                state_dict=raw["state_dict"],
                class_names=list(raw.get("class_names", [])),
                standardize=raw.get("standardize", {"mode": "none"}),
                data=raw.get("data", {}),
                progress=raw.get("progress", {}),
                metrics=raw.get("metrics", {}),
            )
        return Checkpoint(
            model_config=ModelConfig(**raw["model_config"]),
            train_config=config_from_dict(raw["train_config"]),
            vocab=Vocab.from_dict(raw["vocab"]),
            state_dict=raw["state_dict"],
            progress=raw.get("progress", {}),
            metrics=raw.get("metrics", {}),
            corpus=raw.get("corpus", {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: malformed checkpoint: {e!r}") from e
