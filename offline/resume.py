"""Exact resume: repair a torn last line, find the finished (index, sample) pairs, skip them.

Outputs are appended whole lines at a time (outputs.DurableAppender), so a kill can leave at most
one partial line, at the end; `repair` cuts it off. The finished pairs are kept as one sorted
int64 array (8 bytes a sample: 8 MB for a million), and since jobs come in (index, sample)
order, skipping is a merge against it. `OUT.run.json` holds the settings a resumed run must
share with the first one (above all the base seed, and the input's size and sha256), so a resume
never mixes two runs or two inputs. Lines the input does not ask for, or that repeat an earlier
one, are reported and counted as nothing.
"""
from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstmgen.errors import UsageError
from lstmgen.offline.jobs import Job
from lstmgen.offline.outputs import line_key

SAMPLE_BITS = 24  # key = index << 24 | sample (prompts.MAX_NUM_SAMPLES < 2**24)
SAMPLE_MASK = (1 << SAMPLE_BITS) - 1
MAX_EXAMPLES = 5  # duplicated or foreign lines named in the warning


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


@dataclass(frozen=True)
class Finished:
    """What an output already holds, measured against the input it is resumed with."""

    keys: np.ndarray  # sorted unique keys of this input's samples: each counts as done once
    duplicates: int  # lines repeating an (index, sample) that came earlier in the file
    foreign: int  # lines of no sample this input asks for (another input's, or edited in)
    examples: tuple[str, ...]  # the first few of those two kinds, to show


def finished_keys(path: Path, fmt: str, counts: Sequence[int]) -> Finished:
    """Every line of `path` (after `repair`) sorted into this input's finished samples, duplicates
    and foreign lines; `counts[i]` is the number of samples prompt i asks for."""
    keys, foreign, examples = array("q"), 0, []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            try:
                index, sample = line_key(line, fmt)
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise ResumeError(f"{path}:{n}: not an output line of lstmgen sample ({e}); "
                                  "cannot resume into this file") from e
            if 0 <= index < len(counts) and 0 <= sample < counts[index]:
                keys.append(key(index, sample))
                continue
            foreign += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"line {n}: index {index} sample {sample}")
    unique, seen = np.unique(np.frombuffer(keys, dtype=np.int64), return_counts=True)
    again = unique[seen > 1][:MAX_EXAMPLES - len(examples)]
    examples += [f"index {k >> SAMPLE_BITS} sample {k & SAMPLE_MASK}, {c} times"
                 for k, c in zip(again.tolist(), seen[seen > 1].tolist())]
    return Finished(unique, int(len(keys) - len(unique)), foreign, tuple(examples))


def extra_lines_warning(path: Path, finished: Finished) -> str | None:
    """The warning for duplicated or foreign lines, or None: they stay (the file is the user's),
    and a resumed run writes only what is missing, so each sample is counted once."""
    if not finished.duplicates and not finished.foreign:
        return None
    return (f"warning: {path} holds {finished.duplicates:,} duplicated line(s) and {finished.foreign:,} line(s) "
            f"of no sample this input asks for ({'; '.join(finished.examples)}); they are left in place and "
            "not counted as done: remove them by hand, or pass --overwrite to start again")


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


def max_tokens_of(keys: np.ndarray, max_tokens: Sequence[int]) -> int:
    """The max_new_tokens of the samples `keys` name (`max_tokens[i]`: prompt i's): what running
    them would cost, which a resumed run does not pay."""
    per_prompt = np.asarray(max_tokens, dtype=np.int64)
    return int(per_prompt[keys >> SAMPLE_BITS].sum()) if len(keys) else 0


def run_file(out: str) -> Path:
    return Path(out + ".run.json")


def check_same_run(path: Path, settings: dict) -> dict:
    """The first run's settings; raises ResumeError naming what differs from `settings`."""
    try:
        first = json.loads(path.read_text())
        if not isinstance(first, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as e:
        raise ResumeError(f"{path}: cannot read the first run's settings ({e}); cannot resume safely") from e
    check_same_input(first.get("input"), settings["input"], settings["prompts"])
    a, b = _flat(first), _flat(settings)
    # the base seed is the first run's whatever this one drew; the input was compared above
    compared = {k for k in set(a) | set(b) if k != "seed" and not k.startswith("input.")}
    differ = sorted(k for k in compared if a.get(k) != b.get(k))
    if differ:
        raise ResumeError(f"--resume: these settings differ from the first run's ({path}): {', '.join(differ)}")
    return first


def check_same_input(first: dict | None, now: dict, prompts: str) -> None:
    """Refuses to resume from an input whose bytes changed: its prompts (and so its indexes,
    seeds and texts) would not be the ones the output's lines were made from."""
    if first is None or first == now:  # None: a run file from before inputs were recorded (cli warns)
        return
    old = first if isinstance(first, dict) else {}
    if old.get("size") != now["size"]:
        what = f"{old.get('size')} -> {now['size']} bytes"
    else:
        what = f"same size, sha256 {str(old.get('sha256'))[:12]}... -> {now['sha256'][:12]}..."
    raise ResumeError(f"--resume: {prompts} changed since the first run ({what}): the samples already written "
                      "belong to the old prompts. Resume with the original file, or pass --overwrite to start "
                      "again with this one")


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
