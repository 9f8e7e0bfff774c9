"""Sample output, appended durably: JSONL (default), tab-separated text (.txt/.tsv), or Parquet.

Lines are written whole and the file is flushed and fsynced in batches (every `sync_every` lines
or `sync_seconds`), so after a kill at most the last batch is lost and at most the last line is
torn; `resume.py` repairs that and skips what is already there. Parquet cannot be appended to,
so its samples go to a JSONL journal beside it (`OUT.journal.jsonl`) that becomes the Parquet
file when the run completes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

TSV_COLUMNS = ("index", "sample", "id", "seed", "finish_reason", "text")


def output_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".txt", ".tsv"):
        return "tsv"
    return "jsonl"


def _escape(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]  # \n, \t, \\ and quotes escaped: one line


def dump_line(row: dict, fmt: str) -> str:
    """One output line (with its newline) in the journal's format."""
    if fmt != "tsv":
        return json.dumps(row, ensure_ascii=False) + "\n"
    reason = "error" if "error" in row else row["finish_reason"]
    text = row.get("error", row.get("text", ""))
    ident = "" if row.get("id") is None else _escape(str(row["id"]))
    return f"{row['index']}\t{row['sample']}\t{ident}\t{row['seed']}\t{reason}\t{_escape(text)}\n"


def line_key(line: str, fmt: str) -> tuple[int, int]:
    """(index, sample) of one complete output line."""
    if fmt == "tsv":
        index, sample, _ = line.split("\t", 2)
        return int(index), int(sample)
    row = json.loads(line)
    return int(row["index"]), int(row["sample"])


def journal_path(out: str) -> Path:
    """Where samples are appended: the output itself, or the journal of a Parquet output."""
    return Path(out + ".journal.jsonl") if output_format(out) == "parquet" else Path(out)


class DurableAppender:
    """Appends lines; flush + fsync every `sync_every` lines or `sync_seconds`, and on close."""

    def __init__(self, path: Path, sync_every: int = 1000, sync_seconds: float = 1.0):
        # A lone surrogate (no UTF-8 for it) can only sit inside a JSON-escaped string here, where
        # backslashreplace's "\ud800" is the JSON escape of the same character: the line stays
        # valid and reads back equal, instead of the write ending the run.
        self._f = open(path, "a", encoding="utf-8", errors="backslashreplace", newline="\n")
        self.sync_every, self.sync_seconds = sync_every, sync_seconds
        self._unsynced, self._last_sync = 0, time.monotonic()

    def write(self, line: str) -> None:
        self._f.write(line)
        self._unsynced += 1
        if self._unsynced >= self.sync_every or time.monotonic() - self._last_sync >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._unsynced, self._last_sync = 0, time.monotonic()

    def close(self) -> None:
        self.sync()
        self._f.close()


def _journal_rows(journal: Path, chunk: int) -> Iterator[list[dict]]:
    rows = []
    with open(journal, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == chunk:
                yield rows
                rows = []
    if rows:
        yield rows


def parquet_schema(first: dict):
    import pyarrow as pa

    return pa.schema([
        ("index", pa.int64()), ("sample", pa.int64()),
        ("id", pa.int64() if isinstance(first.get("id"), int) else pa.string()),
        ("prompt", pa.string()), ("seed", pa.uint64()), ("text", pa.string()), ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()), ("generated_tokens", pa.int64()), ("stop_sequence", pa.string()),
        ("logprobs", pa.string()),  # JSON text: its shape is the sampler's, not Parquet's
        ("error", pa.string()),
    ])


def journal_to_parquet(journal: Path, out: Path, int_ids: bool = False, chunk: int = 16_384) -> None:
    """Converts the finished journal into the Parquet file (streaming, `chunk` rows at a time),
    then removes the journal. Writes to a temporary name first: a kill here loses nothing.
    `int_ids`: every id of the input is an integer (an int64 column); else ids are strings, an
    integer one as its decimal text (one column holds one type, whatever the first row has)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = out.with_name(out.name + ".tmp")
    writer = None
    try:
        for rows in _journal_rows(journal, chunk):
            if writer is None:
                schema = parquet_schema({"id": 0} if int_ids else {})
                writer = pq.ParquetWriter(tmp, schema)
            for r in rows:
                if not int_ids and isinstance(r.get("id"), int):
                    r["id"] = str(r["id"])
                if "logprobs" in r:
                    r["logprobs"] = json.dumps(r["logprobs"])
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        if writer is None:  # nothing sampled: an empty file with the columns
            pq.write_table(parquet_schema({}).empty_table(), tmp)
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, out)
    journal.unlink()
