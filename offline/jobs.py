"""Prompt items -> generation jobs, one per (prompt, sample), made lazily in input order.

A job's seed depends only on the base seed and its (index, sample) position (or on the item's
own "seed"), so a sample is the same whichever path runs it (local, resumed, or a Ray actor)
and whatever shares its batch.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import numpy as np

from lstmgen.config_args import option
from lstmgen.offline.prompts import SAMPLING_FIELDS, Fingerprint, InputError, PromptItem, parse_item, read_records
from lstmgen.serve.completion import nth_seed
from lstmgen.serve.errors import InvalidRequest
from lstmgen.serve.params import GenerationRequest, RequestLimits, SamplingParams, validate


@dataclass(frozen=True)
class SampleConfig:
    """The command's defaults; a prompt's own fields override them."""

    num_samples: int = option(1, "samples per prompt")
    max_new_tokens: int = option(200, "tokens per sample")
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = option((), "stop sequence (repeatable)", append=True)
    seed: int = 0  # base seed: each (prompt, sample) derives its own from it (--seed; unset: a random one)
    skip_unknown: bool = option(False, "drop prompt characters the model does not know")
    logprobs: bool = False  # both from --logprobs N
    top_logprobs: int = 0


@dataclass(frozen=True)
class Job:
    index: int  # the prompt's position in the input (0-based, blank lines not counted)
    sample: int  # sample number for that prompt
    id: str | int | None  # the input's "id", if it has one
    request: GenerationRequest


def sample_seed(base: int, index: int, sample: int) -> int:
    """Independent, reproducible seed per (prompt, sample)."""
    return int(np.random.SeedSequence([base, index, sample]).generate_state(1, np.uint64)[0] >> 1)


def request_for(item: PromptItem, cfg: SampleConfig, seed: int) -> GenerationRequest:
    overrides = {k: getattr(item, k) for k in SAMPLING_FIELDS if getattr(item, k) is not None}
    sampling = replace(cfg.sampling, **overrides, seed=seed)

    def pick(name: str):
        own = getattr(item, name)
        return getattr(cfg, name) if own is None else own

    logprobs = pick("logprobs") or bool(item.top_logprobs)
    return GenerationRequest(prompt=item.prompt, max_new_tokens=pick("max_new_tokens"), sampling=sampling,
                             seed_given=True, stop=tuple(pick("stop")), skip_unknown=pick("skip_unknown"),
                             logprobs=logprobs, top_logprobs=pick("top_logprobs") if logprobs else 0)


def jobs_for(item: PromptItem, index: int, cfg: SampleConfig) -> Iterator[Job]:
    n = cfg.num_samples if item.num_samples is None else item.num_samples
    for j in range(n):
        seed = nth_seed(item.seed, j) if item.seed is not None else sample_seed(cfg.seed, index, j)
        yield Job(index, j, item.id, request_for(item, cfg, seed))


def iter_jobs(items: Iterable[PromptItem], cfg: SampleConfig) -> Iterator[Job]:
    for index, item in enumerate(items):
        yield from jobs_for(item, index, cfg)


@dataclass(frozen=True)
class CheckedInput:
    """What the check pass learnt about the input."""

    samples: int  # samples it asks for
    identity: dict  # {"size", "sha256"} of the bytes read: --resume refuses an input that changed
    int_ids: bool = False  # every "id" given is an integer (a Parquet output's id column type)
    counts: array | None = None  # samples asked for per prompt, when wanted (4 bytes a prompt)
    tokens: int = 0  # the max_new_tokens of all its samples: what the run may make (progress ETA)
    max_tokens: array | None = None  # max_new_tokens per prompt, with `counts` (4 bytes a prompt)


def check_input(path: str, cfg: SampleConfig, limits: RequestLimits, counts: bool = False) -> CheckedInput:
    """Reads the whole input once (streaming) and checks every record's fields, types and ranges;
    raises InputError naming the file and line. `counts`: also keep each prompt's sample count
    (what `--resume` needs to tell a foreign output line from a finished sample) and max_new_tokens
    (what the finished samples would have cost: the ETA counts only the rest)."""
    total, tokens, digest, id_types = 0, 0, Fingerprint(), set()
    per_prompt, max_tokens = (array("I"), array("I")) if counts else (None, None)
    for where, raw in read_records(path, digest):
        item = parse_item(raw, where)
        try:
            max_new = validate(request_for(item, cfg, item.seed or 0), limits)
        except InvalidRequest as e:
            raise InputError(f"{where}: {e}") from e
        id_types.add(type(item.id))
        n = cfg.num_samples if item.num_samples is None else item.num_samples
        total += n
        tokens += n * max_new
        if per_prompt is not None:
            per_prompt.append(n)
            max_tokens.append(max_new)
    if total == 0:
        raise InputError(f"{path}: no prompts found")
    return CheckedInput(total, digest.as_dict(), int in id_types and str not in id_types, per_prompt, tokens,
                        max_tokens)
