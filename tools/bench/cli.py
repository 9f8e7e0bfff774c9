"""`lstmgen bench` flags onto BenchConfig; the run, its JSON report and its plot."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lstmgen.tools.bench.config import SAMPLING_MODES, TARGET_ENTROPY, WORD_LEVEL_FROM, BenchConfig
from lstmgen.tools.bench.figure import plot
from lstmgen.tools.bench.run import run_bench


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--preset", default=d.preset, help="model shape for random weights")
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint or run dir instead of random weights")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help=f"vocabulary of the random-weight model; from {WORD_LEVEL_FROM} on a word-level one "
                        "(PTB: 10000, WikiText-2: 33278)")
    p.add_argument("--sampling", default=",".join(d.sampling),
                   help=f"comma-separated sampling modes, each measured in this run: {', '.join(SAMPLING_MODES)} "
                        "(temperature 0.8, top_k 40, top_p 0.9; mixed: rows with different settings)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="measure each server point this many times (modes interleaved) and report the median")
    p.add_argument("--entropy", type=float, default=None,
                   help="mean entropy (nats/token) the random model's logits are shaped to "
                        f"(default: {TARGET_ENTROPY['word']} word level, {TARGET_ENTROPY['char']} char level)")
    p.add_argument("--work-dir", default=d.work_dir, help="where the bundle is written")
    p.add_argument("--concurrency", default=",".join(map(str, d.concurrency)), help="server stream counts")
    p.add_argument("--batches", default=",".join(map(str, d.batches)), help="raw ORT batch sizes")
    p.add_argument("--seconds", type=float, default=d.seconds, help="measurement window per server point")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens per request")
    p.add_argument("--int8", action="store_true", help="benchmark the int8 (dynamic quantized) export")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="ONNX Runtime intra-op threads of the server and of the raw step it is paired with "
                        "(0: ORT's default, one per core)")
    p.add_argument("--state-every", type=int, default=0, metavar="N",
                   help="also measure the cost of return_state and of a state every N tokens at 64 streams")
    p.add_argument("--json", default=None, help="write the results here (an existing file only with --overwrite)")
    p.add_argument("--plot", default=None,
                   help="draw tokens/s against concurrency into this PNG (an existing file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing --json/--plot files (outside --work-dir they are refused without it: "
                        "docs/ holds the published reports)")


def refuse_overwrite(paths: list[str | None], work_dir: str, overwrite: bool) -> str | None:
    """Why the run must not start, or None: an existing --json/--plot file (the published reports
    in docs/, copied from a command) is replaced only with --overwrite; bench's own work dir is its
    scratch space (`make bench` writes there run after run)."""
    work = Path(work_dir).resolve()
    taken = [p for p in paths if p and Path(p).exists() and not Path(p).resolve().is_relative_to(work)]
    if not taken or overwrite:
        return None
    return (f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}; write the figures elsewhere "
            f"(e.g. {work_dir}/) or pass --overwrite to replace {'it' if len(taken) == 1 else 'them'}")


def run(args: argparse.Namespace) -> int:
    modes = tuple(m.strip() for m in args.sampling.split(",") if m.strip())
    bad = [m for m in modes if m not in SAMPLING_MODES]
    if bad or not modes:
        print(f"lstmgen bench: --sampling: unknown mode(s) {bad}; choose from {', '.join(SAMPLING_MODES)}",
              file=sys.stderr)
        return 2
    refused = refuse_overwrite([args.json, args.plot], args.work_dir, args.overwrite)
    if refused:  # before the minute of measuring, not after it
        print(f"lstmgen bench: error: {refused}", file=sys.stderr)
        return 2
    cfg = BenchConfig(preset=args.preset, checkpoint=args.checkpoint, work_dir=args.work_dir,
                      vocab_size=args.vocab_size, sampling=modes, entropy=args.entropy, repeats=args.repeats,
                      concurrency=tuple(int(x) for x in args.concurrency.split(",")),
                      batches=tuple(int(x) for x in args.batches.split(",")), seconds=args.seconds,
                      max_new_tokens=args.max_new_tokens, int8=args.int8, threads=args.threads,
                      state_every=args.state_every)
    result = run_bench(cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0
