"""Typed configuration: the model's shape and the training run, plus the named presets."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Literal

from lstmgen.config_args import option


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    embedding_size: int = 128
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.0
    tie_weights: bool = False
    init_scale: float = 0.0  # > 0: uniform init in [-s, s] (Zaremba); 0: PyTorch defaults
    # nn.LSTM, nn.GRU or an LSTM variant (train/cells.py); checkpoints written before the field existed load as "lstm"
    cell: Literal["lstm", "gru", "peephole", "cifg"] = "lstm"


@dataclass(frozen=True)
class RunConfig:
    """What every task's run takes: the recurrent stack's shape, the loop, the schedule and the
    limits. A run's config is one of its task's types: TrainConfig (a language model) or
    FrameTrainConfig (a frame model). Each field is a `lstmgen train` flag overriding the preset's value."""

    task: Literal["lm", "regression", "classification"] = option(
        "lm", "lm: a language model on text; regression or classification: a frame model on float sequences "
              "(--data builtin:sin-cos, builtin:digits, mnist:DIR, FILE.npz or FILE.npy)")
    cell: Literal["lstm", "gru", "peephole", "cifg"] = "lstm"
    # the recurrent stack's shape
    hidden_size: int = option(512, "LSTM width H")
    num_layers: int = option(2, "stacked LSTM layers L")
    dropout: float = option(0.0, "dropout on the non-recurrent connections (Zaremba)")
    init_scale: float = option(0.0, "uniform init in [-s, s] (Zaremba); 0: PyTorch's defaults")
    # truncated BPTT over `batch_size` contiguous streams, `bptt` steps per update
    batch_size: int = option(20, "B: contiguous streams trained side by side")
    bptt: int = option(35, "T: steps of truncated backpropagation through time per update")
    epochs: int = option(
        10, "number of passes over the training text (0: no limit; --max-steps or --max-seconds ends the run)")
    max_steps: int = option(0, "stop after this many updates in all (0: no limit); still validates and saves")
    # > 0: this session's wall time, the closing validation and saves included (budget.py); the CLI
    # sets epochs=0 when --max-seconds comes without --epochs, so the time alone says how long
    max_seconds: float = option(
        0.0, "train this long: this session's wall time, the closing validation and saves included (not "
             "loading the corpus); without --epochs the preset's epoch count no longer applies (0: no limit)")
    optimizer: Literal["sgd", "adam"] = option("sgd", "sgd (Zaremba) or adam (char-RNN tutorials)")
    lr: float = option(1.0, "learning rate")
    # Zaremba decay: lr *= lr_decay every epoch once epoch > decay_after (epochs counted from 1)
    lr_decay: float = option(1.0, "multiply lr by this every epoch after --decay-after (Zaremba's schedule)")
    decay_after: int = option(0, "epochs at the full learning rate before the decay starts")
    weight_decay: float = option(0.0, "L2 penalty")
    clip_norm: float = option(5.0, "clip the global gradient norm to this (0: no clipping)")
    # The gradient is of the loss summed over the bptt steps and averaged over the batch, as in
    # Zaremba's code and TF ptb_word_lm (their lr=1.0 assumes it); False: averaged over both, as
    # pytorch/examples does (it uses lr=20 instead) and as the TF char-RNN tutorials do with Adam.
    loss_sum_over_time: bool = option(
        True, "gradient of the loss summed over the bptt steps (Zaremba, TF ptb_word_lm) rather than averaged")
    # used when the corpus has no separate valid file
    valid_fraction: float = option(0.1, "share of a single-file corpus held out (from its end) for validation")
    seed: int = option(1234, "random seed (torch.manual_seed)")
    eval_batch_size: int = option(10, "streams for the validation/test pass")
    log_interval: int = option(
        50, "log the training loss, lr and tokens/s (steps.csv, progress) every this many updates")
    # last.pt between validations too, so that a resume loses little
    save_every: int = option(1000, "also write last.pt every this many updates (0: only at validations)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto (cuda when available), cpu or cuda")
    # bf16 autocast of the forward pass on CUDA (weights, optimizer and loss stay fp32); no-op on CPU
    amp: Literal["off", "bf16"] = option(
        "off", "bf16: autocast the forward pass to bfloat16 on CUDA (ignored, with a message, on CPU)")


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """A language model's run (task "lm"): the text's tokens and the embedding besides the stack."""

    task: Literal["lm"] = option("lm", "lm: a language model on text")
    embedding_size: int = option(128, "embedding width E")
    tie_weights: bool = option(False, "share the embedding and output weights (needs E == H)")
    level: Literal["char", "word"] = option(
        "char", "char or word tokens (word: whitespace split plus <eos> per line, PTB style)")
    # word level: words used fewer than min_count times in the training text, or beyond the
    # max_vocab most frequent (the vocabulary counting <eos> and <unk>; 0: no limit), become <unk>
    min_count: int = option(1, "word level: words seen fewer times in the training text become <unk>")
    max_vocab: int = option(0, "word level: keep the most frequent words, the vocabulary (with <eos> and <unk>) "
                               "at most this size; the rest become <unk> (0: no limit)")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size, self.embedding_size, self.hidden_size, self.num_layers,
                           self.dropout, self.tie_weights, self.init_scale, self.cell)


