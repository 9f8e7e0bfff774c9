"""The grpc.aio server: Generator service, grpc.health.v1, reflection, graceful stop on signals;
optional TLS, bearer-token auth and a Prometheus /metrics port."""
from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lstmgen.errors import UsageError, UserError
from lstmgen.serve.auth import TokenAuth, read_token
from lstmgen.bundle import load_manifest
from lstmgen.config_args import option
from lstmgen.serve.engine import Engine, EngineConfig
from lstmgen.serve.frame_engine import FrameEngine
from lstmgen.serve.frame_service import FrameService, frame_model_info
from lstmgen.serve.frame_scheduler import FrameLimits, FrameScheduler
from lstmgen.serve.faults import FaultyEngine
from lstmgen.serve.metrics import Metrics
from lstmgen.serve.params import RequestLimits, request_bytes_for
from lstmgen.serve.reflection import enable_reflection
from lstmgen.serve.scheduler import Scheduler, SchedulerConfig
from lstmgen.serve.service import GeneratorService, ServiceConfig
from lstmgen.serve.state_blob import codec_for, read_state_key
from lstmgen_client.v1 import generator_pb2 as pb

log = logging.getLogger("lstmgen.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name  # "lstmgen.v1.Generator"
FRAMES_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FrameModel"].full_name


class BindError(UserError, OSError):
    """The gRPC address cannot be listened on (in use, or not an address of this machine)."""


@dataclass(frozen=True)
class ServerConfig:
    bundle: str = option(help="bundle folder made by `lstmgen export`", metavar="BUNDLE_DIR")
    host: str = option("0.0.0.0", "address to bind")
    # 0: any free port (the bound one is logged and printed)
    port: int = option(50051, "port to bind; 0 picks a free one")
    grace_s: float = option(10.0, "seconds in-flight streams get on SIGTERM", flag="--grace", metavar="SECONDS")
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    frames: FrameLimits = field(default_factory=FrameLimits)  # max_streams: limits.max_concurrent_streams
    # PEM certificate chain; with tls_key, the port speaks TLS only
    tls_cert: str | None = option(None, "certificate chain: serve TLS only (needs --tls-key)", metavar="PEM")
    tls_key: str | None = option(None, "private key of --tls-cert", metavar="PEM")  # PEM private key
    # calls need `authorization: Bearer <token>` (health stays open)
    auth_token_file: str | None = option(None, "require 'authorization: Bearer <token>' (the file's content) on "
                                               "every call but health", metavar="FILE")
    # replicas' shared secret: state blobs are signed and checked
    state_key_file: str | None = option(None, "sign the state blobs this server returns and accept only signed "
                                              "ones (HMAC-SHA256 with the file's content, at least 16 bytes); give "
                                              "every replica the same file", flag="--state-key", metavar="FILE")
    # Prometheus /metrics over HTTP; None: off, 0: any free port
    metrics_port: int | None = option(None, "serve Prometheus metrics on http://HOST:PORT/metrics (0: any free "
                                            "port; unset: off)", metavar="PORT")
    # None: the same address as the gRPC port
    metrics_host: str | None = option(None, "address for the metrics port (unset: --host's)", metavar="HOST")
    # OpenAI-compatible HTTP API + playground (serve/http_api.py); None: off
    http_port: int | None = option(None, "also serve an OpenAI-compatible HTTP API (/v1/completions, /v1/models, "
                                         "/health) and the playground page (/) on this port, sharing the model and "
                                         "batch; TLS and token as for gRPC (0: any free port; unset: off)",
                                   metavar="PORT")
    # None: the same address as the gRPC port
    http_host: str | None = option(None, "address for the HTTP port (unset: --host's)", metavar="HOST")
    # a request's head and body must arrive within this (serve/http_server.py)
    http_read_timeout_s: float = option(30.0, "an HTTP request's head and body must arrive within this, from "
                                              "connecting or from the previous response; slower: 408 and the "
                                              "connection is closed", flag="--http-read-timeout", metavar="SECONDS")
    # open HTTP connections; fewer if the descriptor limit leaves less room
    http_max_connections: int = option(1024, "open HTTP connections; past it the longest-idle one is closed, or "
                                             "the new one gets 503 (fewer when the descriptor limit, less a "
                                             "reserve for gRPC and metrics, leaves less room)", metavar="N")
    # the model's name on the HTTP API; None: the bundle folder's name
    served_model_name: str | None = option(None, "the model's name on the HTTP API (\"model\" in requests, GET "
                                                 "/v1/models; unset: the bundle folder's name)", metavar="NAME")
    # JSON file for /v1/chat/completions (serve/openai_chat.py); None: the default
    chat_template: str | None = option(None, "JSON {\"message\", \"assistant\", \"stop\"} writing a "
                                             "/v1/chat/completions conversation as the prompt (docs/http.md; unset: "
                                             "role-tagged lines, 'user: ...')", metavar="FILE")
    # TEST HOOKS (serve/faults.py), hidden from --help: every Nth decode step fails; the Nth decode
    # step kills the worker
    inject_step_failure_every: int = option(0, "every Nth decode step fails", hidden=True)
    inject_worker_crash_at_step: int = option(0, "the Nth decode step kills the worker", hidden=True)
    # The scheduler thread's Python/numpy work keeps the GIL for up to this long while the event loop
    # and gRPC's poller thread wait for it. On 2 contended cores, 1 ms instead of Python's 5 ms took
    # the p99 of rejections at a full server from 130-290 ms to 30-55 ms; neutral on a quiet machine
    # (docs/hardening.md). Process-wide: set by run_until_signal.
    switch_interval_s: float = option(0.001, "longest the model's thread keeps Python's GIL while the event loop "
                                             "and gRPC wait for it (sys.setswitchinterval; docs/hardening.md)",
                                      flag="--switch-interval-ms", scale=1000, metavar="MS")


class Server:
    """Owns the engine, scheduler and grpc server; `start()`, then `stop()`."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        # Read every file first, so a bad path fails at start, naming it (OSError / ValueError).
        self._tls = None
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise UsageError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
            self._tls = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
        token = read_token(cfg.auth_token_file) if cfg.auth_token_file else None
        sched_cfg = cfg.scheduler
        if cfg.state_key_file:
            sched_cfg = replace(sched_cfg, state_key=read_state_key(cfg.state_key_file))
        self.metrics = Metrics()
        self.failed: BaseException | None = None  # set if the scheduler's worker died
        self.stop_requested = asyncio.Event()  # a signal, or the worker died
        # The manifest's kind picks the engine, the scheduler and the service (BundleError names the file)
        if load_manifest(cfg.bundle, verify_checksums=False).kind == "frames":
            limits = self._frames(cfg, sched_cfg)
        else:
            limits = self._text(cfg, sched_cfg)
        self.health = health.aio.HealthServicer()
        interceptors = [TokenAuth(token, self.metrics.refused)] if token else []
        self.grpc = grpc.aio.server(interceptors=interceptors, options=[
            # gRPC refuses a bigger request before parsing it: RESOURCE_EXHAUSTED, "larger than max"
            ("grpc.max_receive_message_length", limits.max_request_bytes),
            # gRPC sets SO_REUSEPORT by default: a second server on the same port would then start
            # fine and silently take half the new connections. Off, its bind fails at start.
            ("grpc.so_reuseport", 0),
            # Frame models: a stream's input the server has not read stays in gRPC's 64 KiB window.
            # Grown by BDP probing, the window held ~4 MB per stream that sends and never reads (the
            # scheduler caps the rest); upload speed on loopback is the same (docs/frames.md).
            *([("grpc.http2.bdp_probe", 0)] if self.engine.manifest.kind == "frames" else []),
        ])
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.http = None  # serve/http_api.py, only with --http-port: starlette and uvicorn load only then
        if cfg.http_port is not None:
            from lstmgen.serve.http_api import HttpApi
            from lstmgen.serve.http_server import ConnectionLimits, HttpServer
            from lstmgen.serve.openai_chat import ChatTemplate, load_chat_template
            template = load_chat_template(cfg.chat_template) if cfg.chat_template else ChatTemplate()
            self.http_api = HttpApi(self.scheduler, cfg.served_model_name or Path(cfg.bundle).resolve().name,
                                    self.metrics, cfg.service, token, template)
            self.http = HttpServer(self.http_api.app, cfg.http_host or cfg.host, cfg.http_port, cfg.tls_cert,
                                   cfg.tls_key, limits=ConnectionLimits(cfg.http_read_timeout_s,
                                                                        cfg.http_max_connections))

    def _text(self, cfg: ServerConfig, sched_cfg: SchedulerConfig) -> RequestLimits:
        """A language model: the continuous-batching scheduler and the Generator service."""
        self.engine = Engine(cfg.bundle, cfg.engine)
        engine = self.engine
        if cfg.inject_step_failure_every or cfg.inject_worker_crash_at_step:
            log.warning("TEST HOOK: every %d-th decode step fails (--inject-step-failure-every), decode step %d "
                        "kills the worker (--inject-worker-crash-at-step); 0 = off",
                        cfg.inject_step_failure_every, cfg.inject_worker_crash_at_step)
            engine = FaultyEngine(self.engine, cfg.inject_step_failure_every, cfg.inject_worker_crash_at_step)
        limits = cfg.limits
        if not limits.max_request_bytes:  # 0: room for the longest prompt and the largest state
            limits = replace(limits, max_request_bytes=request_bytes_for(
                limits.max_prompt_chars, codec_for(self.engine.manifest).max_bytes))
        self.scheduler = Scheduler(engine, limits, sched_cfg, observer=self.metrics,
                                   on_fatal=self._worker_failed)
        self.metrics.watch(self.scheduler)
        self.service = GeneratorService(self.scheduler, codec_for(self.engine.manifest, sched_cfg.state_key),
                                        cfg.service, self.metrics)
        return limits

    def _frames(self, cfg: ServerConfig, sched_cfg: SchedulerConfig) -> RequestLimits:
        """A frame model: the frame scheduler and the FrameModel service (serve/frame_scheduler.py)."""
        if cfg.http_port is not None:
            raise UsageError("--http-port: the HTTP API serves text models; this bundle is a frame model")
        self.engine = FrameEngine(cfg.bundle, cfg.engine)
        codec = codec_for(self.engine.manifest, sched_cfg.state_key)
        limits = cfg.limits
        if not limits.max_request_bytes:  # the largest message of frames and a state, with room for the rest
            limits = replace(limits, max_request_bytes=4 * cfg.frames.max_frames_per_message
                             * self.engine.manifest.frames.input_size + 64 * 1024 + codec.max_bytes)
        self.scheduler = FrameScheduler(self.engine, self.engine.spec_view(),
                                        replace(cfg.frames, max_streams=limits.max_concurrent_streams),
                                        on_fatal=self._worker_failed)
        self.service = FrameService(self.scheduler, frame_model_info(self.engine, self.scheduler.limits, limits, codec),
                                    codec, self.metrics)
        self.metrics.watch_frames(self.scheduler)
        return limits

    async def start(self) -> int:
        self.scheduler.start()
        self.service.add_to_server(self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        offered = (SERVICE_NAME,) + ((FRAMES_SERVICE_NAME,) if self.engine.manifest.kind == "frames" else ())
        enable_reflection(self.grpc, (*offered, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
                          (pb.DESCRIPTOR, health_pb2.DESCRIPTOR))
        self.port = self._bind(f"{self.cfg.host}:{self.cfg.port}")
        if self.cfg.metrics_port is not None:
            host = self.cfg.metrics_host or self.cfg.host
            self.metrics_port = self.metrics.serve(host, self.cfg.metrics_port)
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
        if self.cfg.auth_token_file is None and any(
                h in ("0.0.0.0", "::", "") for h in (self.cfg.host, self.cfg.http_host or self.cfg.host)):
            log.warning("listening on all network interfaces without authentication: anyone who can reach "
                        "this machine can generate; bind --host 127.0.0.1 or set --auth-token-file (with TLS)")
        if self.http is not None:
            self.http_port = await self.http.start()
            log.info("OpenAI-compatible HTTP API and playground on http%s://%s:%d/", "s" if self._tls else "",
                     self.http.host, self.http_port)
        await self.grpc.start()
        m = self.engine.manifest
        for name in ("", SERVICE_NAME) + ((FRAMES_SERVICE_NAME,) if m.kind == "frames" else ()):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        what = (f"{m.level}-level, vocab {m.vocab_size}" if m.kind == "text"
                else f"frames, {m.frames.task}, {m.frames.input_size} -> {m.frames.output_size}")
        log.info("serving %s (%s, %s %d x %d) on %s:%d with %s%s%s%s", self.cfg.bundle, what, m.cell,
                 m.num_layers, m.hidden_size, self.cfg.host, self.port, self.engine.provider,
                 ", TLS" if self._tls else "", ", token auth" if self.cfg.auth_token_file else "",
                 ", signed states" if self.cfg.state_key_file else "")
        return self.port

    def _bind(self, address: str) -> int:
        problem = bind_problem(self.cfg.host, self.cfg.port)
        if problem:
            raise BindError(f"cannot listen on {address}: {problem}")
        try:  # grpcio raises RuntimeError("Failed to bind ..."); older versions returned port 0
            port = (self.grpc.add_secure_port(address, self._tls) if self._tls
                    else self.grpc.add_insecure_port(address))
        except RuntimeError:
            port = 0
        if port == 0:
            raise BindError(f"cannot listen on {address}: "
                            + (f"port {self.cfg.port} is in use (another server?) or " if self.cfg.port else "")
                            + "the address is not one of this machine's")
        return port

    def _worker_failed(self, error: BaseException) -> None:
        """Event loop: the scheduler's worker cannot go on (its streams already ended UNAVAILABLE).
        run_until_signal stops the server (NOT_SERVING first) and the process exits 1, so that a
        supervisor restarts it."""
        self.failed = error
        self.stop_requested.set()

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, refuse new streams, and give every accepted stream the grace
        period to be read to its end: a slow reader gets the text made for it, not just made."""
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        logging.getLogger("grpc._cython.cygrpc").addFilter(_shutdown_cancel)
        if self.http is not None:
            self.http_api.stopping = True  # GET /health: 503
        self.scheduler.stop_accepting()
        drained = await self.scheduler.drain(self.cfg.grace_s)
        if not drained:
            log.warning("grace period of %.1fs over; %d stream(s) end with UNAVAILABLE",
                        self.cfg.grace_s, self.scheduler.open_streams)
        await self.scheduler.close(f"server shutting down: the {self.cfg.grace_s:g}s grace period ran out "
                                   "before this stream finished; retry on another server")
        # Lets the aborted handlers send their status; a stream whose client read nothing for the
        # whole grace period cannot take a status behind its unread output: gRPC cancels it.
        await self.grpc.stop(1.0)
        await _grpc_calls_ended(2.0)
        if self.http is not None:
            await self.http.stop()
        self.metrics.close()
        log.info("stopped")


def bind_problem(host: str, port: int) -> str | None:
    """Why gRPC could not listen on host:port, found with a plain socket bound as gRPC binds it
    (SO_REUSEADDR; a wildcard as dual-stack `[::]`, else 0.0.0.0), or None. Asked first because gRPC's
    C core writes its own failure (`E1207 ... add_port.cc:83] Failed to add port ...`) to stderr.
    Port 0 checks the address alone."""
    host = host.strip("[]")
    wildcard = host in ("", "0.0.0.0", "::")
    if wildcard:
        addresses = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    else:
        try:
            addresses = [(a[0], a[4]) for a in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE)]
        except socket.gaierror as e:
            return f"{host} does not resolve to an address ({e.strerror})"
        except UnicodeError:
            return None  # gRPC resolves it, or says why not
    failed: list[OSError] = []
    for family, sockaddr in addresses:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if wildcard and family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:  # one address taken is enough: its clients would reach the other server
                return f"port {port} is in use (another server?)"
            failed.append(e)
            continue
        if wildcard:
            return None  # gRPC keeps the first wildcard that binds
    if len(failed) < len(addresses):
        return None  # gRPC listens on the addresses that bind
    e = failed[-1] if wildcard else failed[0]  # a wildcard: 0.0.0.0's error (`[::]` fails without IPv6)
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine"
    if e.errno == errno.EACCES:
        return f"permission denied ({e.strerror}): ports below 1024 need privileges"
    return e.strerror or str(e)


