"""RuntimeService servicer: proto in -> use case (service.py) -> proto out.

Logs, metrics and usage RPCs come from the TelemetryApi mixin (telemetry_api.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf import empty_pb2

from hangar.agent.v1 import agent_pb2
from hangar.events.v1 import events_pb2
from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.runtime.domain import (
    DeploymentState,
    Isolation,
    ReleaseReason,
    RequestedSource,
    ServerState,
)
from services.runtime.enrolment import AgentEnrolment, certificate_to_proto, seconds
from services.runtime.projects import Projects
from services.runtime.routes import EDGE, WAKE_TIMEOUT, Routes
from services.runtime.service import AgentReports, Containers, Deployments, Servers
from services.runtime.sources import AgentArtifacts, Sources
from services.runtime.store import Container, Deployment, Server, Source
from services.runtime.telemetry import Telemetry
from services.runtime.telemetry_api import TelemetryApi
from shared.auth import Authorizer, require_service
from shared.outbox import OutboxFeed
from shared.proto import optional_timestamp
from shared.resources import Resources

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
_RELEASE_REASON = {
    reason: pb.ReleaseReason.Value(f"RELEASE_REASON_{reason.name}") for reason in ReleaseReason
}


def server_to_proto(s: Server) -> pb.Server:
    return pb.Server(
        id=s.id,
        name=s.name,
        region=s.region,
        agent_address=s.agent_address,
        capacity=s.capacity.to_proto(),
        reserved=s.reserved.to_proto(),
        status=_SERVER_STATUS[s.status],
        last_heartbeat_at=optional_timestamp(s.last_heartbeat_at),
        created_at=optional_timestamp(s.created_at),
        isolation=_ISOLATION[s.isolation],
    )


def deployment_to_proto(d: Deployment) -> pb.Deployment:
    out = pb.Deployment(
        id=d.id,
        project_id=d.project_id,
        organization_id=d.organization_id,
        server_id=d.server_id,
        status=_DEPLOYMENT_STATUS[d.status],
        capacity_reserved=d.capacity_reserved,
        resources=d.resources.to_proto(),
        secrets_version=d.env_version,
        status_reason=d.status_reason,
        rolled_back_from=d.rolled_back_from,
        created_at=optional_timestamp(d.created_at),
        updated_at=optional_timestamp(d.updated_at),
        slug_sha256=d.slug_sha256,
        release_reason=_RELEASE_REASON[d.release_reason],
        created_by=d.created_by,
        process_type=d.process_type,
        processes=[
            pb.DeploymentProcess(type=p.type, resources=p.resources.to_proto()) for p in d.processes
        ],
        image_command=d.image_command,
        image_digest=d.image_digest,
        replicas=d.replicas,
        replica_index=d.replica_index,
        replica_set_id=d.replica_set_id,
        max_surge=d.max_surge,
        max_unavailable=d.max_unavailable,
    )
    if d.image is not None:
        out.image = d.image
    elif d.source_sha256:
        out.source_sha256 = d.source_sha256
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


def container_to_proto(c: Container) -> pb.Container:
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
        process_type=c.process_type,
    )


def source_to_proto(s: Source) -> pb.Source:
    return pb.Source(
        project_id=s.project_id,
        sha256=s.sha256,
        size_bytes=s.size_bytes,
        created_by=s.created_by,
        created_at=optional_timestamp(s.created_at),
    )


def report_from_proto(r: pb.ContainerStatusReport) -> agent_pb2.Container:
    report = agent_pb2.Container(
        container_id=r.container_id,
        status=_REPORTED_STATUS.get(r.status, agent_pb2.CONTAINER_STATUS_UNSPECIFIED),
        reason=r.reason,
        restart_count=r.restart_count,
        last_exit_reason=r.last_exit_reason,
        last_log_lines=r.last_log_lines,
        crash_loop=r.crash_loop,
        slug_sha256=r.slug_sha256,
        building=r.building,
        image_digest=r.image_digest,
    )
    if r.HasField("exit_code"):
        report.exit_code = r.exit_code
    # The two enums share their numbers (AWAKE 1, SLEEPING 2, WAKING 3).
    report.sleep_status = r.sleep_status  # type: ignore[assignment]
    if r.HasField("last_request_at"):
        report.last_request_at.CopyFrom(r.last_request_at)
    return report


def isolation_from_proto(value: int) -> Isolation | None:
    """What a registering admin declares (unspecified: none, until the agent says); None
    for a number that names no isolation (the use case refuses it)."""
    if value == pb.SERVER_ISOLATION_UNSPECIFIED:
        return Isolation.NONE
    return _ISOLATION_OF.get(value)


def source_from_proto(requested: pb.Deployment) -> RequestedSource:
    which = requested.WhichOneof("source")
    common: dict[str, Any] = {
        "process_type": requested.process_type,
        "processes": tuple((p.type, p.percent) for p in requested.processes),
        "replicas": requested.replicas,
        "max_surge": requested.max_surge if requested.HasField("max_surge") else None,
        "max_unavailable": (
            requested.max_unavailable if requested.HasField("max_unavailable") else None
        ),
    }
    if which == "image":
        return RequestedSource(
            image=requested.image, image_command=requested.image_command, **common
        )
    if which == "command":
        return RequestedSource(command=requested.command, **common)
    if which == "source_sha256":
        return RequestedSource(source_sha256=requested.source_sha256, **common)
    return RequestedSource(**common)


@dataclass
class TelemetryParts:
    """What the TelemetryApi mixin reads as `self.app` (its TelemetryHost)."""

    telemetry: Telemetry
    authorizer: Authorizer
    projects: Projects


class RuntimeApi(TelemetryApi, runtime_pb2_grpc.RuntimeServiceServicer):
    # A TelemetryHost; mypy holds the Protocol's mutable `projects` invariant.
    app: TelemetryParts  # type: ignore[assignment]

    def __init__(
        self,
        *,
        servers: Servers,
        deployments: Deployments,
        containers: Containers,
        agent_reports: AgentReports,
        sources: Sources,
        artifacts: AgentArtifacts,
        feed: OutboxFeed,
        routes: Routes,
        telemetry: TelemetryParts,
        enrolment: AgentEnrolment,
    ) -> None:
        self.enrolment = enrolment
        self.routes = routes
        self.sources = sources
        self.artifacts = artifacts
        self.servers = servers
        self.deployments = deployments
        self.containers = containers
        self.agent_reports = agent_reports
        self.feed = feed
        self.app = telemetry

    # -------------------------------------------------------------------- servers

    async def RegisterServer(
        self, request: pb.RegisterServerRequest, context: Context
    ) -> pb.Server:
        spec = request.server
        server = await self.servers.register_server(
            name=spec.name,
            region=spec.region,
            agent_address=spec.agent_address,
            capacity=Resources.from_proto(spec.capacity),
            isolation=isolation_from_proto(spec.isolation),
        )
        return server_to_proto(server)

    async def ListServers(
        self, request: pb.ListServersRequest, context: Context
    ) -> pb.ListServersResponse:
        page = await self.servers.list_servers(request.page_size, request.page_token)
        return pb.ListServersResponse(
            servers=[server_to_proto(x) for x in page.items], next_page_token=page.next_page_token
        )

    async def GetServer(self, request: pb.GetServerRequest, context: Context) -> pb.Server:
        return server_to_proto(await self.servers.get_server(request.id))

    async def DrainServer(self, request: pb.DrainServerRequest, context: Context) -> pb.Server:
        return server_to_proto(await self.servers.drain_server(request.id))

    # ---------------------------------------------------------------- deployments

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: Context
    ) -> pb.Deployment:
        return deployment_to_proto(await self.deployments.get_deployment(request.id))

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: Context
    ) -> pb.ListDeploymentsResponse:
        page = await self.deployments.list_deployments(
            request.project_id, request.page_size, request.page_token
        )
        return pb.ListDeploymentsResponse(
            deployments=[deployment_to_proto(d) for d in page.items],
            next_page_token=page.next_page_token,
        )

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: Context
    ) -> pb.Deployment:
        deployment = await self.deployments.create_deployment(
            request.project_id, source_from_proto(request.deployment)
        )
        return deployment_to_proto(deployment)

    async def RollbackDeployment(
        self, request: pb.RollbackDeploymentRequest, context: Context
    ) -> pb.Deployment:
        return deployment_to_proto(await self.deployments.roll_back_deployment(request.id))

    async def CancelDeployment(
        self, request: pb.CancelDeploymentRequest, context: Context
    ) -> pb.Deployment:
        return deployment_to_proto(await self.deployments.cancel_deployment(request.id))

    # ----------------------------------------------------------------- containers

    async def ListContainers(
        self, request: pb.ListContainersRequest, context: Context
    ) -> pb.ListContainersResponse:
        page = await self.containers.list_containers(
            request.project_id, request.page_size, request.page_token
        )
        return pb.ListContainersResponse(
            containers=[container_to_proto(c) for c in page.items],
            next_page_token=page.next_page_token,
        )

    # -------------------------------------------------------------------- sources

    async def UploadSource(
        self, request_iterator: AsyncIterator[pb.UploadSourceRequest], context: Context
    ) -> pb.Source:
        async def chunks() -> AsyncIterator[tuple[str, bytes]]:
            async for message in request_iterator:
                yield message.project_id, message.chunk

        return source_to_proto(await self.sources.upload(chunks()))

    async def ListSources(
        self, request: pb.ListSourcesRequest, context: Context
    ) -> pb.ListSourcesResponse:
        page = await self.sources.list_sources(
            request.project_id, request.page_size, request.page_token
        )
        return pb.ListSourcesResponse(
            sources=[source_to_proto(s) for s in page.items], next_page_token=page.next_page_token
        )

    async def FetchArtifact(
        self, request: pb.FetchArtifactRequest, context: Context
    ) -> AsyncIterator[pb.ArtifactChunk]:
        async for chunk in await self.artifacts.fetch(request.sha256):
            yield pb.ArtifactChunk(chunk=chunk)

    async def PutArtifact(
        self, request_iterator: AsyncIterator[pb.PutArtifactRequest], context: Context
    ) -> pb.Artifact:
        async def chunks() -> AsyncIterator[tuple[str, bytes]]:
            async for message in request_iterator:
                yield message.project_id, message.chunk

        artifact = await self.artifacts.put_slug(chunks())
        return pb.Artifact(sha256=artifact.sha256, size_bytes=artifact.size_bytes)

    # --------------------------------------------------------------------- agents

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        server = await self.agent_reports.heartbeat(
            request.server_id,
            [report_from_proto(r) for r in request.containers],
            isolation=_ISOLATION_OF.get(request.isolation),
        )
        return pb.HeartbeatResponse(server_status=_SERVER_STATUS[server.status])

    async def ReportContainerStatus(
        self, request: pb.ReportContainerStatusRequest, context: Context
    ) -> empty_pb2.Empty:
        await self.agent_reports.report_container(
            request.server_id, report_from_proto(request.report)
        )
        return empty_pb2.Empty()

    # --------------------------------------------------------------------- routes

    async def ListRoutes(
        self, request: pb.ListRoutesRequest, context: Context
    ) -> pb.ListRoutesResponse:
        require_service(EDGE)
        return pb.ListRoutesResponse(
            routes=[
                pb.Route(
                    project_id=r.project_id,
                    hostnames=r.hostnames,
                    upstreams=r.upstreams,
                    unavailable_reason=r.unavailable_reason,
                    challenges=[pb.DomainChallenge(hostname=h, token=t) for h, t in r.challenges],
                    sleeping_upstreams=r.sleeping_upstreams,
                    sleep_enabled=r.sleep_enabled,
                )
                for r in await self.routes.list_routes()
            ]
        )

    async def WakeRoute(
        self, request: pb.WakeRouteRequest, context: Context
    ) -> pb.WakeRouteResponse:
        require_service(EDGE)
        # Within the edge's deadline, less a margin to answer (WAKE_TIMEOUT without one).
        left = context.time_remaining()
        timeout = WAKE_TIMEOUT if left is None else max(left - 0.5, 0.1)
        return pb.WakeRouteResponse(woken=await self.routes.wake(request.project_id, timeout))

    # --------------------------------------------------------------------- events

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[events_pb2.Event]:
        require_service()
        async for event in self.feed.watch(request, context):
            yield event

    # ------------------------------------------------------------ agent enrolment

    async def CreateJoinToken(
        self, request: pb.CreateJoinTokenRequest, context: Context
    ) -> pb.JoinToken:
        return await self.enrolment.create_join_token(request.id, seconds(request.ttl))

    async def RevokeAgentCertificate(
        self, request: pb.RevokeAgentCertificateRequest, context: Context
    ) -> pb.AgentCertificate:
        return certificate_to_proto(await self.enrolment.revoke(request.id))

    async def RenewAgentCertificate(
        self, request: pb.RenewAgentCertificateRequest, context: Context
    ) -> pb.AgentCertificate:
        issued = await self.enrolment.renew(context, request.csr)
        return certificate_to_proto(issued.row, issued.chain_pem, issued.ca_pem)