@dataclass(frozen=True)
class FrameTrainConfig(RunConfig):
    """A frame model's run (task "regression" or "classification", train/frame_task.py)."""

    task: Literal["regression", "classification"] = option(
        "regression", "regression or classification: a frame model on float sequences")
    # frame tasks only: a linear input layer of this width before the recurrent stack (0: none);
    # input standardisation (frame_data.py); stream: the sequences end to end as one continuous stream,
    # cut into batch_size streams walked bptt frames at a time with the state carried (regression)
    projection_size: int = option(
        0, "frame tasks: a linear input layer of this width before the recurrent stack (0: none)")
    standardize: Literal["none", "global", "sequence"] = option(
        "none", "frame tasks: standardise the inputs per feature, by each sequence's own mean and std "
                "(sequence, as the audio->articulation seed), by the training frames' (global), or not")
    stream: bool = option(
        False, "regression: the sequences end to end as one continuous stream, cut into --batch-size streams "
               "walked --bptt frames at a time with the state carried (builtin:sin-cos always is)")


AnyTrainConfig = TrainConfig | FrameTrainConfig
_BY_TASK: dict[str, type] = {"lm": TrainConfig, "regression": FrameTrainConfig, "classification": FrameTrainConfig}


def config_class(task: str) -> type:
    if task not in _BY_TASK:
        raise ValueError(f"task must be one of {', '.join(_BY_TASK)} (got {task!r})")
    return _BY_TASK[task]


def task_fields(task: str) -> frozenset[str]:
    return frozenset(f.name for f in fields(config_class(task)))


def check_fields(task: str, names, show: Callable[[str], str] = str) -> None:
    """A ValueError naming the settings among `names` that `task` does not have (`show`: how to name
    one, e.g. as its flag) and the task they belong to."""
    foreign = [k for k in names if k not in task_fields(task)]
    if foreign:
        where = " or ".join(t for t in _BY_TASK if all(k in task_fields(t) for k in foreign))
        raise ValueError(f"{', '.join(map(show, foreign))} appl{'y' if len(foreign) > 1 else 'ies'} to --task "
                         f"{where}, not {'--task ' if show is not str else ''}{task}")


def for_task(cfg: AnyTrainConfig, task: str, **overrides) -> AnyTrainConfig:
    """`cfg` as `task`'s config type with `overrides`: the settings every task shares carry over, a
    task's own come from its type's defaults. A setting the task does not have is a ValueError
    naming it and the tasks it applies to."""
    cls = config_class(task)
    mine = task_fields(task)
    check_fields(task, overrides)
    shared = {f.name: getattr(cfg, f.name) for f in fields(RunConfig)}
    own = {k: getattr(cfg, k) for k in mine - shared.keys() if hasattr(cfg, k)}
    return cls(**{**shared, **own, **overrides, "task": task})


