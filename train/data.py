"""Corpus loading and truncated-BPTT batching.

A corpus comes from a file, a directory, a split prefix or an http(s) URL. Split layouts follow the
datasets this project trains on: PTB (`ptb.train.txt`, `ptb.valid.txt`, `ptb.test.txt`) and WikiText
as pytorch/examples ships it (`train.txt`, `valid.txt`, `test.txt`); anything else is one file whose
last `valid_fraction` becomes validation. The vocabulary is built from the training text only, so a
validation figure never benefits from symbols the model could not have seen.

Batching is pytorch/examples word_language_model's: the id stream is cut into B contiguous streams
(`batchify`) and walked `bptt` steps at a time (`get_batch`), so row b of one batch continues row b of
the previous one and the LSTM state can be carried across batches.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lstmgen.bundle import sha256_file
from lstmgen.datasets import held_out_start
from lstmgen.errors import UserError
from lstmgen.vocab import EOS, Level, Vocab

SPLITS = ("train", "valid", "test")
_EXTS = ("txt", "tokens")  # WikiText's own zips name the splits wiki.train.tokens etc.
_URL_TIMEOUT_S = 60


class DataError(UserError):
    """A corpus that cannot be used; the message names the file (or URL) and the problem."""


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to one bool
class Corpus:
    vocab: Vocab
    train: torch.Tensor  # [N_train] long
    valid: torch.Tensor  # [N_valid] long
    test: torch.Tensor | None  # [N_test] long, when the corpus has a test split
    # Provenance for checkpoints and bundles: data, kind, layout, files {split: path/sha256/bytes},
    # url and sha256 (downloads), token counts, ...
    source: dict = field(default_factory=dict)


# -- reading --------------------------------------------------------------------------------------
def read_text(path: str | os.PathLike) -> str:
    """UTF-8 text with universal newlines (CRLF -> LF), so a corpus reads the same on any OS."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found" if not p.exists() else f"{p}: not a regular file")
    try:
        with open(p, encoding="utf-8-sig", newline=None) as f:  # -sig: a BOM is not text
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (bad byte {e.object[e.start:e.start + 1]!r} at offset {e.start})") from e
    except OSError as e:
        raise DataError(f"{p}: cannot be read: {e.strerror or e}") from e
    if not text.strip():
        raise DataError(f"{p}: file is empty")
    return text


def is_url(data: str) -> bool:
    return urllib.parse.urlparse(data).scheme in ("http", "https")


def download(url: str, cache_dir: str | os.PathLike) -> Path:
    """Fetch `url` into `cache_dir` once (a resumed run reuses the file) and return its path."""
    parsed = urllib.parse.urlparse(url)
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(parsed.path).name) or "corpus.txt"
    # The URL's hash in the name keeps two URLs ending in the same file name apart.
    dest = Path(cache_dir) / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with urllib.request.urlopen(url, timeout=_URL_TIMEOUT_S) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        raise DataError(f"{url}: download failed: {reason}") from e
    os.replace(tmp, dest)  # atomic: a killed download never looks complete
    return dest


# -- split layouts --------------------------------------------------------------------------------
def _layout_at(prefix: Path) -> tuple[str, dict[str, Path]] | None:
    """PTB-style split files `<prefix>.train.txt`, `<prefix>.valid.txt`, ... when they exist."""
    for ext in _EXTS:
        files = {s: prefix.with_name(f"{prefix.name}.{s}.{ext}") for s in SPLITS}
        if files["train"].is_file():
            return "ptb", {s: p for s, p in files.items() if p.is_file()}
    return None


def find_splits(path: Path) -> tuple[str, dict[str, Path]]:
    """(layout, {split: file}) for a file, a split prefix or a directory."""
    if path.is_dir():
        for ext in _EXTS:  # WikiText as pytorch/examples ships it
            files = {s: path / f"{s}.{ext}" for s in SPLITS}
            if files["train"].is_file():
                return "wikitext", {s: p for s, p in files.items() if p.is_file()}
        prefixes = sorted({m.group(1) for f in path.iterdir()
                           if (m := re.fullmatch(r"(.+)\.train\.(?:txt|tokens)", f.name))})
        if len(prefixes) == 1:
            found = _layout_at(path / prefixes[0])
            if found:
                return found
        if len(prefixes) > 1:
            raise DataError(f"{path}: several corpora in one directory ({', '.join(prefixes)}); "
                            "pass the prefix, e.g. " + str(path / prefixes[0]))
        raise DataError(f"{path}: directory holds no split files (expected train.txt/valid.txt/test.txt "
                        "or NAME.train.txt/NAME.valid.txt/NAME.test.txt)")
    m = re.fullmatch(r"(?:(.+)\.)?(train|valid|test)\.(?:txt|tokens)", path.name)
    if m and path.is_file():  # one split file of a layout: take its siblings too
        try:
            found = _layout_at(path.with_name(m.group(1))) if m.group(1) else find_splits(path.parent)
        except DataError:
            found = None
        if found and found[1].get(m.group(2)) == path:
            return found
    if path.is_file():
        return "single", {"train": path}
    found = _layout_at(path)  # a bare prefix such as data/ptb/ptb
    if found:
        return found
    raise DataError(f"{path}: file not found")


