"""The agent tells runtime what it runs: ReportContainerStatus on every state change, and a
Heartbeat every few seconds that carries the status of every container (so a report lost
while runtime was away is made good by the next beat).

Calls carry the agent's own service token (HANGAR_AGENT_SERVICE_SECRET) and a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable
from datetime import datetime, timedelta

import grpc

from hangar.runtime.v1 import runtime_pb2 as rpb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.agent.domain import ContainerInfo, ContainerState, SleepState, utcnow
from services.agent.drivers import Driver
from shared.clients import Clients
from shared.proto import timestamp

log = logging.getLogger("hangar.agent.reporting")

RUNTIME_SERVICE = rpb.DESCRIPTOR.services_by_name["RuntimeService"]

_STATUS = {
    ContainerState.STARTING: rpb.CONTAINER_STATUS_STARTING,
    ContainerState.RUNNING: rpb.CONTAINER_STATUS_RUNNING,
    ContainerState.STOPPING: rpb.CONTAINER_STATUS_STOPPING,
    ContainerState.EXITED: rpb.CONTAINER_STATUS_EXITED,
    ContainerState.FAILED: rpb.CONTAINER_STATUS_FAILED,
    ContainerState.STOPPED: rpb.CONTAINER_STATUS_EXITED,
}


# The driver's isolation (Driver.isolation) as runtime's enum.
_ISOLATION = {
    "none": rpb.SERVER_ISOLATION_NONE,
    "container": rpb.SERVER_ISOLATION_CONTAINER,
}

_SLEEP = {
    SleepState.AWAKE: rpb.SLEEP_STATUS_AWAKE,
    SleepState.SLEEPING: rpb.SLEEP_STATUS_SLEEPING,
    SleepState.WAKING: rpb.SLEEP_STATUS_WAKING,
}


def report_of(info: ContainerInfo) -> rpb.ContainerStatusReport:
    report = rpb.ContainerStatusReport(
        container_id=info.container_id,
        status=_STATUS[info.state],
        reason=info.reason,
        sleep_status=_SLEEP[info.sleep],
        restart_count=info.restarts,
        last_exit_reason=info.last_exit_reason,
        last_log_lines=info.last_log_lines,
        crash_loop=info.crash_loop,
        building=info.building,
        slug_sha256=info.slug_sha256,
        image_digest=info.image_digest,
    )
    if info.exit_code is not None:
        report.exit_code = info.exit_code
    if info.last_request_at is not None:
        report.last_request_at.CopyFrom(timestamp(info.last_request_at))
    return report


def server_key(configured: str) -> str:
    """The server this agent is registered as: the setting, else this machine's hostname."""
    return configured or socket.gethostname()


class RuntimeReporter:
    def __init__(
        self,
        driver: Driver,
        clients: Clients,
        *,
        server: str,
        heartbeat_seconds: float = 5.0,
        retry_seconds: float = 1.0,
    ) -> None:
        self.driver = driver
        self.clients = clients
        self.server = server
        self.heartbeat_seconds = heartbeat_seconds
        self.retry_seconds = retry_seconds
        self._pending: dict[str, ContainerInfo] = {}  # newest unsent state per container
        self._changed = asyncio.Event()
        self._last_beat: datetime | None = None
        self.server_status = rpb.SERVER_STATUS_UNSPECIFIED
        driver.subscribe(self._on_change)

    def _stub(self) -> runtime_pb2_grpc.RuntimeServiceStub:
        return self.clients.stub("runtime", runtime_pb2_grpc.RuntimeServiceStub, RUNTIME_SERVICE)

    def _on_change(self, info: ContainerInfo) -> None:
        self._pending[info.container_id] = info  # a newer state replaces an unsent older one
        self._changed.set()

    async def run_reports(self) -> None:
        """Send each container's newest state as it changes; keep it until runtime took it."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            for container_id, info in list(self._pending.items()):
                try:
                    request = rpb.ReportContainerStatusRequest(
                        server_id=self.server, report=report_of(info)
                    )
                    await self._stub().ReportContainerStatus(request)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # runtime or identity away: keep it, retry
                    log.warning(
                        "status report not delivered; retrying",
                        extra={"container_id": container_id, "error": _describe(exc)},
                    )
                    await asyncio.sleep(self.retry_seconds)
                    self._changed.set()
                    break
                if self._pending.get(container_id) is info:
                    del self._pending[container_id]

    def _beat_reports(self, containers: Iterable[ContainerInfo]) -> list[rpb.ContainerStatusReport]:
        """Live containers, and those that ended since the last beat runtime took."""
        margin = timedelta(seconds=self.heartbeat_seconds)
        since = self._last_beat - margin if self._last_beat else None
        return [
            report_of(info)
            for info in containers
            if not info.state.ended or since is None or (info.ended_at or utcnow()) >= since
        ]

    async def beat(self) -> rpb.HeartbeatResponse:
        started = utcnow()
        reply: rpb.HeartbeatResponse = await self._stub().Heartbeat(
            rpb.HeartbeatRequest(
                server_id=self.server,
                containers=self._beat_reports(self.driver.list()),
                isolation=_ISOLATION.get(
                    getattr(self.driver, "isolation", "none"), rpb.SERVER_ISOLATION_NONE
                ),
            )
        )
        self._last_beat = started
        self.server_status = reply.server_status
        return reply

    async def run_heartbeat(self) -> None:
        while True:
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                extra = {"server": self.server, "error": _describe(exc)}
                log.warning("heartbeat not delivered", extra=extra)
            await asyncio.sleep(self.heartbeat_seconds)


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)