def _shutdown_cancel(record: logging.LogRecord) -> bool:
    """Past the grace period gRPC cancels the handlers of unread streams, sometimes twice; the
    handler ends the stream as UNAVAILABLE (logged), but on Python 3.11 a second cancel still
    marks its task cancelled and grpc.aio logs a CancelledError traceback for it. Installed only
    once the server is stopping, this drops that one record: it reports nothing the stream's own
    log line does not."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, asyncio.CancelledError)


async def _grpc_calls_ended(timeout: float) -> None:
    """Wait (up to `timeout`) for grpc.aio's own tasks of the calls it cancelled at stop: an unread
    stream's were still pending when stop() returned (in each of three instrumented runs of the
    grace-period test), and end a few loop turns later. Left pending, asyncio.run's teardown may
    cancel them first, and grpc.aio then prints that CancelledError with traceback.print_exc,
    straight to stderr, where no logging filter reaches it (the intermittent traceback of that
    test)."""
    current = asyncio.current_task()
    calls = [t for t in asyncio.all_tasks() if t is not current and not t.done()
             and (t.get_name() == "rpc_task" or t.get_name().startswith("HandleExceptions["))]
    if calls:
        await asyncio.wait(calls, timeout=timeout)


async def run_until_signal(cfg: ServerConfig, on_ready=None) -> int:
    """Serve until SIGTERM/SIGINT (exit status 0) or until the worker dies (1)."""
    sys.setswitchinterval(cfg.switch_interval_s)
    server = Server(cfg)
    await server.start()
    if on_ready is not None:
        on_ready(server)
    stop = server.stop_requested
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if server.failed is not None:
        log.critical("stopping: the generation worker failed (%r); exit status 1", server.failed)
    else:
        log.info("signal received; stopping (grace %.1fs)", cfg.grace_s)
    await server.stop()
    return 1 if server.failed is not None else 0