def config_from_dict(d: dict) -> AnyTrainConfig:
    """A saved config (a checkpoint's, config.json's), written by this or an older version whose
    TrainConfig held every task's fields: the task's type, with the fields it has."""
    task = d.get("task", "lm")
    mine = task_fields(task)
    return config_class(task)(**{k: v for k, v in d.items() if k in mine})


# Zaremba et al. 2014 ("Recurrent Neural Network Regularization"), as TensorFlow's ptb_word_lm
# configures them: max_epoch = epochs at full lr, max_max_epoch = total epochs.
PRESETS: dict[str, AnyTrainConfig] = {
    "ptb-small": TrainConfig(level="word", embedding_size=200, hidden_size=200, num_layers=2,
                             dropout=0.0, init_scale=0.1, batch_size=20, bptt=20, epochs=13,
                             optimizer="sgd", lr=1.0, lr_decay=0.5, decay_after=4, clip_norm=5.0),
    "ptb-medium": TrainConfig(level="word", embedding_size=650, hidden_size=650, num_layers=2,
                              dropout=0.5, init_scale=0.05, batch_size=20, bptt=35, epochs=39,
                              optimizer="sgd", lr=1.0, lr_decay=0.8, decay_after=6, clip_norm=5.0),
    "ptb-large": TrainConfig(level="word", embedding_size=1500, hidden_size=1500, num_layers=2,
                             dropout=0.65, init_scale=0.04, batch_size=20, bptt=35, epochs=55,
                             optimizer="sgd", lr=1.0, lr_decay=1 / 1.15, decay_after=14, clip_norm=10.0),
    # The Anna Karenina char-RNN tutorial: 2 x 512, 100 steps x 100 sequences, Adam 1e-3, keep 0.5.
    "char-rnn": TrainConfig(level="char", embedding_size=128, hidden_size=512, num_layers=2,
                            dropout=0.5, batch_size=100, bptt=100, epochs=20, optimizer="adam",
                            lr=1e-3, clip_norm=5.0, loss_sum_over_time=False),
    # Small and fast: the demo (a minute or two on 2 cores) and tests.
    "tiny": TrainConfig(level="char", embedding_size=64, hidden_size=128, num_layers=2,
                        dropout=0.0, batch_size=32, bptt=64, epochs=1, optimizer="adam", lr=3e-3,
                        clip_norm=5.0, log_interval=20, loss_sum_over_time=False),
    # The sine->cosine regression tutorial: linear 1 -> 10, one LSTM of 10, linear 10 -> 1; 50 streams
    # of 20 steps, Adam 0.006. Its 200 updates (2 epochs of builtin:sin-cos) leave one seed in five
    # at test MSE 0.17; 500 bring all five to 0.006-0.013 (var(cos) = 0.5), in a few seconds.
    "sin-cos": FrameTrainConfig(task="regression", projection_size=10, hidden_size=10, num_layers=1,
                                batch_size=50, bptt=20, eval_batch_size=10, epochs=5, optimizer="adam",
                                lr=0.006, clip_norm=5.0, log_interval=20, loss_sum_over_time=False),
    # The row-by-row MNIST classifier tutorial: linear 28 -> 128, one LSTM of 128, the last step's
    # output -> 10 classes; 128 images a batch, Adam. Sized for builtin:digits (8 rows of 8): dropout
    # 0.2 on the projection and the head, 40 epochs (~1,300 training images); MNIST needs fewer epochs.
    "row-digits": FrameTrainConfig(task="classification", projection_size=128, hidden_size=128, num_layers=1,
                                   dropout=0.2, batch_size=128, eval_batch_size=256, epochs=40, optimizer="adam",
                                   lr=3e-3, clip_norm=5.0, log_interval=10, loss_sum_over_time=False),
}


def preset(name: str, **overrides) -> AnyTrainConfig:
    """A named preset with `overrides` (None: keep the preset's); `task=` makes it that task's type."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    base = PRESETS[name]
    return for_task(base, given.pop("task", base.task), **given)
