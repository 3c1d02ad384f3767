"""Runtime's use cases: authorize the caller, apply the rules, then read or write the store,
or hand the work to the scheduler (placement) and the deployer (the agents).

api.py turns protos into these calls and their results back into protos.
"""

from __future__ import annotations

from hangar.agent.v1 import agent_pb2
from services.runtime import store
from services.runtime.deployer import Deployer
from services.runtime.domain import (
    LATEST,
    WEB,
    DeploymentState,
    Isolation,
    ProcessShare,
    RequestedSource,
    ServerState,
    choose_source,
    process_type_of,
    replica_share,
    required,
    reservable,
    rollout_limits,
    source_digest,
    split_processes,
)
from services.runtime.projects import Projects
from services.runtime.scheduler import Scheduler
from services.runtime.store import Container, Deployment, DeploymentSpec, Server
from shared import pagination
from shared.audit import current_actor, record_audit
from shared.auth import (
    Authorizer,
    require_caller,
    require_platform_admin,
    require_service,
    require_token_project,
)
from shared.db import Database
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from shared.resources import Resources

MAX_PAGE_SIZE = 500
AGENT = "agent"


class ProjectAccess:
    """Whether the caller may use a permission on a project (in its organization)."""

    def __init__(self, authorizer: Authorizer, projects: Projects) -> None:
        self.authorizer = authorizer
        self.projects = projects

    async def authorize_project(self, project_id: str, permission: str) -> str:
        """The project's id, trimmed, if the caller holds `permission` in its organization."""
        require_caller()
        project_id = required(project_id, "project_id")
        require_token_project(project_id)
        organization_id = await self.projects.organization_of(project_id)
        await self.authorizer.require(organization_id, permission)
        return project_id


