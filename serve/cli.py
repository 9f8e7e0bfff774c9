"""`lstmgen serve BUNDLE_DIR --port N --device auto|cpu|cuda`."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from lstmgen import config_args
from lstmgen.errors import UserError
from lstmgen.serve.params import RequestLimits


# Config fields without a flag of their own -> the flag that sets them (tests/test_config_args.py):
# the scheduler's signing key is read at start from the file --state-key names (ServerConfig.state_key_file).
SERVE_ELSEWHERE = {"state_key": "--state-key", "max_streams": "--max-concurrent"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lstmgen.serve.engine import EngineConfig
    from lstmgen.serve.frame_stream import FrameLimits
    from lstmgen.serve.scheduler import SchedulerConfig
    from lstmgen.serve.server import ServerConfig
    from lstmgen.serve.service import ServiceConfig

    # Every default below is the config dataclass's (serve/server.py, engine.py, params.py, scheduler.py,
    # service.py), and so is each help text.
    p.formatter_class = config_args.DefaultsFormatter
    add = config_args.add_dataclass_arguments
    add(p, ServerConfig, only=("bundle", "host", "port", "grace_s", "switch_interval_s",
                               "inject_step_failure_every", "inject_worker_crash_at_step"))
    add(p, EngineConfig, group="ONNX Runtime")
    add(p, RequestLimits, group="limits (reported in GetModelInfo and /v1/models)")
    add(p, SchedulerConfig, exclude=SERVE_ELSEWHERE, group="prompts and batching")
    add(p, FrameLimits, exclude=SERVE_ELSEWHERE, group="frame models (a bundle of kind frames)")
    add(p, ServiceConfig, group="message pacing")
    add(p, ServerConfig, only=("tls_cert", "tls_key", "auth_token_file", "state_key_file"), group="security")
    add(p, ServerConfig, only=("metrics_port", "metrics_host", "http_port", "http_host", "http_read_timeout_s",
                               "http_max_connections", "served_model_name", "chat_template"),
        group="metrics and the HTTP API")
    g = p.add_argument_group("logging")
    g.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    g.add_argument("--quiet", "-q", action="store_true",
                   help="log warnings and errors only (as --log-level WARNING); the 'serving on' line stays")
    g.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one object per line with time, level, logger, message and request_id")


def config_from_args(args: argparse.Namespace):
    from lstmgen.serve.server import ServerConfig

    cfg = config_args.from_args(ServerConfig, args, exclude=SERVE_ELSEWHERE)
    lim = cfg.limits
    return replace(cfg, limits=replace(lim, default_new_tokens=min(lim.default_new_tokens, lim.max_new_tokens)))


def describe(cfg, kind: str = "text") -> str:
    """The resolved configuration as people read it, only what applies to the bundle's kind (`text` or
    `frames`: no prompts, prefix cache or HTTP for a frame model); test hooks only when one is set."""
    e, lim = cfg.engine, cfg.limits
    parts = [f"bundle {cfg.bundle}", f"grpc {cfg.host}:{cfg.port}",
             f"device {e.device} (threads {e.intra_op_threads or 'default'}, spin {e.spin})"]
    if kind == "frames":
        request = f"{lim.max_request_bytes:,} bytes" if lim.max_request_bytes else "bytes: frames and state limits"
        idle = f"after {cfg.frames.idle_timeout_s:g}s" if cfg.frames.idle_timeout_s else "never"
        parts += [f"limits: {lim.max_concurrent_streams} concurrent streams, request {request}",
                  f"idle streams end {idle}"]
    else:
        parts.append(_describe_text(cfg))
    metrics = "off" if cfg.metrics_port is None else f"{cfg.metrics_host or cfg.host}:{cfg.metrics_port}"
    parts += [f"grace {cfg.grace_s:g}s", "tls " + ("on" if cfg.tls_cert else "off"),
              "token auth " + ("on" if cfg.auth_token_file else "off"),
              "state signing " + ("on" if cfg.state_key_file else "off"), f"metrics {metrics}"]
    if kind != "frames":
        parts.append("http " + ("off" if cfg.http_port is None else f"{cfg.http_host or cfg.host}:{cfg.http_port} "
                     f"(read timeout {cfg.http_read_timeout_s:g}s, at most {cfg.http_max_connections} connections)"))
    hooks = [f"{name} {getattr(cfg, name)}" for name in ("inject_step_failure_every", "inject_worker_crash_at_step")
             if getattr(cfg, name)]
    if hooks:
        parts.append("TEST HOOKS " + ", ".join(hooks))
    return "; ".join(parts)


def _describe_text(cfg) -> str:
    """A language model's limits, prompt reading, prefix cache and message pacing."""
    lim, s = cfg.limits, cfg.service
    parts = [f"limits: prompt {lim.max_prompt_chars:,} chars, new tokens {lim.max_new_tokens:,} "
             f"(default {lim.default_new_tokens:,}), {lim.max_concurrent_streams} concurrent, "
             f"{lim.max_queued_streams} queued, request "
             + (f"{lim.max_request_bytes:,} bytes" if lim.max_request_bytes else "bytes: prompt and state limits")
             + f", output {lim.max_request_output:,} entries a request, {lim.max_unread_output:,} unread a stream",
             f"prefill chunk {cfg.scheduler.prefill_chunk}, a new prompt waits up to "
             f"{cfg.scheduler.prefill_wait_steps} decode steps for company",
             "prefix cache " + (f"{cfg.scheduler.prefix_cache_mb:g} MiB, every {cfg.scheduler.prefix_cache_every} tokens"
                                if cfg.scheduler.prefix_cache_mb > 0 else "off"),
             f"messages {s.message_budget_per_s:g}/s, at least {s.min_message_interval_s * 1e3:g} ms apart"]
    return "; ".join(parts)


