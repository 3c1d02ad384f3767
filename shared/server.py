"""The one grpc.aio server bootstrap every Hangar service runs on.

uvloop, interceptors (request id, caller, deadline, error mapping), the standard health
service with a status per service, reflection that lists health too, and graceful shutdown:
SIGTERM/SIGINT -> health NOT_SERVING -> end the WatchEvents streams -> stop accepting ->
drain in-flight calls -> close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.interceptors import Authenticator, ServerInterceptor
from shared.logging import configure_logging
from shared.metrics import Metrics, MetricsServer, serve_metrics
from shared.outbox import OutboxFeed
from shared.settings import Settings
from shared.tls import TlsCredentials, process_tls
from shared.tracing import configure_tracing, server_interceptors

log = logging.getLogger("hangar.server")


class Service(Protocol):
    """What a service hands the bootstrap: its servicers, background loops and clean-up.

    A service with an outbox also has a `feed` attribute (an OutboxFeed): its WatchEvents
    streams are ended when the server stops.
    """

    service_names: Sequence[str]  # full names, e.g. "hangar.identity.v1.IdentityService"

    def register(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class RunningServer:
    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        service: Service,
        port: int,
        grace: float,
        metrics_server: MetricsServer | None = None,
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.service = service
        self.port = port
        self.grace = grace
        self.metrics_server = metrics_server
        self.health_server: grpc.aio.Server | None = None  # plaintext health (probes)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server is not None else None

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        # Server streams never end by themselves: end them first, so the grace period only
        # waits for the unary calls in flight (not the whole of it for every watcher).
        feed = getattr(self.service, "feed", None)
        if isinstance(feed, OutboxFeed):
            feed.end_watches()
        await self.server.stop(self.grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.service.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()


async def start_server(
    service: Service,
    address: str,
    *,
    authenticator: Authenticator | None = None,
    grace: float = 5.0,
    tls: TlsCredentials | None = None,
    health_address: str = "",
) -> RunningServer:
    """Start serving `service` on `address` ("host:port"; port 0 picks a free one).

    Without an explicit `authenticator`, the service's own `authenticator` attribute (if any)
    verifies bearer tokens. A service with a `metrics` attribute (shared.metrics.Metrics, set
    when its settings have a metrics address) is counted and serves GET /metrics there. With
    tracing on (shared.tracing), each call is a span. With `tls` (default: the process's
    HANGAR_TLS_* files, shared.tls), only clients with a certificate of the platform CA connect;
    `health_address` then serves grpc.health.v1 alone in plaintext (kubelet's gRPC probes
    cannot present a certificate).
    """
    tls = tls or process_tls()
    if authenticator is None:
        authenticator = getattr(service, "authenticator", None)
    metrics: Metrics | None = getattr(service, "metrics", None)
    # Tracing (when on) outside ours: request id and error mapping run inside the call's span.
    interceptors: list[grpc.aio.ServerInterceptor] = [
        *server_interceptors(),
        ServerInterceptor(authenticator),
        # A service's own checks run inside ours: their refusals are mapped to statuses.
        *getattr(service, "interceptors", ()),
    ]
    if metrics is not None:
        interceptors.insert(0, metrics.server_interceptor())  # outermost: sees final codes
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ],
    )
    service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.server_credentials())
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    metrics_server = None
    if metrics is not None:
        settings: Settings = getattr(service, "settings")  # noqa: B009 - not in the Protocol
        metrics_server = await serve_metrics(metrics, settings.metrics_address)
    try:
        await server.start()
        await service.start()
    except BaseException:
        if metrics_server is not None:
            await metrics_server.close()
        raise
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    for name in service.service_names:
        await health_servicer.set(name, serving)
    running = RunningServer(server, health_servicer, service, port, grace, metrics_server)
    if health_address:
        running.health_server = await _serve_health(health_servicer, health_address)
    return running


async def _serve_health(servicer: health.aio.HealthServicer, address: str) -> grpc.aio.Server:
    """The health service alone, plaintext: it tells whether the process serves, nothing else."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    await server.start()
    return server


def run_service(
    name: str,
    build: Callable[[Settings], Awaitable[Service]],
    authenticator: Callable[[Settings], Authenticator | None] | None = None,
) -> None:
    """Entry point of a service process: serve until SIGTERM/SIGINT, then shut down cleanly."""
    settings = Settings.from_env(name)
    configure_logging(name, settings.log_level)
    configure_tracing(name)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    try:
        asyncio.run(_serve_forever(settings, build, authenticator))
    except OSError as exc:
        log.error("%s: %s", name, exc)
        raise SystemExit(1) from None


async def _serve_forever(
    settings: Settings,
    build: Callable[[Settings], Awaitable[Service]],
    authenticator: Callable[[Settings], Authenticator | None] | None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = await build(settings)
    try:
        running = await start_server(
            service,
            settings.listen_address,
            authenticator=authenticator(settings) if authenticator else None,
            grace=settings.grace_seconds,
            health_address=os.environ.get(f"HANGAR_{settings.service.upper()}_HEALTH_ADDR", ""),
        )
    except BaseException:
        await service.close()
        raise
    log.info("serving", extra={"address": settings.listen_address, "port": running.port})
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.grace_seconds})
    await running.stop()
    log.info("stopped")
