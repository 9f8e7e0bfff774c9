"""`lstmgen serve BUNDLE_DIR --port N --device auto|cpu|cuda`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import asdict

from lstmgen.serve.params import Limits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE_DIR", help="bundle folder made by `lstmgen export`")
    p.add_argument("--host", default="0.0.0.0", help="address to bind")
    p.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="execution provider: auto = CUDA when onnxruntime-gpu finds a GPU, else CPU")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight streams get on SIGTERM")
    d = Limits()
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars, help="longest prompt accepted")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="largest max_new_tokens accepted")
    p.add_argument("--default-new-tokens", type=int, default=d.default_new_tokens,
                   help="max_new_tokens when a request leaves it unset")
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent_streams,
                   help="streams generating at once (rows in the batch)")
    p.add_argument("--max-queued", type=int, default=d.max_queued_streams,
                   help="streams waiting for a slot; beyond this: RESOURCE_EXHAUSTED")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens primed per call per request")
    p.add_argument("--log-level", default="INFO", help="logging level")


def config_from_args(args: argparse.Namespace):
    from lstmgen.serve.engine import EngineConfig
    from lstmgen.serve.scheduler import SchedulerConfig
    from lstmgen.serve.server import ServerConfig

    d = Limits()
    limits = Limits(max_prompt_chars=args.max_prompt_chars, max_new_tokens=args.max_new_tokens,
                    default_new_tokens=min(args.default_new_tokens, args.max_new_tokens),
                    max_stop_sequences=d.max_stop_sequences, max_stop_sequence_chars=d.max_stop_sequence_chars,
                    max_concurrent_streams=args.max_concurrent, max_queued_streams=args.max_queued)
    return ServerConfig(bundle=args.bundle, host=args.host, port=args.port, grace_s=args.grace,
                        engine=EngineConfig(device=args.device, intra_op_threads=args.threads),
                        limits=limits, scheduler=SchedulerConfig(prefill_chunk=args.prefill_chunk))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lstmgen.bundle import BundleError
    from lstmgen.serve.server import run_until_signal

    cfg = config_from_args(args)
    logging.getLogger("lstmgen.server").info("config %s", asdict(cfg))

    def ready(port: int) -> None:
        print(f"lstmgen serving on {args.host}:{port}", flush=True)  # tests and scripts wait for this

    try:
        asyncio.run(run_until_signal(cfg, ready))
    except (BundleError, RuntimeError, OSError) as e:
        print(f"lstmgen serve: {e}", file=sys.stderr)
        return 2
    return 0
