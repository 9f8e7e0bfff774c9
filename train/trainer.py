"""Training as Zaremba et al. (2014) and TensorFlow's ptb_word_lm do it: truncated BPTT over B
contiguous streams with the LSTM state carried (detached) from batch to batch, global-norm gradient
clipping, SGD with a per-epoch lr decay (or Adam), and a validation pass over the whole validation
stream after every epoch.

A run directory holds config.json (the resolved config), metrics.csv (one row per validation),
steps.csv (the training loss per logged window), curves.png (both, plotted), best.pt (lowest
validation loss) and last.pt (everything needed to resume: optimizer, epoch, step within the epoch,
LSTM state, RNG states). A resumed run replays exactly what the uninterrupted run would have done,
because batches are deterministic and the RNG and LSTM states are restored. Ctrl-C or SIGTERM
writes last.pt at the update under way and stops (interrupt.py); --max-seconds leaves time for the
closing validation and saves (budget.py).

Under torchrun the same code trains data-parallel (see distributed.py); only rank 0 writes files.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.nn.functional as F

from lstmgen.console import Console, duration
from lstmgen.errors import UserError
from lstmgen.train import distributed as ddp
from lstmgen.train import runlog
from lstmgen.train.checkpoint import BEST, LAST, Checkpoint, load_checkpoint, save_checkpoint
from lstmgen.train.config import TrainConfig
from lstmgen.train.data import Corpus, DataError, batchify, get_batch, load_corpus, num_batches
from lstmgen.train.budget import TimeBudget, plan_validation
from lstmgen.train.distributed import DistInfo
from lstmgen.train.interrupt import StopSignals, TrainInterrupted
from lstmgen.train.model import StackedLSTM, State
from lstmgen.train.preview import TEMPERATURE, sample_text
from lstmgen.train.runlog import CURVES_PNG, METRICS_CSV, STEPS_CSV

CONFIG_JSON, CACHE_DIR = "config.json", "cache"
# A resumed run may change when it stops, its lr or dropout, but not what these fix: the model's
# shape, the tokens, the optimizer state's meaning, or how the stream is cut into batches.
_FIXED_FIELDS = ("task", "cell", "embedding_size", "hidden_size", "num_layers", "tie_weights", "level",
                 "min_count", "max_vocab", "valid_fraction", "optimizer", "batch_size", "bptt")

Log = Callable[[str], None]
INTERRUPTED = "interrupted"  # the stop reason a signal gives (interrupt.py)
PROBE_S = 0.5  # with --max-seconds: seconds spent timing validation before training (budget.py)


class TrainError(UserError):
    """A run that cannot start or continue; the message says why."""


class RunExistsError(TrainError):
    """The output directory already holds a run, and neither resuming nor overwriting it was asked
    for. The message names the keywords (resume=True, overwrite=True), or with flags=True the
    command's flags (--resume, --overwrite)."""

    def __init__(self, out: Path, *, resumable: bool = True, flags: bool = False):
        self.out, self.resumable = out, resumable
        resume, overwrite = ("--resume", "--overwrite") if flags else ("resume=True", "overwrite=True")
        ways = (f"continue it ({resume}), " if resumable else "") + f"start it over ({overwrite})"
        super().__init__(f"{out}: already holds a run; {ways} or choose another output directory")


# what a run writes into its directory (its cache/ of downloads is kept by overwrite)
RUN_FILES = (LAST, BEST, CONFIG_JSON, METRICS_CSV, STEPS_CSV, CURVES_PNG)


def holds_run(out: Path) -> bool:
    return (out / LAST).exists() or (out / BEST).exists()


