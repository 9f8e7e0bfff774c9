"""Corpus loading and truncated-BPTT batching.

A corpus comes from a file, a directory, a split prefix or an http(s) URL. Split layouts follow the
datasets this project trains on: PTB (`ptb.train.txt`, `ptb.valid.txt`, `ptb.test.txt`) and WikiText
as pytorch/examples ships it (`train.txt`, `valid.txt`, `test.txt`); anything else is one file whose
last `valid_fraction` becomes validation. The vocabulary is built from the training text only, so a
validation figure never benefits from symbols the model could not have seen.

Reading, encoding, the held-out cut and the figures are the text pipeline's (lstmgen/text.py), the
same functions `lstmgen eval` and serving call; this module finds the files, builds the vocabulary,
records the validation split (`source["validation"]`, a text.ValidationSplit that export writes into
the bundle) and keeps what needs torch. Batching is pytorch/examples word_language_model's: the id
stream is cut into B contiguous streams (`batchify`, text.batchify as a tensor) and walked `bptt`
steps at a time (`get_batch`), so row b of one batch continues row b of the previous one and the
LSTM state can be carried across batches.
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

import numpy as np
import torch

import lstmgen.text as pipeline
from lstmgen.bundle import sha256_file
from lstmgen.text import TextError, ValidationSplit, encode, held_out_start, read_text
from lstmgen.vocab import Level, UnknownTokensError, Vocab

SPLITS = ("train", "valid", "test")
_EXTS = ("txt", "tokens")  # WikiText's own zips name the splits wiki.train.tokens etc.
_URL_TIMEOUT_S = 60


# A corpus that cannot be used; the message names the file (or URL) and the problem. The text
# pipeline's own error, so one `except DataError` also catches what reading or batching raise.
DataError = TextError


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to one bool
class Corpus:
    vocab: Vocab
    train: torch.Tensor  # [N_train] long
    valid: torch.Tensor  # [N_valid] long
    test: torch.Tensor | None  # [N_test] long, when the corpus has a test split
    # Provenance for checkpoints and bundles: data, kind, layout, files {split: path/sha256/bytes},
    # url and sha256 (downloads), token counts, ...
    source: dict = field(default_factory=dict)


# -- finding the files ----------------------------------------------------------------------------
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


# -- loading --------------------------------------------------------------------------------------
def load_corpus(data: str, level: Level, valid_fraction: float = 0.1,
                cache_dir: str | os.PathLike | None = None, *, min_count: int = 1, max_vocab: int = 0) -> Corpus:
    """Read, split and encode a corpus from a path, a split prefix or an http(s) URL. Word level:
    `min_count` / `max_vocab` keep the frequent training words and map the rest to <unk>."""
    path, source = _locate(data, cache_dir)
    layout, files = find_splits(path)
    texts = {s: read_text(p) for s, p in files.items()}
    files_info = {s: {"path": str(p.resolve()), "sha256": sha256_file(p), "bytes": p.stat().st_size}
                  for s, p in files.items()}
    validation = _validation_split(texts, files, files_info, level, valid_fraction, source)
    # chars: the alphabet of the whole corpus, as char-rnn and nanoGPT build it (a held-out tail may
    # hold a symbol the training text lacks, e.g. Anna Karenina's licence text); words: PTB style,
    # the training vocabulary, held-out words -> <unk>
    vocab = Vocab.build(level, texts.values() if level == "char" else [texts["train"]],
                        min_count=min_count, max_vocab=max_vocab)
    ids = {s: _encode_split(vocab, t, s, files.get(s, files["train"])) for s, t in texts.items()}
    source.update(layout=layout, level=level, vocab_size=len(vocab), files=files_info,
                  tokens={s: len(v) for s, v in ids.items()}, validation=validation.to_dict())
    source["sha256"] = files_info["train"]["sha256"]  # the training text's identity
    tensors = {s: torch.from_numpy(v) for s, v in ids.items()}  # int64 -> long
    return Corpus(vocab, tensors["train"], tensors["valid"], tensors.get("test"), source)


def _locate(data: str, cache_dir: str | os.PathLike | None) -> tuple[Path, dict]:
    """The local path `data` names (a URL downloaded, a corpus name fetched) and the start of its
    provenance: data, kind, url or name, path."""
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
    source["path"] = str(path.resolve())
    return path, source


def _validation_split(texts: dict[str, str], files: dict[str, Path], files_info: dict[str, dict], level: str,
                      valid_fraction: float, source: dict) -> ValidationSplit:
    """The text validation reads: the valid file, or (none in the layout) the tail of the training
    file, carved off `texts` here at the cut `lstmgen eval` scores too. Returns its record."""
    named = {"corpus": source.get("name"), "url": source.get("url")}
    if "valid" in texts:
        info = files_info["valid"]
        return ValidationSplit(files["valid"].name, info["sha256"], level, 0, len(texts["valid"]),
                               path=info["path"], **named)
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    whole = texts["train"]
    cut = held_out_start(whole, level, valid_fraction)
    texts["train"], texts["valid"] = whole[:cut], whole[cut:]
    source["valid_fraction"] = valid_fraction
    if not texts["train"].strip() or not texts["valid"].strip():
        raise DataError(f"{files['train']}: too little text to hold out {valid_fraction:.0%} for validation")
    info = files_info["train"]
    return ValidationSplit(files["train"].name, info["sha256"], level, cut, len(whole), valid_fraction,
                           path=info["path"], **named)


def _encode_split(vocab: Vocab, text: str, split: str, path: Path) -> np.ndarray:
    """A split's ids [N] (text.encode, a file's lines); a symbol neither the vocabulary nor <unk>
    covers is a DataError naming the file, the split and the symbols."""
    try:
        return encode(vocab, text, lines=True).ids
    except UnknownTokensError as e:
        hint = ("; train with --min-count N or --max-vocab N to map rare words to <unk>" if vocab.level == "word"
                else " (clean the text, or put them in the training text)")
        raise DataError(f"{path}: {split} split holds {e.describe('the training vocabulary')}{hint}") from None


# -- TBPTT batching (pytorch/examples word_language_model) ------------------------------------------
def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[N] -> [N // B, B] on the device of `ids`: text.batchify's contiguous streams as a tensor."""
    return torch.from_numpy(pipeline.batchify(ids.cpu().numpy(), batch_size)).to(ids.device)  # [N, B]


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets starting at row i: x, y [T, B] with T = min(bptt, N - 1 - i)."""
    t = min(bptt, source.size(0) - 1 - i)
    return source[i:i + t], source[i + 1:i + 1 + t]  # [T, B], [T, B]


def num_batches(source: torch.Tensor, bptt: int) -> int:
    """How many get_batch calls walk `source` once (the last one may be shorter than bptt)."""
    return len(range(0, source.size(0) - 1, bptt))
