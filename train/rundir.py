"""The run directory, for every task: what a run writes there, whether a folder holds a run, the
resume/overwrite rules, and the clean-up of a folder a failed run created.

A run directory holds config.json (the resolved config), metrics.csv (one row per validation),
steps.csv (the training loss per logged window), curves.png (both, plotted), best.pt (lowest
validation loss) and last.pt (everything needed to resume) and, for a downloaded corpus, cache/.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from lstmgen.train.checkpoint import BEST, LAST, Checkpoint, FrameCheckpoint, load_any
from lstmgen.train.config import AnyTrainConfig, config_from_dict
from lstmgen.train.runlog import CURVES_PNG, METRICS_CSV, STEPS_CSV
from lstmgen.train.setup import TrainError

CONFIG_JSON, CACHE_DIR = "config.json", "cache"
# what a run writes into its directory (its cache/ of downloads is kept by overwrite)
RUN_FILES = (LAST, BEST, CONFIG_JSON, METRICS_CSV, STEPS_CSV, CURVES_PNG)
# A resumed run may change when it stops, its lr or dropout, but not what these fix: the model's
# shape, the tokens, the optimizer state's meaning, or how the data is cut into batches.
FIXED_FIELDS = ("task", "cell", "embedding_size", "hidden_size", "num_layers", "tie_weights", "level",
                "min_count", "max_vocab", "valid_fraction", "optimizer", "batch_size", "bptt",
                "projection_size", "standardize")  # stream: the frame task checks it (builtin:sin-cos sets it)


class RunExistsError(TrainError):
    """The output directory already holds a run, and neither resuming nor overwriting it was asked
    for. The message names the keywords (resume=True, overwrite=True), or with flags=True the
    command's flags (--resume, --overwrite)."""

    def __init__(self, out: Path, *, resumable: bool = True, flags: bool = False):
        self.out, self.resumable = out, resumable
        resume, overwrite = ("--resume", "--overwrite") if flags else ("resume=True", "overwrite=True")
        ways = (f"continue it ({resume}), " if resumable else "") + f"start it over ({overwrite})"
        super().__init__(f"{out}: already holds a run; {ways} or choose another output directory")


def holds_run(out: Path) -> bool:
    return (out / LAST).exists() or (out / BEST).exists()


def clear_run(out: Path) -> None:
    """Remove a previous run's files (overwrite=True), leaving anything else in the folder."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def saved_config(out_dir: str | os.PathLike) -> AnyTrainConfig:
    """The config a run directory was trained with (from its config.json)."""
    path = Path(out_dir) / CONFIG_JSON
    try:
        return config_from_dict(json.loads(path.read_text())["train"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"{path}: cannot read the run's config: {e}") from e


def write_config(out: Path, cfg: AnyTrainConfig, model_cfg, device, world_size: int, data: dict) -> None:
    resolved = {"train": asdict(cfg), "model": asdict(model_cfg), "device": str(device),
                "world_size": world_size, "data": {k: v for k, v in data.items() if k != "files"}}
    (out / CONFIG_JSON).write_text(json.dumps(resolved, indent=2) + "\n")


def prior_run(out: Path, cfg: AnyTrainConfig, *, resume: bool, overwrite: bool) -> Checkpoint | FrameCheckpoint | None:
    """The checkpoint a resumed run continues (None for a new run), after the folder's rules:
    resuming needs last.pt and the same fixed settings; a folder holding a run needs resume or
    overwrite."""
    if resume and overwrite:
        raise TrainError("resume=True continues the run in the folder and overwrite=True replaces it; "
                         "choose one")
    if not resume:
        if holds_run(out) and not overwrite:
            raise RunExistsError(out)
        return None
    if not (out / LAST).is_file():
        raise TrainError(f"{out / LAST}: nothing to resume (no {LAST} in {out})")
    prior = load_any(out / LAST)
    if "optimizer" not in prior.progress or "rng" not in prior.progress:
        raise TrainError(f"{out / LAST}: holds no resume state (an earlier lstmgen did not save one for frame "
                         "runs); start the run over with overwrite=True (--overwrite)")
    was = prior.train_config
    changed = [f"{k} {getattr(was, k, None)!r} -> {getattr(cfg, k, None)!r}"
               for k in FIXED_FIELDS if getattr(was, k, None) != getattr(cfg, k, None)]
    if changed:
        raise TrainError(f"{out / LAST}: cannot resume with a different {', '.join(changed)}")
    return prior


@contextmanager
def created_by_run(out: Path, writer: bool = True) -> Iterator[None]:
    """A run that fails (or is interrupted) before its first checkpoint removes the folder it
    created: without a checkpoint there is nothing to resume. `writer`: this process writes it."""
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and writer and out.is_dir() and not holds_run(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
