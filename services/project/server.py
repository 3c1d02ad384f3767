"""The project service process: the servicer, identity's organization events, the allocation
releaser, the reconciler and the audit relay."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from hangar.events.v1 import events_pb2
from hangar.project.v1 import project_pb2, project_pb2_grpc
from services.project.api import ProjectApi
from services.project.certificates import DomainCertificates
from services.project.crypto import Keyring
from services.project.custom_domains import Domains, HttpDomainCheck
from services.project.domain import PublicAddress
from services.project.hostnames import IdentityOrganizations, OrganizationSlugs
from services.project.reconciler import AllocationReleaser, Reconciler
from services.project.service import BillingPool, Projects
from shared.app import ServiceApp
from shared.audit import AuditRelay
from shared.auth import Authorizer, RemoteAuthorizer
from shared.db import Database, Session
from shared.outbox import EventConsumer
from shared.server import run_service
from shared.settings import DEFAULT_PORTS, Settings

log = logging.getLogger(__name__)

ORGANIZATION_EVENTS = ("organization.created", "organization.updated", "organization.deleted")


class ProjectApp(ServiceApp):
    name = "project"
    service_names: Sequence[str] = (
        project_pb2.DESCRIPTOR.services_by_name["ProjectService"].full_name,
    )

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        authorizer: Authorizer | None = None,
        run_loops: bool = True,
    ) -> None:
        super().__init__(settings, db)
        self.keyring = Keyring.from_settings(
            settings.project_master_keys, settings.project_master_key_id
        )
        if not self.keyring.configured:
            log.warning("no master keys (HANGAR_PROJECT_MASTER_KEYS): secrets are unavailable")
        self.pool = BillingPool(self.clients)
        self.authorizer: Authorizer = authorizer or RemoteAuthorizer(
            self.clients, watch=self.access_watch
        )
        self.slugs = OrganizationSlugs(
            db,
            PublicAddress.of(
                settings.apps_domain,
                settings.addresses.get("edge", f"127.0.0.1:{DEFAULT_PORTS['edge']}"),
            ),
            IdentityOrganizations(self.clients),
        )
        self.projects = Projects(db, self.authorizer, self.pool, self.keyring, self.slugs)
        self.domains = Domains(
            db,
            HttpDomainCheck(settings.domain_check_address, settings.call_timeout_seconds),
            settings.apps_domain,
        )
        self.certificates = DomainCertificates(db, self.projects, settings.apps_domain)
        self.releaser = AllocationReleaser(db, self.feed, self.pool)
        self.reconciler = Reconciler(
            db, self.pool, interval_seconds=settings.project_reconcile_seconds
        )
        self.audit_relay = AuditRelay(db, self.name, self.clients)
        self.organization_events = EventConsumer(
            db,
            self.name,
            consumer="project",
            source="identity",
            watch=self.watch_events("identity"),
            handler=self.on_identity_event,
            types=list(ORGANIZATION_EVENTS),
        )
        if run_loops:
            for loop in (
                self.organization_events.run,
                self.releaser.run,
                self.reconciler.run,
                self.audit_relay.run,
            ):
                self.add_loop(loop)

    @classmethod
    async def create(cls, settings: Settings) -> ProjectApp:
        # Create and resize hold a connection across billing's reservation: a roomier pool.
        db = await Database.connect(settings.service_database_url(cls.name), max_size=20)
        return cls(settings, db)

    def register(self, server: grpc.aio.Server) -> None:
        project_pb2_grpc.add_ProjectServiceServicer_to_server(
            ProjectApi(self.projects, self.feed, self.domains, self.certificates), server
        )

    async def on_identity_event(self, tx: Session, event: events_pb2.Event) -> None:
        if event.type == "organization.deleted":
            org = event.organization_id or event.aggregate_id
            if org:
                await self.projects.delete_organization(tx, org)
        elif event.type in ("organization.created", "organization.updated"):
            await self.slugs.on_organization_event(tx, event)


def main() -> None:
    run_service(ProjectApp.name, ProjectApp.create)
