"""The text pipeline, written once for every stage: read a text file, encode it, hold out its
validation tail, cut the ids into B contiguous streams, and turn a loss into perplexity or bits per
char. Training (train/data.py, train/lm_task.py, train/runlog.py), `lstmgen eval`
(lstmgen/evaluate.py), the vocabulary (lstmgen/vocab.py), serving's prompts (serve/params.py) and
with them offline sampling all call these. Numpy only, no torch: training converts at its edge.

Reading: UTF-8 with universal newlines (CRLF and CR become LF) and no BOM, so a file reads the same
on any OS; a file that is missing, not a file, unreadable, not UTF-8 or empty is a TextError naming
it and the problem.

Encoding: char level one id per character; word level PTB style, the words of each line split on
white space and `<eos>` at every line end ("\\n"; other Unicode line separators are white space
inside a line, as when pytorch/examples iterates a file's lines). A file's text is a list of lines
(`lines=True`): its last line ends in `<eos>` even without a final newline. A prompt is not:
`<eos>` stands only where it has a "\\n", so the model continues the line it ends in.

Unknown symbols, one policy everywhere: a word the vocabulary lacks is read as `<unk>` when the
vocabulary has it (counted in `Encoded.unk_mapped`); any other unknown symbol (a character, or a word
of a vocabulary without `<unk>`) is an UnknownTokensError naming them, or with `skip_unknown` is
dropped (counted in `Encoded.skipped`). A char vocabulary is built over every split of its corpus
(train/data.py), so training never meets one; serving and `lstmgen eval` refuse or skip them.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lstmgen.errors import UserError
from lstmgen.vocab import EOS, UnknownTokensError, Vocab

class TextError(UserError):
    """Text that cannot be used: a file (named in the message) or too few tokens."""


# -- reading --------------------------------------------------------------------------------------
def read_text(path: str | os.PathLike) -> str:
    """The file's text: UTF-8, universal newlines (CRLF -> LF), a BOM dropped. Raises TextError."""
    p = Path(path)
    if not p.is_file():
        raise TextError(f"{p}: file not found" if not p.exists() else f"{p}: not a regular file")
    try:
        with open(p, encoding="utf-8-sig", newline=None) as f:  # -sig: a BOM is not text
            text = f.read()
    except UnicodeDecodeError as e:
        raise TextError(f"{p}: not UTF-8 text (bad byte {e.object[e.start:e.start + 1]!r} at offset {e.start})") from e
    except OSError as e:
        raise TextError(f"{p}: cannot be read: {e.strerror or e}") from e
    if not text.strip():
        raise TextError(f"{p}: file is empty")
    return text


# -- encoding -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class Encoded:
    ids: np.ndarray  # int64 [N]
    unknown: tuple[str, ...] = ()  # the symbols the vocabulary lacks, each once, in order of appearance
    unk_mapped: int = 0  # occurrences read as <unk> (word level, a vocabulary with <unk>)
    skipped: int = 0  # occurrences dropped (skip_unknown)


def symbols(text: str, level: str, *, lines: bool = False) -> list[str]:
    """Text -> the symbols the vocabulary looks up: its characters, or its words with `<eos>` at
    each "\\n" (`lines`: and at the end of a last line without one)."""
    if level == "char":
        return list(text)
    if lines and text and not text.endswith("\n"):
        text += "\n"
    out: list[str] = []
    for line in text.split("\n"):
        out.extend(line.split())
        out.append(EOS)
    out.pop()  # split("\n") gives one more part than there are newlines
    return out