# -- encoding -------------------------------------------------------------------------------------
def encode_split(vocab: Vocab, text: str, split: str) -> list[int]:
    """Held-out text -> ids, PTB style for words; unknown words -> <unk> when the vocab has one."""
    stoi, unknown = vocab.stoi, []
    if vocab.level == "char":
        ids = [stoi.get(ch, -1) for ch in text]
        if -1 in ids:
            unknown = sorted({ch for ch in text if ch not in stoi})
            raise DataError(f"{split} split holds {len(unknown)} character(s) that the training text "
                            f"lacks: {', '.join(repr(c) for c in unknown[:10])} "
                            "(clean the text, or put them in the training text)")
        return ids
    unk, eos = vocab.unk_id, stoi[EOS]
    ids = []
    for line in text.splitlines():  # PTB: line.split() + [<eos>] per line, like encode_corpus
        for w in line.split():
            i = stoi.get(w, unk)
            if i is None:
                unknown.append(w)
            else:
                ids.append(i)
        ids.append(eos)
    if unknown:
        shown = ", ".join(repr(w) for w in list(dict.fromkeys(unknown))[:10])
        raise DataError(f"{split} split holds {len(set(unknown))} word(s) not in the training vocabulary, "
                        f"which has no <unk> to map them to: {shown}; train with --min-count N or "
                        "--max-vocab N to map rare words to <unk>")
    return ids


def load_corpus(data: str, level: Level, valid_fraction: float = 0.1,
                cache_dir: str | os.PathLike | None = None, *, min_count: int = 1, max_vocab: int = 0) -> Corpus:
    """Read, split and encode a corpus from a path, a split prefix or an http(s) URL. Word level:
    `min_count` / `max_vocab` keep the frequent training words and map the rest to <unk>."""
    source: dict = {"data": data}
    if is_url(data):
        if cache_dir is None:
            raise DataError(f"{data}: a URL needs a cache directory to download into")
        path = download(data, cache_dir)
        source.update(kind="url", url=data)
    else:
        from lstmgen.datasets import CORPORA, resolve
        if data in CORPORA and not Path(data).exists():  # a standard corpus by name, fetched once into its cache
            source.update(kind="named", name=data)
        path = Path(resolve(data, log=lambda msg: print(msg, file=sys.stderr))).expanduser()
        source.setdefault("kind", "dir" if path.is_dir() else "file" if path.is_file() else "prefix")
    layout, files = find_splits(path)
    source["path"] = str(path.resolve())
    texts = {s: read_text(p) for s, p in files.items()}
    if "valid" not in texts:  # single file, or a layout without a valid file: carve the tail off
        if not 0.0 < valid_fraction < 1.0:
            raise DataError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
        whole = texts["train"]
        cut = held_out_start(whole, level, valid_fraction)  # the tail `lstmgen eval` scores too
        texts["train"], texts["valid"] = whole[:cut], whole[cut:]
        source["valid_fraction"] = valid_fraction
        if not texts["train"].strip() or not texts["valid"].strip():
            raise DataError(f"{files['train']}: too little text to hold out {valid_fraction:.0%} for validation")
    # chars: the alphabet of the whole corpus, as char-rnn and nanoGPT build it (a held-out tail may
    # hold a symbol the training text lacks, e.g. Anna Karenina's licence text); words: PTB style,
    # the training vocabulary, held-out words -> <unk>
    vocab = Vocab.build(level, texts.values() if level == "char" else [texts["train"]],
                        min_count=min_count, max_vocab=max_vocab)
    ids = {"train": vocab.encode_corpus(texts["train"])}
    for split in ("valid", "test"):
        if split in texts:
            try:
                ids[split] = encode_split(vocab, texts[split], split)
            except DataError as e:
                raise DataError(f"{files.get(split, files['train'])}: {e}") from None
    source.update(
        layout=layout, level=level, vocab_size=len(vocab),
        files={s: {"path": str(p.resolve()), "sha256": sha256_file(p), "bytes": p.stat().st_size}
               for s, p in files.items()},
        tokens={s: len(v) for s, v in ids.items()},
    )
    source["sha256"] = source["files"]["train"]["sha256"]  # the training text's identity
    tensors = {s: torch.tensor(v, dtype=torch.long) for s, v in ids.items()}
    return Corpus(vocab, tensors["train"], tensors["valid"], tensors.get("test"), source)


# -- TBPTT batching (pytorch/examples word_language_model) ------------------------------------------
def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[N] -> [N // B, B]: column b is the b-th contiguous slice of the stream; the rest is dropped."""
    n = ids.size(0) // batch_size
    if n < 2:
        raise DataError(f"{ids.size(0)} tokens are too few for {batch_size} streams (need at least "
                        f"{2 * batch_size}); use a smaller batch size or more text")
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()  # [N, B]


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets starting at row i: x, y [T, B] with T = min(bptt, N - 1 - i)."""
    t = min(bptt, source.size(0) - 1 - i)
    return source[i:i + t], source[i + 1:i + 1 + t]  # [T, B], [T, B]


def num_batches(source: torch.Tensor, bptt: int) -> int:
    """How many get_batch calls walk `source` once (the last one may be shorter than bptt)."""
    return len(range(0, source.size(0) - 1, bptt))
