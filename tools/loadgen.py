"""A load generator in its own process: N concurrent streams for T seconds against a server.

Each stream issues requests back to back, the first of staggered lengths so that requests end and
start at a steady rate; the measured window follows a warm-up without a break. Reported: tokens/s
over the window, time to first token, inter-token latency (a message's gap spread over the tokens
it carries), messages/s, request latency, completed, cancelled and failed requests by status,
and the CPU this process used in the window (on one machine with the server, it takes the cores
the server needs).
With `--cancel-fraction F` that share of requests is abandoned at a random point (after a random
number of tokens); with `--metrics URL` the server's RSS and row/queue gauges are scraped before
and after the run, and what its counters grew by inside the measured window is reported; with
`--probe-rate R` a separate connection fires R short calls per second on a fixed schedule (open
loop) and reports how fast each was answered, by status: at a full server, the rejection latency.
`lstmgen loadtest --help` (or `python -m lstmgen.tools.loadgen --help`). It lives with the server
package, not the client: it reads the server's metric names (lstmgen.tools.scrape).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

from lstmgen import config_args
from lstmgen.config_args import option
from lstmgen.tools.scrape import counter_deltas, scrape_or_none, settle
from lstmgen_client.client import AsyncClient
from lstmgen_client.errors import LstmgenError


def pct(xs: list, q: float):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def percentiles(xs: list) -> dict:
    return {"p50": pct(xs, 0.5), "p90": pct(xs, 0.9), "p99": pct(xs, 0.99), "max": pct(xs, 1.0)}


@dataclass
class LoadResult:
    streams: int
    seconds: float
    tokens: int = 0
    messages: int = 0
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: dict = field(default_factory=dict)
    ttft_ms: list = field(default_factory=list)
    itl_ms: list = field(default_factory=list)
    latency_ms: list = field(default_factory=list)  # whole request, completed ones
    failed_ms: dict = field(default_factory=dict)  # status -> times from the call to its error

    def summary(self) -> dict:
        # The first keys are read by `lstmgen bench` (tools/bench/server.py): keep them.
        return {
            "streams": self.streams, "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens / self.seconds, 1),
            "messages_per_s": round(self.messages / self.seconds, 1),
            "tokens_per_message": round(self.tokens / max(self.messages, 1), 2),
            "completed": self.completed, "failed": dict(self.failed),
            "ttft_ms": pct(self.ttft_ms, 0.5), "ttft_p99_ms": pct(self.ttft_ms, 0.99),
            "p50_ms": pct(self.itl_ms, 0.5), "p99_ms": pct(self.itl_ms, 0.99),
            "itl_mean_ms": round(statistics.fmean(self.itl_ms), 3) if self.itl_ms else None,
            "requests": self.requests, "cancelled": self.cancelled, "failed_total": sum(self.failed.values()),
            "latency_ms": percentiles(self.latency_ms),
            "failed_latency_ms": {code: percentiles(xs) for code, xs in self.failed_ms.items()},
        }


@dataclass(frozen=True)
class LoadPlan:
    """One load run; each field but `params` is a `lstmgen loadtest` flag (config_args)."""

    streams: int = option(8, "concurrent streams, each issuing requests back to back")
    seconds: float = option(10.0, "length of the measured window")
    prompt: str = option("The ", "prompt of every request")
    # request settings, or a list that streams take in turn (--max-new-tokens, --temperature, --sampling-json)
    params: dict | list[dict] = field(default_factory=dict)
    warmup: float = option(1.0, "seconds of load before the window (not counted)")
    # share of requests abandoned after a random number of tokens
    cancel_fraction: float = option(0.0, "share of requests the client abandons after a random number of tokens")
    # 0: no cap; else stop issuing once this many were started
    max_requests: int = option(0, "stop after this many requests (0: only --seconds)", flag="--requests")
    backoff: float = option(0.0, "mean seconds a stream pauses after a failed request (jittered 0.5x-1.5x)")
    probe_rate: float = option(0.0, "also fire this many 1-token calls per second on a fixed schedule, on their "
                                    "own connection, and report their latency by status")
    stagger: bool = option(True, "first requests of staggered lengths, so requests end and start at a steady rate "
                                 "(--no-stagger: every stream starts with a full-length request)")


def staggered_length(longest: int, index: int, streams: int) -> int:
    """Tokens the first request of stream `index` of `streams` asks for: (index + 1) / streams of
    the length, so that requests end and start at a steady rate (one_stream)."""
    return max(1, longest * (index % streams + 1) // streams)


def request_seed(index: int, n: int) -> int:
    """The seed of stream `index`'s n-th request: every run sends the same requests."""
    return index * 100_003 + n


