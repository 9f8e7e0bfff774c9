"""The benchmarked model: random weights in a preset's shape, logits shaped like a trained model's
(or a trained checkpoint), exported to a bundle in the work dir."""
from __future__ import annotations

import string
from pathlib import Path

from lstmgen.tools.bench.config import TARGET_ENTROPY, WORD_LEVEL_FROM, BenchConfig


def bench_vocab(size: int):
    """A char vocabulary of printable symbols, or (size >= WORD_LEVEL_FROM) a word vocabulary
    with <unk> and <eos>, so any prompt encodes."""
    from lstmgen.vocab import EOS, UNK, Vocab

    if size < WORD_LEVEL_FROM:
        symbols = (" \n" + string.ascii_letters + string.punctuation + string.digits)[:size]
        return Vocab("char", tuple(sorted(symbols)))
    common = ["the", "of", "and", "to", "a", "in", "is", "that", "it", "was"]
    words = [EOS, UNK] + common + [f"w{i}" for i in range(size - 2 - len(common))]
    return Vocab("word", tuple(words))


def mean_entropy(logits) -> float:
    """Mean entropy (nats) of softmax over the last axis; logits a torch tensor [N, V]."""
    import torch

    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def shape_logits(model, vocab_size: int, target: float) -> tuple[float, float]:
    """Scale the output layer so the mean entropy of the model's next-token distributions over a
    random token stream is `target` nats; returns (scale, entropy reached)."""
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (64, 16), generator=g)  # [T, B]
    with torch.no_grad():
        y, _ = model(tokens, model.init_state(16))  # [T, B, V]
        y = y.reshape(-1, vocab_size)
        bias = model.head.bias.detach().clone()
        base = y - bias  # the head's matmul part; logits = s * base + s * bias
        lo, hi = 1e-3, 1e3
        for _ in range(60):  # entropy falls as the scale grows: bisection in log space
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if mean_entropy(mid * (base + bias)) > target else (lo, mid)
        scale = (lo * hi) ** 0.5
        model.head.weight.mul_(scale)
        model.head.bias.mul_(scale)
    return scale, mean_entropy(scale * (base + bias))


def make_bundle(cfg: BenchConfig, work: Path):
    """-> (checkpoint, bundle folder, the entropy the logits were shaped to or None for a checkpoint)."""
    import torch

    from lstmgen.export.bundle import export_bundle
    from lstmgen.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from lstmgen.train.config import preset
    from lstmgen.train.model import RecurrentLM

    entropy = None
    if cfg.checkpoint:
        ckpt = load_checkpoint(cfg.checkpoint)
    else:
        vocab = bench_vocab(cfg.vocab_size)
        tc = preset(cfg.preset)
        torch.manual_seed(0)
        model = RecurrentLM(tc.model_config(len(vocab))).eval()
        target = cfg.entropy if cfg.entropy is not None else TARGET_ENTROPY[vocab.level]
        scale, entropy = shape_logits(model, len(vocab), target)
        ckpt = Checkpoint(tc.model_config(len(vocab)), tc, vocab, model.state_dict(),
                          corpus={"source": f"random weights, {cfg.preset} shape, output layer x{scale:.3g} "
                                            f"for {entropy:.2f} nats/token"})
        save_checkpoint(ckpt, work / "model.pt")
    path = cfg.checkpoint or work / "model.pt"
    export_bundle(path, work / "bundle", int8=cfg.int8)
    return ckpt, work / "bundle", entropy