def bundle_kind(path: str) -> str:
    """The manifest's `kind`, read before anything is logged, so that a wrong folder is one line: a
    training run or a checkpoint is named as such, with the export that makes a bundle of it."""
    from lstmgen.bundle import MANIFEST, load_manifest

    p = Path(path)
    run_files = [f for f in ("best.pt", "last.pt", "config.json") if (p / f).is_file()]
    if (p.is_file() and p.suffix == ".pt") or (p.is_dir() and not (p / MANIFEST).exists() and run_files):
        what = "a checkpoint" if p.is_file() else f"a training run ({', '.join(run_files)})"
        raise UserError(f"{p} is {what}, not a bundle: make one with `lstmgen export {p} --out BUNDLE_DIR`, "
                        "then `lstmgen serve BUNDLE_DIR`")
    return load_manifest(p, verify_checksums=False).kind


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `request_id` when the log call passed it in `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if hasattr(record, "request_id"):
            out["request_id"] = record.request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def run(args: argparse.Namespace) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        print("lstmgen serve: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.prefix_cache_mb < 0 or args.prefix_cache_every < 1:
        print(f"lstmgen serve: --prefix-cache-mb must be >= 0 (got {args.prefix_cache_mb:g}) and "
              f"--prefix-cache-every >= 1 (got {args.prefix_cache_every})", file=sys.stderr)
        return 2
    for flag, value, least in (("--max-request-output", args.max_request_output, 1),
                               ("--max-unread-output", args.max_unread_output, 1),
                               ("--prefill-wait-steps", args.prefill_wait_steps, 0),
                               ("--prefill-together", args.prefill_together, 1),
                               ("--max-prefill-rows", args.max_prefill_rows, 1),
                               ("--max-stop-sequences", args.max_stop_sequences, 0),
                               ("--max-stop-sequence-chars", args.max_stop_sequence_chars, 1),
                               ("--max-top-logprobs", args.max_top_logprobs, 0),
                               ("--frame-max-per-message", args.frame_max_per_message, 1),
                               ("--frame-max-pending", args.frame_max_pending, 1),
                               ("--frame-max-unread", args.frame_max_unread, 1),
                               ("--frame-per-step", args.frame_per_step, 1)):
        if value < least:
            print(f"lstmgen serve: {flag} must be >= {least} (got {value})", file=sys.stderr)
            return 2
    if not 0 < args.message_budget < float("inf") or not 0 <= args.min_message_interval_ms < float("inf"):
        print(f"lstmgen serve: --message-budget must be a positive number of messages a second (got "
              f"{args.message_budget:g}) and --min-message-interval-ms a number >= 0 (got "
              f"{args.min_message_interval_ms:g})", file=sys.stderr)
        return 2
    if args.prefill_chunk < 1:
        print(f"lstmgen serve: --prefill-chunk must be >= 1 (got {args.prefill_chunk})", file=sys.stderr)
        return 2
    if not 0 < args.switch_interval_ms < float("inf"):
        print(f"lstmgen serve: --switch-interval-ms must be a positive number of milliseconds "
              f"(got {args.switch_interval_ms:g})", file=sys.stderr)
        return 2
    if not args.frame_idle_timeout >= 0:  # also NaN
        print(f"lstmgen serve: --frame-idle-timeout must be >= 0 seconds, 0 for never "
              f"(got {args.frame_idle_timeout:g})", file=sys.stderr)
        return 2
    if not 0 < args.http_read_timeout < float("inf") or args.http_max_connections < 1:
        print(f"lstmgen serve: --http-read-timeout must be a positive number of seconds (got "
              f"{args.http_read_timeout:g}) and --http-max-connections >= 1 (got {args.http_max_connections})",
              file=sys.stderr)
        return 2
    kind = bundle_kind(args.bundle)
    setup_logging("WARNING" if args.quiet else args.log_level, args.log_format)
    from lstmgen.serve.server import run_until_signal

    cfg = config_from_args(args)
    logging.getLogger("lstmgen.server").info("config: %s", describe(cfg, kind))

    def ready(server) -> None:  # tests and scripts wait for this line
        metrics = (f" (metrics on http://{cfg.metrics_host or cfg.host}:{server.metrics_port}/metrics)"
                   if cfg.metrics_port is not None else "")
        scheme = "https" if cfg.tls_cert else "http"
        http = (f" (http on {scheme}://{cfg.http_host or cfg.host}:{server.http_port}/)"
                if cfg.http_port is not None else "")
        print(f"lstmgen serving on {args.host}:{server.port}{metrics}{http}", flush=True)

    # A UserError (bad bundle, port in use) exits 2 in lstmgen.cli; a dead worker exits 1
    return asyncio.run(run_until_signal(cfg, ready))
