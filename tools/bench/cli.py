"""`lstmgen bench` flags onto BenchConfig; the run, its JSON report and its plot."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lstmgen import config_args
from lstmgen.tools.bench.config import SAMPLING_MODES, BenchConfig
from lstmgen.tools.bench.figure import plot
from lstmgen.tools.bench.run import run_bench


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = config_args.DefaultsFormatter
    config_args.add_dataclass_arguments(p, BenchConfig)
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
    cfg = config_args.from_args(BenchConfig, args)
    bad = [m for m in cfg.sampling if m not in SAMPLING_MODES]
    if bad:
        print(f"lstmgen bench: --sampling: unknown mode(s) {bad}; choose from {', '.join(SAMPLING_MODES)}",
              file=sys.stderr)
        return 2
    refused = refuse_overwrite([args.json, args.plot], args.work_dir, args.overwrite)
    if refused:  # before the minute of measuring, not after it
        print(f"lstmgen bench: error: {refused}", file=sys.stderr)
        return 2
    result = run_bench(cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0
