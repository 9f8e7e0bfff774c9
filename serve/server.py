"""The grpc.aio server: Generator service, grpc.health.v1, reflection, graceful stop on signals;
optional TLS, bearer-token auth and a Prometheus /metrics port."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lstmgen.serve.auth import TokenAuth, read_token
from lstmgen.serve.engine import Engine, EngineConfig
from lstmgen.serve.faults import FaultyEngine
from lstmgen.serve.metrics import Metrics
from lstmgen.serve.params import Limits
from lstmgen.serve.scheduler import Scheduler, SchedulerConfig
from lstmgen.serve.service import GeneratorService, ServiceConfig
from lstmgen_client.v1 import generator_pb2 as pb
from lstmgen_client.v1 import generator_pb2_grpc as pb_grpc

log = logging.getLogger("lstmgen.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name  # "lstmgen.v1.Generator"


@dataclass(frozen=True)
class ServerConfig:
    bundle: str
    host: str = "0.0.0.0"
    port: int = 50051  # 0: any free port (the bound one is logged and printed)
    grace_s: float = 10.0  # in-flight streams get this long to finish on SIGTERM
    # ORT threads spin inside a step only: spinning between steps too steals the cores the event
    # loop, gRPC and the clients need (measured in docs/benchmark.md).
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(spin="run"))
    limits: Limits = field(default_factory=Limits)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, the port speaks TLS only
    tls_key: str | None = None  # PEM private key
    auth_token_file: str | None = None  # calls need `authorization: Bearer <token>` (health stays open)
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None: off, 0: any free port
    metrics_host: str | None = None  # None: the same address as the gRPC port
    inject_step_failure_every: int = 0  # TEST HOOK (serve/faults.py): every Nth decode step fails
    # The scheduler thread's Python/numpy work keeps the GIL for up to this long while the event loop
    # and gRPC's poller thread wait for it. On 2 contended cores, 1 ms instead of Python's 5 ms took
    # the p99 of rejections at a full server from 130-290 ms to 30-55 ms; neutral on a quiet machine
    # (docs/hardening.md). Process-wide: set by run_until_signal.
    switch_interval_s: float = 0.001


class Server:
    """Owns the engine, scheduler and grpc server; `start()`, then `stop()`."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        # Read every file first, so a bad path fails at start, naming it (OSError / ValueError).
        self._tls = None
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
            self._tls = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
        token = read_token(cfg.auth_token_file) if cfg.auth_token_file else None
        self.engine = Engine(cfg.bundle, cfg.engine)  # raises BundleError naming the file
        engine = self.engine
        if cfg.inject_step_failure_every:
            log.warning("TEST HOOK: every %d-th decode step fails (--inject-step-failure-every)",
                        cfg.inject_step_failure_every)
            engine = FaultyEngine(self.engine, cfg.inject_step_failure_every)
        self.metrics = Metrics()
        self.scheduler = Scheduler(engine, cfg.limits, cfg.scheduler, observer=self.metrics)
        self.metrics.watch(self.scheduler)
        self.health = health.aio.HealthServicer()
        interceptors = [TokenAuth(token, lambda: self.metrics.rejected("unauthenticated"))] if token else []
        self.grpc = grpc.aio.server(interceptors=interceptors, options=[
            # gRPC refuses a bigger request before parsing it: RESOURCE_EXHAUSTED, "larger than max"
            ("grpc.max_receive_message_length", cfg.limits.max_request_bytes),
        ])
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> int:
        self.scheduler.start()
        GeneratorService(self.scheduler, self.cfg.service, self.metrics).add_to_server(self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc)
        address = f"{self.cfg.host}:{self.cfg.port}"
        self.port = (self.grpc.add_secure_port(address, self._tls) if self._tls
                     else self.grpc.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        if self.cfg.metrics_port is not None:
            host = self.cfg.metrics_host or self.cfg.host
            self.metrics_port = self.metrics.serve(host, self.cfg.metrics_port)
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
        await self.grpc.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        m = self.engine.manifest
        log.info("serving %s (%s-level, %d x %d, vocab %d) on %s:%d with %s%s%s", self.cfg.bundle, m.level,
                 m.num_layers, m.hidden_size, m.vocab_size, self.cfg.host, self.port, self.engine.provider,
                 ", TLS" if self._tls else "", ", token auth" if self.cfg.auth_token_file else "")
        return self.port

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, refuse new streams, let in-flight ones finish within the grace."""
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        self.scheduler.stop_accepting()
        drained = await self.scheduler.drain(self.cfg.grace_s)
        if not drained:
            log.warning("grace period of %.1fs over; %d stream(s) end with UNAVAILABLE",
                        self.cfg.grace_s, self.scheduler.in_system)
        await self.scheduler.close(f"server shutting down: the {self.cfg.grace_s:g}s grace period ran out "
                                   "before this stream finished; retry on another server")
        await self.grpc.stop(1.0)  # lets the aborted handlers send their status
        self.metrics.close()
        log.info("stopped")


async def run_until_signal(cfg: ServerConfig, on_ready=None) -> None:
    sys.setswitchinterval(cfg.switch_interval_s)
    server = Server(cfg)
    await server.start()
    if on_ready is not None:
        on_ready(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received; stopping (grace %.1fs)", cfg.grace_s)
    await server.stop()
