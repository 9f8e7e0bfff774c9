"""Server memory held by gRPC streams whose client reads nothing (docs/hardening.md, section 12).

    python tools/unread_memory.py BUNDLE_DIR --streams 64 [--logprobs 20] [--rounds 2] [-- SERVE_FLAGS]

Starts `lstmgen serve BUNDLE_DIR` on a free loopback port with metrics, opens N streams with a
1 KB HTTP/2 window that it never reads (a stalled client), waits until every one is parked
(backpressure) or finished, cancels them, and prints the server's RSS before, while holding and
after, per round. A prompt the model can read: --prompt (default "All").
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from lstmgen.tools.scrape import scrape_metrics, wait_for
from lstmgen_client import Client
from lstmgen_client.v1 import generator_pb2 as pb

HELD = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]  # a client that does not read


def start(bundle: str, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "lstmgen.cli", "serve", bundle, "--host", "127.0.0.1", "--port", "0",
           "--metrics-port", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    for line in proc.stdout:
        m = re.search(r"serving on ([\d.]+:\d+) \(metrics on (\S+)\)", line)
        if m:
            return proc, m.group(1), m.group(2)
    raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")




def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--logprobs", type=int, default=20, help="top_logprobs per token (0: no logprobs)")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt", default="All")
    p.add_argument("serve_flags", nargs="*", help="after --: more `lstmgen serve` flags")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        proc, target, url = start(a.bundle, Path(d) / "serve.log", ["--max-concurrent", str(max(a.streams, 512)),
                                                                    *a.serve_flags])
        rss = lambda: scrape_metrics(url)["process_resident_memory_bytes"] / 2**20  # noqa: E731
        try:
            with Client(target) as c:  # warm the paths that allocate for good
                c.generate(a.prompt, max_new_tokens=400, logprobs=a.logprobs > 0, top_logprobs=a.logprobs)
            wait_for(url, lambda m: m["lstmgen_open_streams"] == 0, 30)
            before = rss()
            print(f"streams {a.streams}, top_logprobs {a.logprobs}, max_new_tokens {a.max_new_tokens}: "
                  f"RSS before {before:.0f} MB")
            for r in range(a.rounds):
                with grpc.insecure_channel(target, options=HELD) as ch:
                    gen = ch.unary_stream("/lstmgen.v1.Generator/Generate",
                                          request_serializer=pb.GenerateRequest.SerializeToString,
                                          response_deserializer=pb.GenerateResponse.FromString)
                    calls = [gen(pb.GenerateRequest(prompt=a.prompt, max_new_tokens=a.max_new_tokens, seed=i,
                                                    logprobs=a.logprobs > 0, top_logprobs=a.logprobs))
                             for i in range(a.streams)]
                    m = wait_for(url, lambda m: m["lstmgen_streams_in_system"] == m["lstmgen_parked_streams"], 120)
                    time.sleep(1)  # the last writes settle
                    holding, made = rss(), scrape_metrics(url)["lstmgen_generated_tokens_total"]
                    for call in calls:
                        call.cancel()
                wait_for(url, lambda m: m["lstmgen_open_streams"] == 0, 60)
                time.sleep(1)
                print(f"round {r + 1}: holding {holding:.0f} MB ({(holding - before) / a.streams:.2f} MB a stream, "
                      f"{m['lstmgen_parked_streams']:.0f} parked, {made:,.0f} tokens made in all so far), "
                      f"after cancelling {rss():.0f} MB ({(rss() - before) / before:+.0%})")
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
