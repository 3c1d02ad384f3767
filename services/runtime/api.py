"""RuntimeService servicer: proto in -> domain call -> proto out.

RPCs not overridden here answer UNIMPLEMENTED (the generated base class) until built:
CreateDeployment and RollbackDeployment wait for project.ResolveSecrets and the agent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, TypeAlias

import grpc
from google.protobuf import timestamp_pb2

from hangar.events.v1 import events_pb2
from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.runtime import store
from services.runtime.domain import DeploymentState, Resources, ServerState
from shared.audit import record_audit
from shared.auth import require_caller, require_platform_admin, require_service
from shared.errors import InvalidArgument, NotFound, PermissionDenied

if TYPE_CHECKING:
    from services.runtime.server import RuntimeApp

Context: TypeAlias = grpc.aio.ServicerContext

_SERVER_STATUS = {
    ServerState.ACTIVE: pb.SERVER_STATUS_ACTIVE,
    ServerState.DRAINING: pb.SERVER_STATUS_DRAINING,
    ServerState.DOWN: pb.SERVER_STATUS_DOWN,
}
_DEPLOYMENT_STATUS = {
    state: pb.DeploymentStatus.Value(f"DEPLOYMENT_STATUS_{state.name}") for state in DeploymentState
}


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


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
        last_heartbeat_at=_ts(s.last_heartbeat_at),
        created_at=_ts(s.created_at),
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
        created_at=_ts(d.created_at),
        updated_at=_ts(d.updated_at),
    )
    if d.image is not None:
        out.image = d.image
    else:
        out.command = d.command or ""
    if d.exit_code is not None:
        out.exit_code = d.exit_code
    return out


def _required(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidArgument.field(field, "required")
    return value.strip()


class RuntimeApi(runtime_pb2_grpc.RuntimeServiceServicer):
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
            )
            await record_audit(
                tx,
                "runtime",
                organization_id="",
                action="server.registered",
                target_type="server",
                target_id=server.id,
                metadata={"name": server.name, "region": server.region},
            )
        return server_to_proto(server)

    async def ListServers(
        self, request: pb.ListServersRequest, context: Context
    ) -> pb.ListServersResponse:
        require_platform_admin()
        size = store.page_size(request.page_size)
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
        require_caller()
        project_id = _required(request.project_id, "project_id")
        organization_id = await self.app.projects.organization_of(project_id)
        await self.app.authorizer.require(organization_id, "deployments.list")
        size = store.page_size(request.page_size)
        async with self.db.session() as s:
            page = await store.list_deployments(s, project_id, size, request.page_token)
        return pb.ListDeploymentsResponse(
            deployments=[deployment_to_proto(d) for d in page.items],
            next_page_token=page.next_page_token,
        )

    async def CancelDeployment(
        self, request: pb.CancelDeploymentRequest, context: Context
    ) -> pb.Deployment:
        deployment = await self._readable(request.id, "deployments.cancel")
        return deployment_to_proto(await self.app.scheduler.cancel(deployment.id))

    # --------------------------------------------------------------------- events

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.Event]:
        require_service()
        async for event in self.app.feed.watch(request, context):
            yield event
