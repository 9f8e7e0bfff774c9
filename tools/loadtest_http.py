"""HTTP (OpenAI SSE) against gRPC on ONE server, in one run: the same streams, prompts and lengths.

    lstmgen serve BUNDLE --port 50051 --http-port 8000 &
    python tools/loadtest_http.py --grpc localhost:50051 --http http://localhost:8000 --streams 32 --seconds 20

Each transport gets the window in turn (gRPC, then HTTP, then gRPC again so drift shows), with N
closed-loop streams issuing requests back to back. Reported per transport: generated tokens/s,
requests/s, time to first token p50/p99, and the ratio HTTP/gRPC. The HTTP side is a minimal
asyncio client (stdlib, keep-alive connection per stream), so the figure is the server's cost, not
a heavy client's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import urllib.parse

from lstmgen_client import AsyncClient


class SSEClient:
    """One keep-alive HTTP/1.1 connection; POST /v1/completions with stream=true."""

    def __init__(self, base: str):
        u = urllib.parse.urlparse(base)
        self.host, self.port = u.hostname, u.port or 80
        self.reader = self.writer = None

    async def completion(self, body: dict) -> tuple[int, float | None]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(data) + data)
        t0, first, tokens = time.perf_counter(), None, 0
        status = await self.reader.readline()
        assert b" 200 " in status, status
        while (await self.reader.readline()) not in (b"\r\n", b""):
            pass
        while True:  # chunked transfer encoding: size line, data, CRLF
            size = int((await self.reader.readline()).strip(), 16)
            if size == 0:
                await self.reader.readline()
                break
            payload = await self.reader.readexactly(size + 2)
            for event in payload.split(b"\n\n"):
                if event.startswith(b"data: {"):
                    text = json.loads(event[6:])["choices"][0]["text"]
                    if text and first is None:
                        first = time.perf_counter() - t0
                    tokens += len(text)  # a char model: one token per character
        return tokens, first


async def window(kind: str, args) -> dict:
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 1.0, "stream": True}
    tokens, ttft, reqs = 0, [], 0
    end = time.perf_counter() + args.seconds

    async def worker(i: int) -> None:
        nonlocal tokens, reqs
        if kind == "http":
            c = SSEClient(args.http)
            while time.perf_counter() < end:
                n, first = await c.completion(body)
                tokens, reqs = tokens + n, reqs + 1
                ttft.append(first)
            c.writer.close()
        else:
            async with AsyncClient(args.grpc) as c:
                while time.perf_counter() < end:
                    t0, first = time.perf_counter(), None
                    async for chunk in c.generate_stream(args.prompt, max_new_tokens=args.max_tokens):
                        if first is None and chunk.token_count:
                            first = time.perf_counter() - t0
                        tokens += chunk.token_count
                    reqs += 1
                    ttft.append(first)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(args.streams)))
    took = time.perf_counter() - t0
    ttft = sorted(x for x in ttft if x is not None)
    q = lambda p: round(1e3 * ttft[min(len(ttft) - 1, int(p * len(ttft)))], 1) if ttft else None  # noqa: E731
    return {"transport": kind, "tokens_per_s": round(tokens / took), "requests_per_s": round(reqs / took, 1),
            "ttft_ms_p50": q(0.5), "ttft_ms_p99": q(0.99), "requests": reqs}


async def main_async(args) -> list[dict]:
    rows = []
    for kind in ("grpc", "http", "grpc"):
        rows.append(await window(kind, args))
        print(json.dumps(rows[-1]), flush=True)
    grpc_tps = statistics.mean(r["tokens_per_s"] for r in rows if r["transport"] == "grpc")
    print(f"HTTP/gRPC tokens/s ratio: {rows[1]['tokens_per_s'] / grpc_tps:.2f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grpc", required=True, help="gRPC target HOST:PORT")
    p.add_argument("--http", required=True, help="HTTP base URL, e.g. http://localhost:8000")
    p.add_argument("--streams", type=int, default=32, help="concurrent closed-loop streams per transport")
    p.add_argument("--seconds", type=float, default=20.0, help="window per transport")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens per request")
    p.add_argument("--prompt", default="First Citizen:\n", help="prompt of every request")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
