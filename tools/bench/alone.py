"""The server's scheduler alone, in this process: no gRPC and no load generator process."""
from __future__ import annotations

import time
from pathlib import Path

from lstmgen.tools.bench.config import SAMPLING_MODES


def scheduler_alone(bundle: Path, streams: int, seconds: float, prompt: str, max_new_tokens: int, mode: str,
                    threads: int = 0, warmup: float = 2.0) -> float:
    """Tokens/s of the server's scheduler with no gRPC and no load generator process: its worker,
    batching and message pacing in this process, `streams` readers issuing requests back to back
    (their first of staggered lengths, as the load generator's), counted over `seconds` after
    `warmup`. Beside the server's own figure it splits what is lost to the raw step into the
    scheduler's share and the serving edge's (gRPC, the event loop's writes, the client)."""
    import asyncio

    from lstmgen.serve.engine import Engine, EngineConfig
    from lstmgen.serve.params import GenerationRequest, SamplingParams
    from lstmgen.serve.scheduler import Scheduler
    from lstmgen.serve.service import ServiceConfig, pace
    from lstmgen.tools.loadgen import request_seed, staggered_length

    engine = Engine(bundle, EngineConfig(device="cpu", intra_op_threads=threads))  # serve's spin
    settings = SAMPLING_MODES[mode]
    cfg = ServiceConfig()

    async def run() -> float:
        scheduler = Scheduler(engine)
        scheduler.start()
        start = time.perf_counter() + warmup
        stop, tokens = start + seconds, [0]

        async def reader(i: int) -> None:
            n = 0
            while time.perf_counter() < stop:
                length = staggered_length(max_new_tokens, i, streams) if n == 0 else max_new_tokens
                sampling = SamplingParams(**settings[i % len(settings)], seed=request_seed(i, n))
                stream = scheduler.submit(GenerationRequest(prompt=prompt, max_new_tokens=length,
                                                            sampling=sampling, seed_given=True))
                async for chunk in stream:
                    if start <= time.perf_counter() < stop:
                        tokens[0] += chunk.token_count
                    if chunk.finished is None:
                        await pace(scheduler, cfg, stream)
                n += 1

        try:
            await asyncio.gather(*(reader(i) for i in range(streams)))
        finally:
            await scheduler.close()
        return tokens[0] / seconds

    return asyncio.run(run())
