"""The language-model task of the training loop (train/loop.py): truncated BPTT over B contiguous
streams of a corpus's token ids (pytorch/examples word_language_model, Zaremba et al. 2014), the
state carried across batches; figures in nats per token with perplexity (words) or bits per char.
Under torchrun each process trains its block of the B streams."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from lstmgen.text import figure_text, figures
from lstmgen.train.checkpoint import Checkpoint
from lstmgen.train.config import TrainConfig
from lstmgen.train.data import Corpus, DataError, batchify, get_batch, load_corpus, num_batches
from lstmgen.train.distributed import DistInfo
from lstmgen.train.task import State, Step, Validation
from lstmgen.train.model import RecurrentLM
from lstmgen.train.preview import TEMPERATURE, sample_text
from lstmgen.train.setup import TrainError


@torch.no_grad()
def evaluate_sum(model: RecurrentLM, source: torch.Tensor, bptt: int, *, chunks: int | None = None,
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


def evaluate(model: RecurrentLM, source: torch.Tensor, bptt: int) -> float:
    """Mean nats per token over a whole [N, B] stream, the state carried across batches."""
    total, count = evaluate_sum(model, source, bptt)
    return total / count


def _streams(ids: torch.Tensor | None, batch_size: int, split: str, device: torch.device) -> torch.Tensor | None:
    if ids is None:
        return None
    try:
        return batchify(ids, batch_size).to(device)  # [N, B]
    except DataError as e:
        raise DataError(f"{split} split: {e}") from None


def load_text_task(cfg: TrainConfig, data: str, cache: Path, device: torch.device, dist: DistInfo) -> "TextTask":
    corpus = load_corpus(data, cfg.level, cfg.valid_fraction, cache, min_count=cfg.min_count, max_vocab=cfg.max_vocab)
    return TextTask(cfg, corpus, device, dist)


class TextTask:
    unit = "tok"
    test_on_stop = False  # a test pass over PTB's test split would overrun a time limit

    def __init__(self, cfg: TrainConfig, corpus: Corpus, device: torch.device, dist: DistInfo):
        self.cfg, self.corpus, self.device, self.dist = cfg, corpus, device, dist
        self.kind = cfg.level
        self.model = RecurrentLM(cfg.model_config(len(corpus.vocab))).to(device)
        self.shard = dist.shard(cfg.batch_size)  # this rank's streams of the global batch
        self.train = _streams(corpus.train, cfg.batch_size, "train", device)[:, self.shard].contiguous()  # [N, b]
        self.splits = {"valid": _streams(corpus.valid, cfg.eval_batch_size, "valid", device)}  # [Nv, Bv]
        self.n_batches = num_batches(self.train, cfg.bptt)

    def check_prior(self, prior: Checkpoint, data: str, last: Path) -> None:
        if not isinstance(prior, Checkpoint):
            raise TrainError(f"{last}: holds a frame model, not a language model")
        if prior.vocab != self.corpus.vocab or prior.corpus.get("sha256", self.corpus.source["sha256"]) \
                != self.corpus.source["sha256"]:
            raise TrainError(f"{data}: the training text differs from the one {last} was trained on")
        if prior.corpus.get("tokens", self.corpus.source["tokens"]) != self.corpus.source["tokens"]:
            # the same text read into other tokens (an earlier version split word-level lines on
            # more characters than "\n"): the batches would not continue the run's
            raise TrainError(f"{data}: this version reads the text into {self.corpus.source['tokens']} tokens, "
                             f"{last} was trained on {prior.corpus['tokens']}; start the run over (--overwrite)")

    @property
    def source(self) -> dict:
        return self.corpus.source

    def describe(self, data: str) -> str:
        c = self.corpus
        return (f"data: {data} ({c.source['layout']} layout; tokens "
                + ", ".join(f"{k} {v:,}" for k, v in c.source["tokens"].items()) + f"; vocab {len(c.vocab)})")

    # -- training ---------------------------------------------------------------------------------
    def zero_state(self) -> State:
        return self.model.init_state(self.train.size(1), self.device)

    def batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(start, self.n_batches):
            yield get_batch(self.train, k * self.cfg.bptt, self.cfg.bptt)  # [T, b] each

    def forward(self, net, batch, state: State) -> Step:
        x, y = batch  # [T, b]
        logits, state = net(x, state)  # [T, b, V]
        # mean over this rank's equal shard: DDP's average over ranks is the global mean
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        return Step(loss, y.numel(), y.numel(), state, x.size(0) if self.cfg.loss_sum_over_time else 1.0)

    # -- scoring ----------------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        if split == "test" and "test" not in self.splits and self.corpus.test is not None:
            self.splits["test"] = _streams(self.corpus.test, self.cfg.eval_batch_size, "test", self.device)
        return self.splits.get(split) is not None

    def valid_chunks(self) -> int:
        return num_batches(self.splits["valid"], self.cfg.bptt)

    def score(self, model, split: str, chunks: int | None, stop) -> dict[str, float]:
        """This rank's block of the split's streams: nats summed and tokens, with what a whole
        (or the planned) pass reads, for the loop to sum over ranks."""
        data = self.splits[split]
        mine = data[:, self.dist.shard(data.size(1))]
        total, count = evaluate_sum(model, mine, self.cfg.bptt, chunks=chunks, stop=stop)
        rows = data.size(0) - 1  # tokens predicted per stream
        planned = min(rows, chunks * self.cfg.bptt if chunks is not None else rows) * mine.size(1)
        chunks_read = -(-count // max(self.cfg.bptt * mine.size(1), 1))
        return {"loss": total, "count": count, "whole": rows * mine.size(1), "planned": planned,
                "chunks": chunks_read}

    def figures(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss"] / sums["count"]
        return {"loss": loss, **figures(self.cfg.level, loss)}

    def describe_val(self, val: Validation, note: str) -> str:
        return f"val loss {val.loss:.4f} ({figure_text(self.cfg.level, val.loss)}{note})"

    # -- checkpoints ------------------------------------------------------------------------------
    def metrics(self) -> dict:
        c = self.corpus
        return {"level": self.cfg.level, "train_tokens": c.train.numel(), "valid_tokens": c.valid.numel(),
                "test_tokens": c.test.numel() if c.test is not None else 0}

    def checkpoint(self, state_dict: dict, progress: dict, metrics: dict) -> Checkpoint:
        return Checkpoint(self.model.cfg, self.cfg, self.corpus.vocab, state_dict, progress, metrics,
                          dict(self.corpus.source))


    def preview(self, step: int) -> tuple[str, str]:
        text = sample_text(self.model, self.corpus.vocab, seed=self.cfg.seed + step)
        return f"temperature {TEMPERATURE}", text
