"""The agent process: runs on each server and starts / stops app processes for runtime.

It has no database: its state is the apps it runs, each owned by a shim of its own, and a
record of each in its state directory. Shutting it down (SIGTERM) stops them all; an agent
that dies (SIGKILL, a crash) leaves them running, and the next agent of the same state
directory adopts them before it serves (`AgentApp.adopt`), so runtime sees them running on.
With its own service secret (HANGAR_AGENT_SERVICE_SECRET) it also reports to runtime:
status changes as they happen, a heartbeat, and the apps' logs and metrics (shipping.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import grpc

from hangar.agent.v1 import agent_pb2, agent_pb2_grpc
from services.agent import containers
from services.agent.api import AgentApi
from services.agent.artifacts import RuntimeArtifacts
from services.agent.drivers import Driver, ProcessDriver
from services.agent.enrolment import CertificateRenewer, bound_server_of, with_bound_server
from services.agent.metrics import watch_agent
from services.agent.reporting import RuntimeReporter, server_key
from services.agent.restarts import RestartRules
from services.agent.shipping import AgentTelemetry
from shared.auth import IdentityJwks, ServiceTokenSource, TokenVerifier
from shared.clients import Clients
from shared.interceptors import Authenticator
from shared.loops import cancel_and_wait
from shared.metrics import Metrics
from shared.server import run_service
from shared.settings import Settings

log = logging.getLogger("hangar.agent")

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
# After its apps are stopped, what a stopping agent still gives runtime: their last log
# lines and a last heartbeat, at once: it ends within its stop grace and a second.
FAREWELL_SECONDS = 0.5


class AgentApp:
    """What shared.server serves: the AgentService over one driver."""

    name = "agent"
    service_names: Sequence[str] = (AGENT_SERVICE.full_name,)

    def __init__(
        self,
        settings: Settings,
        *,
        driver: Driver | None = None,
        authenticator: Authenticator | None = None,
        report: bool | None = None,
    ) -> None:
        settings = with_bound_server(settings)
        self.settings = settings
        self.driver: Driver = driver or build_driver(settings)
        # GET /metrics (shared.server serves it) only with HANGAR_AGENT_METRICS_ADDR.
        self.metrics = Metrics() if settings.metrics_address else None
        if self.metrics is not None:
            watch_agent(self.metrics, self.driver)
        self._jwks: IdentityJwks | None = None
        if authenticator is None:
            # Tokens are verified locally with identity's published keys.
            self._jwks = IdentityJwks(settings, metrics=self.metrics)
            authenticator = TokenVerifier.for_settings(settings, self._jwks)
        self.authenticator = authenticator
        # Calls to runtime carry the agent's own token (only with its secret configured).
        self.token_source = (
            ServiceTokenSource(settings, metrics=self.metrics)
            if settings.service_secrets.get("agent")
            else None
        )
        self.clients = Clients(
            settings.addresses,
            default_timeout=settings.call_timeout_seconds,
            token_provider=self.token_source,
            metrics=self.metrics,
        )
        builder = getattr(self.driver, "builder", None)
        if builder is not None and self.token_source is not None:
            builder.artifacts = RuntimeArtifacts(
                self.clients, Path(settings.agent_state_dir) / "artifacts"
            )
        self._loops: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.reporter: RuntimeReporter | None = None
        self.telemetry: AgentTelemetry | None = None
        if report if report is not None else self.token_source is not None:
            self.telemetry = AgentTelemetry(settings, self.driver, self.clients)
            self.telemetry.flush_seconds = min(self.telemetry.flush_seconds, FAREWELL_SECONDS)
            self.reporter = RuntimeReporter(
                self.driver,
                self.clients,
                server=server_key(settings.agent_server),
                heartbeat_seconds=settings.agent_heartbeat_seconds,
            )
            self.add_loop(self.reporter.run_reports)
            self.add_loop(self.reporter.run_heartbeat)
        # An enrolled agent (`hangar agent join`) renews its own certificate (docs/tls.md).
        self.renewer: CertificateRenewer | None = None
        if self.token_source is not None and bound_server_of(settings.tls):
            self.renewer = CertificateRenewer(
                settings.tls,
                self.clients,
                timeout=settings.call_timeout_seconds,
                on_renewed=self.telemetry.follow_files if self.telemetry is not None else None,
            )
            self.add_loop(self.renewer.run)

    @classmethod
    async def create(cls, settings: Settings) -> AgentApp:
        app = cls(settings)
        try:
            await app.adopt()  # before the port opens: what it lists then is all it runs
        except BaseException:
            await app.close()
            raise
        return app

    async def adopt(self) -> None:
        """Takes over the apps an earlier agent of this state directory left (once)."""
        await self.driver.adopt()

    def add_loop(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """A background task that runs while the agent serves (status reports, shipping)."""
        self._loops.append(loop)

    def register(self, server: grpc.aio.Server) -> None:
        agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentApi(self.driver), server)

    async def start(self) -> None:
        await self.adopt()  # a no-op once done (an app built by `create`)
        self._tasks = [asyncio.create_task(loop()) for loop in self._loops]
        if self.telemetry is not None:
            await self.telemetry.start()

    async def close(self) -> None:
        await self.driver.close()  # no app outlives the agent (SIGKILL after the stop grace)
        # After the apps, together: their last lines go out, runtime hears they stopped.
        await asyncio.gather(self._last_lines(), self._last_beat())
        await cancel_and_wait(self._tasks)
        await self.clients.close()
        if self.token_source is not None:
            await self.token_source.close()
        if self._jwks is not None:
            await self._jwks.close()

    async def _last_lines(self) -> None:
        if self.telemetry is not None:
            await self.telemetry.close()

    async def _last_beat(self) -> None:
        if self.reporter is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.reporter.beat(), FAREWELL_SECONDS)


def build_driver(settings: Settings) -> Driver:
    """The driver `agent_driver` names: "container" (runc), "process", or "auto" (runc
    wherever it can run, else processes, said loudly: apps are not isolated then)."""
    common: dict[str, Any] = {
        "advertise_host": settings.agent_app_host,
        "start_timeout": settings.agent_start_timeout_seconds,
        "stop_grace": settings.agent_stop_grace_seconds,
        "log_lines": settings.agent_log_buffer_lines,
        "restart_rules": RestartRules(
            backoff_seconds=settings.agent_restart_backoff_seconds,
            max_backoff_seconds=settings.agent_restart_max_backoff_seconds,
            stable_seconds=settings.agent_restart_stable_seconds,
            crash_loop_after=settings.agent_crash_loop_restarts,
        ),
    }
    choice = settings.agent_driver
    if choice not in ("auto", "container", "process"):
        raise ValueError(f"HANGAR_AGENT_DRIVER must be auto, container or process, not {choice!r}")
    why_not = containers.unavailable_reason() if choice != "process" else None
    if choice == "container" and why_not is not None:
        raise RuntimeError(f"the container driver cannot run here: {why_not}")
    if choice == "process" or why_not is not None:
        log.warning(
            "APPS ARE NOT ISOLATED: the agent runs them as plain processes of its own user, "
            "on this machine's filesystem and network (development only; %s)",
            why_not or "HANGAR_AGENT_DRIVER=process",
        )
        return ProcessDriver(state_dir=settings.agent_state_dir, **common)
    log.info("apps run in containers (runc)", extra={"state_dir": settings.agent_state_dir})
    return containers.ContainerDriver(
        state_dir=settings.agent_state_dir,
        pids_limit=settings.agent_pids_limit,
        tmpfs_mb=settings.agent_tmpfs_mb,
        freeze_seconds=settings.agent_freeze_seconds,
        build_timeout=settings.agent_build_timeout_seconds,
        insecure_registries=settings.agent_insecure_registries,
        keep_unused_seconds=settings.agent_keep_unused_images_seconds,
        **common,
    )


def main() -> None:
    run_service(AgentApp.name, AgentApp.create)
