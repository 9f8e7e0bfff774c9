"""`lstmgen train` and `lstmgen.train(...)`: a run directory (train/rundir.py), a task (the
language model of train/lm_task.py, or a frame model of train/frame_task.py) and the one training
loop over it (train/loop.py). This module decides which, checks what applies to all, and reports."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from lstmgen.console import Console
from lstmgen.train import distributed as ddp
from lstmgen.train import runlog
from lstmgen.train.checkpoint import BEST
from lstmgen.train.config import TrainConfig
from lstmgen.train.distributed import DistInfo
from lstmgen.train.interrupt import StopSignals
from lstmgen.train.loop import Log, Loop
from lstmgen.train.rundir import (CACHE_DIR, RunExistsError, clear_run, created_by_run, holds_run, prior_run,
                                  write_config)
from lstmgen.train.runlog import METRICS_CSV, STEPS_CSV
from lstmgen.train.setup import TrainError, check_config, resolve_device

__all__ = ["train", "TrainError", "RunExistsError"]


def _check_inputs(cfg: TrainConfig, data: str | None, targets: str | None, dist: DistInfo) -> None:
    if cfg.task == "lm":
        if targets is not None:
            raise TrainError("--targets is for frame data (--task regression or classification)")
        if data and (data.startswith(("builtin:", "mnist:")) or data.endswith((".npz", ".npy"))):
            raise TrainError(f"{data} is frame data, not text; train it with --task regression or "
                             "--task classification")
    elif dist.enabled:
        raise TrainError(f"--task {cfg.task} trains in one process; run it without torchrun")
    check_config(cfg)
    if cfg.batch_size % dist.world_size:
        raise TrainError(f"batch_size {cfg.batch_size} must divide evenly over {dist.world_size} processes "
                         "(equal shards keep the averaged gradient equal to the single-process one)")


def _frame_data_of(source: dict, targets: str | None) -> tuple[str | None, str | None]:
    """A frame run's data (and .npy targets) as its checkpoint recorded them, by resolved path: a
    resumed run may start from another directory than the one its spec was written in."""
    files, kind = source.get("files") or [], source.get("kind")
    if kind == "mnist" and source.get("path"):
        return f"mnist:{source['path']}", targets
    if kind in ("npz", "npy") and files:
        return files[0]["path"], targets or (files[1]["path"] if kind == "npy" and len(files) > 1 else None)
    return source.get("spec"), targets


def train(cfg: TrainConfig, data: str | None, out_dir: str | os.PathLike, *, resume: bool = False,
          overwrite: bool = False, log: Log | None = None, progress_bar: bool = True,
          console: Console | None = None, targets: str | None = None, sample_every: int = 0) -> Path:
    """Train (or, with resume=True, continue) the run in `out_dir` on `data` (a path, split prefix,
    directory or http(s) URL; None when resuming: the run's own data). Returns best.pt's path.
    A folder that already holds a run needs resume=True or overwrite=True (its run's files are
    replaced once the new data have loaded; anything else in the folder is kept).
    cfg.task regression or classification trains a frame model: `data` is then frame data
    (frame_data.py) and `targets` the .npy of targets for .npy inputs.

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) every process calls this; they train one
    language model data-parallel and rank 0 alone logs and writes the run directory.

    `console` says how progress and log lines are shown (lstmgen/console.py; by default a bar on a
    terminal, plain lines elsewhere); `log` replaces its log lines, `progress_bar=False` its progress.
    `sample_every` > 0: log a short generated sample every this many updates (preview.py).
    A run that fails before its first checkpoint removes the run directory it created.

    SIGINT (Ctrl-C) or SIGTERM while training stops after the update under way, saves last.pt
    there and raises TrainInterrupted (a KeyboardInterrupt) naming it; resume=True continues from it.

    Raises TrainError, DataError, FrameDataError or CheckpointError with a message fit for the user.
    """
    dist = ddp.from_env()
    _check_inputs(cfg, data, targets, dist)
    console = console or Console(progress=progress_bar)
    if not dist.is_main:
        console = Console(quiet=True, progress=False)
    log = (log or console.event) if dist.is_main else (lambda line: None)
    out = Path(out_dir)
    prior = prior_run(out, cfg, resume=resume, overwrite=overwrite)
    if prior is not None and data is None:
        if cfg.task == "lm":
            data = prior.corpus.get("url") or prior.corpus.get("path") or prior.corpus.get("data")
        else:
            data, targets = _frame_data_of(prior.data, targets)
    if not data:
        raise TrainError("no training data given")
    device = resolve_device(cfg.device, dist.local_rank)
    if cfg.amp != "off" and device.type != "cuda":
        log(f"amp={cfg.amp} ignored: bf16 autocast is used on CUDA only; training in fp32 on {device}")
    ddp.start(dist, device)
    try:
        with created_by_run(out, dist.is_main):
            with StopSignals() as signals:
                best = _train(cfg, data, targets, out, prior, device, dist, log, console,
                              signals=signals, sample_every=sample_every, overwrite=overwrite)
            # every rank reaches teardown together: gloo aborts a process whose peer closes the
            # connection while it is still tearing down (seen as SIGABRT on a loaded CI machine)
            ddp.barrier(dist)
            return best
    finally:
        ddp.stop(dist)


def _load_task(cfg: TrainConfig, data: str, targets: str | None, out: Path, device: torch.device, dist: DistInfo):
    if cfg.task == "lm":
        from lstmgen.train.lm_task import load_text_task
        return load_text_task(cfg, data, out / CACHE_DIR, device, dist)
    from lstmgen.train.frame_task import load_frame_task
    return load_frame_task(cfg, data, targets, device)


def _train(cfg: TrainConfig, data: str, targets: str | None, out: Path, prior, device: torch.device,
           dist: DistInfo, log: Log, console: Console, *, signals: StopSignals, sample_every: int,
           overwrite: bool) -> Path:
    torch.manual_seed(cfg.seed)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    else:
        ddp.barrier(dist)  # rank 0 first: a URL is downloaded into the cache once
    task = _load_task(cfg, data, targets, out, device, dist)
    if dist.is_main:
        ddp.barrier(dist)
    if prior is not None:
        task.check_prior(prior, data, out / "last.pt")
    if overwrite and dist.is_main and holds_run(out):
        clear_run(out)
        log(f"overwrite: removed the previous run's files from {out}")
    loop = Loop(task, out, device, prior, log, console, dist, signals, sample_every)
    if dist.is_main:
        write_config(out, task.cfg, task.model.cfg, device, dist.world_size, task.source)
        if prior is not None:  # forget what a killed session logged past last.pt
            runlog.write_csv(out / METRICS_CSV, loop.p.history)
            runlog.truncate_after(out / STEPS_CSV, loop.p.global_step)
    n_params = sum(t.numel() for t in loop.params)
    log("config: " + " ".join(f"{k}={v}" for k, v in asdict(task.cfg).items()))
    log(task.describe(data) + f" | model: {n_params:,} parameters on {device}"
        + (f" | cell {cfg.cell}" if cfg.cell != "lstm" else "")
        + (f" | {dist.world_size} processes (DDP), {cfg.batch_size // dist.world_size} streams each"
           if dist.enabled else "")
        + (" | bf16 autocast" if loop.amp else "")
        + (f" | resuming at epoch {loop.p.epoch}, step {loop.p.global_step}" if prior else ""))
    loop.run()
    return out / BEST