def encode(vocab: Vocab, text: str, *, skip_unknown: bool = False, lines: bool = False) -> Encoded:
    """Text -> ids under the one unknown-symbol policy (module docstring); `lines`: a file's text,
    whose last line ends in <eos>. Raises UnknownTokensError."""
    stoi = vocab.stoi
    syms = symbols(text, vocab.level, lines=lines)
    ids = [stoi.get(s, -1) for s in syms]
    if -1 not in ids:
        return Encoded(np.asarray(ids, np.int64))
    unknown = tuple(dict.fromkeys(s for s, i in zip(syms, ids) if i < 0))
    count = ids.count(-1)
    unk = vocab.unk_id
    if unk is not None:
        return Encoded(np.asarray([unk if i < 0 else i for i in ids], np.int64), unknown, unk_mapped=count)
    if not skip_unknown:
        raise UnknownTokensError(unknown, vocab.level)
    return Encoded(np.asarray([i for i in ids if i >= 0], np.int64), unknown, skipped=count)


# -- the validation split -------------------------------------------------------------------------
def held_out_start(text: str, level: str, valid_fraction: float) -> int:
    """Where the validation tail of a one-file corpus starts (the trainer's cut, and the one `lstmgen
    eval` scores); word level moves it to a line start so no word is cut."""
    cut = int(len(text) * (1.0 - valid_fraction))
    if level == "word":
        nl = text.find("\n", cut)
        cut = nl + 1 if 0 <= nl < len(text) - 1 else cut
        while 0 < cut < len(text) and not text[cut - 1].isspace():
            cut += 1  # no newline left: at least do not split a word
    return cut


def tail_words(name: str, start: int, end: int, fraction: float) -> str:
    """How a held-out tail is named to people: the file, the chars and the share."""
    return f"the validation tail of {name}, chars {start:,}..{end:,} ({fraction:.0%})"


@dataclass(frozen=True)
class ValidationSplit:
    """The text a model was validated on, as training read it: chars [start, end) of the text of
    `file` (read_text's text: universal newlines, no BOM). Recorded in the checkpoint's corpus and
    the bundle's manifest (`validation_split`), so `lstmgen eval BUNDLE` scores it again."""

    file: str  # the file's name
    sha256: str  # of the file's bytes: a copy elsewhere is the same text
    level: str  # "char" | "word"
    start: int
    end: int
    fraction: float | None = None  # the held-out tail of a one-file corpus; None: a validation file of its own
    path: str | None = None  # where training read it
    corpus: str | None = None  # a standard corpus name (`lstmgen data`), kept in the data cache
    url: str | None = None  # where training downloaded it from

    def describe(self) -> str:
        if self.fraction is None:
            return f"the whole of {self.file}, the validation split"
        return tail_words(self.file, self.start, self.end, self.fraction)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "ValidationSplit":
        return cls(**d)


# -- TBPTT streams --------------------------------------------------------------------------------
def batchify(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """[N_total] -> [N, B] with N = N_total // B: column b is the b-th contiguous slice of the
    stream (pytorch/examples word_language_model), the rest dropped. Raises TextError."""
    n = ids.shape[0] // batch_size
    if n < 2:
        raise TextError(f"{ids.shape[0]} tokens are too few for {batch_size} streams (need at least "
                        f"{2 * batch_size}); use a smaller batch size or more text")
    return np.ascontiguousarray(ids[: n * batch_size].reshape(batch_size, n).T)  # [N, B]


# -- the figures ----------------------------------------------------------------------------------
def perplexity(nats: float) -> float:
    """exp(mean nats per token), the word-level figure (capped below float overflow)."""
    return math.exp(min(nats, 700.0))


def bits_per_char(nats: float) -> float:
    """Mean nats per char / ln 2, the char-level figure."""
    return nats / math.log(2)


def figures(level: str, nats: float) -> dict[str, float]:
    """The level's figure for a mean loss in nats per token: {"ppl": ...} (word) or {"bpc": ...} (char)."""
    return {"ppl": perplexity(nats)} if level == "word" else {"bpc": bits_per_char(nats)}


def figure_text(level: str, nats: float, *, precise: bool = False) -> str:
    """"ppl 117.35" (word; `precise`: three decimals) or "1.4620 bpc" (char), for a log line."""
    if level == "word":
        return f"ppl {perplexity(nats):.{3 if precise else 2}f}"
    return f"{bits_per_char(nats):.4f} bpc"
