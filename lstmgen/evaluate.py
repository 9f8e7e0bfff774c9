"""`lstmgen eval`: a bundle's loss on a text file, through ONNX Runtime (no torch).

The text goes through the pipeline training uses (lstmgen/text.py): read as training reads a corpus,
encoded as training encodes a held-out split (words as `line.split() + [<eos>]` per line, unknown
words -> <unk> when the vocabulary has it; other unknown symbols an error unless skipped), cut into
`batch_size` contiguous streams (`batchify`), and stepped through the single-step graph with (h, c)
carried over the whole file. That is what the trainer's `evaluate` computes with the same batch
size: its bptt chunks carry the state too, so they change only the float rounding.

Never the text the model was trained on: the bundle's provenance names its training file (path and
sha256). That file, or a corpus name without a test split (Tiny Shakespeare), is scored only on the
tail training held out for validation, at the trainer's own cut; any other file is scored whole.
Without a file, the bundle's recorded validation split (`Manifest.validation_split`, written at
export from what training read) is scored: the file found by its recorded path or corpus name and
checked by its sha256. The result says which part was scored (`part_to_score`, `recorded_part`).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lstmgen import config_args, console
from lstmgen.bundle import Manifest
from lstmgen.config_args import option
from lstmgen.console import Console, duration
from lstmgen.text import (Encoded, TextError, ValidationSplit, batchify, encode, figure_text, figures,
                          held_out_start, read_text, tail_words)
from lstmgen.vocab import UnknownTokensError, Vocab


# named for both fronts: the flag of `lstmgen eval` and the field of EvalConfig
_SKIP_HINT = "; --skip-unknown (EvalConfig.skip_unknown) drops them"


class EvalError(TextError):
    """The text cannot be evaluated with this bundle; the message names the file and the problem."""


@dataclass(frozen=True)
class EvalConfig:
    # B contiguous streams (the trainer's eval_batch_size)
    batch_size: int = option(10, "contiguous streams (the trainer's eval batch)")
    # steps per chunk of float64 loss work and progress; the figure does not depend on it
    bptt: int = option(35, "steps per chunk of loss computation; the state is carried, so the figure does not "
                           "depend on it")
    device: str = option("auto", "ONNX Runtime device: auto = CUDA when onnxruntime-gpu finds a GPU, else CPU",
                         choices=("auto", "cpu", "cuda"))
    threads: int = option(0, "ONNX Runtime intra-op threads (0: its default)")
    progress: bool = True  # --no-progress
    # drop symbols the vocabulary cannot encode (and <unk> cannot stand for)
    skip_unknown: bool = option(False, "drop characters/words the bundle's vocabulary lacks (and <unk> cannot "
                                       "stand for) instead of stopping with an error")


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
        """Perplexity for words, bits per char for chars (lstmgen/text.py, as the trainer's)."""
        return figures(self.level, self.loss)

    def to_dict(self) -> dict:
        return {**asdict(self), **self.figures(), "tokens_per_s": self.tokens_per_s}

    def line(self) -> str:
        fig = figure_text(self.level, self.loss, precise=True)
        unk = f" ({self.unk_mapped:,} OOV words as <unk>)" if self.unk_mapped else ""
        unk += f" ({self.skipped:,} unknown symbols skipped)" if self.skipped else ""
        part = f" scored {self.scored} |" if self.scored else ""
        return (f"{self.data}:{part} {self.tokens:,} tokens{unk} | loss {self.loss:.4f} nats/token | {fig} | "
                f"{self.tokens_per_s:,.0f} tokens/s ({self.seconds:.1f}s, {self.batch_size} streams)")


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
    return Scored(start, len(text), f"{tail_words(name, start, len(text), fraction)}, {how}")


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


def recorded_part(bundle: str | Path, split: ValidationSplit | None) -> tuple[Path, Scored]:
    """The file and part the bundle records as its validation split (no --data): found at its
    recorded path, else (a standard corpus) in the data cache, and only where its sha256 matches.
    Nothing is downloaded. Raises EvalError saying what was recorded and how to pass --data."""
    from lstmgen.datasets import cache_root, sha256_of

    if split is None:
        raise EvalError(f"{bundle}: the bundle records no validation split (exported before lstmgen recorded "
                        "it); name the text to score with --data FILE, or a corpus name")
    places = [Path(split.path)] if split.path else []
    if split.corpus:
        places.append(cache_root() / split.corpus / split.file)
    changed = [p for p in places if p.is_file() and sha256_of(p) != split.sha256]
    for p in places:
        if p.is_file() and p not in changed:
            return p, Scored(split.start, split.end, f"{split.describe()}, recorded in the bundle")
    where = " or ".join(str(p) for p in places) or split.file
    found = f"{', '.join(map(str, changed))} has changed since training" if changed else f"{where} is not found"
    raise EvalError(f"{bundle}: the bundle records its validation split as {split.describe()} (sha256 "
                    f"{split.sha256[:16]}...), and {found}; pass that file with --data FILE (a copy "
                    f"elsewhere is recognised by its sha256)" + (f" or --data {split.corpus}" if split.corpus else ""))


def encode_text(vocab: Vocab, text: str, source: str, skip_unknown: bool = False) -> Encoded:
    """The text's ids (lstmgen/text.py `encode`, as training encodes a held-out file); symbols
    neither the vocabulary nor <unk> covers raise EvalError naming `source`, unless skipped."""
    try:
        return encode(vocab, text, skip_unknown=skip_unknown, lines=True)
    except UnknownTokensError as e:
        raise EvalError(f"{source}: " + e.describe("the bundle's vocabulary") + _SKIP_HINT) from None


def nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed -log softmax(logits)[target] in float64; logits [K, V], targets [K]."""
    x = logits.astype(np.float64)  # [K, V]
    m = x.max(axis=1, keepdims=True)  # [K, 1]
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))  # [K]
    return float((lse - x[np.arange(x.shape[0]), targets]).sum())


def evaluate_bundle(bundle: str | Path, data: str | Path | None = None, cfg: EvalConfig = EvalConfig(),
                    display: Console | None = None) -> EvalResult:
    """Loss of the bundle's model on the text file `data`, or on corpus `data` by name (its test split,
    else the tail training held out), never on its training text (`part_to_score`); `data` None: on
    the validation split the bundle records (`recorded_part`). Raises a UserError (EvalError,
    TextError, BundleError, DatasetError, ...). `display` shows the progress (default: a bar on a
    terminal, plain lines elsewhere)."""
    from lstmgen.serve.engine import Engine, EngineConfig

    display = display or Console(progress=cfg.progress)
    if not cfg.progress:
        display = Console(display.fmt, quiet=display.quiet, progress=False, out=display.out, err=display.err)

    if cfg.batch_size < 1 or cfg.bptt < 1:
        raise EvalError(f"batch_size and bptt must be >= 1 (got {cfg.batch_size}, {cfg.bptt})")
    engine = Engine(bundle, EngineConfig(device=cfg.device, intra_op_threads=cfg.threads))
    name, text, part = _text_to_score(bundle, data, engine.manifest, display)
    display.event(f"{name}: scoring {part.what}", scored=part.what, span=[part.start, part.end])
    where = f"{name} ({part.what})" if part.start else name
    enc = encode_text(engine.manifest.vocab, text[part.start:part.end], where, cfg.skip_unknown)
    try:
        source = batchify(enc.ids, cfg.batch_size)  # [N, B]
    except TextError as e:
        raise EvalError(f"{where}: {e}") from None
    total, seconds = _score(engine, source, cfg, display)
    tokens = (source.shape[0] - 1) * cfg.batch_size
    return EvalResult(str(bundle), name, engine.manifest.level, tokens, total / tokens, seconds,
                      enc.unk_mapped, cfg.batch_size, enc.skipped, part.what, (part.start, part.end))


def _text_to_score(bundle: str | Path, data: str | Path | None, manifest: Manifest,
                   display: Console) -> tuple[str, str, Scored]:
    """(the file read, its text, the part of it to score) for `data`, or without it the bundle's
    recorded validation split."""
    from lstmgen.datasets import CORPORA, resolve

    if data is None:
        path, part = recorded_part(bundle, manifest.validation_split)
        text = read_text(path)
        if part.end > len(text):  # a hand-edited manifest: the sha256 matched, so the text is the same
            raise EvalError(f"{bundle}: the recorded validation split ends at char {part.end:,}, past the "
                            f"{len(text):,} chars of {path}")
        return str(path), text, part
    named = CORPORA.get(str(data)) if not Path(data).exists() else None
    name = resolve(str(data), for_eval=True, log=lambda msg: print(msg, file=display.err))
    text = read_text(name)
    return name, text, part_to_score(Path(name), text, manifest.level, manifest.provenance, named)


def _score(engine, source: np.ndarray, cfg: EvalConfig, display: Console) -> tuple[float, float]:
    """(nats summed, seconds) over the [N, B] streams, the state carried from the first row to the last."""
    n_steps, b = source.shape[0] - 1, cfg.batch_size
    state = engine.zeros(b)  # each [L, B, H]
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
            rate = done * b / max(spent, 1e-9)
            eta = (n_steps - done) * spent / done
            display.progress(f"{done * b:,}/{n_steps * b:,} tokens ({done / n_steps:.0%}) | "
                             f"loss {total / (done * b):.4f} | {rate:,.0f} tokens/s | ETA {duration(eta)}",
                             tokens=done * b, total=n_steps * b, loss=total / (done * b), tokens_per_s=rate,
                             eta_s=round(eta, 1))
    return total, time.perf_counter() - t0


# -- the subcommand --------------------------------------------------------------------------------
# EvalConfig fields without a flag of their own -> the flag that sets them (tests/test_config_args.py)
EVAL_ELSEWHERE = {"progress": "--no-progress"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = config_args.DefaultsFormatter
    parser.description = (
        "Loss of a bundle on a text file with ONNX Runtime: tokens, nats/token, perplexity (word) or "
        "bits per char (char), and tokens/s. The file is encoded as training encodes held-out text "
        "and read as --batch-size contiguous streams with the LSTM state carried through, which "
        "matches `lstmgen train`'s validation/test figure at the same batch size.")
    parser.add_argument("bundle", metavar="BUNDLE_DIR", help="a bundle folder made by `lstmgen export`")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="text file, e.g. ptb.test.txt, or a corpus name (`lstmgen data list`): its test split, "
                             "or for a corpus of one file (tinyshakespeare) the tail training held out. The file "
                             "the bundle was trained on (its provenance: path or sha256) is scored only on that "
                             "held-out tail; the result says which part was scored. Default: the validation "
                             "split recorded in the bundle (its file found by path or corpus name, checked by "
                             "sha256)")
    config_args.add_dataclass_arguments(parser, EvalConfig, exclude=EVAL_ELSEWHERE)
    parser.add_argument("--json", metavar="FILE", default=argparse.SUPPRESS, help="also write the figures as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    console.add_arguments(parser, quiet_help="only the result line and warnings: no progress")


def run(args: argparse.Namespace) -> int:
    cfg = config_args.from_args(EvalConfig, args, exclude=EVAL_ELSEWHERE, progress=not args.no_progress)
    display = console.from_args(args)
    result = evaluate_bundle(args.bundle, args.data, cfg, display)  # a UserError exits 2 in lstmgen.cli
    display.result(result.line(), **result.to_dict())
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0
