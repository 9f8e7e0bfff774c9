"""Prompt input, read as a stream: text (one prompt per non-blank line), JSONL, or Parquet.

Each record is checked field by field (`parse_item`), and every error names the file and line
(or Parquet row), so a bad input is refused before anything is generated or written. The bytes
read are hashed on the way (`Fingerprint`), so `--resume` notices an input edited between runs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lstmgen.errors import UsageError

# Most samples one prompt may ask for; sample numbers also pack into the resume key (resume.py).
MAX_NUM_SAMPLES = 1_000_000
INT32_MAX = 2**31 - 1
# What the sampler's kernels and the resume key accept: a value outside fails inside a step that
# other rows share, so it is refused here, naming the record, before anything runs.
INT_RANGES = {"num_samples": (1, MAX_NUM_SAMPLES), "max_new_tokens": (1, INT32_MAX), "top_k": (0, INT32_MAX),
              "seed": (0, 2**64 - 1), "top_logprobs": (0, INT32_MAX)}
ID_RANGE = (-2**63, 2**63 - 1)  # an integer id is a Parquet int64 column


class InputError(UsageError):
    """The prompts file is unreadable or one of its records is malformed (message names where)."""


@dataclass(frozen=True)
class PromptItem:
    """One input record; None means "use the command's default"."""

    prompt: str
    id: str | int | None = None
    num_samples: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    greedy: bool | None = None
    seed: int | None = None  # sample j gets seed + j
    stop: tuple[str, ...] | None = None
    skip_unknown: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "greedy")
_INTS = tuple(INT_RANGES)
_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_BOOLS = ("greedy", "skip_unknown", "logprobs")
FIELDS = ("prompt", "id", *_INTS, *_FLOATS, *_BOOLS, "stop")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def span(lo: int, hi: int) -> str:
    return f"{lo}..{'2^64-1' if hi == 2**64 - 1 else hi}"


def _as_float(v: Any) -> float | None:
    """`v` as a float; None for a non-number or an integer too large for a double."""
    if not (_is_int(v) or isinstance(v, float)):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def shown(v: Any, width: int = 60) -> str:
    """A value for an error message: ASCII (a lone surrogate escaped), cut to `width` characters."""
    try:
        text = json.dumps(v)
    except (ValueError, TypeError, RecursionError):
        text = type(v).__name__
    return text if len(text) <= width else f"{text[:width]}... ({len(text):,} characters)"


def lone_surrogate(text: str) -> int | None:
    """Position of the first lone surrogate in `text` (valid JSON, "\\ud800", but no Unicode
    text: it cannot be encoded, written or matched), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def parse_item(raw: Any, where: str) -> PromptItem:
    """A checked PromptItem from one decoded record; raises InputError naming `where` and the field."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a JSON object with a string \"prompt\", got {type(raw).__name__}")
    fields = {k: v for k, v in raw.items() if v is not None}  # Parquet/Arrow nulls: field absent
    unknown = sorted(set(fields) - set(FIELDS) - {"index"})
    if unknown:
        names = ", ".join(repr(k)[:40] for k in unknown[:5])  # repr escapes a lone surrogate
        raise InputError(f"{where}: unknown field(s) {names}; known: {', '.join(FIELDS)}")

    def bad(name: str, want: str) -> InputError:
        return InputError(f"{where}: field \"{name}\" must be {want}, got {shown(fields[name])}")

    def check_text(name: str, text: str) -> None:
        pos = lone_surrogate(text)
        if pos is not None:
            raise InputError(f"{where}: field \"{name}\" must be Unicode text; it holds a lone surrogate "
                             f"{shown(text[pos])} at character {pos}")

    if not isinstance(fields.get("prompt"), str):
        raise InputError(f"{where}: expected a string \"prompt\"")
    check_text("prompt", fields["prompt"])
    if "id" in fields:
        ident = fields["id"]
        if isinstance(ident, str):
            check_text("id", ident)
        elif not _is_int(ident) or not ID_RANGE[0] <= ident <= ID_RANGE[1]:
            raise bad("id", "a string or an integer in -2^63..2^63-1")
    for name, (lo, hi) in INT_RANGES.items():
        if name in fields and not (_is_int(fields[name]) and lo <= fields[name] <= hi):
            raise bad(name, f"an integer in {span(lo, hi)}")
    for name in _FLOATS:
        if name in fields:
            if (number := _as_float(fields[name])) is None:
                raise bad(name, "a number")
            fields[name] = number
    for name in _BOOLS:
        if name in fields and not isinstance(fields[name], bool):
            raise bad(name, "true or false")
    if "stop" in fields:
        stop = fields["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise bad("stop", "a string or a list of strings")
        for s in stop:
            check_text("stop", s)
        fields["stop"] = tuple(stop)
    fields.pop("index", None)  # a Ray dataset's row number, not a setting
    return PromptItem(**fields)


def decode_json(line: str, where: str) -> Any:
    """One JSON record; InputError naming `where` for anything json refuses, including what it
    refuses with a ValueError or RecursionError (a 5,000-digit integer, 100,000 nested lists)."""
    try:
        return json.loads(line)
    except RecursionError:
        raise InputError(f"{where}: not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON: {e}") from None
    except ValueError as e:  # an integer past Python's 4,300 digits (the rest of its text is for programmers)
        raise InputError(f"{where}: not usable JSON: {str(e).split(';')[0]}") from None


def input_format(path: str) -> str:
    """"text", "jsonl" or "parquet", by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "text"


class Fingerprint:
    """Size and sha256 of the bytes read: what identifies an input between runs."""

    def __init__(self) -> None:
        self.size = 0
        self._sha = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self.size += len(data)
        self._sha.update(data)

    def as_dict(self) -> dict:
        return {"size": self.size, "sha256": self._sha.hexdigest()}


def read_records(path: str | Path, digest: Fingerprint | None = None) -> Iterator[tuple[str, Any]]:
    """(where, raw record) for every prompt in input order; blank lines are skipped. Streams:
    one line (or one Parquet batch) in memory at a time. `digest`, when given, sees every byte."""
    path = Path(path)
    fmt = input_format(str(path))
    try:
        if fmt == "parquet":
            if digest is not None:
                _hash_file(path, digest)
            yield from _parquet_records(path)
            return
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if digest is not None:
                    digest.update(raw)
                where = f"{path}:{n}"
                try:
                    line = raw.decode("utf-8").rstrip("\n")
                except UnicodeDecodeError as e:
                    raise InputError(f"{where}: not UTF-8 text ({e})") from None
                if not line.strip():
                    continue
                yield where, ({"prompt": line} if fmt == "text" else decode_json(line, where))
    except OSError as e:
        raise InputError(f"{path}: cannot read prompts: {e}") from e


def _hash_file(path: Path, digest: Fingerprint) -> None:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError(f"{path}: reading Parquet needs pyarrow: pip install 'lstmgen[parquet]'") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise InputError(f"{path}: not a readable Parquet file: {e}") from e
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}: row {n}", row


def read_items(path: str | Path, digest: Fingerprint | None = None) -> Iterator[PromptItem]:
    """Checked prompts in input order (their position is their index)."""
    for where, raw in read_records(path, digest):
        yield parse_item(raw, where)
