"""The edge process (`hangar serve edge`): Caddy on the public ports, kept in step with
runtime's route table.

Start-up: the `ask` endpoint, the upstreams' DNS and the failed-wake page (wake.py) on
loopback ports, then Caddy with the first table (empty if runtime does not answer yet; the
controller keeps trying) and the uploaded certificates (project's ListDomainCertificates),
then the controller follows runtime's events. With HANGAR_EDGE_METRICS_ADDR, GET /metrics
there (metrics.py) opens first, so a taken port fails the start. SIGTERM/SIGINT stop the
controller, then Caddy (which finishes in-flight requests within its grace). Caddy cannot
outlive this process (see `Caddy`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from services.edge.caddy import Caddy, CaddyError, EdgeConfig, default_state_dir
from services.edge.certificates import ProjectCertificates
from services.edge.controller import AskServer, EdgeController
from services.edge.dns import UpstreamDns
from services.edge.metrics import EdgeMetrics
from services.edge.runtime_routes import RuntimeRoutes
from services.edge.wake import RouteWaker, WakePages
from shared.logging import configure_logging
from shared.metrics import Metrics, MetricsServer, serve_metrics
from shared.settings import Settings
from shared.tracing import configure_tracing

log = logging.getLogger("hangar.edge")


def edge_config(
    settings: Settings, caddy: Caddy, ask_url: str, dns_address: str, *, metrics: bool = False
) -> EdgeConfig:
    return EdgeConfig(
        http_address=settings.addresses["edge"],
        https_port=settings.edge_https_port,
        admin_address=settings.edge_admin_address,
        apps_domain=settings.apps_domain,
        storage_dir=str(caddy.storage_dir),
        ask_url=ask_url,
        dns_address=dns_address,
        metrics=metrics,
    )


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Prometheus metrics, only with a metrics address (as every process).
    metrics = Metrics() if settings.metrics_address else None
    edge_metrics = EdgeMetrics(metrics) if metrics is not None else None
    source = RuntimeRoutes(settings, metrics=metrics)
    caddy = Caddy(
        settings.edge_admin_address, default_state_dir(), stop_grace=settings.grace_seconds
    )
    ask = AskServer()
    waker: RouteWaker | None = None
    pages = WakePages()
    dns = UpstreamDns()
    controller: EdgeController | None = None
    metrics_server: MetricsServer | None = None
    try:
        if metrics is not None:
            metrics_server = await serve_metrics(metrics, settings.metrics_address)
        edge = edge_config(
            settings, caddy, await ask.start(), await dns.start(), metrics=metrics is not None
        )
        source.wake_timeout = edge.wake_deadline_seconds
        # Requests for a sleeping project: held by Caddy while runtime wakes it (wake.py).
        waker = RouteWaker(source.wake)
        dns.waker, dns.pages_port = waker, await pages.start()
        controller = EdgeController(
            source,
            caddy,
            edge,
            dns,
            first_fetch_timeout=settings.call_timeout_seconds,
            # Uploaded certificates, over the same clients (the edge's service token).
            certificates=ProjectCertificates(source.clients, settings.call_timeout_seconds),
            metrics=edge_metrics,
        )
        if edge_metrics is not None:
            edge_metrics.watch(controller, dns, ask, caddy, waker)
        ask.controller = controller
        waker.on_done = controller.refresh
        pages.reason_for = _failure_of(controller, waker)
        await controller.start()
        where = {"http": edge.http_address, "https": edge.https_address}
        log.info("serving", extra={**where, "domain": edge.apps_domain})
        await _until_stopped(stop, caddy)
    finally:
        log.info("shutting down")
        await caddy.stop()  # first: whatever happens next, no Caddy is left behind
        if controller is not None:
            await controller.close()
        if waker is not None:
            await waker.close()
        await ask.close()
        await pages.close()
        dns.close()
        await source.close()
        if metrics_server is not None:
            await metrics_server.close()
        log.info("stopped")


def _failure_of(controller: EdgeController, waker: RouteWaker) -> Callable[[str], str | None]:
    def reason_for(hostname: str) -> str | None:
        project = controller.project_of(hostname)
        return waker.failure(project) if project is not None else None

    return reason_for


async def _until_stopped(stop: asyncio.Event, caddy: Caddy) -> None:
    """Until SIGTERM/SIGINT; an exit of Caddy itself ends the edge too (its supervisor
    restarts it)."""
    assert caddy.proc is not None
    stopped = asyncio.create_task(stop.wait())
    exited = asyncio.create_task(caddy.proc.wait())
    done, pending = await asyncio.wait({stopped, exited}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if exited in done:
        raise SystemExit(f"caddy exited ({caddy.proc.returncode})")


def main() -> None:
    settings = Settings.from_env("edge")
    configure_logging("edge", settings.log_level)
    configure_tracing("edge")
    try:
        asyncio.run(serve(settings))
    except (OSError, CaddyError) as exc:  # a port taken, caddy missing or refusing
        log.error("edge: %s", exc)
        raise SystemExit(1) from None
