"""Drive the serving scheduler with a stream of jobs, holding at most `window` of them at once.

`results` is the one loop both paths share: the local command consumes it on its own event loop,
and each Ray actor runs it on a private loop thread (`LoopThread`), one call per block of rows.
Jobs are made as they are needed, so memory depends on the window, not on the input's size.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from lstmgen.offline.jobs import Job
from lstmgen.serve.errors import GenerationError, InvalidRequest
from lstmgen.serve.params import Limits
from lstmgen.serve.scheduler import Scheduler


@dataclass(frozen=True)
class Result:
    job: Job
    row: dict  # the output record (see `output_row`)
    tokens: int  # generated tokens
    retry: bool = False  # a transient failure: not written, so --resume runs it again


def offline_limits(batch_size: int, window: int, max_new_tokens: int) -> Limits:
    # The window bounds what is in the system, so the scheduler never refuses a job as overloaded.
    return Limits(max_new_tokens=max(Limits().max_new_tokens, max_new_tokens),
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


async def run_one(scheduler: Scheduler, job: Job) -> Result:
    row = output_row(job)
    parts, logprobs, fin = [], [], None
    try:
        # Nobody reads offline output token by token: the stream wakes this reader once, when it
        # ends (a wake-up per token of every row would take the cores ONNX Runtime needs).
        stream = scheduler.submit(job.request, whole=True)
        try:
            while (chunk := await stream.next()) is not None:
                parts.append(chunk.text)
                logprobs += [_jsonable(x) for x in chunk.logprobs]
                fin = chunk.finished or fin
        except asyncio.CancelledError:
            stream.cancel()
            raise
    except InvalidRequest as e:  # e.g. a prompt symbol the model does not know: part of the result
        row["error"] = str(e)
        return Result(job, row, 0)
    except GenerationError as e:
        row["error"] = str(e)
        return Result(job, row, 0, retry=True)
    except Exception as e:  # anything else this one record raised: its line says so, the run goes on
        row["error"] = f"failed while sampling this record: {type(e).__name__}: {e}"
        return Result(job, row, 0)
    row.update(text="".join(parts), finish_reason=fin.reason.value, prompt_tokens=fin.prompt_tokens,
               generated_tokens=fin.generated_tokens)
    if fin.stop_sequence:
        row["stop_sequence"] = fin.stop_sequence
    if job.request.logprobs:
        row["logprobs"] = logprobs
    return Result(job, row, fin.generated_tokens)


async def results(scheduler: Scheduler, jobs: Iterable[Job], window: int, ordered: bool) -> AsyncIterator[Result]:
    """Every job's Result: in completion order, or with `ordered` in job order (holding at most
    `window` finished results back while an earlier one is still running)."""
    free = asyncio.Semaphore(window)
    done: asyncio.Queue = asyncio.Queue()
    tasks: set[asyncio.Task] = set()

    async def one(k: int, job: Job) -> None:
        await done.put((k, await run_one(scheduler, job)))

    async def feed() -> None:
        n = 0
        try:
            for n, job in enumerate(jobs, 1):
                await free.acquire()
                task = asyncio.create_task(one(n - 1, job))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except Exception as e:  # the job iterator failed (e.g. a bad record): the consumer raises it
            await done.put((-1, e))
            return
        await done.put((-1, n))  # fed them all: n is the total

    feeder = asyncio.create_task(feed())
    pending: dict[int, Result] = {}
    yielded, total = 0, None
    try:
        while total is None or yielded < total:
            k, result = await done.get()
            if k < 0:
                if isinstance(result, Exception):
                    raise result
                total = result
                continue
            if not ordered:
                free.release()
                yielded += 1
                yield result
                continue
            pending[k] = result
            while yielded in pending:
                free.release()  # a slot frees only once its result has left the reorder buffer
                yield pending.pop(yielded)
                yielded += 1
    finally:
        feeder.cancel()
        for task in list(tasks):
            task.cancel()


class LoopThread:
    """An event loop on a thread of its own with a started Scheduler, for callers without
    asyncio (a Ray actor): `run(jobs)` blocks until every job has finished."""

    def __init__(self, engine, limits: Limits):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lstmgen-offline-loop", daemon=True)
        self._thread.start()
        self.scheduler = self._call(self._start(engine, limits))

    @staticmethod
    async def _start(engine, limits: Limits) -> Scheduler:
        scheduler = Scheduler(engine, limits)
        scheduler.start()
        return scheduler

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def run(self, jobs: list[Job], window: int) -> list[Result]:
        async def collect() -> list[Result]:
            return [r async for r in results(self.scheduler, jobs, window, ordered=True)]
        return self._call(collect())

    def close(self) -> None:
        self._call(self.scheduler.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
