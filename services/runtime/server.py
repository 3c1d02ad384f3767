"""The runtime service process: the servicer, the queue retry loop, the deploy sweep, the
reconciler and the project.deleted consumer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc

from hangar.events.v1 import events_pb2
from hangar.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from services.runtime import store
from services.runtime.agents import Agents
from services.runtime.api import RuntimeApi, TelemetryParts
from services.runtime.artifacts import artifact_store_from_settings
from services.runtime.billing_usage import RemoteBillingUsage
from services.runtime.deployer import Deployer
from services.runtime.enrolment import (
    AgentBinding,
    AgentEnrolment,
    AgentPeers,
    EnrolmentServer,
    EnrolmentSettings,
)
from services.runtime.projects import Projects, RemoteProjects
from services.runtime.reconciler import Reconciler
from services.runtime.routes import Routes
from services.runtime.scheduler import Scheduler
from services.runtime.service import AgentReports, Containers, Deployments, ProjectAccess, Servers
from services.runtime.sleeper import SleepController
from services.runtime.sources import MAX_SLUG_BYTES, AgentArtifacts, Sources
from services.runtime.telemetry import Telemetry
from shared.app import ServiceApp
from shared.audit import AuditRelay
from shared.auth import Authorizer, RemoteAuthorizer
from shared.db import Database, Session
from shared.outbox import EventConsumer
from shared.server import run_service
from shared.settings import Settings

PROJECT_CREATED = "project.created"
PROJECT_DOMAINS_CHANGED = "project.domains_changed"
PROJECT_DELETED = "project.deleted"
PROJECT_UPDATED = "project.updated"
PROJECT_CONFIG_CHANGED = "project.config_changed"

__all__ = ["Projects", "RemoteProjects", "RuntimeApp", "build", "main"]


class ProjectEvents(EventConsumer):
    """project.deleted -> the project's deployments end in the cursor's transaction; its
    containers are stopped on the agents once that has committed. project.updated -> its
    live deployments take its sleep setting (the sleep controller reads it from them).
    project.created / project.updated with a hostname -> the edge's route for it
    (`route.changed` in runtime's feed, which the edge watches); project.domains_changed ->
    its custom domains (verified ones routed, pending ones' checks answered)."""

    def __init__(self, app: RuntimeApp) -> None:
        super().__init__(
            app.db,
            "runtime",
            consumer="runtime",
            source="project",
            watch=app.watch_events("project"),
            handler=self._handle,
            types=[
                PROJECT_CREATED,
                PROJECT_DELETED,
                PROJECT_UPDATED,
                PROJECT_CONFIG_CHANGED,
                PROJECT_DOMAINS_CHANGED,
            ],
        )
        self.app = app

    async def _handle(self, tx: Session, event: events_pb2.Event) -> None:
        if "hostname" in event.payload and event.type in (PROJECT_CREATED, PROJECT_UPDATED):
            await self.app.routes.set_hostname(tx, event, str(event.payload["hostname"]))
        if event.type == PROJECT_DOMAINS_CHANGED:
            await self.app.routes.set_domains(tx, event)
        elif event.type == PROJECT_DELETED:
            await self.app.deployer.end_project(tx, event.aggregate_id)
            await self.app.routes.forget(tx, event)
        elif event.type == PROJECT_UPDATED and "sleep_enabled" in event.payload:
            spec = event.payload
            after = int(spec["sleep_after_seconds"]) if spec["sleep_enabled"] else None
            await store.set_sleep_after(tx, event.aggregate_id, after)
        elif event.type == PROJECT_CONFIG_CHANGED:
            change = event.payload
            if "restart" in change and not change["restart"]:
                return
            actor = str(change["actor"]) if "actor" in change else ""
            await self.app.scheduler.restart_with_new_config(tx, event.aggregate_id, actor)

    async def apply(self, event: events_pb2.Event) -> None:
        await super().apply(event)
        if event.type == PROJECT_DELETED:
            self.app.deployer.stop_soon()
        elif event.type == PROJECT_CONFIG_CHANGED:
            self.app.deployer.sweep_soon()  # start the new release, if one was placed


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
        consume_projects: bool | None = None,
        enrolment: EnrolmentSettings | None = None,
    ) -> None:
        super().__init__(settings, db)
        # Agent enrolment and the agents' binding to their server (docs/tls.md).
        self.enrolment_settings = enrolment or EnrolmentSettings.from_env()
        self.enrolment = AgentEnrolment(db, self.enrolment_settings.agent_ca())
        self.enrolment_server = EnrolmentServer(self.enrolment)
        self.interceptors = [AgentBinding(self.enrolment)]
        self.authorizer: Authorizer = authorizer or RemoteAuthorizer(
            self.clients, watch=self.access_watch
        )
        self.projects: Projects = projects or RemoteProjects(self.clients)
        self.agents = Agents(
            self.token_source, timeout=settings.call_timeout_seconds, peer_of=AgentPeers(db)
        )
        self.scheduler = Scheduler(
            db,
            schedule_timeout_seconds=settings.runtime_schedule_timeout_seconds,
            retry_seconds=settings.runtime_schedule_retry_seconds,
            single_tenant=settings.single_tenant,
        )
        self.deployer = Deployer(
            db,
            self.scheduler,
            self.agents,
            self.projects,
            start_timeout_seconds=settings.runtime_start_timeout_seconds,
            sweep_seconds=settings.runtime_agent_sweep_seconds,
            heartbeat_timeout_seconds=settings.runtime_heartbeat_timeout_seconds,
            drain_seconds=settings.runtime_drain_seconds,
        )
        self.scheduler.on_placed = self.deployer.sweep_soon
        self.reconciler = Reconciler(
            db,
            interval_seconds=settings.runtime_reconcile_seconds,
            check_agents=self.deployer.reconcile,
        )
        self.sleeper = SleepController(
            db, self.agents, interval_seconds=settings.runtime_sleep_check_seconds
        )
        self.routes = Routes(db, self.sleeper.wake)
        self.project_events = ProjectEvents(self)
        self.telemetry = Telemetry(db, settings, RemoteBillingUsage(self.clients))
        access = ProjectAccess(self.authorizer, self.projects)
        self.servers = Servers(db)
        self.deployments = Deployments(db, access, self.scheduler, self.deployer)
        self.containers = Containers(db, access)
        self.agent_reports = AgentReports(self.deployer)
        self.artifacts = artifact_store_from_settings(settings)
        self.sources = Sources(db, access, self.artifacts, settings.max_source_bytes)
        self.agent_artifacts = AgentArtifacts(db, self.artifacts, MAX_SLUG_BYTES)
        if background:
            for loop in self.telemetry.loops():
                self.add_loop(_coroutine(loop))
            self.add_loop(self.scheduler.run)
            self.add_loop(self.deployer.run)
            self.add_loop(self.reconciler.run)
            self.add_loop(self.sleeper.run)
            self.add_loop(AuditRelay(db, "runtime", self.clients).run)
        if consume_projects if consume_projects is not None else background:
            self.add_loop(self.project_events.run)

    def register(self, server: grpc.aio.Server) -> None:
        api = RuntimeApi(
            servers=self.servers,
            deployments=self.deployments,
            containers=self.containers,
            agent_reports=self.agent_reports,
            sources=self.sources,
            artifacts=self.agent_artifacts,
            feed=self.feed,
            routes=self.routes,
            telemetry=TelemetryParts(self.telemetry, self.authorizer, self.projects),
            enrolment=self.enrolment,
        )
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(api, server)

    async def start(self) -> None:
        await super().start()
        if self.enrolment_settings.address:
            await self.enrolment_server.start(self.enrolment_settings.address)

    async def close(self) -> None:
        await self.enrolment_server.stop()
        await self.deployer.close()
        await self.telemetry.close()
        await self.agents.close()
        await super().close()


def _coroutine(loop: Callable[[], Awaitable[None]]) -> Callable[[], Coroutine[Any, Any, None]]:
    async def run() -> None:
        await loop()

    return run


async def build(settings: Settings) -> RuntimeApp:
    db = await Database.connect(settings.service_database_url(RuntimeApp.name))
    return RuntimeApp(settings, db)


def main() -> None:
    run_service(RuntimeApp.name, build)
