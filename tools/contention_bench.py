"""How much a little work beside it slows ONNX Runtime's model step (docs/benchmark.md, "What
still holds the 64-stream figures"), side by side in one run.

    python tools/contention_bench.py BUNDLE [--batch 64] [--seconds 3] [--repeats 3]

The server shares the machine's cores with its event loop, gRPC's threads and (in `lstmgen bench`)
the load generator: on 2 cores together about a fifth of one core while ORT runs its step on
both. This times the bare step loop (the bundle's step graph, the server's session options) alone
and with another process that keeps one core busy for a share of the time in short bursts, the
way an event loop wakes, interleaved, and prints each step time against the quiet one. ORT splits
each matrix product evenly between its threads, so the step waits for the thread that lost its
core: the step slows by more than the share of one core taken.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

from lstmgen.tools.bench import RawStep
from lstmgen.serve.engine import EngineConfig


def busy(share: float, period_s: float, stop) -> None:
    """Spin for `share` of every `period_s`, sleep the rest, until `stop` is set."""
    while not stop.is_set():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < share * period_s:
            pass
        time.sleep(period_s * (1 - share))


def step_ms(raw: RawStep, batch: int, seconds: float) -> float:
    """Mean ms per step of the bare loop (lstmgen bench's raw step)."""
    return 1e3 * batch / raw.tokens_per_s(batch, seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (the server's --threads)")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    raw = RawStep(args.bundle, EngineConfig(device="cpu", intra_op_threads=args.threads))  # the server's spin
    step_ms(raw, args.batch, 1.0)  # warm up
    loads = [(0.0, 0.0), (0.05, 0.002), (0.1, 0.002), (0.2, 0.002), (0.1, 0.0005)]
    times: dict[tuple, list[float]] = {load: [] for load in loads}
    for _ in range(args.repeats):
        for share, period in loads:
            stop = mp.Event()
            proc = mp.Process(target=busy, args=(share, period, stop), daemon=True) if share else None
            if proc:
                proc.start()
                time.sleep(0.2)
            times[(share, period)].append(step_ms(raw, args.batch, args.seconds))
            stop.set()
            if proc:
                proc.join()
    quiet = statistics.median(times[loads[0]])
    print(f"B={args.batch}, {args.threads} ORT threads: bare step {quiet:.2f} ms (median of {args.repeats})")
    for share, period in loads[1:]:
        ms = statistics.median(times[(share, period)])
        print(f"  beside a process busy {share:.0%} of one core in {share * period * 1e3:.2f} ms bursts: "
              f"{ms:.2f} ms, {ms / quiet - 1:+.0%}")


if __name__ == "__main__":
    main()