class Servers:
    """The fleet, as a platform admin manages it."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def register_server(
        self,
        *,
        name: str,
        region: str,
        agent_address: str,
        capacity: Resources,
        isolation: Isolation | None,
    ) -> Server:
        """isolation None: a value the caller sent that names no isolation we know."""
        require_platform_admin()
        capacity = reservable(capacity, "server.capacity")
        async with self.db.transaction() as tx:
            server = await store.insert_server(
                tx,
                name=required(name, "server.name"),
                region=required(region, "server.region"),
                agent_address=required(agent_address, "server.agent_address"),
                capacity=capacity,
                isolation=_known(isolation),
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
        return server

    async def list_servers(self, page_size: int, page_token: str) -> pagination.Page[Server]:
        require_platform_admin()
        size = pagination.page_size(page_size, maximum=MAX_PAGE_SIZE)
        async with self.db.session() as s:
            return await store.list_servers(s, size, page_token)

    async def get_server(self, server_id: str) -> Server:
        require_platform_admin()
        async with self.db.session() as s:
            return await store.get_server(s, required(server_id, "id"))

    async def drain_server(self, server_id: str) -> Server:
        require_platform_admin()
        async with self.db.transaction() as tx:
            server = await store.set_server_status(
                tx, required(server_id, "id"), ServerState.DRAINING
            )
            await record_audit(
                tx,
                "runtime",
                organization_id="",
                action="server.drained",
                target_type="server",
                target_id=server.id,
            )
        return server


def _known(isolation: Isolation | None) -> Isolation:
    if isolation is None:
        raise InvalidArgument.field("server.isolation", "not a known isolation")
    return isolation


class Deployments:
    """A project's deployments as its organization's members see and change them."""

    def __init__(
        self,
        db: Database,
        access: ProjectAccess,
        scheduler: Scheduler,
        deployer: Deployer,
    ) -> None:
        self.db = db
        self.access = access
        self.scheduler = scheduler
        self.deployer = deployer

    async def _readable(self, deployment_id: str, permission: str) -> Deployment:
        """The deployment, if the caller may use `permission` on it (AIP-193 otherwise)."""
        principal = require_caller()
        try:
            async with self.db.session() as s:
                deployment = await store.get_deployment(s, required(deployment_id, "id"))
        except NotFound:
            if principal.is_platform_admin:
                raise
            raise PermissionDenied(f"missing permission {permission} on this deployment") from None
        require_token_project(deployment.project_id)
        await self.access.authorizer.require(deployment.organization_id, permission)
        return deployment

    async def get_deployment(self, deployment_id: str) -> Deployment:
        return await self._readable(deployment_id, "deployments.get")

    async def list_deployments(
        self, project_id: str, page_size: int, page_token: str
    ) -> pagination.Page[Deployment]:
        project_id = await self.access.authorize_project(project_id, "deployments.list")
        size = pagination.page_size(page_size, maximum=MAX_PAGE_SIZE)
        async with self.db.session() as s:
            return await store.list_deployments(s, project_id, size, page_token)

    async def create_deployment(self, project_id: str, requested: RequestedSource) -> Deployment:
        """A new deployment of the project: placed at once when a server has room, else
        queued; the deployer starts a placed one on its agent."""
        require_caller()
        project = await self.access.projects.get(required(project_id, "project_id"))
        require_token_project(project.id)
        await self.access.authorizer.require(project.organization_id, "deployments.create")
        replicas, resources = replica_share(project.resources, requested.replicas)
        surge, unavailable = rollout_limits(
            replicas, requested.max_surge, requested.max_unavailable
        )
        process_type = process_type_of(requested.process_type)
        processes: tuple[ProcessShare, ...] = ()
        if requested.processes:
            if requested.source_sha256 is None:
                raise InvalidArgument.field(
                    "deployment.processes", "only a deployment of an uploaded source has several"
                )
            if requested.process_type:
                raise InvalidArgument.field(
                    "deployment.process_type", "not with processes (name each there)"
                )
            processes = split_processes(requested.processes, resources)
            process_type = processes[0].type
        web = any(p.type == WEB for p in processes) if processes else process_type == WEB
        source: str | None = None
        image: str | None = None
        command: str | None = None
        if requested.source_sha256 is not None:
            source = await self._uploaded(
                project.id, project.region, source_digest(requested.source_sha256)
            )
        else:
            image, command = choose_source(
                requested, project.default_image, project.default_command
            )
        if requested.image_command and image is None:
            raise InvalidArgument.field("deployment.image_command", "only with an image")
        if image is not None:
            async with self.db.session() as s:
                if not await store.any_active_sandbox_server(s, project.region):
                    raise FailedPrecondition(
                        f"no server in region {project.region!r} runs the container sandbox "
                        "that images need; deploy a command",
                        reason="NO_IMAGE_DRIVER",
                    )
        placed = await self.scheduler.create_set(
            DeploymentSpec(
                project_id=project.id,
                organization_id=project.organization_id,
                resources=resources,
                replicas=replicas,
                max_surge=surge,
                max_unavailable=unavailable,
                region=project.region,
                image=image,
                command=command,
                source_sha256=source,
                process_type=process_type,
                processes=processes,
                image_command=requested.image_command if image is not None else "",
                created_by=current_actor() or "",
                # A worker serves no HTTP: no health or liveness check, never put to sleep
                # for want of requests.
                health_check_path=project.health_check_path if web else "",
                sleep_after_seconds=project.sleep_after_seconds if web else None,
                restart_policy=project.restart_policy,
                liveness_check_path=project.liveness_check_path if web else "",
                liveness_period_seconds=project.liveness_period_seconds,
                liveness_failure_threshold=project.liveness_failure_threshold,
            )
        )
        for replica in placed:
            if replica.status is DeploymentState.SCHEDULING:
                self.deployer.launch_soon(replica.id)
        return placed[0]

    async def _uploaded(self, project_id: str, region: str, digest: str) -> str:
        """The digest of one of the project's uploaded sources (LATEST: its newest), which
        only a server with the container sandbox may build."""
        async with self.db.session() as s:
            source = await store.find_source(s, project_id, digest)
            if source is None:
                raise InvalidArgument.field(
                    "deployment.source_sha256",
                    "this project has no uploaded source"
                    + ("" if digest == LATEST else f" {digest}"),
                )
            if not await store.any_active_sandbox_server(s, region):
                raise FailedPrecondition(
                    f"no server in region {region!r} runs the container sandbox that builds need",
                    reason="NO_BUILD_SANDBOX",
                )
        return source.sha256

    async def roll_back_deployment(self, deployment_id: str) -> Deployment:
        deployment = await self._readable(deployment_id, "deployments.rollback")
        rollback = await self.scheduler.roll_back(deployment.id)
        if rollback.status is DeploymentState.SCHEDULING:
            self.deployer.launch_soon(rollback.id)
        if rollback.replicas > 1:
            self.deployer.sweep_soon()  # its other replicas, placed with it
        return rollback

    async def cancel_deployment(self, deployment_id: str) -> Deployment:
        deployment = await self._readable(deployment_id, "deployments.cancel")
        cancelled = await self.scheduler.cancel(deployment.id)
        self.deployer.stop_soon()
        return cancelled


class Containers:
    """A project's live containers, as its organization's members see them."""

    def __init__(self, db: Database, access: ProjectAccess) -> None:
        self.db = db
        self.access = access

    async def list_containers(
        self, project_id: str, page_size: int, page_token: str
    ) -> pagination.Page[Container]:
        project_id = await self.access.authorize_project(project_id, "containers.list")
        size = pagination.page_size(page_size, maximum=MAX_PAGE_SIZE)
        async with self.db.session() as s:
            return await store.list_containers(s, project_id, size, page_token)


class AgentReports:
    """What the agents tell runtime: heartbeats and container status changes (the agent's
    own service token only)."""

    def __init__(self, deployer: Deployer) -> None:
        self.deployer = deployer

    async def heartbeat(
        self, server_id: str, reports: list[agent_pb2.Container], isolation: Isolation | None
    ) -> Server:
        """isolation None: the agent did not say."""
        require_service(AGENT)
        for report in reports:
            _require_container_id(report)
        return await self.deployer.heartbeat(
            required(server_id, "server_id"), reports, isolation=isolation
        )

    async def report_container(self, server_id: str, report: agent_pb2.Container) -> None:
        require_service(AGENT)
        server_id = required(server_id, "server_id")
        _require_container_id(report)
        await self.deployer.report(server_id, report)


def _require_container_id(report: agent_pb2.Container) -> None:
    report.container_id = required(report.container_id, "report.container_id")
