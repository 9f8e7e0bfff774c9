"""The training loop, once for every task (a language model, a frame regressor, a frame classifier).

Zaremba et al. (2014) / TensorFlow's ptb_word_lm as the pattern: updates over the task's batches
with the recurrent state carried (detached) from batch to batch where the task's data are
streams, global-norm gradient clipping, a per-epoch lr schedule, and a validation pass after every
epoch (or stop). The task (train/lm_task.py, train/frame_task.py) says what a batch is, what its
loss is, how a split is scored and what a checkpoint holds; the loop owns everything else: the
progress and its resume (last.pt holds the optimizer, RNG and state, so a resumed run replays
exactly what the uninterrupted run would have done), Ctrl-C/SIGTERM (interrupt.py), the time limit
(budget.py), the log windows, metrics.csv/steps.csv/curves.png, best.pt and the test pass. Under
torchrun the same code trains data-parallel (distributed.py); only rank 0 writes files.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, NoReturn

import torch

from lstmgen.console import Console, duration
from lstmgen.train import distributed as ddp
from lstmgen.train import runlog
from lstmgen.train.budget import TimeBudget, plan_validation
from lstmgen.train.checkpoint import BEST, LAST, load_any, save_checkpoint
from lstmgen.train.distributed import DistInfo
from lstmgen.train.interrupt import StopSignals, TrainInterrupted
from lstmgen.train.runlog import METRICS_CSV, STEPS_CSV
from lstmgen.train.setup import TrainError, lr_at, make_optimizer
from lstmgen.train.task import State, Task, Validation

Log = Callable[[str], None]
INTERRUPTED = "interrupted"  # the stop reason a signal gives (interrupt.py)
PROBE_S = 0.5  # with --max-seconds: seconds spent timing validation before training (budget.py)


@dataclass
class Progress:
    epoch: int = 1  # the epoch under way, counted from 1
    step_in_epoch: int = 0  # updates done in it
    global_step: int = 0
    tokens_seen: int = 0  # items (tokens, frames) trained on, every rank's
    elapsed_s: float = 0.0  # wall time over every session of the run
    best_val_loss: float = math.inf
    history: list = field(default_factory=list)  # the metrics.csv rows
    # training loss since the last metrics row, so a resumed run writes the same train_loss
    row_loss: float = 0.0
    row_tokens: int = 0


class Loop:
    """One session of a run: the task's model and the optimizer, and the loop over the batches."""

    def __init__(self, task: Task, out: Path, device: torch.device, prior, log: Log, console: Console,
                 dist: DistInfo = DistInfo(), signals: StopSignals | None = None, sample_every: int = 0):
        self.task, self.cfg, self.out, self.device, self.log = task, task.cfg, out, device, log
        self.console, self.dist = console, dist
        self.signals = signals or StopSignals()  # not entered: never set, the loop just never stops early
        self.sample_every = sample_every if dist.is_main else 0
        self.model = task.model
        self.params = list(self.model.parameters())
        self.opt = make_optimizer(self.cfg, self.params)
        # DDP averages the gradients in backward; self.model stays the plain module for eval/saving
        self.net = self.model if not dist.enabled else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if dist.rank:  # every rank built the same weights; dropout masks must differ between ranks
            torch.manual_seed(self.cfg.seed + dist.rank)
        self.amp = self.cfg.amp == "bf16" and device.type == "cuda"
        self.p = Progress()
        self.hidden: State | None = None  # this rank's state mid-epoch, for last.pt
        if prior is not None:
            self._restore(prior)
        self.bar = console.progress_bar(total=task.n_batches, unit="batch")
        self.t0, self.elapsed0, self.step0 = time.monotonic(), self.p.elapsed_s, self.p.global_step
        self.budget = TimeBudget(self.cfg.max_seconds, self.t0)
        self.val_chunks: int | None = None  # chunks each validation reads; None: all
        self.t_row, self.row_session_tokens = self.t0, 0  # this session's share of the next metrics row
        self.train_s = 0.0  # training time of the metrics row under way (validation not counted)
        self.win_loss = torch.zeros((), device=device)  # loss summed since the last steps.csv row
        self.win_n = self.win_items = 0
        self.t_win = self.t0

    def _restore(self, prior) -> None:
        prog = prior.progress
        self.model.load_state_dict(prior.state_dict)
        self.opt.load_state_dict(prog["optimizer"])
        self.p = Progress(**{f.name: prog[f.name] for f in fields(Progress) if f.name in prog})
        ranks = prog["rng"].get("ranks") or []
        torch.set_rng_state(ranks[self.dist.rank] if len(ranks) == self.dist.world_size else prog["rng"]["torch"])
        if self.device.type == "cuda" and prog["rng"].get("cuda") and not self.dist.enabled:
            torch.cuda.set_rng_state_all(prog["rng"]["cuda"])
        if prog.get("hidden") and self.p.step_in_epoch:
            # saved for the whole batch, each [L, B, H]: (h, c) for an LSTM, (h,) for a GRU
            shard = self.dist.shard(prog["hidden"][0].size(1))
            self.hidden = tuple(t[:, shard].to(self.device).contiguous() for t in prog["hidden"])

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        """Train until the last epoch ends (then score best.pt on the test split, if there is one)
        or a limit stops it. A signal stops it after the update under way: TrainInterrupted."""
        cfg, p = self.cfg, self.p
        if (cfg.epochs and p.epoch > cfg.epochs) or (cfg.max_steps and p.global_step >= cfg.max_steps):
            self._finish_stopped_run()
            return
        try:
            with self.signals.deferred():
                if cfg.max_seconds:
                    self._plan_validation()
                stop = self._epochs()
                finished = cfg.epochs and p.epoch > cfg.epochs
                if (finished or self.task.test_on_stop) and stop != INTERRUPTED and (self.out / BEST).is_file():
                    self.test_best()
        finally:
            self.bar.close()

    def _epochs(self) -> str | None:
        cfg, p = self.cfg, self.p
        stop = None
        while not cfg.epochs or p.epoch <= cfg.epochs:
            stop = self._amp_checked(self._epoch)
            val = self._validate() if stop != INTERRUPTED else None
            if val is None:
                self._stop_interrupted()
            epoch = p.epoch
            if p.step_in_epoch >= self.task.n_batches:  # the epoch is complete
                p.epoch, p.step_in_epoch, self.hidden = p.epoch + 1, 0, None
            self._record(epoch, val, stop)
            if stop:
                break
        return stop

    def _finish_stopped_run(self) -> None:
        """A run already at its end: nothing to do, unless a signal stopped it at max_steps before
        its closing validation, which is done now."""
        cfg, p = self.cfg, self.p
        if p.history and p.history[-1]["step"] == p.global_step or not cfg.max_steps:
            self.log(f"nothing to do: the run is at epoch {p.epoch}, step {p.global_step}")
            return
        with self.signals.deferred():
            val = self._validate()
            if val is None:
                self._stop_interrupted()
            self._record(p.epoch, val, f"max_steps={cfg.max_steps} reached")

    def _stop_interrupted(self) -> NoReturn:
        """Save where the loop stands (mid-epoch, or at an epoch's end before its validation, which
        a resumed run then does first) and stop."""
        self._save(LAST, self._metrics(None))
        raise TrainInterrupted(self.signals.received or "SIGINT", self.p.global_step, self.out / LAST)

    def _amp_checked(self, fn):
        try:
            return fn()
        except RuntimeError as e:  # e.g. a cuDNN older than 9.13 has no bf16 LSTM
            if self.amp and "BFloat16" in str(e):
                raise TrainError(f"--amp bf16: this torch/CUDA build cannot train the model in bfloat16 "
                                 f"({e}); train without --amp") from e
            raise

    def _epoch(self) -> str | None:
        cfg, p, task = self.cfg, self.p, self.task
        lr = lr_at(cfg, p.epoch)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        state = self.hidden if self.hidden is not None else task.zero_state()
        self.bar.reset(total=task.n_batches)
        self.bar.update(p.step_in_epoch)
        self.bar.set_description(f"epoch {p.epoch}")
        stop = None
        for batch in task.batches(p.epoch, p.step_in_epoch):
            state = self._update(batch, state)
            if p.global_step % cfg.log_interval == 0:
                self._flush_window(lr)
            if self.sample_every and p.global_step % self.sample_every == 0:
                self._print_sample()
            stop = self._stop_reason()
            if stop:
                self.hidden = state
                break
            if cfg.save_every and p.global_step % cfg.save_every == 0:
                self.hidden = state
                self._flush_window(lr)  # the window restarts at every save: a resume logs the same rows
                self._save(LAST, self._metrics(None))
        self._flush_window(lr)
        return stop

    def _update(self, batch, state: State | None) -> State | None:
        """One update; returns the state the next batch starts from."""
        if state is not None:  # truncate BPTT at the batch edge; fp32 so bf16 never leaks into last.pt
            state = tuple(t.detach().float() for t in state)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            step = self.task.forward(self.net, batch, state)
        self.opt.zero_grad(set_to_none=True)
        (step.loss * step.scale if step.scale != 1 else step.loss).backward()
        if self.cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_norm)
        self.opt.step()
        self.win_loss += step.loss.detach() * step.n  # stays on the device: no sync per step
        self.win_n += step.n
        self.win_items += step.items
        p = self.p
        p.step_in_epoch, p.global_step = p.step_in_epoch + 1, p.global_step + 1
        p.tokens_seen += step.items * self.dist.world_size
        self.bar.update()
        return step.state

    def _flush_window(self, lr: float) -> None:
        """Fold the loss since the last log into the metrics row, steps.csv and the bar."""
        if not self.win_n:
            return
        loss_sum, n, items = ddp.all_sum(self.dist, torch.stack(
            [self.win_loss, torch.tensor(float(self.win_n), device=self.device),
             torch.tensor(float(self.win_items), device=self.device)])).tolist()
        seconds = time.monotonic() - self.t_win
        self.win_loss.zero_()
        self.win_n = self.win_items = 0
        self.t_win = time.monotonic()
        p = self.p
        p.row_loss += loss_sum
        p.row_tokens += int(n)
        self.row_session_tokens += int(items)
        loss = loss_sum / n
        if not math.isfinite(loss):
            raise TrainError(f"training loss became {loss} at step {p.global_step}; "
                             "try a lower --lr or a smaller --clip-norm")
        self._show_window(loss, lr, items / max(seconds, 1e-9))

    def _show_window(self, loss: float, lr: float, rate: float) -> None:
        p, unit = self.p, self.task.unit
        self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", **{f"{unit}_s": f"{rate:,.0f}"})
        eta = self._eta_s()
        self.console.progress(
            f"epoch {p.epoch} step {p.global_step} (batch {p.step_in_epoch}/{self.task.n_batches}) | "
            f"loss {loss:.5g} | lr {lr:.3g} | {rate:,.0f} {unit}/s | ETA {duration(eta)}",
            epoch=p.epoch, step=p.global_step, batch=p.step_in_epoch, batches=self.task.n_batches, loss=loss,
            lr=lr, **{self._rate_key(): rate}, eta_s=round(eta, 1) if math.isfinite(eta) else None)
        if self.dist.is_main:
            runlog.append_csv(self.out / STEPS_CSV, {
                "step": p.global_step, "epoch": p.epoch, "loss": loss, "lr": lr, self._rate_key(): rate,
                "elapsed_s": self.elapsed0 + time.monotonic() - self.t0}, digits=10)

    def _rate_key(self) -> str:
        return "tokens_per_s" if self.task.unit == "tok" else f"{self.task.unit}_per_s"

    def _print_sample(self) -> None:
        step = self.p.global_step
        shown = self.task.preview(step)
        if shown is not None:
            how, text = shown
            self.log(f"--- sample at step {step} ({how}) ---\n{text}\n--- end of sample ---")

    def _eta_s(self) -> float:
        """Seconds to the run's end at this session's pace (validation included), within its limits."""
        cfg, p, n = self.cfg, self.p, self.task.n_batches
        left = (cfg.epochs - p.epoch) * n + n - p.step_in_epoch if cfg.epochs else math.inf
        if cfg.max_steps:
            left = min(left, cfg.max_steps - p.global_step)
        spent = time.monotonic() - self.t0
        steps = p.global_step - self.step0
        eta = left * spent / steps if steps and math.isfinite(left) else math.inf
        return min(eta, cfg.max_seconds - spent) if cfg.max_seconds else eta

    def _stop_reason(self) -> str | None:
        cfg, p = self.cfg, self.p
        if cfg.max_steps and p.global_step >= cfg.max_steps:
            return f"max_steps={cfg.max_steps} reached"
        if self.dist.enabled and not cfg.max_seconds and p.global_step % cfg.log_interval:
            return None  # a collective per update would cost DDP its overlap; a signal waits a few updates
        # clocks and signals differ between ranks: every rank stops when one must, for the same reason
        if not ddp.any_rank(self.dist, self.budget.time_to_stop() or self.signals.requested, self.device):
            return None
        if ddp.any_rank(self.dist, self.signals.requested, self.device):
            return INTERRUPTED
        return f"max_seconds={cfg.max_seconds:g} reached"

    # -- validation, metrics and checkpoints ------------------------------------------------------
    def _evaluate(self, model, split: str, chunks: int | None = None) -> Validation | None:
        """The task's figures over `split` (its first `chunks` chunks), each rank scoring its share;
        cut short past the time limit; None on a signal."""
        def stop() -> bool:
            return self.signals.requested or self.budget.overrun()

        sums = self.task.score(model, split, chunks, stop)
        keys = sorted(sums)
        total = ddp.all_sum(self.dist, torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                                    device=self.device)).tolist()
        if ddp.any_rank(self.dist, self.signals.requested, self.device):
            return None
        sums = dict(zip(keys, total))
        figures = self.task.figures(sums)
        fraction = sums["count"] / sums["whole"] if sums.get("whole") else 1.0
        planned = sums.get("planned", sums.get("whole", 0.0))
        return Validation(figures["loss"], figures, fraction, cut=sums["count"] < planned)

    def _plan_validation(self) -> None:
        """With a time limit: time a validation chunk, so training leaves room for the closing pass
        (budget.py), and keep a long pass to a prefix of the validation data."""
        chunks = self.task.valid_chunks()
        if chunks is None:
            return
        self.task.score(self.model, "valid", 1, None)  # warm-up: allocations, kernel choice
        # chunk times vary several-fold on a busy machine: average over a fraction of a second
        t, probe_s = time.monotonic(), min(PROBE_S, 0.05 * self.cfg.max_seconds)
        sums = self.task.score(self.model, "valid", None, lambda: time.monotonic() - t > probe_s)
        n = max(1, sums["chunks"])
        chunk_s = ddp.all_sum(self.dist, torch.tensor([(time.monotonic() - t) / n], device=self.device)).item()
        chunk_s /= self.dist.world_size  # every rank plans the same prefix
        self.val_chunks = plan_validation(chunks, chunk_s, self.cfg.max_seconds)
        self.budget.valid_s = self.val_chunks * chunk_s
        if self.val_chunks < chunks:
            self.log(f"validation: a whole pass would take about {chunks * chunk_s:.0f}s, over a quarter of "
                     f"max_seconds={self.cfg.max_seconds:g}; each validation reads the first "
                     f"{self.val_chunks / chunks:.0%} of the validation text")

    def _validate(self) -> Validation | None:
        """The pass after an epoch or a stop; None when a signal asks to stop."""
        t = time.monotonic()
        self.train_s = t - self.t_row  # throughput counts training, not validation
        val = self._evaluate(self.model, "valid", self.val_chunks)
        if val is not None and not val.cut:
            self.budget.valid_s = time.monotonic() - t  # the next pass's estimate
        return val

    def _record(self, epoch: int, val: Validation, stop: str | None) -> None:
        """The metrics row, best.pt when the loss improved, last.pt, the log line."""
        cfg, p = self.cfg, self.p
        t = time.monotonic()
        p.elapsed_s = self.elapsed0 + (t - self.t0)
        row = {"epoch": epoch, "step": p.global_step,
               "train_loss": p.row_loss / p.row_tokens if p.row_tokens else math.nan,
               **_prefixed(val.figures, "val"), "lr": lr_at(cfg, epoch),
               self._rate_key(): self.row_session_tokens / max(self.train_s, 1e-9), "elapsed_s": p.elapsed_s}
        p.row_loss, p.row_tokens = 0.0, 0
        p.history.append(row)
        # a pass cut short read less than the others: it makes best.pt only when there is none yet
        improved = val.loss < p.best_val_loss and (not val.cut or math.isinf(p.best_val_loss))
        if improved:
            p.best_val_loss = val.loss
            self._save(BEST, self._metrics(val), resumable=False)
        self._save(LAST, self._metrics(val))
        if self.dist.is_main:  # a resume rewrites metrics.csv from last.pt's history anyway
            runlog.append_csv(self.out / METRICS_CSV, row)
            runlog.plot_curves(self.out, self.task.kind, title=self.out.name)
        shown = self.task.describe_val(val, val.note(f"max_seconds={cfg.max_seconds:g}"))
        fmt = ".4f" if self.task.kind in ("char", "word") else ".5g"
        self.log(f"epoch {epoch} step {p.global_step} | train loss {row['train_loss']:{fmt}} | {shown}"
                 f"{' *best*' if improved else ''} | lr {row['lr']:.3g} | "
                 f"{row[self._rate_key()]:,.0f} {self.task.unit}/s | {p.elapsed_s:.0f}s"
                 + (f" | stop: {stop}" if stop else ""))
        self.budget.save_s = time.monotonic() - t
        self.t_row, self.row_session_tokens = time.monotonic(), 0  # saving and plotting are not training

    def _metrics(self, val: Validation | None) -> dict:
        p = self.p
        m = {**self.task.metrics(), "global_step": p.global_step,
             "epochs_trained": p.epoch - 1 + p.step_in_epoch / self.task.n_batches,  # 1.5: half of epoch 2
             "tokens_seen": p.tokens_seen, "best_val_loss": p.best_val_loss, "history": list(p.history)}
        if val is not None:
            m.update(_prefixed(val.figures, "val"))
            if val.fraction < 1:
                m["val_fraction"] = val.fraction
        return m

    def _save(self, name: str, metrics: dict, resumable: bool = True) -> Path | None:
        """Every rank calls this at the same points (it gathers state); rank 0 writes."""
        p = self.p
        progress: dict = {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step}
        if resumable:
            progress.update(asdict(p))
            progress["optimizer"] = self.opt.state_dict()  # identical on every rank
            ranks = ddp.gather_objects(self.dist, torch.get_rng_state())
            progress["rng"] = {"torch": ranks[0], "ranks": ranks if self.dist.enabled else [],
                               "cuda": torch.cuda.get_rng_state_all()
                               if self.device.type == "cuda" and not self.dist.enabled else []}
            if self.hidden is not None and p.step_in_epoch:  # the whole batch's state  [L, B, H]
                progress["hidden"] = [ddp.gather_streams(self.dist, t.detach()).cpu() for t in self.hidden]
        if not self.dist.is_main:
            return None
        state_dict = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return save_checkpoint(self.task.checkpoint(state_dict, progress, metrics), self.out / name)

    def test_best(self) -> None:
        """Score best.pt on the test split (TF ptb_word_lm's final figure) and record it there."""
        if not self.task.has_split("test"):
            return
        ddp.barrier(self.dist)  # rank 0 wrote best.pt
        best = load_any(self.out / BEST)
        val = self._evaluate(best.build_model().to(self.device), "test")
        if val is None or val.cut:  # a figure over part of the split would mislead: none at all
            why = "interrupted" if val is None else f"max_seconds={self.cfg.max_seconds:g} reached first"
            self.log(f"test (best.pt): skipped, {why}")
            return
        test = _prefixed(val.figures, "test")
        if self.dist.is_main:
            best.metrics.update(test)
            save_checkpoint(best, self.out / BEST)
        fmt = ".4f" if self.task.kind in ("char", "word") else ".5g"
        self.log("test (best.pt): " + ", ".join(f"{k} {v:{fmt}}" for k, v in test.items()))


def _prefixed(figures: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in figures.items()}
