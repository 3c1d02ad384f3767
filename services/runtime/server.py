"""The runtime service process: the servicer, the queue retry loop and the reconciler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import grpc

from hangar.project.v1 import project_pb2, project_pb2_grpc
from hangar.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from services.runtime.api import RuntimeApi
from services.runtime.reconciler import Reconciler
from services.runtime.scheduler import Scheduler
from shared.app import ServiceApp
from shared.audit import AuditRelay
from shared.auth import Authorizer, RemoteAuthorizer
from shared.clients import Clients
from shared.context import bearer_token_var
from shared.db import Database
from shared.server import run_service
from shared.settings import Settings

PROJECT_SERVICE = project_pb2.DESCRIPTOR.services_by_name["ProjectService"]


class Projects(Protocol):
    """Which organization a project belongs to, for callers allowed to see it."""

    async def organization_of(self, project_id: str) -> str: ...


class RemoteProjects:
    """project.GetProject with the caller's own token: project refuses outsiders (AIP-193)."""

    def __init__(self, clients: Clients) -> None:
        self.clients = clients

    async def organization_of(self, project_id: str) -> str:
        stub = self.clients.stub("project", project_pb2_grpc.ProjectServiceStub, PROJECT_SERVICE)
        token = bearer_token_var.get()
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        project = await stub.GetProject(
            project_pb2.GetProjectRequest(id=project_id), metadata=metadata
        )
        return str(project.organization_id)


class RuntimeApp(ServiceApp):
    name = "runtime"
    service_names: Sequence[str] = (
        str(runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name),
    )

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        authorizer: Authorizer | None = None,
        projects: Projects | None = None,
        background: bool = True,
    ) -> None:
        super().__init__(settings, db)
        self.authorizer: Authorizer = authorizer or RemoteAuthorizer(self.clients)
        self.projects: Projects = projects or RemoteProjects(self.clients)
        self.scheduler = Scheduler(
            db,
            schedule_timeout_seconds=settings.runtime_schedule_timeout_seconds,
            retry_seconds=settings.runtime_schedule_retry_seconds,
        )
        self.reconciler = Reconciler(db, interval_seconds=settings.runtime_reconcile_seconds)
        if background:
            self.add_loop(self.scheduler.run)
            self.add_loop(self.reconciler.run)
            self.add_loop(AuditRelay(db, "runtime", self.clients).run)

    def register(self, server: grpc.aio.Server) -> None:
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(RuntimeApi(self), server)


async def build(settings: Settings) -> RuntimeApp:
    db = await Database.connect(settings.service_database_url(RuntimeApp.name))
    return RuntimeApp(settings, db)


def main() -> None:
    run_service(RuntimeApp.name, build)
