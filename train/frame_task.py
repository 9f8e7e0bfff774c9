"""The frame tasks of the training loop (train/loop.py): `--task regression|classification` over
float frames (train/frame_data.py). Two ways through the data, as the seeds do it:

  sequences  (default) shuffled minibatches of whole sequences, each from a zero state, packed by
             length; regression scores every valid frame, classification the last valid one.
  stream     (regression: --stream, and always for builtin:sin-cos) the sequences end to end as one
             stream cut into batch_size contiguous streams, walked bptt frames at a time with the
             state carried across batches and detached between them (truncated BPTT, as the
             sine->cosine tutorial feeds each batch's final state into the next).

Figures: MSE (regression) or loss and accuracy (classification). Frame runs train in one process.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from lstmgen.train.checkpoint import FrameCheckpoint
from lstmgen.train.config import TrainConfig
from lstmgen.train.frame_model import FrameModel, FrameModelConfig, classification_loss, regression_loss
from lstmgen.train.frame_data import FrameData, Sequences, load_frames, to_streams
from lstmgen.train.task import State, Step, Validation
from lstmgen.train.setup import TrainError

EPOCH_SEED = 1_000_003  # epoch e shuffles with seed + EPOCH_SEED * (e - 1): a resumed epoch draws the same order


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

    def batches(self, order: torch.Tensor | None = None, start: int = 0):
        if self.stream:  # consecutive chunks of the same B streams: the state may flow across them
            for i in range(start * self.bptt, self.x.size(0), self.bptt):
                yield self.x[i:i + self.bptt], self.y[i:i + self.bptt], None  # [T, B, D]
            return
        order = order if order is not None else torch.arange(len(self.lengths), device=self.x.device)
        for i in range(start * self.batch_size, len(order), self.batch_size):
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
def score_frames(model: FrameModel, split: _Split) -> dict[str, float]:
    """Sums over a whole split (streams: the state carried throughout): loss, count (and correct)."""
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
    sums = {"loss": total, "count": count}
    if split.task == "classification":
        sums["correct"] = correct
    return sums


def frame_figures(task: str, sums: dict[str, float]) -> dict[str, float]:
    """{"loss", and "mse" or "accuracy"} from a split's sums."""
    loss = sums["loss"] / sums["count"]
    if task == "regression":
        return {"loss": loss, "mse": loss}
    return {"loss": loss, "accuracy": sums["correct"] / sums["count"]}


def evaluate_frames(model: FrameModel, split: _Split) -> dict[str, float]:
    """{"loss", and "mse" or "accuracy"} over a whole split."""
    return frame_figures(split.task, score_frames(model, split))


def load_frame_task(cfg: TrainConfig, data: str, targets: str | None, device: torch.device) -> "FrameTask":
    frames = load_frames(data, cfg.task, targets=targets, valid_fraction=cfg.valid_fraction,
                         standardize=cfg.standardize, stream=cfg.stream)
    return FrameTask(cfg, frames, device)


class FrameTask:
    unit = "frames"
    test_on_stop = True  # minutes-long runs: the test figure always

    def __init__(self, cfg: TrainConfig, data: FrameData, device: torch.device):
        self.cfg = replace(cfg, stream=data.stream)  # builtin:sin-cos streams whatever the flag said
        self.data, self.device, self.kind = data, device, data.task
        mc = FrameModelConfig(data.task, data.input_size, data.output_size, cfg.hidden_size, cfg.num_layers,
                              cfg.cell, cfg.projection_size, cfg.dropout)
        self.model = FrameModel(mc).to(device)
        if cfg.init_scale > 0:
            for p in self.model.parameters():
                torch.nn.init.uniform_(p, -cfg.init_scale, cfg.init_scale)
        where = data.source.get("spec", "data")
        self.train = _Split(data.train, data.task, cfg.batch_size, cfg.bptt, data.stream, device, f"{where} [train]")
        self.splits = {name: _Split(s, data.task, cfg.eval_batch_size, cfg.bptt, data.stream, device, f"{where} [{name}]")
                       for name, s in (("valid", data.valid), ("test", data.test)) if s is not None}
        self.n_batches = self.train.n_batches

    def check_prior(self, prior, data: str, last: Path) -> None:
        if not isinstance(prior, FrameCheckpoint):
            raise TrainError(f"{last}: holds a language model, not a frame model")
        # files by their content (the same file under another name is the same data); builtin data by name
        digests = [[f.get("sha256") for f in d.get("files", [])] or [d.get("spec")] for d in (prior.data, self.source)]
        if digests[0] != digests[1] or prior.train_config.stream != self.cfg.stream:
            raise TrainError(f"{data}: the frame data differ from the data {last} was trained on")

    @property
    def source(self) -> dict:
        return self.data.source

    def describe(self, data: str) -> str:
        d, cfg = self.data, self.cfg
        return (f"data: {data} ({cfg.task}; {d.input_size} -> {d.output_size}"
                + (" classes" if cfg.task == "classification" else " values per frame")
                + "; sequences " + ", ".join(f"{k} {v:,}" for k, v in d.source["sequences"].items())
                + (" as one continuous stream" if d.stream else "") + f"; standardize {cfg.standardize})")

    # -- training ---------------------------------------------------------------------------------
    def zero_state(self) -> State | None:
        return self.model.init_state(self.train.batch_size, self.device) if self.train.stream else None

    def batches(self, epoch: int, start: int) -> Iterator:
        order = None
        if not self.train.stream:
            shuffle = torch.Generator().manual_seed(self.cfg.seed + EPOCH_SEED * (epoch - 1))
            order = torch.randperm(len(self.train.lengths), generator=shuffle).to(self.device)  # [N]
        return self.train.batches(order, start)

    def forward(self, net, batch, state: State | None) -> Step:
        x, y, lengths = batch
        if state is None:  # whole sequences: each batch from a zero state
            state = self.model.init_state(x.size(1), self.device)
        loss, _, n, state = _loss(net, self.kind, x, y, lengths, state)
        frames = x.size(0) * x.size(1) if lengths is None else int(lengths.sum())
        scale = x.size(0) if self.cfg.loss_sum_over_time and self.kind == "regression" else 1.0
        return Step(loss, n, frames, state if self.train.stream else None, scale)

    # -- scoring ----------------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        return split in self.splits

    def valid_chunks(self) -> None:
        return None  # a pass is short: scored whole, never planned as a prefix

    def score(self, model, split: str, chunks, stop) -> dict[str, float]:
        return score_frames(model, self.splits[split])

    def figures(self, sums: dict[str, float]) -> dict[str, float]:
        return frame_figures(self.kind, sums)

    def describe_val(self, val: Validation, note: str) -> str:
        if self.kind == "regression":
            return f"val mse {val.figures['mse']:.5g}{note}"
        return f"val loss {val.loss:.4f}, accuracy {val.figures['accuracy']:.2%}{note}"

    # -- checkpoints ------------------------------------------------------------------------------
    def metrics(self) -> dict:
        return {"task": self.kind}

    def checkpoint(self, state_dict: dict, progress: dict, metrics: dict) -> FrameCheckpoint:
        d = self.data
        return FrameCheckpoint(self.model.cfg, self.cfg, state_dict, list(d.class_names), d.source["standardize"],
                               dict(d.source), progress, metrics)


    def preview(self, step: int) -> None:
        return None
