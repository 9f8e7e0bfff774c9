"""The `lstmgen` command. Each subcommand lives in its stage's package and is imported only when
chosen, so `lstmgen serve` and `lstmgen generate` never import torch.

A subcommand module defines `add_arguments(parser)` and `run(args) -> int`, and imports nothing
heavy at module level. It lets a UserError (lstmgen/errors.py) or an OSError rise: `main`
prints it as one line and exits 2. Anything else is a bug in lstmgen and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from lstmgen.errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lstmgen.train.cli", "train a stacked LSTM (or GRU) language model on text, or a frame "
                                   "regressor or classifier on float sequences"),
    "export": ("lstmgen.export.cli", "export a checkpoint to an ONNX bundle and verify it against PyTorch"),
    "serve": ("lstmgen.serve.cli", "serve a bundle over gRPC on ONNX Runtime"),
    "generate": ("lstmgen_client.cli", "stream generated text from a running server"),
    "sample": ("lstmgen.offline.cli", "batch offline sampling from a bundle (no server)"),
    "eval": ("lstmgen.evaluate", "loss / perplexity / bits per char of a bundle on a text file (no torch)"),
    "bench": ("lstmgen.tools.bench.cli", "benchmark eager PyTorch, raw ONNX Runtime and the server in one run"),
    "data": ("lstmgen.datasets", "fetch a standard corpus by name (tinyshakespeare, ptb, wikitext-2, "
                                 "anna-karenina) into a cache; then --data NAME works"),
    "loadtest": ("lstmgen.tools.loadgen", "drive a running server with concurrent streams; report throughput, "
                                          "latency, failures and the server's memory and rows"),
}


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstmgen", description="Train, export and serve stacked-LSTM text generators. "
                                    "`lstmgen COMMAND --help` describes each command.")
    from lstmgen import __version__
    parser.add_argument("--version", action="version", version=f"lstmgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    chosen = chosen if chosen in SUBCOMMANDS else None
    args = build_parser(chosen).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (UserError, OSError) as e:  # a bad input or a file/port the system refused, named in the message
        print(f"lstmgen {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
