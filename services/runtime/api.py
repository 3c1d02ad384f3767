"""RuntimeService servicer: proto in -> domain call -> proto out.

Logs, metrics and usage RPCs come from the TelemetryApi mixin (telemetry_api.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeAlias

import grpc
from google.protobuf import empty_pb2

from hangar.agent.v1 import agent_pb2
from hangar.events.v1 import events_pb2
from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.runtime import store
from services.runtime.domain import DeploymentState, Isolation, Resources, ServerState
from services.runtime.scheduler import IMAGE_DRIVER
from services.runtime.store import DeploymentSpec
from services.runtime.telemetry_api import TelemetryApi
from shared import pagination
from shared.audit import record_audit
from shared.auth import require_caller, require_platform_admin, require_service
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from shared.proto import optional_timestamp

if TYPE_CHECKING:
    from services.runtime.server import RuntimeApp

Context: TypeAlias = grpc.aio.ServicerContext

_SERVER_STATUS = {
    ServerState.ACTIVE: pb.SERVER_STATUS_ACTIVE,
    ServerState.DRAINING: pb.SERVER_STATUS_DRAINING,
    ServerState.DOWN: pb.SERVER_STATUS_DOWN,
}
_ISOLATION = {
    Isolation.NONE: pb.SERVER_ISOLATION_NONE,
    Isolation.CONTAINER: pb.SERVER_ISOLATION_CONTAINER,
}
_ISOLATION_OF: dict[int, Isolation] = {value: isolation for isolation, value in _ISOLATION.items()}
_DEPLOYMENT_STATUS = {
    state: pb.DeploymentStatus.Value(f"DEPLOYMENT_STATUS_{state.name}") for state in DeploymentState
}

MAX_PAGE_SIZE = 500


def server_to_proto(s: store.Server) -> pb.Server:
    return pb.Server(
        id=s.id,
        name=s.name,
        region=s.region,
        agent_address=s.agent_address,
        ram_mb=s.capacity.ram_mb,
        cpu_millis=s.capacity.cpu_millis,
        ram_mb_reserved=s.reserved.ram_mb,
        cpu_millis_reserved=s.reserved.cpu_millis,
        status=_SERVER_STATUS[s.status],
        last_heartbeat_at=optional_timestamp(s.last_heartbeat_at),
        created_at=optional_timestamp(s.created_at),
        isolation=_ISOLATION[s.isolation],
    )


def deployment_to_proto(d: store.Deployment) -> pb.Deployment:
    out = pb.Deployment(
        id=d.id,
        project_id=d.project_id,
        organization_id=d.organization_id,
        server_id=d.server_id,
        status=_DEPLOYMENT_STATUS[d.status],
        capacity_reserved=d.capacity_reserved,
        ram_mb=d.resources.ram_mb,
        cpu_millis=d.resources.cpu_millis,
        secrets_version=d.env_version,
        status_reason=d.status_reason,
        rolled_back_from=d.rolled_back_from,
        created_at=optional_timestamp(d.created_at),
        updated_at=optional_timestamp(d.updated_at),
    )
    if d.image is not None:
        out.image = d.image
    else:
        out.command = d.command or ""
    if d.exit_code is not None:
        out.exit_code = d.exit_code
    return out


_CONTAINER_STATUS = {
    "starting": pb.CONTAINER_STATUS_STARTING,
    "running": pb.CONTAINER_STATUS_RUNNING,
    "stopping": pb.CONTAINER_STATUS_STOPPING,
    "stopped": pb.CONTAINER_STATUS_EXITED,
    "failed": pb.CONTAINER_STATUS_FAILED,
}
_SLEEP_STATUS = {
    "awake": pb.SLEEP_STATUS_AWAKE,
    "sleeping": pb.SLEEP_STATUS_SLEEPING,
    "waking": pb.SLEEP_STATUS_WAKING,
}
# Runtime's container report -> the agent's (the deployer speaks the agent's message).
_REPORTED_STATUS = {
    pb.CONTAINER_STATUS_STARTING: agent_pb2.CONTAINER_STATUS_STARTING,
    pb.CONTAINER_STATUS_RUNNING: agent_pb2.CONTAINER_STATUS_RUNNING,
    pb.CONTAINER_STATUS_STOPPING: agent_pb2.CONTAINER_STATUS_STOPPING,
    pb.CONTAINER_STATUS_EXITED: agent_pb2.CONTAINER_STATUS_EXITED,
    pb.CONTAINER_STATUS_FAILED: agent_pb2.CONTAINER_STATUS_FAILED,
}


def container_to_proto(c: store.Container) -> pb.Container:
    return pb.Container(
        id=c.id,
        project_id=c.project_id,
        deployment_id=c.deployment_id,
        server_id=c.server_id,
        status=_CONTAINER_STATUS[c.status],
        sleep_status=_SLEEP_STATUS[c.sleep_status],
        address=c.address,
        last_request_at=optional_timestamp(c.last_request_at),
        started_at=optional_timestamp(c.started_at),
        restart_count=c.restart_count,
        last_exit_reason=c.last_exit_reason,
        crash_loop=c.crash_loop,
    )


def report_from_proto(r: pb.ContainerStatusReport) -> agent_pb2.Container:
    report = agent_pb2.Container(
        container_id=_required(r.container_id, "report.container_id"),
        status=_REPORTED_STATUS.get(r.status, agent_pb2.CONTAINER_STATUS_UNSPECIFIED),
        reason=r.reason,
        restart_count=r.restart_count,
        last_exit_reason=r.last_exit_reason,
        last_log_lines=r.last_log_lines,
        crash_loop=r.crash_loop,
    )
    if r.HasField("exit_code"):
        report.exit_code = r.exit_code
    # The two enums share their numbers (AWAKE 1, SLEEPING 2, WAKING 3).
    report.sleep_status = r.sleep_status  # type: ignore[assignment]
    if r.HasField("last_request_at"):
        report.last_request_at.CopyFrom(r.last_request_at)
    return report


def _isolation(value: int) -> Isolation:
    """What a registering admin declares; unspecified: none, until the agent says."""
    if value == pb.SERVER_ISOLATION_UNSPECIFIED:
        return Isolation.NONE
    if value not in _ISOLATION_OF:
        raise InvalidArgument.field("server.isolation", "not a known isolation")
    return _ISOLATION_OF[value]


def _required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument.field(field, "required")
    return value.strip()


class RuntimeApi(TelemetryApi, runtime_pb2_grpc.RuntimeServiceServicer):
    # RuntimeApp is a TelemetryHost; mypy holds the Protocol's mutable `projects` invariant.
    app: RuntimeApp  # type: ignore[assignment]

    def __init__(self, app: RuntimeApp) -> None:
        self.app = app
        self.db = app.db

    # -------------------------------------------------------------------- servers

    async def RegisterServer(
        self, request: pb.RegisterServerRequest, context: Context
    ) -> pb.Server:
        require_platform_admin()
        spec = request.server
        capacity = Resources(spec.ram_mb, spec.cpu_millis).validate("server.")
        async with self.db.transaction() as tx:
            server = await store.insert_server(
                tx,
                name=_required(spec.name, "server.name"),
                region=_required(spec.region, "server.region"),
                agent_address=_required(spec.agent_address, "server.agent_address"),
                capacity=capacity,
                isolation=_isolation(spec.isolation),
            )
            await record_audit(
                tx,
                "runtime",
                organization_id="",
                action="server.registered",
                target_type="server",
                target_id=server.id,
                metadata={
                    "name": server.name,
                    "region": server.region,
                    "isolation": server.isolation.value,
                },
            )
        return server_to_proto(server)

    async def ListServers(
        self, request: pb.ListServersRequest, context: Context
    ) -> pb.ListServersResponse:
        require_platform_admin()
        size = pagination.page_size(request.page_size, maximum=MAX_PAGE_SIZE)
        async with self.db.session() as s:
            page = await store.list_servers(s, size, request.page_token)
        return pb.ListServersResponse(
            servers=[server_to_proto(x) for x in page.items], next_page_token=page.next_page_token
        )

    async def GetServer(self, request: pb.GetServerRequest, context: Context) -> pb.Server:
        require_platform_admin()
        async with self.db.session() as s:
            server = await store.get_server(s, _required(request.id, "id"))
        return server_to_proto(server)

    async def DrainServer(self, request: pb.DrainServerRequest, context: Context) -> pb.Server:
        require_platform_admin()
        async with self.db.transaction() as tx:
            server = await store.set_server_status(
                tx, _required(request.id, "id"), ServerState.DRAINING
            )
            await record_audit(
                tx,
                "runtime",
                organization_id="",
                action="server.drained",
                target_type="server",
                target_id=server.id,
            )
        return server_to_proto(server)

    # ---------------------------------------------------------------- deployments

    async def _readable(self, deployment_id: str, permission: str) -> store.Deployment:
        """The deployment, if the caller may use `permission` on it (AIP-193 otherwise)."""
        principal = require_caller()
        try:
            async with self.db.session() as s:
                deployment = await store.get_deployment(s, _required(deployment_id, "id"))
        except NotFound:
            if principal.is_platform_admin:
                raise
            raise PermissionDenied(f"missing permission {permission} on this deployment") from None
        await self.app.authorizer.require(deployment.organization_id, permission)
        return deployment

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: Context
    ) -> pb.Deployment:
        return deployment_to_proto(await self._readable(request.id, "deployments.get"))

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: Context
    ) -> pb.ListDeploymentsResponse:
        project_id = await self._authorize_project(request.project_id, "deployments.list")
        size = pagination.page_size(request.page_size, maximum=MAX_PAGE_SIZE)
        async with self.db.session() as s:
            page = await store.list_deployments(s, project_id, size, request.page_token)
        return pb.ListDeploymentsResponse(
            deployments=[deployment_to_proto(d) for d in page.items],
            next_page_token=page.next_page_token,
        )

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: Context
    ) -> pb.Deployment:
        require_caller()
        project = await self.app.projects.get(_required(request.project_id, "project_id"))
        await self.app.authorizer.require(project.organization_id, "deployments.create")
        image, command = _source(request.deployment, project.default_image, project.default_command)
        if image is not None:
            async with self.db.session() as s:
                if not await store.any_active_server_with_driver(s, IMAGE_DRIVER):
                    raise FailedPrecondition(
                        "no server has a driver that runs images; deploy a command",
                        reason="NO_IMAGE_DRIVER",
                    )
        deployment = await self.app.scheduler.create(
            DeploymentSpec(
                project_id=project.id,
                organization_id=project.organization_id,
                resources=project.resources,
                region=project.region,
                image=image,
                command=command,
                health_check_path=project.health_check_path,
                sleep_after_seconds=project.sleep_after_seconds,
                restart_policy=project.restart_policy,
                liveness_check_path=project.liveness_check_path,
                liveness_period_seconds=project.liveness_period_seconds,
                liveness_failure_threshold=project.liveness_failure_threshold,
            )
        )
        if deployment.status is DeploymentState.SCHEDULING:
            self.app.deployer.launch_soon(deployment.id)
        return deployment_to_proto(deployment)

    async def RollbackDeployment(
        self, request: pb.RollbackDeploymentRequest, context: Context
    ) -> pb.Deployment:
        deployment = await self._readable(request.id, "deployments.rollback")
        rollback = await self.app.scheduler.roll_back(deployment.id)
        if rollback.status is DeploymentState.SCHEDULING:
            self.app.deployer.launch_soon(rollback.id)
        return deployment_to_proto(rollback)

    async def CancelDeployment(
        self, request: pb.CancelDeploymentRequest, context: Context
    ) -> pb.Deployment:
        deployment = await self._readable(request.id, "deployments.cancel")
        cancelled = await self.app.scheduler.cancel(deployment.id)
        self.app.deployer.stop_soon()
        return deployment_to_proto(cancelled)

    # ----------------------------------------------------------------- containers

    async def ListContainers(
        self, request: pb.ListContainersRequest, context: Context
    ) -> pb.ListContainersResponse:
        project_id = await self._authorize_project(request.project_id, "containers.list")
        size = pagination.page_size(request.page_size, maximum=MAX_PAGE_SIZE)
        async with self.db.session() as s:
            page = await store.list_containers(s, project_id, size, request.page_token)
        return pb.ListContainersResponse(
            containers=[container_to_proto(c) for c in page.items],
            next_page_token=page.next_page_token,
        )

    # --------------------------------------------------------------------- agents

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        require_service("agent")
        reports = [report_from_proto(r) for r in request.containers]
        server = await self.app.deployer.heartbeat(
            _required(request.server_id, "server_id"),
            reports,
            isolation=_ISOLATION_OF.get(request.isolation),
        )
        return pb.HeartbeatResponse(server_status=_SERVER_STATUS[server.status])

    async def ReportContainerStatus(
        self, request: pb.ReportContainerStatusRequest, context: Context
    ) -> empty_pb2.Empty:
        require_service("agent")
        await self.app.deployer.report(
            _required(request.server_id, "server_id"), report_from_proto(request.report)
        )
        return empty_pb2.Empty()

    # --------------------------------------------------------------------- events

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.Event]:
        require_service()
        async for event in self.app.feed.watch(request, context):
            yield event


def _source(
    requested: pb.Deployment, default_image: str, default_command: str
) -> tuple[str | None, str | None]:
    """(image, command): what the request names, else the project's default."""
    which = requested.WhichOneof("source")
    if which == "image":
        return _required(requested.image, "deployment.image"), None
    if which == "command":
        command = _required(requested.command, "deployment.command")
    elif default_image:
        return default_image, None
    elif default_command:
        command = default_command
    else:
        raise InvalidArgument.field(
            "deployment.command", "required: the project has no default command or image"
        )
    if "\x00" in command:
        raise InvalidArgument.field("deployment.command", "must not contain NUL")
    return None, command