def clear_run(out: Path) -> None:
    """Remove a previous run's files (overwrite=True), leaving anything else in the folder."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def check_config(cfg: TrainConfig) -> None:
    problems = [f"{k} must be >= 1 (got {getattr(cfg, k)})"
                for k in ("embedding_size", "hidden_size", "num_layers", "batch_size", "bptt",
                          "eval_batch_size", "log_interval", "min_count") if getattr(cfg, k) < 1]
    problems += [f"{k} must be >= 0 (got {getattr(cfg, k)})"
                 for k in ("epochs", "max_steps", "max_seconds", "save_every", "decay_after", "weight_decay",
                           "clip_norm", "init_scale", "max_vocab") if getattr(cfg, k) < 0]
    if cfg.epochs == 0 and not (cfg.max_steps > 0 or cfg.max_seconds > 0):
        problems.append("epochs=0 (no epoch limit) needs max_steps or max_seconds to end the run")
    if 0 < cfg.max_vocab < 3:
        problems.append(f"max_vocab must be 0 (no limit) or >= 3, to hold <eos>, <unk> and a word (got {cfg.max_vocab})")
    if cfg.level == "char" and (cfg.min_count != 1 or cfg.max_vocab):
        problems.append("min_count and max_vocab apply to word level only (a char vocabulary has no <unk>)")
    if not cfg.lr > 0 or not cfg.lr_decay > 0:
        problems.append(f"lr and lr_decay must be > 0 (got {cfg.lr}, {cfg.lr_decay})")
    if not 0 <= cfg.dropout < 1:
        problems.append(f"dropout must be in [0, 1) (got {cfg.dropout})")
    if not 0 < cfg.valid_fraction < 1:
        problems.append(f"valid_fraction must be in (0, 1) (got {cfg.valid_fraction})")
    if cfg.projection_size < 0:
        problems.append(f"projection_size must be >= 0 (got {cfg.projection_size})")
    if cfg.task == "lm" and (cfg.projection_size or cfg.standardize != "none" or cfg.stream):
        problems.append("projection_size, standardize and stream apply to --task regression or classification")
    for k, allowed in (("optimizer", ("sgd", "adam")), ("level", ("char", "word")),
                       ("device", ("auto", "cpu", "cuda")), ("amp", ("off", "bf16")),
                       ("task", ("lm", "regression", "classification")), ("cell", ("lstm", "gru")),
                       ("standardize", ("none", "global", "sequence"))):
        if getattr(cfg, k) not in allowed:
            problems.append(f"{k} must be one of {', '.join(allowed)} (got {getattr(cfg, k)!r})")
    if cfg.tie_weights and cfg.embedding_size != cfg.hidden_size:
        problems.append(f"tie_weights needs embedding_size == hidden_size "
                        f"(got {cfg.embedding_size} and {cfg.hidden_size})")
    if problems:
        raise TrainError("invalid config: " + "; ".join(problems))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """cpu or cuda; under torchrun each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device 'cuda' requested but CUDA is not available to torch {torch.__version__}; "
                         "use --device cpu or --device auto")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Zaremba's schedule: full lr for `decay_after` epochs, then x lr_decay per epoch (from 1)."""
    return cfg.lr * cfg.lr_decay ** max(epoch - cfg.decay_after, 0)


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def figures(level: str, loss: float, prefix: str = "val") -> dict[str, float]:
    """Perplexity for words, bits per char for chars, beside the loss in nats per token."""
    if level == "word":
        return {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 700.0))}
    return {f"{prefix}_loss": loss, f"{prefix}_bpc": loss / math.log(2)}


@torch.no_grad()
def evaluate_sum(model: StackedLSTM, source: torch.Tensor, bptt: int, *, chunks: int | None = None,
                 stop: Callable[[], bool] | None = None) -> tuple[float, int]:
    """(nats summed, tokens predicted) over a whole [N, B] stream, the state carried across
    batches. Chunking by bptt changes nothing but the float rounding: the state flows through.
    `chunks`: only the first this many bptt chunks; `stop`: asked before each chunk after the
    first, ends the pass early when true (a time limit, an interrupt)."""
    if source.size(1) == 0:  # a rank with no validation streams of its own
        return 0.0, 0
    was_training = model.training
    model.eval()
    state = model.init_state(source.size(1), source.device)
    total = torch.zeros((), device=source.device)
    count = 0
    for n, i in enumerate(range(0, source.size(0) - 1, bptt)):
        if (chunks is not None and n >= chunks) or (n and stop is not None and stop()):
            break
        x, y = get_batch(source, i, bptt)  # [T, B]
        logits, state = model(x, state)  # [T, B, V]
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        count += y.numel()
    model.train(was_training)
    return total.item(), count


