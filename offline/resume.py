"""Exact resume: repair a torn last line, find the finished (index, sample) pairs, skip them.

Outputs are appended whole lines at a time (outputs.DurableAppender), so a kill can leave at most
one partial line, at the end; `repair` cuts it off. The finished pairs are kept as one sorted
int64 array (8 bytes a sample: 8 MB for a million), and since jobs come in (index, sample)
order, skipping is a merge against it. `OUT.run.json` holds the settings a resumed run must
share with the first one (above all the base seed), so a resume never mixes two runs.
"""
from __future__ import annotations

import json
import os
from array import array
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lstmgen.errors import UsageError
from lstmgen.offline.jobs import Job
from lstmgen.offline.outputs import line_key

SAMPLE_BITS = 24  # key = index << 24 | sample (prompts.MAX_NUM_SAMPLES < 2**24)


class ResumeError(UsageError):
    """The output cannot be continued as asked (message says why)."""


def key(index: int, sample: int) -> int:
    return index << SAMPLE_BITS | sample


def repair(path: Path) -> int:
    """Cuts a torn (newline-less) last line off `path`; returns the bytes removed."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                pos = pos - step + nl + 1
                break
            pos -= step
        if pos < size:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
        return size - pos


def finished_keys(path: Path, fmt: str) -> np.ndarray:
    """Sorted unique keys of every line in `path` (after `repair`)."""
    keys = array("q")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                index, sample = line_key(line, fmt)
            except (ValueError, KeyError, TypeError) as e:
                raise ResumeError(f"{path}:{n}: not an output line of lstmgen sample ({e}); "
                                  "cannot resume into this file") from e
            keys.append(key(index, sample))
    return np.unique(np.frombuffer(keys, dtype=np.int64))


def skip_finished(jobs: Iterable[Job], done: np.ndarray) -> Iterator[Job]:
    """The jobs whose key is not in `done` (jobs arrive in increasing key order)."""
    i, n = 0, len(done)
    for job in jobs:
        k = key(job.index, job.sample)
        while i < n and done[i] < k:
            i += 1
        if i < n and done[i] == k:
            continue
        yield job


def run_file(out: str) -> Path:
    return Path(out + ".run.json")


def check_same_run(path: Path, settings: dict) -> dict:
    """The first run's settings; raises ResumeError naming what differs from `settings`."""
    try:
        first = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ResumeError(f"{path}: cannot read the first run's settings ({e}); cannot resume safely") from e
    a, b = _flat(first), _flat(settings)
    differ = sorted(k for k in set(a) | set(b) if k != "seed" and a.get(k) != b.get(k))
    if differ:
        raise ResumeError(f"--resume: these settings differ from the first run's ({path}): {', '.join(differ)}")
    return first


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_run_file(path: Path, settings: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
