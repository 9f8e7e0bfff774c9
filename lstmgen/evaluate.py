"""`lstmgen eval`: a bundle's loss on a text file, through ONNX Runtime (no torch).

The file is encoded as training encodes a held-out split (train/data.py `encode_split`: words as
`line.split() + [<eos>]` per line, unknown words -> <unk> when the vocabulary has it; chars one by
one, unknown chars an error), cut into `batch_size` contiguous streams like `batchify`, and stepped
through the single-step graph with (h, c) carried over the whole file. That is what the trainer's
`evaluate` computes with the same batch size: its bptt chunks carry the state too, so they change
only the float rounding.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lstmgen.bundle import BundleError
from lstmgen.vocab import EOS, Vocab


class EvalError(Exception):
    """The text cannot be evaluated with this bundle; the message names the file and the problem."""


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 10  # B contiguous streams (the trainer's eval_batch_size)
    bptt: int = 35  # steps per chunk of float64 loss work and progress; the figure does not depend on it
    device: str = "cpu"  # cpu | cuda | auto (ONNX Runtime execution provider)
    threads: int = 0  # ORT intra-op threads; 0: its default
    progress: bool = True


@dataclass(frozen=True)
class EvalResult:
    bundle: str
    data: str
    level: str
    tokens: int  # tokens predicted: (N - 1) * B
    loss: float  # mean nats per token
    seconds: float
    unk_mapped: int  # word level: out-of-vocabulary words counted as <unk>
    batch_size: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def figures(self) -> dict[str, float]:
        """Perplexity for words, bits per char for chars (the trainer's `figures`)."""
        if self.level == "word":
            return {"ppl": math.exp(min(self.loss, 700.0))}
        return {"bpc": self.loss / math.log(2)}

    def to_dict(self) -> dict:
        return {**asdict(self), **self.figures(), "tokens_per_s": self.tokens_per_s}

    def line(self) -> str:
        fig = (f"ppl {self.figures()['ppl']:.3f}" if self.level == "word"
               else f"{self.figures()['bpc']:.4f} bpc")
        unk = f" ({self.unk_mapped:,} OOV words as <unk>)" if self.unk_mapped else ""
        return (f"{self.data}: {self.tokens:,} tokens{unk} | loss {self.loss:.4f} nats/token | {fig} | "
                f"{self.tokens_per_s:,.0f} tokens/s ({self.seconds:.1f}s, {self.batch_size} streams)")


def read_text(path: str | Path) -> str:
    """UTF-8 with universal newlines and no BOM, exactly as train/data.py reads a corpus."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{p}: file not found" if not p.exists() else f"{p}: not a regular file")
    try:
        with open(p, encoding="utf-8-sig", newline=None) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise EvalError(f"{p}: not UTF-8 text (bad byte {e.object[e.start:e.start + 1]!r} at offset {e.start})") from e
    if not text.strip():
        raise EvalError(f"{p}: file is empty")
    return text


def encode_text(vocab: Vocab, text: str, source: str) -> tuple[np.ndarray, int]:
    """(ids int64 [N], how many words became <unk>); unknown symbols that cannot be mapped raise."""
    stoi = vocab.stoi
    if vocab.level == "char":
        unknown = sorted({ch for ch in set(text) if ch not in stoi})
        if unknown:
            raise EvalError(f"{source}: {len(unknown)} character(s) not in the bundle's vocabulary: "
                            f"{', '.join(repr(c) for c in unknown[:10])}"
                            + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
        return np.fromiter((stoi[ch] for ch in text), np.int64, len(text)), 0
    unk, eos = vocab.unk_id, stoi[EOS]
    ids: list[int] = []
    unknown: list[str] = []
    mapped = 0
    for line in text.splitlines():  # PTB: line.split() + [<eos>] per line
        for w in line.split():
            i = stoi.get(w)
            if i is None:
                if unk is None:
                    unknown.append(w)
                    continue
                i, mapped = unk, mapped + 1
            ids.append(i)
        ids.append(eos)
    if unknown:
        shown = list(dict.fromkeys(unknown))
        raise EvalError(f"{source}: {len(shown)} word(s) not in the bundle's vocabulary, which has no <unk> "
                        f"to map them to: {', '.join(repr(w) for w in shown[:10])}"
                        + (f" and {len(shown) - 10} more" if len(shown) > 10 else ""))
    return np.asarray(ids, np.int64), mapped


def batchify(ids: np.ndarray, batch_size: int, source: str) -> np.ndarray:
    """[N_total] -> [N, B]: column b is the b-th contiguous slice (train/data.py batchify)."""
    n = ids.shape[0] // batch_size
    if n < 2:
        raise EvalError(f"{source}: {ids.shape[0]} tokens are too few for {batch_size} streams "
                        f"(need at least {2 * batch_size})")
    return np.ascontiguousarray(ids[: n * batch_size].reshape(batch_size, n).T)  # [N, B]


def nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed -log softmax(logits)[target] in float64; logits [K, V], targets [K]."""
    x = logits.astype(np.float64)  # [K, V]
    m = x.max(axis=1, keepdims=True)  # [K, 1]
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))  # [K]
    return float((lse - x[np.arange(x.shape[0]), targets]).sum())


