"""`lstmgen eval`: a bundle's loss on a text file, through ONNX Runtime (no torch).

The file is encoded as training encodes a held-out split (train/data.py `encode_split`: words as
`line.split() + [<eos>]` per line, unknown words -> <unk> when the vocabulary has it; chars one by
one, unknown chars an error unless skipped), cut into `batch_size` contiguous streams like `batchify`, and stepped
through the single-step graph with (h, c) carried over the whole file. That is what the trainer's
`evaluate` computes with the same batch size: its bptt chunks carry the state too, so they change
only the float rounding.

Never the text the model was trained on: the bundle's provenance names its training file (path and
sha256). That file, or a corpus name without a test split (Tiny Shakespeare), is scored only on the
tail training held out for validation, at the trainer's own cut; any other file is scored whole.
The result says which part was scored (`part_to_score`).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lstmgen import console
from lstmgen.console import Console, duration
from lstmgen.errors import UserError
from lstmgen.vocab import EOS, Vocab


# named for both fronts: the flag of `lstmgen eval` and the field of EvalConfig
_SKIP_HINT = "; --skip-unknown (EvalConfig.skip_unknown) drops them"


class EvalError(UserError):
    """The text cannot be evaluated with this bundle; the message names the file and the problem."""


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 10  # B contiguous streams (the trainer's eval_batch_size)
    bptt: int = 35  # steps per chunk of float64 loss work and progress; the figure does not depend on it
    device: str = "auto"  # auto | cpu | cuda (ONNX Runtime execution provider; auto: CUDA when there)
    threads: int = 0  # ORT intra-op threads; 0: its default
    progress: bool = True
    skip_unknown: bool = False  # drop symbols the vocabulary cannot encode (and <unk> cannot stand for)


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
    skipped: int = 0  # with skip_unknown: symbols dropped from the text
    scored: str = ""  # which part of the file was scored, for people (Scored.what)
    span: tuple[int, int] | None = None  # chars [start, end) of the file's text that were scored

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
        unk += f" ({self.skipped:,} unknown symbols skipped)" if self.skipped else ""
        part = f" scored {self.scored} |" if self.scored else ""
        return (f"{self.data}:{part} {self.tokens:,} tokens{unk} | loss {self.loss:.4f} nats/token | {fig} | "
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


@dataclass(frozen=True)
class Scored:
    """The part of a file that is scored: chars [start, end) of its text, and in words which."""
    start: int
    end: int
    what: str


def part_to_score(path: Path, text: str, level: str, provenance: dict, named=None) -> Scored:
    """Which part of `text` (the file at `path`) to score so that no training text is: the file
    the provenance names as the training text -> the validation tail training carved off it (the
    trainer's own cut, `held_out_start`), or an error when training held none of it out; a corpus
    name without a test split (`named`, a datasets.Corpus) -> that tail even when the provenance
    names no file; any other file -> all of it. Raises EvalError."""
    from lstmgen.datasets import held_out_start

    corpus = provenance.get("corpus") or {}
    files = {s: f for s, f in (corpus.get("files") or {}).items() if isinstance(f, dict)}
    split = _split_of(path, files)
    name = path.name
    if split in ("valid", "test"):
        which = "validation" if split == "valid" else "test"
        return Scored(0, len(text), f"the whole of {name}, the {which} split training read beside its training text")
    if split is None and named is not None and named.has_test_split:
        return Scored(0, len(text), f"the whole of {name}, the test split of {named.name}")
    fraction = corpus.get("valid_fraction")
    if split == "train":
        if fraction is None:  # a layout with its own validation file: the training file is all training text
            held = ", ".join(f"{s} {files[s].get('path')}" for s in ("valid", "test") if s in files)
            raise EvalError(f"{path}: the text this bundle was trained on (its sha256 is the training file's in "
                            f"the bundle's provenance) and training held none of it out; score its held-out "
                            f"split{'s: ' + held if held else ' instead'}")
        how = "as training held it out"
    elif named is not None and not files:  # the provenance cannot tell: assume the model saw this corpus
        fraction = (provenance.get("train_config") or {}).get("valid_fraction", 0.1)
        how = ("as training holds it out (the bundle's provenance does not name its training text, and "
               f"{named.name} has no test split)")
    elif files.get("train"):
        return Scored(0, len(text), f"the whole of {name}, which is not the bundle's training text "
                                    "(its sha256 differs from the training file's in the bundle's provenance)")
    else:
        return Scored(0, len(text), f"the whole of {name} (the bundle's provenance does not name its training "
                                    "text, so whether the model was trained on it cannot be checked)")
    start = held_out_start(text, level, fraction)
    return Scored(start, len(text), f"the validation tail of {name}, chars {start:,}..{len(text):,} "
                                    f"({fraction:.0%}), {how}")


def _split_of(path: Path, files: dict[str, dict]) -> str | None:
    """The split of the training corpus that `path` is ("train", "valid", "test"), by path, else
    by sha256; None when the provenance names none of them."""
    from lstmgen.datasets import sha256_of

    real = str(path.resolve())
    for split, f in files.items():
        if f.get("path") == real:
            return split
    shas = {f.get("sha256"): split for split, f in files.items() if f.get("sha256")}
    return shas.get(sha256_of(path)) if shas else None


def encode_text(vocab: Vocab, text: str, source: str, skip_unknown: bool = False) -> tuple[np.ndarray, int, int]:
    """(ids int64 [N], how many words became <unk>, how many symbols were skipped); unknown
    symbols that cannot be mapped raise, or with skip_unknown are dropped."""
    stoi = vocab.stoi
    if vocab.level == "char":
        unknown = sorted({ch for ch in set(text) if ch not in stoi})
        if unknown and not skip_unknown:
            raise EvalError(f"{source}: {len(unknown)} character(s) not in the bundle's vocabulary: "
                            f"{', '.join(repr(c) for c in unknown[:10])}"
                            + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
                            + _SKIP_HINT)
        ids = [stoi[ch] for ch in text if ch in stoi]
        return np.asarray(ids, np.int64), 0, len(text) - len(ids)
    unk, eos = vocab.unk_id, stoi[EOS]
    ids: list[int] = []
    unknown: list[str] = []
    mapped = 0
    for line in text.splitlines():  # PTB: line.split() + [<eos>] per line
        for w in line.split():
            i = stoi.get(w)
            if i is None:
                if unk is None:
                    unknown.append(w)  # skipped, or an error below
                    continue
                i, mapped = unk, mapped + 1
            ids.append(i)
        ids.append(eos)
    if unknown and not skip_unknown:
        shown = list(dict.fromkeys(unknown))
        raise EvalError(f"{source}: {len(shown)} word(s) not in the bundle's vocabulary, which has no <unk> "
                        f"to map them to: {', '.join(repr(w) for w in shown[:10])}"
                        + (f" and {len(shown) - 10} more" if len(shown) > 10 else "") + _SKIP_HINT)
    return np.asarray(ids, np.int64), mapped, len(unknown)


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


def evaluate_bundle(bundle: str | Path, data: str | Path, cfg: EvalConfig = EvalConfig(),
                    display: Console | None = None) -> EvalResult:
    """Loss of the bundle's model on the text file `data`, or on corpus `data` by name (its test split,
    else the tail training held out), never on its training text (`part_to_score`). Raises a
    UserError (EvalError, BundleError, DatasetError, ...). `display` shows the progress (default: a
    bar on a terminal, plain lines elsewhere)."""
    from lstmgen.datasets import CORPORA, resolve
    from lstmgen.serve.engine import Engine, EngineConfig

    display = display or Console(progress=cfg.progress)
    if not cfg.progress:
        display = Console(display.fmt, quiet=display.quiet, progress=False, out=display.out, err=display.err)

    if cfg.batch_size < 1 or cfg.bptt < 1:
        raise EvalError(f"batch_size and bptt must be >= 1 (got {cfg.batch_size}, {cfg.bptt})")
    engine = Engine(bundle, EngineConfig(device=cfg.device, intra_op_threads=cfg.threads))
    named = CORPORA.get(str(data)) if not Path(data).exists() else None
    data = resolve(str(data), for_eval=True, log=lambda msg: print(msg, file=display.err))
    text = read_text(data)
    part = part_to_score(Path(data), text, engine.manifest.level, engine.manifest.provenance, named)
    display.event(f"{data}: scoring {part.what}", scored=part.what, span=[part.start, part.end])
    where = f"{data} ({part.what})" if part.start else str(data)
    ids, mapped, skipped = encode_text(engine.manifest.vocab, text[part.start:part.end], where, cfg.skip_unknown)
    source = batchify(ids, cfg.batch_size, where)  # [N, B]
    n_steps = source.shape[0] - 1
    state = engine.zeros(cfg.batch_size)  # each [L, B, H]
    total = 0.0
    t0 = time.perf_counter()
    with display.progress_bar(total=n_steps, unit="step") as bar:
        for i in range(0, n_steps, cfg.bptt):
            t_len = min(cfg.bptt, n_steps - i)
            chunk = []
            for t in range(i, i + t_len):
                logits, state = engine.step(source[t], state)  # [B, V]; the state runs through the file
                chunk.append(logits)
            total += nll_sum(np.concatenate(chunk), source[i + 1:i + 1 + t_len].reshape(-1))
            bar.update(t_len)
            done, spent = i + t_len, time.perf_counter() - t0
            rate = done * cfg.batch_size / max(spent, 1e-9)
            eta = (n_steps - done) * spent / done
            display.progress(f"{done * cfg.batch_size:,}/{n_steps * cfg.batch_size:,} tokens ({done / n_steps:.0%}) | "
                             f"loss {total / (done * cfg.batch_size):.4f} | {rate:,.0f} tokens/s | ETA {duration(eta)}",
                             tokens=done * cfg.batch_size, total=n_steps * cfg.batch_size,
                             loss=total / (done * cfg.batch_size), tokens_per_s=rate, eta_s=round(eta, 1))
    seconds = time.perf_counter() - t0
    tokens = n_steps * cfg.batch_size
    return EvalResult(str(bundle), str(data), engine.manifest.level, tokens, total / tokens, seconds,
                      mapped, cfg.batch_size, skipped, part.what, (part.start, part.end))


# -- the subcommand --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Loss of a bundle on a text file with ONNX Runtime: tokens, nats/token, perplexity (word) or "
        "bits per char (char), and tokens/s. The file is encoded as training encodes held-out text "
        "and read as --batch-size contiguous streams with the LSTM state carried through, which "
        "matches `lstmgen train`'s validation/test figure at the same batch size.")
    parser.add_argument("bundle", metavar="BUNDLE_DIR", help="a bundle folder made by `lstmgen export`")
    parser.add_argument("--data", required=True, metavar="FILE", default=argparse.SUPPRESS,
                        help="text file, e.g. ptb.test.txt, or a corpus name (`lstmgen data list`): its test split, "
                             "or for a corpus of one file (tinyshakespeare) the tail training held out. The file "
                             "the bundle was trained on (its provenance: path or sha256) is scored only on that "
                             "held-out tail; the result says which part was scored")
    parser.add_argument("--batch-size", type=int, default=10, help="contiguous streams (the trainer's eval batch)")
    parser.add_argument("--bptt", type=int, default=35,
                        help="steps per chunk of loss computation; the state is carried, so the figure does not depend on it")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="ONNX Runtime device: auto = CUDA when onnxruntime-gpu finds a GPU, else CPU")
    parser.add_argument("--skip-unknown", action="store_true",
                        help="drop characters/words the bundle's vocabulary lacks (and <unk> cannot stand for) "
                             "instead of stopping with an error")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--json", metavar="FILE", default=argparse.SUPPRESS, help="also write the figures as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    console.add_arguments(parser, quiet_help="only the result line and warnings: no progress")


def run(args: argparse.Namespace) -> int:
    cfg = EvalConfig(args.batch_size, args.bptt, args.device, args.threads, not args.no_progress, args.skip_unknown)
    display = console.from_args(args)
    result = evaluate_bundle(args.bundle, args.data, cfg, display)  # a UserError exits 2 in lstmgen.cli
    display.result(result.line(), **result.to_dict())
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0
