"""Drive the scheduler with a stream of jobs, holding at most `window` of them at once.

`results` is the one loop both paths share: the local command iterates it on its own thread, and
each Ray actor calls `Sampler.run` on a block of rows. Both read each job to its end through
serve/completion.py (no event loop: the scheduler's worker resolves a future per job). Jobs are
made as they are needed, so memory depends on the window, not on the input's size.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from lstmgen.offline.jobs import Job
from lstmgen.serve.completion import Completed, completions
from lstmgen.serve.errors import GenerationError, InvalidRequest
from lstmgen.serve.params import RequestLimits
from lstmgen.serve.scheduler import Scheduler


@dataclass(frozen=True)
class Result:
    job: Job
    row: dict  # the output record (see `output_row`)
    tokens: int  # generated tokens
    retry: bool = False  # a transient failure: not written, so --resume runs it again


def offline_limits(batch_size: int, window: int, max_new_tokens: int) -> RequestLimits:
    # The window bounds what is in the system, so the scheduler never refuses a job as overloaded.
    return RequestLimits(max_new_tokens=max(RequestLimits().max_new_tokens, max_new_tokens),
                  max_concurrent_streams=batch_size, max_queued_streams=window + 1)


def output_row(job: Job) -> dict:
    row = {"index": job.index, "sample": job.sample}
    if job.id is not None:
        row["id"] = job.id
    row.update(prompt=job.request.prompt, seed=job.request.sampling.seed)
    return row


def _jsonable(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    return x


def result_for(job: Job, outcome: Completed | Exception) -> Result:
    """A job's output record: its text and counts, or the error that ended it."""
    row = output_row(job)
    if isinstance(outcome, InvalidRequest):  # e.g. a prompt symbol the model does not know: part of the result
        row["error"] = str(outcome)
        return Result(job, row, 0)
    if isinstance(outcome, GenerationError):  # the worker failed or stopped: --resume runs it again
        row["error"] = str(outcome)
        return Result(job, row, 0, retry=True)
    if isinstance(outcome, Exception):  # anything else this one record raised: its line says so
        row["error"] = f"failed while sampling this record: {type(outcome).__name__}: {outcome}"
        return Result(job, row, 0)
    fin = outcome.finished
    row.update(text=outcome.text, finish_reason=fin.reason.value, prompt_tokens=fin.prompt_tokens,
               generated_tokens=fin.generated_tokens)
    if fin.stop_sequence:
        row["stop_sequence"] = fin.stop_sequence
    if job.request.logprobs:
        row["logprobs"] = [_jsonable(x) for x in outcome.logprobs]
    return Result(job, row, fin.generated_tokens)


def results(scheduler: Scheduler, jobs: Iterable[Job], window: int, ordered: bool,
            idle: Callable[[], float] | None = None) -> Iterator[Result]:
    """Every job's Result: in completion order, or with `ordered` in job order (holding at most
    `window` finished results back while an earlier one is still running). `idle` (the progress
    line) is called while no result comes, and returns the seconds until it is due again."""
    for job, outcome in completions(scheduler.submit_completion, ((job, job.request) for job in jobs), window,
                                    ordered, idle):
        yield result_for(job, outcome)


class Sampler:
    """A started Scheduler for callers that sample blocks of jobs (a Ray actor): `run(jobs)`
    blocks until every job has finished."""

    def __init__(self, engine, limits: RequestLimits):
        self.scheduler = Scheduler(engine, limits)
        self.scheduler.start()

    def run(self, jobs: list[Job], window: int) -> list[Result]:
        return list(results(self.scheduler, jobs, window, ordered=True))

    def close(self) -> None:
        self.scheduler.shutdown()