def evaluate_bundle(bundle: str | Path, data: str | Path, cfg: EvalConfig = EvalConfig()) -> EvalResult:
    """Loss of the bundle's model on the text file `data`. Raises EvalError, BundleError, RuntimeError."""
    from tqdm import tqdm

    from lstmgen.serve.engine import Engine, EngineConfig

    if cfg.batch_size < 1 or cfg.bptt < 1:
        raise EvalError(f"batch_size and bptt must be >= 1 (got {cfg.batch_size}, {cfg.bptt})")
    engine = Engine(bundle, EngineConfig(device=cfg.device, intra_op_threads=cfg.threads))
    ids, mapped = encode_text(engine.manifest.vocab, read_text(data), str(data))
    source = batchify(ids, cfg.batch_size, str(data))  # [N, B]
    n_steps = source.shape[0] - 1
    h, c = engine.zeros(cfg.batch_size)  # [L, B, H]
    total = 0.0
    t0 = time.perf_counter()
    with tqdm(total=n_steps, disable=not cfg.progress, unit="step", leave=False, file=sys.stderr) as bar:
        for i in range(0, n_steps, cfg.bptt):
            t_len = min(cfg.bptt, n_steps - i)
            chunk = []
            for t in range(i, i + t_len):
                logits, h, c = engine.step(source[t], h, c)  # [B, V]; the state runs through the file
                chunk.append(logits)
            total += nll_sum(np.concatenate(chunk), source[i + 1:i + 1 + t_len].reshape(-1))
            bar.update(t_len)
    seconds = time.perf_counter() - t0
    tokens = n_steps * cfg.batch_size
    return EvalResult(str(bundle), str(data), engine.manifest.level, tokens, total / tokens, seconds,
                      mapped, cfg.batch_size)


# -- the subcommand --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Loss of a bundle on a text file with ONNX Runtime: tokens, nats/token, perplexity (word) or "
        "bits per char (char), and tokens/s. The file is encoded as training encodes held-out text "
        "and read as --batch-size contiguous streams with the LSTM state carried through, which "
        "matches `lstmgen train`'s validation/test figure at the same batch size.")
    parser.add_argument("bundle", metavar="BUNDLE_DIR", help="a bundle folder made by `lstmgen export`")
    parser.add_argument("--data", required=True, metavar="FILE", default=argparse.SUPPRESS,
                        help="text file, e.g. ptb.test.txt")
    parser.add_argument("--batch-size", type=int, default=10, help="contiguous streams (the trainer's eval batch)")
    parser.add_argument("--bptt", type=int, default=35,
                        help="steps per chunk of loss computation; the state is carried, so the figure does not depend on it")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="ONNX Runtime device")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--json", metavar="FILE", default=argparse.SUPPRESS, help="also write the figures as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    cfg = EvalConfig(args.batch_size, args.bptt, args.device, args.threads, not args.no_progress)
    try:
        result = evaluate_bundle(args.bundle, args.data, cfg)
    except (EvalError, BundleError, RuntimeError, ValueError) as e:
        print(f"lstmgen eval: error: {e}", file=sys.stderr)
        return 2
    print(result.line())
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0
