"""A load generator in its own process: N concurrent streams for T seconds against a server.

Each stream issues requests back to back. Reported: tokens/s over the window, time to first
token, inter-token latency (a message's gap spread over the tokens it carries), messages/s,
completed and failed requests by status. `python -m lstmgen_client.loadgen --help`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

from lstmgen_client.client import AsyncClient
from lstmgen_client.errors import LstmgenError


@dataclass
class LoadResult:
    streams: int
    seconds: float
    tokens: int = 0
    messages: int = 0
    completed: int = 0
    failed: dict = field(default_factory=dict)
    ttft_ms: list = field(default_factory=list)
    itl_ms: list = field(default_factory=list)

    def summary(self) -> dict:
        def pct(xs, q):
            if not xs:
                return None
            xs = sorted(xs)
            return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)
        return {
            "streams": self.streams, "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens / self.seconds, 1),
            "messages_per_s": round(self.messages / self.seconds, 1),
            "tokens_per_message": round(self.tokens / max(self.messages, 1), 2),
            "completed": self.completed, "failed": dict(self.failed),
            "ttft_ms": pct(self.ttft_ms, 0.5), "ttft_p99_ms": pct(self.ttft_ms, 0.99),
            "p50_ms": pct(self.itl_ms, 0.5), "p99_ms": pct(self.itl_ms, 0.99),
            "itl_mean_ms": round(statistics.fmean(self.itl_ms), 3) if self.itl_ms else None,
        }


async def one_stream(client: AsyncClient, res: LoadResult, stop_at: float, prompt: str, params: dict,
                     seed: int) -> None:
    n = 0
    while time.perf_counter() < stop_at:
        t0 = last = time.perf_counter()
        first = True
        try:
            async for chunk in client.generate_stream(prompt, seed=seed * 100_003 + n, **params):
                now = time.perf_counter()
                if now > stop_at:  # count only what arrived inside the window
                    break
                res.tokens += chunk.token_count
                res.messages += 1
                if first:
                    res.ttft_ms.append((now - t0) * 1e3)
                    first = False
                elif chunk.token_count:
                    res.itl_ms.extend([(now - last) * 1e3 / chunk.token_count] * chunk.token_count)
                last = now
                if chunk.finished is not None:
                    res.completed += 1
        except LstmgenError as e:
            res.failed[e.code.name] = res.failed.get(e.code.name, 0) + 1
        n += 1


async def run_load(target: str, streams: int, seconds: float, prompt: str, params: dict,
                   warmup: float = 1.0) -> LoadResult:
    async with AsyncClient(target, timeout=seconds + warmup + 60) as client:
        await client.model_info()  # connected and serving before the clock starts
        if warmup:
            warm = LoadResult(streams, warmup)
            end = time.perf_counter() + warmup
            await asyncio.gather(*(one_stream(client, warm, end, prompt, params, 10_000 + i)
                                   for i in range(streams)))
        res = LoadResult(streams, seconds)
        start = time.perf_counter()
        await asyncio.gather(*(one_stream(client, res, start + seconds, prompt, params, i) for i in range(streams)))
        res.seconds = time.perf_counter() - start
        return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="HOST:PORT")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--json", default="-", help="file for the JSON summary ('-': stdout)")
    args = p.parse_args(argv)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    res = asyncio.run(run_load(args.target, args.streams, args.seconds, args.prompt, params, args.warmup))
    out = json.dumps(res.summary())
    if args.json == "-":
        print(out)
    else:
        with open(args.json, "w") as f:
            f.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
