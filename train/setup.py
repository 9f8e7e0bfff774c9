"""What every training run is set up with, whatever its task: the config's checks, the device, the
optimizer and the learning-rate schedule."""
from __future__ import annotations

import typing
from functools import cache

import torch

from lstmgen.errors import UserError
from lstmgen.train.config import AnyTrainConfig, TrainConfig


class TrainError(UserError):
    """A run that cannot start or continue; the message says why."""


@cache
def _choices(cls: type) -> dict[str, tuple]:
    """Each Literal field of a config type -> its allowed values (one definition: the annotation)."""
    hints = typing.get_type_hints(cls)
    return {k: typing.get_args(t) for k, t in hints.items() if typing.get_origin(t) is typing.Literal}


def _text_problems(cfg: TrainConfig) -> list[str]:
    problems = [f"{k} must be >= 1 (got {getattr(cfg, k)})" for k in ("embedding_size", "min_count")
                if getattr(cfg, k) < 1]
    if cfg.max_vocab < 0 or 0 < cfg.max_vocab < 3:
        problems.append(f"max_vocab must be 0 (no limit) or >= 3, to hold <eos>, <unk> and a word (got {cfg.max_vocab})")
    if cfg.level == "char" and (cfg.min_count != 1 or cfg.max_vocab):
        problems.append("min_count and max_vocab apply to word level only (a char vocabulary has no <unk>)")
    if cfg.tie_weights and cfg.embedding_size != cfg.hidden_size:
        problems.append(f"tie_weights needs embedding_size == hidden_size "
                        f"(got {cfg.embedding_size} and {cfg.hidden_size})")
    return problems


def check_config(cfg: AnyTrainConfig) -> None:
    """Every problem of the config in one TrainError (nothing is checked later, mid-run)."""
    problems = [f"{k} must be >= 1 (got {getattr(cfg, k)})"
                for k in ("hidden_size", "num_layers", "batch_size", "bptt", "eval_batch_size", "log_interval")
                if getattr(cfg, k) < 1]
    problems += [f"{k} must be >= 0 (got {getattr(cfg, k)})"
                 for k in ("epochs", "max_steps", "max_seconds", "save_every", "decay_after", "weight_decay",
                           "clip_norm", "init_scale", "projection_size") if getattr(cfg, k, 0) < 0]
    if cfg.epochs == 0 and not (cfg.max_steps > 0 or cfg.max_seconds > 0):
        problems.append("epochs=0 (no epoch limit) needs max_steps or max_seconds to end the run")
    if isinstance(cfg, TrainConfig):
        problems += _text_problems(cfg)
    if not cfg.lr > 0 or not cfg.lr_decay > 0:
        problems.append(f"lr and lr_decay must be > 0 (got {cfg.lr}, {cfg.lr_decay})")
    if not 0 <= cfg.dropout < 1:
        problems.append(f"dropout must be in [0, 1) (got {cfg.dropout})")
    if not 0 < cfg.valid_fraction < 1:
        problems.append(f"valid_fraction must be in (0, 1) (got {cfg.valid_fraction})")
    problems += [f"{k} must be one of {', '.join(allowed)} (got {getattr(cfg, k)!r})"
                 + (": a frame task's config is FrameTrainConfig" if k == "task" and isinstance(cfg, TrainConfig) else "")
                 for k, allowed in _choices(type(cfg)).items() if getattr(cfg, k) not in allowed]
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


def lr_at(cfg: AnyTrainConfig, epoch: int) -> float:
    """Zaremba's schedule: full lr for `decay_after` epochs, then x lr_decay per epoch (from 1)."""
    return cfg.lr * cfg.lr_decay ** max(epoch - cfg.decay_after, 0)


def make_optimizer(cfg: AnyTrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
