"""Prompt input, read as a stream: text (one prompt per non-blank line), JSONL, or Parquet.

Each record is checked field by field (`parse_item`), and every error names the file and line
(or Parquet row), so a bad input is refused before anything is generated or written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lstmgen.errors import UsageError

# Most samples one prompt may ask for; sample numbers also pack into the resume key (resume.py).
MAX_NUM_SAMPLES = 1_000_000


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
_INTS = ("num_samples", "max_new_tokens", "top_k", "seed", "top_logprobs")
_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_BOOLS = ("greedy", "skip_unknown", "logprobs")
FIELDS = ("prompt", "id", *_INTS, *_FLOATS, *_BOOLS, "stop")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_item(raw: Any, where: str) -> PromptItem:
    """A checked PromptItem from one decoded record; raises InputError naming `where` and the field."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a JSON object with a string \"prompt\", got {type(raw).__name__}")
    fields = {k: v for k, v in raw.items() if v is not None}  # Parquet/Arrow nulls: field absent
    unknown = sorted(set(fields) - set(FIELDS) - {"index"})
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}")

    def bad(name: str, want: str) -> InputError:
        return InputError(f"{where}: field \"{name}\" must be {want}, got {json.dumps(fields[name])[:60]}")

    if not isinstance(fields.get("prompt"), str):
        raise InputError(f"{where}: expected a string \"prompt\"")
    if "id" in fields and not (isinstance(fields["id"], str) or _is_int(fields["id"])):
        raise bad("id", "a string or an integer")
    for name in _INTS:
        if name in fields and not _is_int(fields[name]):
            raise bad(name, "an integer")
    for name in _FLOATS:
        if name in fields and not (_is_int(fields[name]) or isinstance(fields[name], float)):
            raise bad(name, "a number")
        if name in fields:
            fields[name] = float(fields[name])
    for name in _BOOLS:
        if name in fields and not isinstance(fields[name], bool):
            raise bad(name, "true or false")
    if "num_samples" in fields and not 1 <= fields["num_samples"] <= MAX_NUM_SAMPLES:
        raise bad("num_samples", f"in 1..{MAX_NUM_SAMPLES}")
    if "seed" in fields and not 0 <= fields["seed"] < 2**64:
        raise bad("seed", "in 0..2^64-1")
    if "stop" in fields:
        stop = fields["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise bad("stop", "a string or a list of strings")
        fields["stop"] = tuple(stop)
    fields.pop("index", None)  # a Ray dataset's row number, not a setting
    return PromptItem(**fields)


def input_format(path: str) -> str:
    """"text", "jsonl" or "parquet", by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "text"


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, raw record) for every prompt in input order; blank lines are skipped. Streams:
    one line (or one Parquet batch) in memory at a time."""
    path = Path(path)
    fmt = input_format(str(path))
    try:
        if fmt == "parquet":
            yield from _parquet_records(path)
            return
        with open(path, encoding="utf-8", newline="\n") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if fmt == "text":
                    yield f"{path}:{n}", {"prompt": line}
                    continue
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read prompts: {e}") from e


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


def read_items(path: str | Path) -> Iterator[PromptItem]:
    """Checked prompts in input order (their position is their index)."""
    for where, raw in read_records(path):
        yield parse_item(raw, where)
