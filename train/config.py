"""Typed configuration: the model's shape and the training run, plus the named presets."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    embedding_size: int = 128
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.0
    tie_weights: bool = False
    init_scale: float = 0.0  # > 0: uniform init in [-s, s] (Zaremba); 0: PyTorch defaults
    # nn.LSTM or nn.GRU; checkpoints written before the field existed load as "lstm"
    cell: Literal["lstm", "gru"] = "lstm"


@dataclass(frozen=True)
class TrainConfig:
    # lm: a language model on text; regression / classification: a frame model on float sequences
    # (train/frames.py, train/frame_model.py, train/frame_trainer.py)
    task: Literal["lm", "regression", "classification"] = "lm"
    cell: Literal["lstm", "gru"] = "lstm"
    # model shape (vocab_size comes from the corpus)
    embedding_size: int = 128
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.0
    tie_weights: bool = False
    init_scale: float = 0.0
    # truncated BPTT over `batch_size` contiguous streams, `bptt` steps per update
    batch_size: int = 20
    bptt: int = 35
    epochs: int = 10  # 0: no epoch limit (max_steps or max_seconds ends the run)
    max_steps: int = 0  # > 0: stop after this many updates (demo/tests)
    # > 0: this session's wall time, the closing validation and saves included (budget.py); the CLI
    # sets epochs=0 when --max-seconds comes without --epochs, so the time alone says how long
    max_seconds: float = 0.0
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1.0
    # Zaremba decay: lr *= lr_decay every epoch once epoch > decay_after (epochs counted from 1)
    lr_decay: float = 1.0
    decay_after: int = 0
    weight_decay: float = 0.0
    clip_norm: float = 5.0  # global gradient-norm clip
    # The gradient is of the loss summed over the bptt steps and averaged over the batch, as in
    # Zaremba's code and TF ptb_word_lm (their lr=1.0 assumes it); False: averaged over both, as
    # pytorch/examples does (it uses lr=20 instead) and as the TF char-RNN tutorials do with Adam.
    loss_sum_over_time: bool = True
    level: Literal["char", "word"] = "char"
    # word level: words used fewer than min_count times in the training text, or beyond the
    # max_vocab most frequent (the vocabulary counting <eos> and <unk>; 0: no limit), become <unk>
    min_count: int = 1
    max_vocab: int = 0
    valid_fraction: float = 0.1  # used when the corpus has no separate valid file
    seed: int = 1234
    eval_batch_size: int = 10
    log_interval: int = 50
    save_every: int = 1000  # > 0: also write last.pt every this many updates (resume loses little)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    # bf16 autocast of the forward pass on CUDA (weights, optimizer and loss stay fp32); no-op on CPU
    amp: Literal["off", "bf16"] = "off"
    # frame tasks only: a linear input layer of this width before the recurrent stack (0: none);
    # input standardisation (frames.py); stream: the sequences end to end as one continuous stream,
    # cut into batch_size streams walked bptt frames at a time with the state carried (regression)
    projection_size: int = 0
    standardize: Literal["none", "global", "sequence"] = "none"
    stream: bool = False

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size, self.embedding_size, self.hidden_size, self.num_layers,
                           self.dropout, self.tie_weights, self.init_scale, self.cell)


# Zaremba et al. 2014 ("Recurrent Neural Network Regularization"), as TensorFlow's ptb_word_lm
# configures them: max_epoch = epochs at full lr, max_max_epoch = total epochs.
PRESETS: dict[str, TrainConfig] = {
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
    "sin-cos": TrainConfig(task="regression", projection_size=10, hidden_size=10, num_layers=1,
                           batch_size=50, bptt=20, eval_batch_size=10, epochs=5, optimizer="adam",
                           lr=0.006, clip_norm=5.0, log_interval=20, loss_sum_over_time=False),
    # The row-by-row MNIST classifier tutorial: linear 28 -> 128, one LSTM of 128, the last step's
    # output -> 10 classes; 128 images a batch, Adam. Sized for builtin:digits (8 rows of 8): dropout
    # 0.2 on the projection and the head, 40 epochs (~1,300 training images); MNIST needs fewer epochs.
    "row-digits": TrainConfig(task="classification", projection_size=128, hidden_size=128, num_layers=1,
                              dropout=0.2, batch_size=128, eval_batch_size=256, epochs=40, optimizer="adam",
                              lr=3e-3, clip_norm=5.0, log_interval=10, loss_sum_over_time=False),
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
