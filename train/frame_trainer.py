"""Training a frame model (`lstmgen train --task regression|classification`).

Two ways through the data, as the seeds do it:
  sequences  (default) shuffled minibatches of whole sequences, each from a zero state, packed by
             length; regression scores every valid frame, classification the last valid one.
  stream     (regression: --stream, and always for builtin:sin-cos) the sequences end to end as one
             stream cut into batch_size contiguous streams, walked bptt frames at a time with the
             state carried across batches and detached between them (truncated BPTT, as the
             sine->cosine tutorial feeds each batch's final state into the next).
After every epoch the validation split is scored (MSE, or loss and accuracy) and the run directory
gets the same files as a text run: config.json, metrics.csv, steps.csv, curves.png, best.pt (lowest
validation loss, with the test figures once training ends) and last.pt. Frame runs train in one
process and do not resume (they are minutes long); both are refused with a message.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from lstmgen.console import Console, duration
from lstmgen.train import distributed as ddp
from lstmgen.train import runlog
from lstmgen.train.checkpoint import BEST, LAST, FrameCheckpoint, load_frame_checkpoint, save_checkpoint
from lstmgen.train.config import TrainConfig
from lstmgen.train.frame_model import FrameModel, FrameModelConfig, classification_loss, regression_loss
from lstmgen.train.frames import FrameData, Sequences, load_frames, to_streams
from lstmgen.train.runlog import METRICS_CSV, STEPS_CSV
from lstmgen.train.trainer import (CONFIG_JSON, Log, RunExistsError, TrainError, check_config, clear_run, holds_run,
                                   lr_at, make_optimizer, resolve_device)


def _tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


class _Split:
    """One split on the device, cut into batches: (x [T, B, D_in], y, lengths [B] or None)."""

    def __init__(self, seqs: Sequences, task: str, batch_size: int, bptt: int, stream: bool,
                 device: torch.device, where: str):
        self.stream, self.batch_size, self.bptt = stream, batch_size, bptt
        if stream:
            x, y = to_streams(seqs, batch_size, where)  # [N, B, D]
            self.x, self.y = _tensor(x, device), _tensor(y, device)
            self.n_batches = math.ceil(self.x.size(0) / bptt)
        else:
            self.x, self.y = _tensor(seqs.x, device), _tensor(seqs.y, device)  # [N, T, D], [N, ...]
            self.lengths = _tensor(seqs.lengths, device)  # [N]
            self.n_batches = math.ceil(len(seqs) / batch_size)
        self.task = task

    def batches(self, order: torch.Tensor | None = None):
        if self.stream:  # consecutive chunks of the same B streams: the state may flow across them
            for i in range(0, self.x.size(0), self.bptt):
                yield self.x[i:i + self.bptt], self.y[i:i + self.bptt], None  # [T, B, D]
            return
        order = order if order is not None else torch.arange(len(self.lengths), device=self.x.device)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            lengths = self.lengths[idx]  # [B]
            t = int(lengths.max())
            x = self.x[idx, :t].transpose(0, 1)  # [T, B, D_in]
            y = self.y[idx] if self.task == "classification" else self.y[idx, :t].transpose(0, 1)
            yield x, y, lengths


def _loss(model: FrameModel, task: str, x, y, lengths, state, reduction: str = "mean"):
    """(loss, correct, count, state): count = frames x features (regression) or sequences."""
    out, state = model(x, state, lengths)  # [T, B, D_out or C]
    if lengths is None:
        lengths = torch.full((x.size(1),), x.size(0), dtype=torch.long, device=x.device)
    if task == "regression":
        count = int(lengths.sum()) * y.size(2)
        return regression_loss(out, y, lengths, reduction), None, count, state
    loss, correct = classification_loss(out, y, lengths, reduction)
    return loss, correct, len(y), state


@torch.no_grad()
def evaluate_frames(model: FrameModel, split: _Split) -> dict[str, float]:
    """{"loss", and "mse" or "accuracy"} over a whole split (streams: the state carried throughout)."""
    was_training = model.training
    model.eval()
    total = correct = count = 0.0
    state = model.init_state(split.batch_size, split.x.device) if split.stream else None
    for x, y, lengths in split.batches():
        if not split.stream:
            state = model.init_state(x.size(1), x.device)
        loss, right, n, state = _loss(model, split.task, x, y, lengths, state, reduction="sum")
        total, count = total + loss.item(), count + n
        correct += int(right) if right is not None else 0
    model.train(was_training)
    if split.task == "regression":
        return {"loss": total / count, "mse": total / count}
    return {"loss": total / count, "accuracy": correct / count}


def prefixed(result: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in result.items()}


class _FrameRun:
    def __init__(self, cfg: TrainConfig, data: FrameData, out: Path, device: torch.device, log: Log,
                 console: Console):
        self.cfg, self.data, self.out, self.device, self.log, self.console = cfg, data, out, device, log, console
        self.task = data.task
        mc = FrameModelConfig(data.task, data.input_size, data.output_size, cfg.hidden_size, cfg.num_layers,
                              cfg.cell, cfg.projection_size, cfg.dropout)
        self.model = FrameModel(mc).to(device)
        if cfg.init_scale > 0:
            for p in self.model.parameters():
                torch.nn.init.uniform_(p, -cfg.init_scale, cfg.init_scale)
        self.opt = make_optimizer(cfg, self.model.parameters())
        where = data.source.get("spec", "data")
        self.train_split = _Split(data.train, data.task, cfg.batch_size, cfg.bptt, data.stream, device,
                                  f"{where} [train]")
        self.splits = {name: _Split(s, data.task, cfg.eval_batch_size, cfg.bptt, data.stream, device,
                                    f"{where} [{name}]")
                       for name, s in (("valid", data.valid), ("test", data.test)) if s is not None}
        self.step, self.best, self.history = 0, math.inf, []
        self.t0 = time.monotonic()
        self.shuffle = torch.Generator().manual_seed(cfg.seed)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        bar = self.console.progress_bar(total=self.train_split.n_batches, unit="batch")
        try:
            # epochs 0: no epoch limit (max_seconds or max_steps ends the run)
            for epoch in range(1, cfg.epochs + 1) if cfg.epochs else itertools.count(1):
                bar.reset(total=self.train_split.n_batches)
                bar.set_description(f"epoch {epoch}")
                row, stop = self._epoch(epoch, bar)
                self._validate_and_save(epoch, row, stop)
                if stop:
                    break
        finally:
            bar.close()
        if "test" in self.splits and (self.out / BEST).is_file():
            self._test_best()

    def _epoch(self, epoch: int, bar) -> tuple[dict, str | None]:
        cfg, split = self.cfg, self.train_split
        lr = lr_at(cfg, epoch)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        order = None if split.stream else \
            torch.randperm(len(split.lengths), generator=self.shuffle).to(self.device)  # [N]
        state = self.model.init_state(split.batch_size, self.device) if split.stream else None
        row_sum = win_sum = torch.zeros((), device=self.device)
        row_n = win_n = win_frames = 0
        t_row = t_win = time.monotonic()
        stop = None
        for x, y, lengths in split.batches(order):
            if split.stream:  # truncate BPTT at the batch edge; the state itself flows on
                state = tuple(t.detach() for t in state)
            else:
                state = self.model.init_state(x.size(1), self.device)
            loss, _, n, state = _loss(self.model, self.task, x, y, lengths, state)
            self.opt.zero_grad(set_to_none=True)
            scale = x.size(0) if cfg.loss_sum_over_time and self.task == "regression" else 1
            (loss * scale).backward()
            if cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
            self.opt.step()
            self.step += 1
            win_sum, win_n = win_sum + loss.detach() * n, win_n + n
            win_frames += x.size(0) * x.size(1) if lengths is None else int(lengths.sum())
            bar.update()
            if self.step % cfg.log_interval == 0:
                row_sum, row_n = row_sum + win_sum, row_n + win_n
                self._log_window(epoch, lr, win_sum.item() / win_n, win_frames / (time.monotonic() - t_win))
                win_sum, win_n, win_frames, t_win = torch.zeros((), device=self.device), 0, 0, time.monotonic()
            stop = self._stop_reason()
            if stop:
                break
        row_sum, row_n = row_sum + win_sum, row_n + win_n
        return {"train_loss": row_sum.item() / row_n if row_n else math.nan,
                "train_s": time.monotonic() - t_row}, stop

    def _log_window(self, epoch: int, lr: float, loss: float, frames_per_s: float) -> None:
        if not math.isfinite(loss):
            raise TrainError(f"training loss became {loss} at step {self.step}; try a lower --lr or a "
                             "smaller --clip-norm")
        elapsed = time.monotonic() - self.t0
        self.console.progress(f"epoch {epoch} step {self.step} | loss {loss:.5g} | lr {lr:.3g} | "
                              f"{frames_per_s:,.0f} frames/s | {duration(elapsed)}",
                              epoch=epoch, step=self.step, loss=loss, lr=lr, frames_per_s=frames_per_s)
        runlog.append_csv(self.out / STEPS_CSV, {"step": self.step, "epoch": epoch, "loss": loss, "lr": lr,
                                                 "frames_per_s": frames_per_s, "elapsed_s": elapsed}, digits=10)

    def _stop_reason(self) -> str | None:
        if self.cfg.max_steps and self.step >= self.cfg.max_steps:
            return f"max_steps={self.cfg.max_steps} reached"
        if self.cfg.max_seconds and time.monotonic() - self.t0 >= self.cfg.max_seconds:
            return f"max_seconds={self.cfg.max_seconds:g} reached"
        return None

    # -- validation, metrics and checkpoints ------------------------------------------------------
    def _validate_and_save(self, epoch: int, train: dict, stop: str | None) -> None:
        val = evaluate_frames(self.model, self.splits["valid"])
        row = {"epoch": epoch, "step": self.step, "train_loss": train["train_loss"],
               **prefixed(val, "val"), "lr": lr_at(self.cfg, epoch),
               "train_s": train["train_s"], "elapsed_s": time.monotonic() - self.t0}
        self.history.append(row)
        improved = val["loss"] < self.best
        if improved:
            self.best = val["loss"]
            self._save(BEST, epoch, val)
        self._save(LAST, epoch, val)
        runlog.append_csv(self.out / METRICS_CSV, row)
        runlog.plot_curves(self.out, self.task, title=self.out.name)
        shown = f"val mse {val['mse']:.5g}" if self.task == "regression" else \
            f"val loss {val['loss']:.4f}, accuracy {val['accuracy']:.2%}"
        self.log(f"epoch {epoch} step {self.step} | train loss {row['train_loss']:.5g} | {shown}"
                 f"{' *best*' if improved else ''} | lr {row['lr']:.3g} | {row['elapsed_s']:.0f}s"
                 + (f" | stop: {stop}" if stop else ""))

    def _save(self, name: str, epoch: int, val: dict[str, float]) -> Path:
        d = self.data
        metrics = {"task": self.task, "global_step": self.step, "epochs_trained": epoch,
                   "best_val_loss": self.best, **prefixed(val, "val"), "history": list(self.history)}
        state_dict = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        ckpt = FrameCheckpoint(self.model.cfg, self.cfg, state_dict, list(d.class_names),
                               d.source["standardize"], dict(d.source),
                               {"epoch": epoch, "global_step": self.step}, metrics)
        return save_checkpoint(ckpt, self.out / name)

    def _test_best(self) -> None:
        best = load_frame_checkpoint(self.out / BEST)
        test = prefixed(evaluate_frames(best.build_model().to(self.device), self.splits["test"]), "test")
        best.metrics.update(test)
        save_checkpoint(best, self.out / BEST)
        self.log("test (best.pt): " + ", ".join(f"{k} {v:.5g}" for k, v in test.items()))


def train_frames(cfg: TrainConfig, data: str | None, out_dir: str | os.PathLike, *, resume: bool = False,
                 overwrite: bool = False, log: Log | None = None, progress_bar: bool = True,
                 console: Console | None = None, targets: str | None = None) -> Path:
    """Train a frame model on `data` (frames.py) into `out_dir`; returns best.pt's path.
    Raises TrainError, FrameDataError (and the file readers' errors) with a message for the user."""
    if resume:
        raise TrainError(f"--resume is for text runs; a --task {cfg.task} run starts over (train into a new "
                         "--out, or with --max-seconds to bound it)")
    if ddp.from_env().enabled:
        raise TrainError(f"--task {cfg.task} trains in one process; run it without torchrun")
    console = console or Console(progress=progress_bar)
    log = log or console.event
    check_config(cfg)
    out = Path(out_dir)
    if holds_run(out) and not overwrite:
        raise RunExistsError(out, resumable=False)
    if not data:
        raise TrainError("no training data given")
    device = resolve_device(cfg.device)
    created = not out.exists()
    try:
        torch.manual_seed(cfg.seed)
        frames = load_frames(data, cfg.task, targets=targets, valid_fraction=cfg.valid_fraction,
                             standardize=cfg.standardize, stream=cfg.stream)
        cfg = replace(cfg, stream=frames.stream)  # builtin:sin-cos streams whatever the flag said
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            clear_run(out)
        run = _FrameRun(cfg, frames, out, device, log, console)
        resolved = {"train": asdict(cfg), "model": asdict(run.model.cfg), "device": str(device),
                    "data": frames.source}
        (out / CONFIG_JSON).write_text(json.dumps(resolved, indent=2) + "\n")
        n_params = sum(p.numel() for p in run.model.parameters())
        log("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
        log(f"data: {data} ({cfg.task}; {frames.input_size} -> {frames.output_size}"
            + (" classes" if cfg.task == "classification" else " values per frame")
            + "; sequences " + ", ".join(f"{k} {v:,}" for k, v in frames.source["sequences"].items())
            + (" as one continuous stream" if frames.stream else "")
            + f"; standardize {cfg.standardize}) | model: {cfg.cell} {n_params:,} parameters on {device}")
        run.run()
        return out / BEST
    except BaseException:
        if created and out.is_dir() and not (out / LAST).exists() and not (out / BEST).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
