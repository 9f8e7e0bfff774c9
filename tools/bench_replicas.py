"""Replicas behind nginx against one server, side by side in one run (docs/deploy.md, "Figures").

    python tools/bench_replicas.py [--preset char-rnn] [--vocab-size 83] [--streams 64] [--seconds 8]
                                   [--repeats 2] [--json docs/bench-replicas.json]

Four set-ups under the same load (`lstmgen loadtest`: N concurrent streams, back-to-back requests
at temperature 0.8), measured in turns so that a slow spell of the machine hits all of them:
  one replica, direct (ONNX Runtime's default threads: one per core);
  the same replica through nginx (what the proxy costs);
  two replicas through nginx, each with 1 / cores threads (the cores shared, not added);
  two replicas through nginx, each with the default threads (oversubscribed).
A machine's cores are the limit: replicas on one box divide them, so aggregate tokens/s does not
double here; replicas on their own machines (or pods with their own CPU) add up.
Needs nginx (Debian: apt-get install nginx). Random weights in the preset's shape, as `lstmgen bench`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's launchers: a real server, a real nginx

from conftest import start_server  # noqa: E402
from nginx import start_nginx  # noqa: E402

from lstmgen.tools.bench import BenchConfig, load, make_bundle  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="char-rnn")
    p.add_argument("--vocab-size", type=int, default=83)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, bundle, _ = make_bundle(BenchConfig(preset=args.preset, vocab_size=args.vocab_size, work_dir=tmp), work)
        common = ("--log-level", "WARNING", "--max-concurrent", str(args.streams))

        def serve(name: str, threads: int):
            # conftest.start_server passes --threads 1; the last --threads wins
            return start_server(bundle, work / f"{name}.log", *common, "--threads", str(threads))

        single = serve("single", 0)
        shared = [serve(f"shared{i}", max(1, cores // 2)) for i in range(2)]
        over = [serve(f"over{i}", 0) for i in range(2)]
        proxies = [start_nginx([single.target], work / "n1"), start_nginx([s.target for s in shared], work / "n2"),
                   start_nginx([s.target for s in over], work / "n3")]
        setups = {"1 replica, direct": (single.target, [single]),
                  "1 replica via nginx": (proxies[0].target, [single]),
                  f"2 replicas x {max(1, cores // 2)} thread(s) via nginx": (proxies[1].target, shared),
                  "2 replicas x default threads via nginx": (proxies[2].target, over)}
        runs: dict[str, list[float]] = {k: [] for k in setups}
        try:
            for _ in range(args.repeats):
                for name, (target, _servers) in setups.items():
                    r = load(target, args.streams, args.seconds, "The ", 256, "plain")
                    runs[name].append(r["tokens_per_s"])
                    print(f"{name}: {r['tokens_per_s']:,.0f} tok/s, TTFT p50 {r['ttft_ms']} ms, "
                          f"failed {r['failed']}", flush=True)
        finally:
            for x in proxies + [single] + shared + over:
                x.stop()
    base = statistics.median(runs["1 replica, direct"])
    out = {name: {"tokens_per_s": statistics.median(v), "vs_one_direct": statistics.median(v) / base, "runs": v}
           for name, v in runs.items()}
    print(f"\n{args.streams} streams, {args.preset} shape, vocabulary {args.vocab_size}, {cores} cores:")
    for name, d in out.items():
        print(f"  {name:45s} {d['tokens_per_s']:>9,.0f} tok/s  {d['vs_one_direct']:.0%}")
    if args.json:
        from lstmgen.tools.bench import cpu_model
        Path(args.json).write_text(json.dumps({"streams": args.streams, "preset": args.preset,
                                               "vocab_size": args.vocab_size, "cores": cores,
                                               "cpu_model": cpu_model(), "results": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