async def one_stream(client: AsyncClient, res: LoadResult, window: tuple[float, float], plan: LoadPlan,
                     index: int) -> None:
    """Stream `index` issues requests back to back from now until the window ends; what arrives
    inside the window [start, stop) counts, and the requests started inside it report their
    latency and outcome. The stream's first request asks for (index + 1) / streams of the length
    (stagger): without it every stream starts and ends its requests in step with the others, and
    a window catches whole waves of 64 prompts at once instead of a server's steady churn."""
    start_at, stop_at = window
    rng = random.Random(index)
    # a list of settings: stream i uses the i-th (cyclically), so one batch mixes them
    params = plan.params if isinstance(plan.params, dict) else plan.params[index % len(plan.params)]
    longest = params.get("max_new_tokens") or 256
    n = 0
    while time.perf_counter() < stop_at and not (plan.max_requests and res.requests >= plan.max_requests):
        call = params
        if n == 0 and plan.stagger and plan.streams > 1:
            call = {**params, "max_new_tokens": staggered_length(longest, index, plan.streams)}
        t0 = last = time.perf_counter()
        counted = t0 >= start_at  # started inside the window: its first token, latency and outcome count
        res.requests += counted
        cancel_at = rng.randrange(longest) if rng.random() < plan.cancel_fraction else None
        got = 0
        try:
            async for chunk in client.generate_stream(plan.prompt, seed=request_seed(index, n), **call):
                now = time.perf_counter()
                if now > stop_at:  # count only what arrived inside the window
                    break
                if now >= start_at:
                    res.tokens += chunk.token_count
                    res.messages += 1
                    if got and chunk.token_count and last >= start_at:
                        res.itl_ms.extend([(now - last) * 1e3 / chunk.token_count] * chunk.token_count)
                if not got and counted:
                    res.ttft_ms.append((now - t0) * 1e3)
                got += chunk.token_count
                last = now
                if chunk.finished is not None:
                    if counted:
                        res.completed += 1
                        res.latency_ms.append((now - t0) * 1e3)
                elif cancel_at is not None and got >= cancel_at:
                    res.cancelled += counted  # leaving the loop cancels the call: the server frees the row
                    break
        except LstmgenError as e:
            if counted:
                res.failed[e.code.name] = res.failed.get(e.code.name, 0) + 1
                res.failed_ms.setdefault(e.code.name, []).append((time.perf_counter() - t0) * 1e3)
            if plan.backoff:  # jittered, so rejected streams do not come back as one herd
                await asyncio.sleep(plan.backoff * (0.5 + rng.random()))
        n += 1


async def probe(target: str, window: tuple[float, float], rate: float, prompt: str, client_kw: dict) -> dict:
    """Calls of one token at `rate` per second whatever the answers (open loop), on their own
    channel: their latency is the server's, not this process's queue of streams."""
    times: dict[str, list] = {}

    async def one(client: AsyncClient) -> None:
        t0 = time.perf_counter()
        try:
            await client.generate(prompt, max_new_tokens=1)
            code = "OK"
        except LstmgenError as e:
            code = e.code.name
        times.setdefault(code, []).append((time.perf_counter() - t0) * 1e3)

    async with AsyncClient(target, timeout=30, **client_kw) as client:
        await client.model_info()
        start_at, stop_at = window
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        tasks, next_at = [], time.perf_counter()
        while next_at < stop_at:
            tasks.append(asyncio.ensure_future(one(client)))
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await asyncio.gather(*tasks)
    return {"rate": rate, **{code: {"count": len(xs), **percentiles(xs)} for code, xs in times.items()}}


