"""Training throughput of `lstmgen train` against a plain PyTorch loop on the same model and batches.

    python -m lstmgen.train.throughput --preset ptb-small --data ptb --steps 200

The plain loop is pytorch/examples word_language_model's inner loop (detach the state, forward,
cross-entropy, backward, clip, SGD/Adam step) with nothing else; `lstmgen train` adds its progress
bar, logging windows, checkpoints and metrics. Both count training tokens per second over the same
number of updates (the trainer's own figure, metrics.csv tokens_per_s, leaves validation out). The
ratio says what the trainer's bookkeeping costs.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lstmgen.train.config import PRESETS, TrainConfig
from lstmgen.train.data import batchify, get_batch, load_corpus
from lstmgen.train.model import RecurrentLM
from lstmgen.train.setup import make_optimizer, resolve_device
from lstmgen.train.trainer import train


@dataclass(frozen=True)
class Throughput:
    trainer_tok_s: float
    plain_tok_s: float
    steps: int
    tokens_per_step: int

    @property
    def ratio(self) -> float:
        return self.trainer_tok_s / self.plain_tok_s


def plain_loop(cfg: TrainConfig, data: str, steps: int) -> float:
    """Tokens/s of the bare loop over the first `steps` batches (epochs wrap around)."""
    device = resolve_device(cfg.device)
    corpus = load_corpus(data, cfg.level, cfg.valid_fraction, min_count=cfg.min_count, max_vocab=cfg.max_vocab)
    torch.manual_seed(cfg.seed)
    model = RecurrentLM(cfg.model_config(len(corpus.vocab))).to(device).train()
    opt = make_optimizer(cfg, model.parameters())
    source = batchify(corpus.train, cfg.batch_size).to(device)  # [N, B]
    hidden = model.init_state(cfg.batch_size, device)  # [L, B, H] each
    n_batches = len(range(0, source.size(0) - 1, cfg.bptt))
    tokens = 0
    t0 = time.perf_counter()
    for k in range(steps):
        x, y = get_batch(source, (k % n_batches) * cfg.bptt, cfg.bptt)  # [T, B]
        hidden = tuple(t.detach() for t in hidden)
        logits, hidden = model(x, hidden)  # [T, B, V]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        (loss * x.size(0) if cfg.loss_sum_over_time else loss).backward()
        if cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        tokens += y.numel()
    loss.item()  # wait for the device
    return tokens / (time.perf_counter() - t0)


def trainer_run(cfg: TrainConfig, data: str, steps: int) -> float:
    """Tokens/s that `lstmgen train` itself reports for `steps` updates (validation excluded)."""
    with tempfile.TemporaryDirectory(prefix="lstmgen-throughput-") as tmp:
        run_cfg = replace(cfg, max_steps=steps, epochs=max(cfg.epochs, 10_000), save_every=0)
        train(run_cfg, data, Path(tmp) / "run", log=lambda s: None, progress_bar=False)
        rows = list(csv.DictReader(open(Path(tmp) / "run" / "metrics.csv")))
    # one row per validation (epoch ends and the stop): total updates over total training seconds
    steps_in = [float(r["step"]) - float(p["step"]) for r, p in zip(rows, [{"step": 0}] + rows)]
    seconds_per_token = sum(d / float(r["tokens_per_s"]) for d, r in zip(steps_in, rows))
    return sum(steps_in) / seconds_per_token


def measure(cfg: TrainConfig, data: str, steps: int, rounds: int = 1) -> Throughput:
    """Best of `rounds` alternating runs of each (a shared machine's noise only ever slows a run)."""
    plain = trainer = 0.0
    for _ in range(rounds):
        plain = max(plain, plain_loop(cfg, data, steps))
        trainer = max(trainer, trainer_run(cfg, data, steps))
    return Throughput(trainer, plain, steps, cfg.batch_size * cfg.bptt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstmgen.train.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(k for k, c in PRESETS.items() if c.task == "lm"), default="ptb-small")
    parser.add_argument("--data", required=True, help="corpus, as for `lstmgen train --data`")
    parser.add_argument("--steps", type=int, default=200, help="updates timed in each run")
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs of each; the best counts")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = replace(PRESETS[args.preset], device=args.device)
    print(f"{args.preset} on {args.device} ({torch.get_num_threads()} threads), {args.steps} updates of "
          f"{cfg.batch_size} x {cfg.bptt} tokens, best of {args.rounds}", flush=True)
    r = measure(cfg, args.data, args.steps, args.rounds)
    print(f"lstmgen train:      {r.trainer_tok_s:,.0f} tokens/s")
    print(f"plain PyTorch loop: {r.plain_tok_s:,.0f} tokens/s")
    print(f"ratio (lstmgen / plain): {r.ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(r), "ratio": r.ratio, "preset": args.preset,
                                               "device": args.device, "threads": torch.get_num_threads()},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
