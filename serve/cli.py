"""`lstmgen serve BUNDLE_DIR --port N --device auto|cpu|cuda`."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from lstmgen.errors import UserError
from lstmgen.serve.params import Limits


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lstmgen.serve.engine import SPIN_MODES, EngineConfig
    from lstmgen.serve.scheduler import SchedulerConfig
    from lstmgen.serve.service import ServiceConfig

    p.add_argument("bundle", metavar="BUNDLE_DIR", help="bundle folder made by `lstmgen export`")
    p.add_argument("--host", default="0.0.0.0", help="address to bind")
    p.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="execution provider: auto = CUDA when onnxruntime-gpu finds a GPU, else CPU")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--spin", choices=SPIN_MODES, default=EngineConfig().spin,
                   help="ONNX Runtime threads busy-wait for work: on = also between steps (only with cores "
                        "to spare, see --threads), run = only inside a step, off = never")
    s = ServiceConfig()
    p.add_argument("--message-budget", type=float, default=s.message_budget_per_s,
                   help="messages per second aimed at across all streams; more active streams -> "
                        "more tokens per message")
    p.add_argument("--min-message-interval-ms", type=float, default=s.min_message_interval_s * 1e3,
                   help="least time between one stream's messages after its first token (0: no floor)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight streams get on SIGTERM")
    p.add_argument("--frame-idle-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="frame models: end a stream whose client has neither sent a frame nor read an output for "
                        "this long, with DEADLINE_EXCEEDED, freeing its slot (0: never)")
    d = Limits()
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars, help="longest prompt accepted")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="largest max_new_tokens accepted")
    p.add_argument("--default-new-tokens", type=int, default=d.default_new_tokens,
                   help="max_new_tokens when a request leaves it unset")
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent_streams,
                   help="streams generating at once (rows in the batch)")
    p.add_argument("--max-queued", type=int, default=d.max_queued_streams,
                   help="streams waiting for a slot; beyond this: RESOURCE_EXHAUSTED")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request message in bytes; bigger ones get RESOURCE_EXHAUSTED before they "
                        "are parsed (unset: 4 bytes per --max-prompt-chars + 64 KiB + the model's largest state)")
    p.add_argument("--max-request-output", type=int, default=d.max_request_output,
                   help="output entries (tokens, logprobs and each alternative) an HTTP completion that is not "
                        "streamed may make the server hold: choices x max_tokens x (2 + logprobs); more: 400")
    p.add_argument("--max-unread-output", type=int, default=d.max_unread_output,
                   help="entries a stream may hold unread; past it its generation pauses until the client reads "
                        "(backpressure)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens primed per call per request")
    p.add_argument("--prefix-cache-mb", type=float, default=SchedulerConfig.prefix_cache_mb,
                   help="memory for states after prompt prefixes, so a prompt that begins like an earlier one "
                        "skips that part (0: off)")
    p.add_argument("--prefix-cache-every", type=int, default=SchedulerConfig.prefix_cache_every,
                   help="keep a prefix state every this many prompt tokens (prompts are primed in chunks ending there)")
    p.add_argument("--prime-wait-steps", type=int, default=SchedulerConfig.prime_wait_steps,
                   help="while a decode batch runs, a new prompt waits up to this many decode steps for others to be "
                        "read in the same prompt call: fewer, a sooner first token; more, fewer calls (docs/benchmark.md)")
    p.add_argument("--tls-cert", metavar="PEM", help="certificate chain: serve TLS only (needs --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--auth-token-file", metavar="FILE",
                   help="require 'authorization: Bearer <token>' (the file's content) on every call but health")
    p.add_argument("--state-key", metavar="FILE",
                   help="sign the state blobs this server returns and accept only signed ones (HMAC-SHA256 with the "
                        "file's content, at least 16 bytes); give every replica the same file")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port; unset: off)")
    p.add_argument("--metrics-host", default=None, help="address for the metrics port (unset: --host's)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve an OpenAI-compatible HTTP API (/v1/completions, /v1/models, /health) and the "
                        "playground page (/) on this port, sharing the model and batch; TLS and token as for gRPC "
                        "(0: any free port; unset: off)")
    p.add_argument("--http-host", default=None, help="address for the HTTP port (unset: --host's)")
    p.add_argument("--served-model-name", metavar="NAME", default=None,
                   help="the model's name on the HTTP API (\"model\" in requests, GET /v1/models; unset: the bundle "
                        "folder's name)")
    p.add_argument("--chat-template", metavar="FILE", default=None,
                   help="JSON {\"message\", \"assistant\", \"stop\"} writing a /v1/chat/completions conversation as "
                        "the prompt (docs/http.md; unset: role-tagged lines, 'user: ...')")
    p.add_argument("--http-read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="an HTTP request's head and body must arrive within this, from connecting or from the "
                        "previous response; slower: 408 and the connection is closed")
    p.add_argument("--http-max-connections", type=int, default=1024, metavar="N",
                   help="open HTTP connections; past it the longest-idle one is closed, or the new one gets 503 "
                        "(fewer when the descriptor limit, less a reserve for gRPC and metrics, leaves less room)")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="log warnings and errors only (as --log-level WARNING); the 'serving on' line stays")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one object per line with time, level, logger, message and request_id")
    # TEST HOOKS (serve/faults.py), hidden from --help: every Nth decode step raises; step N kills the worker.
    p.add_argument("--inject-step-failure-every", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--inject-worker-crash-at-step", type=int, default=0, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace):
    from lstmgen.serve.engine import EngineConfig
    from lstmgen.serve.scheduler import SchedulerConfig
    from lstmgen.serve.server import ServerConfig
    from lstmgen.serve.service import ServiceConfig

    d = Limits()
    limits = Limits(max_prompt_chars=args.max_prompt_chars, max_new_tokens=args.max_new_tokens,
                    default_new_tokens=min(args.default_new_tokens, args.max_new_tokens),
                    max_stop_sequences=d.max_stop_sequences, max_stop_sequence_chars=d.max_stop_sequence_chars,
                    max_concurrent_streams=args.max_concurrent, max_queued_streams=args.max_queued,
                    max_request_bytes=args.max_request_bytes or 0, max_request_output=args.max_request_output,
                    max_unread_output=args.max_unread_output)
    return ServerConfig(bundle=args.bundle, host=args.host, port=args.port, grace_s=args.grace,
                        frame_idle_timeout_s=args.frame_idle_timeout,
                        engine=EngineConfig(device=args.device, intra_op_threads=args.threads,
                                            spin=args.spin),
                        service=ServiceConfig(message_budget_per_s=args.message_budget,
                                              min_message_interval_s=args.min_message_interval_ms / 1e3),
                        limits=limits, scheduler=SchedulerConfig(prefill_chunk=args.prefill_chunk,
                                                                 prefix_cache_mb=args.prefix_cache_mb,
                                                                 prefix_cache_every=args.prefix_cache_every,
                                                                 prime_wait_steps=args.prime_wait_steps),
                        tls_cert=args.tls_cert, tls_key=args.tls_key, auth_token_file=args.auth_token_file,
                        state_key_file=args.state_key,
                        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                        http_port=args.http_port, http_host=args.http_host,
                        served_model_name=args.served_model_name, chat_template=args.chat_template,
                        http_read_timeout_s=args.http_read_timeout, http_max_connections=args.http_max_connections,
                        inject_step_failure_every=args.inject_step_failure_every,
                        inject_worker_crash_at_step=args.inject_worker_crash_at_step)


def describe(cfg, kind: str = "text") -> str:
    """The resolved configuration as people read it, only what applies to the bundle's kind (`text` or
    `frames`: no prompts, prefix cache or HTTP for a frame model); test hooks only when one is set."""
    e, lim = cfg.engine, cfg.limits
    parts = [f"bundle {cfg.bundle}", f"grpc {cfg.host}:{cfg.port}",
             f"device {e.device} (threads {e.intra_op_threads or 'default'}, spin {e.spin})"]
    if kind == "frames":
        request = f"{lim.max_request_bytes:,} bytes" if lim.max_request_bytes else "bytes: frames and state limits"
        idle = f"after {cfg.frame_idle_timeout_s:g}s" if cfg.frame_idle_timeout_s else "never"
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
             f"{cfg.scheduler.prime_wait_steps} decode steps for company",
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
    for flag, value in (("--max-request-output", args.max_request_output),
                        ("--max-unread-output", args.max_unread_output)):
        if value < 1:
            print(f"lstmgen serve: {flag} must be >= 1 (got {value})", file=sys.stderr)
            return 2
    if args.prime_wait_steps < 0:
        print(f"lstmgen serve: --prime-wait-steps must be >= 0 (got {args.prime_wait_steps})", file=sys.stderr)
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
