"""Projects' public hostnames: this service's copy of identity's organization slugs, kept from
identity's organization events, and looked up from identity when a project needs one first."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC

import grpc

from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from services.project import domain, store
from services.project.domain import OrganizationSlug, Project, PublicAddress
from shared.clients import Clients
from shared.context import bearer_token_var
from shared.db import Database, Session
from shared.errors import DomainError, from_downstream
from shared.outbox import Cursor, write_event

log = logging.getLogger(__name__)

SCHEMA = store.SCHEMA
IDENTITY_SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]

# Identity's refusals (the caller's token may not read the organization): no slug for now,
# the organization's events bring it. Anything else means identity is unreachable.
_REFUSALS = {
    grpc.StatusCode.PERMISSION_DENIED: None,
    grpc.StatusCode.NOT_FOUND: None,
    grpc.StatusCode.UNAUTHENTICATED: None,
}


class SlugRefused(Exception):
    """Identity would not tell this caller the organization's slug."""


class IdentityOrganizations:
    """identity.GetOrganization, with the caller's own token and the call's deadline."""

    def __init__(self, clients: Clients) -> None:
        self.clients = clients

    async def slug(self, organization_id: str) -> str:
        """SlugRefused when identity refuses; UNAVAILABLE when it does not answer."""
        stub = self.clients.stub(
            "identity", identity_pb2_grpc.IdentityServiceStub, IDENTITY_SERVICE
        )
        token = bearer_token_var.get()
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        try:
            org = await stub.GetOrganization(
                identity_pb2.GetOrganizationRequest(id=organization_id), metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REFUSALS:
                raise SlugRefused(exc.code().name) from None
            raise from_downstream(exc, "identity", {}) from None
        slug: str = org.slug
        return slug


def hostname_update(project: Project, address: PublicAddress) -> dict[str, object]:
    """project.updated's payload when only the hostname changed."""
    return {
        "id": project.id,
        "organization_id": project.organization_id,
        "hostname": address.hostname(project),
        "changed": ["hostname"],
    }


class OrganizationSlugs:
    """The organization slugs projects' hostnames are made of."""

    def __init__(
        self, db: Database, address: PublicAddress, identity: IdentityOrganizations | None
    ) -> None:
        self.db = db
        self.address = address
        self.identity = identity

    async def lookup(self, organization_id: str) -> OrganizationSlug | None:
        """The stored slug, else identity's (stored now, as a lookup); None when identity
        refused the caller. Raises UNAVAILABLE when identity does not answer."""
        async with self.db.session() as s:
            stored = await store.organization_slug(s, organization_id)
            if stored is not None or self.identity is None:
                return stored
            as_of = await store.database_now(s)
        try:
            slug = await self.identity.slug(organization_id)
        except SlugRefused as exc:
            log.info(
                "organization slug not readable yet",
                extra={"organization_id": organization_id, "error": str(exc)},
            )
            return None
        found = OrganizationSlug(organization_id, slug, None, as_of)
        async with self.db.transaction() as tx:
            # An event may have stored it meanwhile: that row stays. Stored now, the
            # organization's projects made before slugs were kept get their hostname out
            # (runtime routes them from then on).
            if await store.insert_organization_slug(tx, found):
                await self._hostnames_changed(tx, organization_id)
            return await store.organization_slug(tx, organization_id) or found

    async def fill(self, projects: list[Project]) -> list[Project]:
        """Projects read before their organization's slug was stored (created before this
        service kept slugs): looked up now, best effort; without it, no hostname."""
        missing = {p.organization_id for p in projects if not p.organization_slug}
        if not missing:
            return projects
        slugs: dict[str, str] = {}
        for organization_id in missing:
            try:
                found = await self.lookup(organization_id)
            except DomainError as exc:
                log.warning(
                    "organization slug lookup failed",
                    extra={"organization_id": organization_id, "error": exc.reason},
                )
                continue
            if found is not None:
                slugs[organization_id] = found.slug
        return [
            p if p.organization_slug else _with_slug(p, slugs.get(p.organization_id, ""))
            for p in projects
        ]

    async def on_organization_event(self, tx: Session, event: events_pb2.Event) -> None:
        """organization.created / organization.updated: keep the slug (never an older one);
        a change gives each of the organization's projects a project.updated."""
        organization_id = event.organization_id or event.aggregate_id
        slug = str(event.payload["slug"]) if "slug" in event.payload else ""
        if not organization_id or not slug:
            return
        position = Cursor.parse(event.cursor)
        incoming = OrganizationSlug(
            organization_id,
            slug,
            (position.txid, position.position),
            event.occurred_at.ToDatetime(tzinfo=UTC),
        )
        stored = await store.organization_slug(tx, organization_id, lock=True)
        if stored is None:
            if await store.insert_organization_slug(tx, incoming):
                await self._hostnames_changed(tx, organization_id)
                return
            stored = await store.organization_slug(tx, organization_id, lock=True)
        assert incoming.cursor is not None
        if not domain.slug_event_applies(stored, slug, incoming.cursor, incoming.as_of):
            return
        await store.set_organization_slug(tx, incoming)
        if stored is None or stored.slug != slug:
            await self._hostnames_changed(tx, organization_id)

    async def _hostnames_changed(self, tx: Session, organization_id: str) -> None:
        for project in await store.organization_projects(tx, organization_id):
            await write_event(
                tx,
                SCHEMA,
                "project.updated",
                organization_id=organization_id,
                aggregate_id=project.id,
                payload=hostname_update(project, self.address),
            )

    async def forget(self, tx: Session, organization_id: str) -> None:
        await store.delete_organization_slug(tx, organization_id)


def _with_slug(project: Project, slug: str) -> Project:
    return replace(project, organization_slug=slug)