def evaluate(model: StackedLSTM, source: torch.Tensor, bptt: int) -> float:
    """Mean nats per token over a whole [N, B] stream, the state carried across batches."""
    total, count = evaluate_sum(model, source, bptt)
    return total / count


def saved_config(out_dir: str | os.PathLike) -> TrainConfig:
    """The config a run directory was trained with (from its config.json)."""
    path = Path(out_dir) / CONFIG_JSON
    try:
        return TrainConfig(**json.loads(path.read_text())["train"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"{path}: cannot read the run's config: {e}") from e


@dataclass
class _Progress:
    epoch: int = 1  # the epoch under way, counted from 1
    step_in_epoch: int = 0  # updates done in it
    global_step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # wall time over every session of the run
    best_val_loss: float = math.inf
    history: list = field(default_factory=list)  # the metrics.csv rows
    # training loss since the last metrics row, so a resumed run writes the same train_loss
    row_loss: float = 0.0
    row_tokens: int = 0


@dataclass(frozen=True)
class _Validation:
    loss: float  # mean nats per token over what was read
    fraction: float  # share of the split's tokens read: < 1 for a planned prefix or a pass cut short
    cut: bool = False  # stopped before its plan by the time limit

    def note(self, limit: str) -> str:
        if self.fraction >= 1:
            return ""
        if self.cut:
            return f"; cut at {self.fraction:.0%} of the validation text by {limit}"
        return f"; the first {self.fraction:.0%} of the validation text"


def _streams(ids: torch.Tensor | None, batch_size: int, split: str, device: torch.device) -> torch.Tensor | None:
    if ids is None:
        return None
    try:
        return batchify(ids, batch_size).to(device)  # [N, B]
    except DataError as e:
        raise DataError(f"{split} split: {e}") from None


class _Run:
    """One session of a run: the model, optimizer and streams, and the loop over them."""

    def __init__(self, cfg: TrainConfig, corpus: Corpus, out: Path, device: torch.device,
                 prior: Checkpoint | None, log: Log, console: Console, dist: DistInfo = DistInfo(),
                 signals: StopSignals | None = None, sample_every: int = 0):
        self.cfg, self.corpus, self.out, self.device, self.log = cfg, corpus, out, device, log
        self.console = console
        self.dist = dist
        self.signals = signals or StopSignals()  # not entered: never set, the loop just never stops early
        self.sample_every = sample_every if dist.is_main else 0
        self.model = StackedLSTM(cfg.model_config(len(corpus.vocab))).to(device)
        self.params = list(self.model.parameters())
        self.opt = make_optimizer(cfg, self.params)
        # DDP averages the gradients in backward; self.model stays the plain module for eval/saving
        self.net = self.model if not dist.enabled else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if dist.rank:  # every rank built the same weights; dropout masks must differ between ranks
            torch.manual_seed(cfg.seed + dist.rank)
        self.shard = dist.shard(cfg.batch_size)  # this rank's streams of the global batch
        self.train_data = _streams(corpus.train, cfg.batch_size, "train", device)[:, self.shard].contiguous()  # [N, b]
        self.valid_data = _streams(corpus.valid, cfg.eval_batch_size, "valid", device)  # [Nv, Bv]
        self.n_batches = num_batches(self.train_data, cfg.bptt)
        self.amp = cfg.amp == "bf16" and device.type == "cuda"
        self.p = _Progress()
        self.hidden: State | None = None  # this rank's LSTM state mid-epoch, for last.pt
        if prior is not None:
            self._restore(prior)
        self.bar = console.progress_bar(total=self.n_batches, unit="batch")
        self.t0, self.elapsed0, self.step0 = time.monotonic(), self.p.elapsed_s, self.p.global_step
        self.budget = TimeBudget(cfg.max_seconds, self.t0)
        self.val_chunks: int | None = None  # bptt chunks each validation reads; None: all
        self.t_row, self.row_session_tokens = self.t0, 0  # this session's share of the next metrics row
        self.train_s = 0.0  # training time of the metrics row under way (validation not counted)
        self.win_loss = torch.zeros((), device=device)  # nats summed since the last steps.csv row
        self.win_tokens, self.t_win = 0, self.t0

    def _restore(self, prior: Checkpoint) -> None:
        prog = prior.progress
        self.model.load_state_dict(prior.state_dict)
        self.opt.load_state_dict(prog["optimizer"])
        self.p = _Progress(**{f.name: prog[f.name] for f in fields(_Progress) if f.name in prog})
        ranks = prog["rng"].get("ranks") or []
        torch.set_rng_state(ranks[self.dist.rank] if len(ranks) == self.dist.world_size else prog["rng"]["torch"])
        if self.device.type == "cuda" and prog["rng"].get("cuda") and not self.dist.enabled:
            torch.cuda.set_rng_state_all(prog["rng"]["cuda"])
        if prog.get("hidden") and self.p.step_in_epoch:
            # saved for the whole batch, each [L, B, H]: (h, c) for an LSTM, (h,) for a GRU
            self.hidden = tuple(t[:, self.shard].to(self.device).contiguous() for t in prog["hidden"])

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        """Train until the last epoch ends (then score best.pt on the test split, if there is one)
        or a limit stops it. A signal stops it after the update under way: TrainInterrupted."""
        cfg, p = self.cfg, self.p
        if (cfg.epochs and p.epoch > cfg.epochs) or (cfg.max_steps and p.global_step >= cfg.max_steps):
            if p.history and p.history[-1]["step"] == p.global_step or not cfg.max_steps:
                self.log(f"nothing to do: the run is at epoch {p.epoch}, step {p.global_step}")
                return
            # stopped by a signal at max_steps, before its closing validation: do that now
            with self.signals.deferred():
                val = self._validate()
                if val is None:
                    self._stop_interrupted()
                self._record(p.epoch, val, f"max_steps={cfg.max_steps} reached")
            return
        try:
            with self.signals.deferred():
                if cfg.max_seconds:
                    self._plan_validation()
                while not cfg.epochs or p.epoch <= cfg.epochs:
                    stop = self._amp_checked(self._epoch)
                    val = self._validate() if stop != INTERRUPTED else None
                    if val is None:
                        self._stop_interrupted()
                    epoch = p.epoch
                    if p.step_in_epoch >= self.n_batches:  # the epoch is complete
                        p.epoch, p.step_in_epoch, self.hidden = p.epoch + 1, 0, None
                    self._record(epoch, val, stop)
                    if stop:
                        break
                finished = cfg.epochs and p.epoch > cfg.epochs
                if finished and self.corpus.test is not None and (self.out / BEST).is_file():
                    self.test_best()
        finally:
            self.bar.close()

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
        cfg, p, opt = self.cfg, self.p, self.opt
        lr = lr_at(cfg, p.epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        self.model.train()
        bsz = self.train_data.size(1)
        state = self.hidden if self.hidden is not None else self.model.init_state(bsz, self.device)
        self.bar.reset(total=self.n_batches)
        self.bar.update(p.step_in_epoch)
        self.bar.set_description(f"epoch {p.epoch}")
        world = self.dist.world_size
        for k in range(p.step_in_epoch, self.n_batches):
            x, y = get_batch(self.train_data, k * cfg.bptt, cfg.bptt)  # [T, b]
            # truncate BPTT at the batch edge; fp32 so bf16 autocast never leaks into last.pt
            state = tuple(t.detach().float() for t in state)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits, state = self.net(x, state)  # [T, b, V]
                # mean over this rank's equal shard: DDP's average over ranks is the global mean
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            opt.zero_grad(set_to_none=True)
            (loss * x.size(0) if cfg.loss_sum_over_time else loss).backward()
            if cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_norm)
            opt.step()
            self.win_loss += loss.detach() * y.numel()  # stays on the device: no sync per step
            self.win_tokens += y.numel()
            p.step_in_epoch, p.global_step = k + 1, p.global_step + 1
            p.tokens_seen += y.numel() * world
            self.bar.update()
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
        else:
            stop = None
        self._flush_window(lr)
        return stop

    def _flush_window(self, lr: float) -> None:
        """Fold the loss since the last log into the metrics row, steps.csv and the bar."""
        if not self.win_tokens:
            return
        loss_sum, tokens = ddp.all_sum(self.dist, torch.stack(
            [self.win_loss, torch.tensor(float(self.win_tokens), device=self.device)])).tolist()
        seconds = time.monotonic() - self.t_win
        self.win_loss.zero_()
        self.win_tokens, self.t_win = 0, time.monotonic()
        p = self.p
        p.row_loss += loss_sum
        p.row_tokens += int(tokens)
        self.row_session_tokens += int(tokens)
        loss = loss_sum / tokens
        if not math.isfinite(loss):
            raise TrainError(f"training loss became {loss} at step {p.global_step}; "
                             "try a lower --lr or a smaller --clip-norm")
        tok_s = tokens / max(seconds, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", tok_s=f"{tok_s:,.0f}")
        eta = self._eta_s()
        self.console.progress(
            f"epoch {p.epoch} step {p.global_step} (batch {p.step_in_epoch}/{self.n_batches}) | loss {loss:.4f} | "
            f"lr {lr:.3g} | {tok_s:,.0f} tok/s | ETA {duration(eta)}",
            epoch=p.epoch, step=p.global_step, batch=p.step_in_epoch, batches=self.n_batches, loss=loss, lr=lr,
            tokens_per_s=tok_s, eta_s=round(eta, 1) if math.isfinite(eta) else None)
        if self.dist.is_main:
            runlog.append_csv(self.out / STEPS_CSV, {
                "step": p.global_step, "epoch": p.epoch, "loss": loss, "lr": lr, "tokens_per_s": tok_s,
                "elapsed_s": self.elapsed0 + time.monotonic() - self.t0}, digits=10)

    def _print_sample(self) -> None:
        step = self.p.global_step
        text = sample_text(self.model, self.corpus.vocab, seed=self.cfg.seed + step)
        self.log(f"--- sample at step {step} (temperature {TEMPERATURE}) ---\n{text}\n--- end of sample ---")

    def _eta_s(self) -> float:
        """Seconds to the run's end at this session's pace (validation included), within its limits."""
        cfg, p = self.cfg, self.p
        left = (cfg.epochs - p.epoch) * self.n_batches + self.n_batches - p.step_in_epoch if cfg.epochs else math.inf
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
    def _evaluate(self, model: StackedLSTM, data: torch.Tensor, chunks: int | None = None) -> _Validation | None:
        """Mean nats per token over `data`'s streams (the first `chunks` bptt chunks of them), each
        rank taking a block of the streams; cut short past the time limit; None on a signal."""
        def stop() -> bool:
            return self.signals.requested or self.budget.overrun()

        total, count = evaluate_sum(model, data[:, self.dist.shard(data.size(1))], self.cfg.bptt,
                                    chunks=chunks, stop=stop)
        total, count = ddp.all_sum(self.dist, torch.tensor([total, count], dtype=torch.float64,
                                                           device=self.device)).tolist()
        if ddp.any_rank(self.dist, self.signals.requested, self.device):
            return None
        rows = data.size(0) - 1  # tokens predicted per stream
        planned = min(rows, chunks * self.cfg.bptt if chunks is not None else rows) * data.size(1)
        return _Validation(total / count, count / (rows * data.size(1)), cut=count < planned)

    def _plan_validation(self) -> None:
        """With a time limit: time a validation chunk, so training leaves room for the closing pass
        (budget.py), and keep a long pass to a prefix of the validation text."""
        data, bptt = self.valid_data[:, self.dist.shard(self.valid_data.size(1))], self.cfg.bptt
        chunks = num_batches(self.valid_data, bptt)
        evaluate_sum(self.model, data, bptt, chunks=1)  # warm-up: allocations, kernel choice
        # chunk times vary several-fold on a busy machine: average over a fraction of a second
        t, probe_s = time.monotonic(), min(PROBE_S, 0.05 * self.cfg.max_seconds)
        _, count = evaluate_sum(self.model, data, bptt, stop=lambda: time.monotonic() - t > probe_s)
        n = max(1, math.ceil(count / max(bptt * data.size(1), 1)))
        chunk_s = ddp.all_sum(self.dist, torch.tensor([(time.monotonic() - t) / n], device=self.device)).item()
        chunk_s /= self.dist.world_size  # every rank plans the same prefix
        self.val_chunks = plan_validation(chunks, chunk_s, self.cfg.max_seconds)
        self.budget.valid_s = self.val_chunks * chunk_s
        if self.val_chunks < chunks:
            self.log(f"validation: a whole pass would take about {chunks * chunk_s:.0f}s, over a quarter of "
                     f"max_seconds={self.cfg.max_seconds:g}; each validation reads the first "
                     f"{self.val_chunks / chunks:.0%} of the validation text")

    def _validate(self) -> _Validation | None:
        """The pass after an epoch or a stop; None when a signal asks to stop."""
        t = time.monotonic()
        self.train_s = t - self.t_row  # tokens/s counts training, not validation
        val = self._evaluate(self.model, self.valid_data, self.val_chunks)
        if val is not None and not val.cut:
            self.budget.valid_s = time.monotonic() - t  # the next pass's estimate
        return val

    def _record(self, epoch: int, val: _Validation, stop: str | None) -> None:
        """The metrics row, best.pt when the loss improved, last.pt, the log line."""
        cfg, p = self.cfg, self.p
        t = time.monotonic()
        p.elapsed_s = self.elapsed0 + (t - self.t0)
        row = {"epoch": epoch, "step": p.global_step,
               "train_loss": p.row_loss / p.row_tokens if p.row_tokens else math.nan,
               **figures(cfg.level, val.loss), "lr": lr_at(cfg, epoch),
               "tokens_per_s": self.row_session_tokens / max(self.train_s, 1e-9), "elapsed_s": p.elapsed_s}
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
            runlog.plot_curves(self.out, cfg.level, title=self.out.name)
        unit = f"ppl {row['val_ppl']:.2f}" if cfg.level == "word" else f"{row['val_bpc']:.4f} bpc"
        self.log(f"epoch {epoch} step {p.global_step} | train loss {row['train_loss']:.4f} | "
                 f"val loss {val.loss:.4f} ({unit}{val.note(f'max_seconds={cfg.max_seconds:g}')})"
                 f"{' *best*' if improved else ''} | lr {row['lr']:.3g} | "
                 f"{row['tokens_per_s']:,.0f} tok/s | {p.elapsed_s:.0f}s" + (f" | stop: {stop}" if stop else ""))
        self.budget.save_s = time.monotonic() - t
        self.t_row, self.row_session_tokens = time.monotonic(), 0  # saving and plotting are not training

    def _metrics(self, val: _Validation | None) -> dict:
        p, c = self.p, self.corpus
        m = {"level": self.cfg.level, "global_step": p.global_step,
             "epochs_trained": p.epoch - 1 + p.step_in_epoch / self.n_batches,  # 1.5: half of epoch 2
             "tokens_seen": p.tokens_seen, "best_val_loss": p.best_val_loss,
             "train_tokens": c.train.numel(), "valid_tokens": c.valid.numel(),
             "test_tokens": c.test.numel() if c.test is not None else 0, "history": list(p.history)}
        if val is not None:
            m.update(figures(self.cfg.level, val.loss))
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
        ckpt = Checkpoint(self.model.cfg, self.cfg, self.corpus.vocab, state_dict, progress, metrics,
                          dict(self.corpus.source))
        return save_checkpoint(ckpt, self.out / name)

    def test_best(self) -> None:
        """Evaluate best.pt on the test split (TF ptb_word_lm's final figure) and record it there."""
        test_data = _streams(self.corpus.test, self.cfg.eval_batch_size, "test", self.device)
        ddp.barrier(self.dist)  # rank 0 wrote best.pt
        best = load_checkpoint(self.out / BEST)
        model = best.build_model().to(self.device)
        val = self._evaluate(model, test_data)
        if val is None or val.cut:  # a figure over part of the split would mislead: none at all
            why = "interrupted" if val is None else f"max_seconds={self.cfg.max_seconds:g} reached first"
            self.log(f"test (best.pt): skipped, {why}")
            return
        test = figures(self.cfg.level, val.loss, prefix="test")
        if self.dist.is_main:
            best.metrics.update(test)
            save_checkpoint(best, self.out / BEST)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items())
        self.log(f"test (best.pt): {shown}")


def _check_resumable(saved: TrainConfig, cfg: TrainConfig, path: Path) -> None:
    changed = [f"{k} {getattr(saved, k)!r} -> {getattr(cfg, k)!r}"
               for k in _FIXED_FIELDS if getattr(saved, k) != getattr(cfg, k)]
    if changed:
        raise TrainError(f"{path}: cannot resume with a different {', '.join(changed)}")


def train(cfg: TrainConfig, data: str | None, out_dir: str | os.PathLike, *, resume: bool = False,
          overwrite: bool = False, log: Log | None = None, progress_bar: bool = True,
          console: Console | None = None, targets: str | None = None, sample_every: int = 0) -> Path:
    """Train (or, with resume=True, continue) the run in `out_dir` on `data` (a path, split prefix,
    directory or http(s) URL; None when resuming: the run's own corpus). Returns best.pt's path.
    A folder that already holds a run needs resume=True or overwrite=True (its run's files are
    replaced once the new corpus has loaded; anything else in the folder is kept).
    cfg.task regression or classification trains a frame model instead (frame_trainer.py): `data`
    is then frame data (frames.py) and `targets` the .npy of targets for .npy inputs.

    Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) every process calls this; they train one
    model data-parallel and rank 0 alone logs and writes the run directory.

    `console` says how progress and log lines are shown (lstmgen/console.py; by default a bar on a
    terminal, plain lines elsewhere); `log` replaces its log lines, `progress_bar=False` its progress.
    `sample_every` > 0: log a short generated sample every this many updates (preview.py).
    A run that fails before its first checkpoint removes the run directory it created.

    SIGINT (Ctrl-C) or SIGTERM while training stops after the update under way, saves last.pt
    there and raises TrainInterrupted (a KeyboardInterrupt) naming it; resume=True continues from it.

    Raises TrainError, DataError or CheckpointError with a message fit for the user.
    """
    if resume and overwrite:
        raise TrainError("resume=True continues the run in the folder and overwrite=True replaces it; "
                         "choose one")
    if cfg.task != "lm":  # float frames: their own data, model and loop
        from lstmgen.train.frame_trainer import train_frames
        return train_frames(cfg, data, out_dir, resume=resume, overwrite=overwrite, log=log,
                            progress_bar=progress_bar, console=console, targets=targets)
    if targets is not None:
        raise TrainError("--targets is for frame data (--task regression or classification)")
    if data and (data.startswith(("builtin:", "mnist:")) or data.endswith((".npz", ".npy"))):
        raise TrainError(f"{data} is frame data, not text; train it with --task regression or "
                         "--task classification")
    dist = ddp.from_env()
    console = console or Console(progress=progress_bar)
    if not dist.is_main:
        console = Console(quiet=True, progress=False)
    log = (log or console.event) if dist.is_main else (lambda line: None)
    check_config(cfg)
    if cfg.batch_size % dist.world_size:
        raise TrainError(f"batch_size {cfg.batch_size} must divide evenly over {dist.world_size} processes "
                         "(equal shards keep the averaged gradient equal to the single-process one)")
    out = Path(out_dir)
    prior = None
    if resume:
        if not (out / LAST).is_file():
            raise TrainError(f"{out / LAST}: nothing to resume (no {LAST} in {out})")
        prior = load_checkpoint(out / LAST)
        _check_resumable(prior.train_config, cfg, out / LAST)
        if data is None:
            data = prior.corpus.get("url") or prior.corpus.get("path") or prior.corpus.get("data")
    elif holds_run(out) and not overwrite:
        raise RunExistsError(out)
    if not data:
        raise TrainError("no training data given")
    device = resolve_device(cfg.device, dist.local_rank)
    if cfg.amp != "off" and device.type != "cuda":
        log(f"amp={cfg.amp} ignored: bf16 autocast is used on CUDA only; training in fp32 on {device}")
    ddp.start(dist, device)
    created = not out.exists()
    try:
        with StopSignals() as signals:
            best = _train(cfg, data, out, prior, device, dist, log, console,
                          signals=signals, sample_every=sample_every, overwrite=overwrite)
        # every rank reaches teardown together: gloo aborts a process whose peer closes the
        # connection while it is still tearing down (seen as SIGABRT on a loaded CI machine)
        ddp.barrier(dist)
        return best
    except BaseException:  # an interrupt too: without a checkpoint there is nothing to resume
        if created and dist.is_main and out.is_dir() and not (out / LAST).exists() and not (out / BEST).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        ddp.stop(dist)


def _train(cfg: TrainConfig, data: str, out: Path, prior: Checkpoint | None, device: torch.device,
           dist: DistInfo, log: Log, console: Console, *, signals: StopSignals, sample_every: int,
           overwrite: bool) -> Path:
    torch.manual_seed(cfg.seed)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    else:
        ddp.barrier(dist)  # rank 0 first: a URL is downloaded into the cache once
    corpus = load_corpus(data, cfg.level, cfg.valid_fraction, out / CACHE_DIR,
                         min_count=cfg.min_count, max_vocab=cfg.max_vocab)
    if dist.is_main:
        ddp.barrier(dist)
    if prior is not None and (prior.vocab != corpus.vocab
                              or prior.corpus.get("sha256", corpus.source["sha256"]) != corpus.source["sha256"]):
        raise TrainError(f"{data}: the training text differs from the one {out / LAST} was trained on")
    if overwrite and dist.is_main and holds_run(out):
        clear_run(out)
        log(f"overwrite: removed the previous run's files from {out}")
    run = _Run(cfg, corpus, out, device, prior, log, console, dist, signals, sample_every)
    if dist.is_main:
        resolved = {"train": asdict(cfg), "model": asdict(run.model.cfg), "device": str(device),
                    "world_size": dist.world_size,
                    "data": {k: v for k, v in corpus.source.items() if k != "files"}}
        (out / CONFIG_JSON).write_text(json.dumps(resolved, indent=2) + "\n")
        if prior is not None:  # forget what a killed session logged past last.pt
            runlog.write_csv(out / METRICS_CSV, run.p.history)
            runlog.truncate_after(out / STEPS_CSV, run.p.global_step)
    n_params = sum(t.numel() for t in run.params)
    log("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    log(f"data: {data} ({corpus.source['layout']} layout; tokens "
        + ", ".join(f"{k} {v:,}" for k, v in corpus.source["tokens"].items())
        + f"; vocab {len(corpus.vocab)}) | model: {n_params:,} parameters on {device}"
        + (f" | cell {cfg.cell}" if cfg.cell != "lstm" else "")
        + (f" | {dist.world_size} processes (DDP), {cfg.batch_size // dist.world_size} streams each"
           if dist.enabled else "")
        + (" | bf16 autocast" if run.amp else "")
        + (f" | resuming at epoch {run.p.epoch}, step {run.p.global_step}" if prior else ""))
    run.run()
    return out / BEST
