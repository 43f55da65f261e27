"""gRPC server bootstrap shared by the three processes.

Every server gets the standard health service (NOT_SERVING until its model is loaded), server
reflection, message-size limits, TLS (mutual with a client CA) when configured, request ids in its
logs, RPC metrics on a Prometheus endpoint (with the service's own collectors), and a graceful stop
on SIGTERM/SIGINT: health flips to NOT_SERVING, new calls are refused, in-flight calls get
`grace_seconds` to finish and are cancelled after that (a second signal cancels them at once).

Health names: "" and each service's name say SERVING while the process takes calls (model loaded,
engine healthy, not draining): readiness probes ask for "". LIVENESS_SERVICE says SERVING from start
to exit, so a liveness probe restarts only a process that no longer answers at all, never one that is
loading, draining, or waiting out its engine's recovery time (services/common/engine_health.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client.registry import Collector

from services.common.engine_health import EXIT_CODE as ENGINE_DEAD_EXIT_CODE
from services.common.engine_health import EngineDead
from services.common.interceptors import MonitoringInterceptor, OpenStreamLimiter, RequestIdInterceptor
from services.common.metrics import ServiceMetrics
from services.common.security import ServerTls

log = logging.getLogger(__name__)

MiB = 1024 * 1024
LIVENESS_SERVICE = "liveness"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port (tests)
    # Requests may carry encoded images/videos; embeddings themselves are always chunked.
    max_receive_message_bytes: int = 64 * MiB
    max_send_message_bytes: int = 16 * MiB
    grace_seconds: float = 30.0
    tls: ServerTls | None = None  # None = plaintext
    metrics_port: int = 0  # 0 = no metrics endpoint (the services' own defaults are 9101..9103)
    metrics_host: str = ""  # "" = the gRPC host
    # A fixed HTTP/2 receive window per stream instead of gRPC's adaptive one (0 = adaptive). The
    # adaptive window grows to several MiB per connection on a fast link, and a caller can fill it
    # before it is refused (keyless callers included): a public front fixes it small. Throughput per
    # stream is then at most this much per round trip.
    receive_window_bytes: int = 0
    # A second, plaintext port serving only grpc.health.v1 (the same states): for probes that cannot
    # present a client certificate to an mTLS port (Kubernetes' native gRPC probes). 0 = none.
    health_port: int = 0

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Service:
    """One servicer to mount: its full proto name (for health/reflection) and its add_* function."""

    name: str
    add_to_server: Callable[[object, grpc.aio.Server], None]
    servicer: object


def channel_options(max_receive_bytes: int = 64 * MiB, max_send_bytes: int = 64 * MiB) -> list[tuple]:
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", max_send_bytes),
    ]


class GrpcServer:
    """`interceptors` run inside the standard ones (request id, then monitoring), e.g. authentication;
    `collectors` add the service's own state to its metrics; `unique_request_ids` for a public front
    (see `assign_request_id`)."""

    def __init__(
        self,
        config: ServerConfig,
        services: Sequence[Service],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        collectors: Sequence[Collector] = (),
        unique_request_ids: bool = False,
    ):
        self.config = config
        self.services = list(services)
        self.health = HealthServicer()
        self.metrics = ServiceMetrics(collectors)
        self.metrics_port: int | None = None
        standard = [RequestIdInterceptor(unique_request_ids), MonitoringInterceptor(self.metrics.rpc),
                    OpenStreamLimiter()]
        self.server = grpc.aio.server(
            interceptors=[*standard, *interceptors],
            # SO_REUSEPORT off: a second server on a taken port must fail, not silently share it.
            options=[
                *channel_options(config.max_receive_message_bytes, config.max_send_message_bytes),
                ("grpc.so_reuseport", 0),
                # Clients re-resolve DNS only when a connection drops: capping connection age lets
                # gateways discover replicas an autoscaler added (headless Services, round robin).
                ("grpc.max_connection_age_ms", 300_000),
                ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000)),
                *([("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", config.receive_window_bytes)]
                  if config.receive_window_bytes else []),
            ],
        )
        for svc in self.services:
            svc.add_to_server(svc.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        names = [svc.name for svc in self.services]
        reflection.enable_server_reflection([*names, health_name, reflection.SERVICE_NAME], self.server)
        self.port: int | None = None
        self.health_server: grpc.aio.Server | None = None
        self._draining = False

    async def start(self) -> int:
        tls = self.config.tls
        if tls is None:
            self.port = self.server.add_insecure_port(self.config.address)
        else:
            self.port = self.server.add_secure_port(self.config.address, tls.credentials())
        if not self.port:
            raise RuntimeError(f"could not bind {self.config.address}")
        await self.set_serving(False)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        mode = "plaintext" if tls is None else ("mutual TLS" if tls.mutual else "TLS")
        log.info("listening on %s:%d (%s)", self.config.host, self.port, mode)
        if self.config.health_port:
            await self._start_health_port()
        self.metrics_port = self.metrics.serve(self.config.metrics_host or self.config.host, self.config.metrics_port)
        return self.port

    async def _start_health_port(self) -> None:
        self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        address = ServerConfig(host=self.config.host, port=self.config.health_port).address
        if not self.health_server.add_insecure_port(address):
            raise RuntimeError(f"could not bind the health port {address}")
        await self.health_server.start()
        log.info("health checks only, plaintext, on %s", address)

    async def set_serving(self, serving: bool) -> None:
        """Publish the readiness state; SERVING is ignored once the drain has begun."""
        if serving and self._draining:
            return
        states = health_pb2.HealthCheckResponse
        status = states.SERVING if serving else states.NOT_SERVING
        for name in ["", *(svc.name for svc in self.services)]:
            await self.health.set(name, status)

    async def stop(self, *, now: bool = False) -> None:
        """Refuse new calls; in-flight ones get the grace period (none with `now`), then are cancelled."""
        self._draining = True
        await self.set_serving(False)
        try:
            await self.server.stop(None if now else self.config.grace_seconds)
        finally:
            self.metrics.close()
            if self.health_server is not None:
                await self.health_server.stop(None)


def run_until_exit(main: Coroutine[object, object, None]) -> None:
    """`asyncio.run(main)`, then ignore SIGTERM/SIGINT while the process exits.

    Once the loop is closed its signal handlers are gone; a repeated SIGTERM (an impatient
    supervisor) must not turn a drained, clean stop into death by signal.
    """
    try:
        asyncio.run(main)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


def run_process(name: str, main: Coroutine[object, object, None],
                operator_errors: tuple[type[Exception], ...] = ()) -> int:
    """A service's exit code: 0 after a clean stop, 2 on an operator error (bad checkpoint, bad
    certificates: the message says it all), engine_health.EXIT_CODE when the engine did not recover,
    1 on anything else (logged with its traceback)."""
    try:
        run_until_exit(main)
    except KeyboardInterrupt:
        pass
    except EngineDead as exc:
        log.error("%s stopped: %s", name, exc)
        return ENGINE_DEAD_EXIT_CODE
    except operator_errors as exc:
        log.error("%s cannot start: %s", name, exc)
        return 2
    except Exception:
        log.exception("%s stopped on an error", name)
        return 1
    return 0


async def serve_until_signal(server: GrpcServer, load: Callable[[], Awaitable[None]] | None = None,
                             watch: Callable[[], Awaitable[None]] | None = None) -> None:
    """Start, run `load` (model loading) while health says NOT_SERVING, then serve until SIGTERM.

    `watch` (e.g. `EngineHealth.watch`) runs beside serving until the drain starts; its exception
    (EngineDead) ends serving and propagates.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    if load is not None:
        # A SIGTERM during a long model load stops the process without waiting for the load.
        loading = asyncio.ensure_future(load())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            loading.cancel()
            await server.stop()
            return
        stopping.cancel()
        loading.result()  # re-raise a failed load
    await server.set_serving(True)
    log.info("serving")
    stopping = asyncio.ensure_future(stop.wait())
    watching = asyncio.ensure_future(watch()) if watch is not None else None
    await asyncio.wait([stopping, *([watching] if watching else [])], return_when=asyncio.FIRST_COMPLETED)
    if watching is not None:
        if watching.done():
            stopping.cancel()
            watching.result()  # EngineDead: the caller stops the server now and the process exits
        watching.cancel()
    log.info("stopping: new calls refused, in-flight calls get %.0fs (a second signal cancels them now)",
             server.config.grace_seconds)
    hurried: set[asyncio.Future] = set()  # referenced until the process ends
    for sig in (signal.SIGTERM, signal.SIGINT):
        # gRPC's stop() may be called again with a shorter grace: it then ends sooner.
        loop.add_signal_handler(sig, lambda: hurried.add(asyncio.ensure_future(server.server.stop(0))))
    await server.stop()
    log.info("stopped")