async def run_load(target: str, streams: int, seconds: float, prompt: str, params: dict,
                   warmup: float = 1.0, *, cancel_fraction: float = 0.0, max_requests: int = 0, backoff: float = 0.0,
                   probe_rate: float = 0.0, metrics_url: str | None = None, stagger: bool = True,
                   **client_kw) -> tuple[LoadResult, dict]:
    """Returns the result and extra report sections: "server" (its state before and after, with
    metrics_url) and "probe" (with probe_rate)."""
    plan = LoadPlan(streams, seconds, prompt, params, warmup, cancel_fraction, max_requests, backoff, probe_rate,
                    stagger)  # positional: the field order above
    extra: dict = {}
    async with AsyncClient(target, timeout=seconds + warmup + 60, **client_kw) as client:
        await client.model_info()  # connected and serving before the clock starts
        before = (await asyncio.to_thread(settle, metrics_url))[0] if metrics_url else None
        res = LoadResult(streams, seconds)
        # One run: `warmup` seconds of load that do not count, then the window. The streams go on
        # through the boundary, so the window sees the server's steady state, not a fresh start.
        start = time.perf_counter() + warmup
        window = (start, start + seconds)
        probing = [probe(target, window, probe_rate, prompt, client_kw)] if probe_rate else []
        # the server's counters at the window's two ends (what it did in the steady state alone), and
        # this process's own CPU there: on a small machine the load generator takes cores the server
        # needs, so a figure measured beside it should say how much
        scrape = lambda: asyncio.to_thread(scrape_or_none, metrics_url)  # noqa: E731
        scrapes = at_window_ends(window, scrape) if metrics_url else []
        cpu = at_window_ends(window, _process_time)
        done = await asyncio.gather(*probing, *(one_stream(client, res, window, plan, i) for i in range(streams)))
        # tokens count while they arrive inside the window, so they are divided by the window; each
        # stream notices its end only at its next message, up to a pacing interval later (128 ms
        # at 64 streams: dividing by the time they took understated tokens/s by 2-3%)
        res.seconds = min(time.perf_counter(), start + seconds) - start
        (t0, c0), (t1, c1) = await readings(cpu, _process_time)
        extra["load_generator_cpu"] = {"seconds": round(t1 - t0, 4), "cpu_seconds": round(c1 - c0, 4),
                                       "cores": round((c1 - c0) / (t1 - t0), 4) if t1 > t0 else None}
        if probing:
            extra["probe"] = done[0]
        ends = await readings(scrapes, scrape)  # [(time, metrics or None)] at the window's ends
    if metrics_url:
        after, settle_s = await asyncio.to_thread(settle, metrics_url)
        rss0, rss1 = before["rss_bytes"], after["rss_bytes"]
        extra["server"] = {"before": before, "after": after, "settle_s": round(settle_s, 3),
                           "rss_growth": round(rss1 / rss0 - 1, 4) if rss0 and rss1 else None}
        if ends and all(m is not None for _, m in ends):
            (t0, m0), (t1, m1) = ends
            extra["server"]["window"] = {"seconds": round(t1 - t0, 4), "deltas": counter_deltas(m0, m1)}
    return res, extra


async def _process_time() -> float:
    return time.process_time()  # CPU seconds of this process, all its threads


async def read_at(at: float, read) -> tuple:
    """(perf_counter time, `await read()`) at perf_counter time `at`."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    return time.perf_counter(), await read()


def at_window_ends(window: tuple[float, float], read) -> list[asyncio.Task]:
    return [asyncio.create_task(read_at(t, read)) for t in window]


async def readings(tasks: list[asyncio.Task], read) -> list[tuple]:
    """The readings at_window_ends took; one still waiting for its time (a run that ended before
    its window, --requests) reads now instead."""
    for i, task in enumerate(tasks):
        if not task.done():
            task.cancel()
            tasks[i] = asyncio.create_task(read_at(0.0, read))
    return [await task for task in tasks]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lstmgen_client.cli import add_connection_arguments

    p.formatter_class = config_args.DefaultsFormatter
    p.add_argument("--target", required=True, help="HOST:PORT of the server")
    config_args.add_dataclass_arguments(p, LoadPlan, exclude=["params"])
    p.add_argument("--metrics", metavar="URL", help="the server's /metrics: report RSS and rows before and after")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens each request asks for")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of every request")
    p.add_argument("--sampling-json", metavar="JSON", default=None,
                   help='a JSON list of request settings, e.g. \'[{"temperature": 0.8, "top_p": 0.9}, {"greedy": true}]\'; '
                        "stream i uses entry i modulo its length (overrides --temperature)")
    p.add_argument("--json", default="-", help="file for the JSON summary ('-': stdout)")
    add_connection_arguments(p)


def run(args: argparse.Namespace) -> int:
    from lstmgen_client.cli import connection_kwargs

    params: dict | list[dict] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.sampling_json:
        try:
            settings = json.loads(args.sampling_json)
            assert isinstance(settings, list) and settings and all(isinstance(d, dict) for d in settings)
        except (ValueError, AssertionError):
            print("lstmgen loadtest: --sampling-json must be a non-empty JSON list of objects", file=sys.stderr)
            return 2
        params = [{"max_new_tokens": args.max_new_tokens, **d} for d in settings]
    plan = config_args.from_args(LoadPlan, args, exclude=["params"], params=params)
    res, extra = asyncio.run(run_load(
        args.target, plan.streams, plan.seconds, plan.prompt, params, plan.warmup,
        cancel_fraction=plan.cancel_fraction, max_requests=plan.max_requests, backoff=plan.backoff,
        probe_rate=plan.probe_rate, metrics_url=args.metrics, stagger=plan.stagger, **connection_kwargs(args)))
    out = json.dumps({**res.summary(), **extra})
    if args.json == "-":
        print(out)
    else:
        with open(args.json, "w") as f:
            f.write(out + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
