"""What runtime needs from project: a project as its caller may see it, and its secrets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import grpc

from hangar.project.v1 import project_pb2, project_pb2_grpc
from shared.clients import Clients
from shared.context import bearer_token_var
from shared.errors import from_downstream
from shared.resources import Resources

PROJECT_SERVICE = project_pb2.DESCRIPTOR.services_by_name["ProjectService"]
_RESTART_POLICY = {
    project_pb2.RESTART_POLICY_ON_FAILURE: "on-failure",
    project_pb2.RESTART_POLICY_ALWAYS: "always",
    project_pb2.RESTART_POLICY_NEVER: "never",
}

# Project's answers about the caller's access, kept as they are (AIP-193); anything else is
# UNAVAILABLE.
_PROJECT_PASSED_ON: dict[grpc.StatusCode, str | None] = {
    grpc.StatusCode.PERMISSION_DENIED: None,
    grpc.StatusCode.UNAUTHENTICATED: None,
    grpc.StatusCode.NOT_FOUND: None,
    grpc.StatusCode.INVALID_ARGUMENT: None,
}
_SECRETS_PASSED_ON: dict[grpc.StatusCode, str | None] = {grpc.StatusCode.NOT_FOUND: None}


@dataclass(frozen=True)
class ProjectInfo:
    """The fields of a project a deployment copies at creation."""

    id: str
    organization_id: str
    resources: Resources
    region: str
    default_command: str = ""
    default_image: str = ""
    health_check_path: str = ""
    sleep_after_seconds: int | None = None  # None: its apps never sleep
    restart_policy: str = "on-failure"  # on-failure | always | never
    liveness_check_path: str = ""  # empty: no liveness check
    liveness_period_seconds: int = 10
    liveness_failure_threshold: int = 3


@dataclass(frozen=True)
class ResolvedEnv:
    env: dict[str, str]
    version_hash: str


class Projects(Protocol):
    async def get(self, project_id: str) -> ProjectInfo:
        """The project, with the caller's own token: outsiders get PERMISSION_DENIED."""
        ...

    async def organization_of(self, project_id: str) -> str: ...

    async def resolve_secrets(self, project_id: str) -> ResolvedEnv:
        """Plaintext secrets, with runtime's service token (never logged or stored); NOT_FOUND
        once the project is gone, UNAVAILABLE for anything else project answers."""
        ...


class RemoteProjects:
    def __init__(self, clients: Clients) -> None:
        self.clients = clients

    def _stub(self) -> project_pb2_grpc.ProjectServiceStub:
        return self.clients.stub("project", project_pb2_grpc.ProjectServiceStub, PROJECT_SERVICE)

    async def get(self, project_id: str) -> ProjectInfo:
        token = bearer_token_var.get()
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        try:
            p = await self._stub().GetProject(
                project_pb2.GetProjectRequest(id=project_id), metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise from_downstream(exc, "project", _PROJECT_PASSED_ON, field="project_id") from None
        return ProjectInfo(
            id=p.id,
            organization_id=p.organization_id,
            resources=Resources.from_proto(p.resources).compute,
            region=p.region,
            default_command=p.default_command,
            default_image=p.default_image,
            health_check_path=p.health_check_path,
            sleep_after_seconds=p.sleep_after_seconds if p.sleep_enabled else None,
            restart_policy=_RESTART_POLICY.get(p.restart_policy, "on-failure"),
            liveness_check_path=p.liveness_check_path,
            liveness_period_seconds=p.liveness_period_seconds or 10,
            liveness_failure_threshold=p.liveness_failure_threshold or 3,
        )

    async def organization_of(self, project_id: str) -> str:
        return (await self.get(project_id)).organization_id

    async def resolve_secrets(self, project_id: str) -> ResolvedEnv:
        try:
            reply = await self._stub().ResolveSecrets(
                project_pb2.ResolveSecretsRequest(project_id=project_id)
            )
        except grpc.aio.AioRpcError as exc:
            raise from_downstream(exc, "project", _SECRETS_PASSED_ON) from None
        return ResolvedEnv(dict(reply.env), reply.version_hash)
