"""The grpc.aio server: Generator service, grpc.health.v1, reflection, graceful stop on signals."""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lstmgen.serve.engine import Engine, EngineConfig
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
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)


class Server:
    """Owns the engine, scheduler and grpc server; `start()`, then `stop()`."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.engine = Engine(cfg.bundle, cfg.engine)  # raises BundleError naming the file
        self.scheduler = Scheduler(self.engine, cfg.limits, cfg.scheduler)
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", 4 * cfg.limits.max_prompt_chars + 64 * 1024),
        ])
        self.port = 0

    async def start(self) -> int:
        self.scheduler.start()
        pb_grpc.add_GeneratorServicer_to_server(GeneratorService(self.scheduler, self.cfg.service), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc)
        self.port = self.grpc.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.cfg.host}:{self.cfg.port}")
        await self.grpc.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        m = self.engine.manifest
        log.info("serving %s (%s-level, %d x %d, vocab %d) on %s:%d with %s", self.cfg.bundle, m.level,
                 m.num_layers, m.hidden_size, m.vocab_size, self.cfg.host, self.port, self.engine.provider)
        return self.port

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, refuse new streams, let in-flight ones finish within the grace."""
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        self.scheduler.stop_accepting()
        drained = await self.scheduler.drain(self.cfg.grace_s)
        if not drained:
            log.warning("grace period of %.1fs over; %d stream(s) end with UNAVAILABLE",
                        self.cfg.grace_s, self.scheduler.in_system)
        await self.scheduler.close()
        await self.grpc.stop(1.0)
        log.info("stopped")


async def run_until_signal(cfg: ServerConfig, on_ready=None) -> None:
    server = Server(cfg)
    port = await server.start()
    if on_ready is not None:
        on_ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received; stopping (grace %.1fs)", cfg.grace_s)
    await server.stop()
