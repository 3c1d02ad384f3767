"""Organizations and their members. Every change writes its outbox event and audit entry in
its transaction, and a change to who may do what is announced to the verifiers before the
call returns."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from services.identity import domain, store
from services.identity.access import AccessBroadcaster, AccessChange, Scope
from services.identity.audit import AuditTrail
from services.identity.domain import Role
from services.identity.service_auth import LocalAuthorizer
from shared import pagination
from shared.auth import require_user
from shared.context import Principal
from shared.db import Database, Session
from shared.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound, PermissionDenied
from shared.ids import new_id
from shared.outbox import write_event
from shared.pagination import Page
from shared.validation import require_id

SCHEMA = "identity"


class Organizations:
    def __init__(
        self,
        db: Database,
        authorizer: LocalAuthorizer,
        audit: AuditTrail,
        access: AccessBroadcaster,
    ) -> None:
        self.db = db
        self.authorizer = authorizer
        self.audit = audit
        self.access = access

    async def create_organization(self, name: str, slug: str) -> store.Organization:
        principal = require_user()
        violations: list[FieldViolation] = []
        try:
            name = domain.clean_name(name, "organization.name", required=True)
        except InvalidArgument as exc:
            violations += exc.violations
        if (bad := domain.slug_violation(slug)) is not None:
            violations.append(bad)
        if violations:
            raise InvalidArgument(violations)
        async with self.db.transaction() as tx:
            org = await store.insert_organization(
                tx, org_id=new_id(), name=name, slug=slug, owner_id=principal.subject
            )
            if org is None:
                raise AlreadyExists(
                    "an organization with this slug exists",
                    reason="SLUG_TAKEN",
                    metadata={"field": "organization.slug"},
                )
            await store.insert_member(tx, org.id, principal.subject, Role.OWNER)
            await write_event(
                tx,
                SCHEMA,
                "organization.created",
                organization_id=org.id,
                aggregate_id=org.id,
                payload={
                    "id": org.id,
                    "name": org.name,
                    "slug": org.slug,
                    "owner_id": org.owner_id,
                },
            )
            await self.audit.record(
                tx,
                org.id,
                "organization.created",
                principal.subject,
                "organization",
                org.id,
                {"slug": org.slug},
            )
        # No announcement: the id is new, so no service can hold a decision about it.
        return org

    async def get_organization(self, org_id: str) -> store.Organization:
        require_id(org_id, "id")
        await self.authorizer.require(org_id, "organizations.get")
        async with self.db.session() as s:
            org = await store.organization(s, org_id)
        if org is None:
            raise NotFound("organization not found")
        return org

    async def list_organizations(self, size: int, token: str) -> Page[store.Organization]:
        principal = require_user()
        limit = pagination.page_size(size)
        key = pagination.decode_page_token(token, (str, str))
        after = None
        if key is not None:
            try:
                after = (datetime.fromisoformat(key[0]), key[1])
            except ValueError:
                raise InvalidArgument.field(
                    "page_token", "not a page token from this list"
                ) from None
        async with self.db.session() as s:
            orgs = await store.organizations_of(s, principal.subject, after, limit + 1)
        return pagination.page_of(orgs, limit, lambda o: [o.created_at.isoformat(), o.id])

    async def _actor_role(self, tx: Session, org_id: str, principal: Principal) -> Role:
        """Lock the organization (member changes take turns), then the caller's role.

        Membership is checked before existence: a stranger learns nothing (AIP-193).
        """
        org = await store.organization(tx, org_id, lock=True)
        role = await store.member_role(tx, org_id, principal.subject)
        if role is None or org is None:
            raise PermissionDenied("you are not a member of this organization")
        return role

    async def update_organization(
        self, org_id: str, name: str, slug: str, paths: Sequence[str]
    ) -> store.Organization:
        principal = require_user()
        require_id(org_id, "organization.id")
        fields = list(paths) or [f for f, v in (("name", name), ("slug", slug)) if v]
        unknown = [p for p in fields if p not in ("name", "slug")]
        if unknown or not fields:
            raise InvalidArgument.field(
                "update_mask",
                "updatable fields are name and slug" if unknown else "nothing to update",
            )
        changes: dict[str, str] = {}
        violations: list[FieldViolation] = []
        if "name" in fields:
            try:
                changes["name"] = domain.clean_name(name, "organization.name", required=True)
            except InvalidArgument as exc:
                violations += exc.violations
        if "slug" in fields:
            if (bad := domain.slug_violation(slug)) is not None:
                violations.append(bad)
            changes["slug"] = slug
        if violations:
            raise InvalidArgument(violations)
        async with self.db.transaction() as tx:
            role = await self._actor_role(tx, org_id, principal)
            if not domain.allows(role, "organizations.update"):
                raise PermissionDenied("only admins and owners update the organization")
            try:
                org = await store.update_organization(tx, org_id, changes)
            except store.SlugTaken:
                raise AlreadyExists(
                    "an organization with this slug exists",
                    reason="SLUG_TAKEN",
                    metadata={"field": "organization.slug"},
                ) from None
            assert org is not None
            await write_event(
                tx,
                SCHEMA,
                "organization.updated",
                organization_id=org.id,
                aggregate_id=org.id,
                payload={"id": org.id, "name": org.name, "slug": org.slug},
            )
            await self.audit.record(
                tx,
                org.id,
                "organization.updated",
                principal.subject,
                "organization",
                org.id,
                {"fields": sorted(changes)},
            )
            return org

    async def delete_organization(self, org_id: str) -> None:
        principal = require_user()
        require_id(org_id, "id")
        async with self.db.transaction() as tx:
            role = await self._actor_role(tx, org_id, principal)
            if not domain.allows(role, "organizations.delete"):
                raise PermissionDenied("only owners delete the organization")
            await self.audit.record(
                tx, org_id, "organization.deleted", principal.subject, "organization", org_id
            )
            await write_event(
                tx,
                SCHEMA,
                "organization.deleted",
                organization_id=org_id,
                aggregate_id=org_id,
                payload={"id": org_id},
            )
            await store.delete_organization(tx, org_id)
        await self.access.announce(AccessChange((Scope(organization_id=org_id),)))

    async def add_member(self, org_id: str, email: str, role_value: int) -> store.Member:
        principal = require_user()
        violations = _missing(organization_id=org_id)
        try:
            email = domain.normalize_email(email)
        except InvalidArgument as exc:
            violations += exc.violations
        role = _role(role_value, violations)
        if violations or role is None:
            raise InvalidArgument(violations)
        async with self.db.transaction() as tx:
            actor = await self._actor_role(tx, org_id, principal)
            domain.check_member_change(actor, None, role)
            user = await store.user_by_email(tx, email)
            if user is None:
                raise NotFound("no account with this email", reason="USER_NOT_FOUND")
            if not await store.insert_member(tx, org_id, user.id, role):
                raise AlreadyExists("already a member", reason="ALREADY_MEMBER")
            await write_event(
                tx,
                SCHEMA,
                "member.added",
                organization_id=org_id,
                aggregate_id=user.id,
                payload={"organization_id": org_id, "user_id": user.id, "role": role.db_name},
            )
            await self.audit.record(
                tx,
                org_id,
                "member.added",
                principal.subject,
                "user",
                user.id,
                {"role": role.db_name},
            )
        await self.access.announce(AccessChange((Scope(user.id, org_id),)))
        return store.Member(user.id, user.email, role)

    async def list_members(self, org_id: str, size: int, token: str) -> Page[store.Member]:
        require_id(org_id, "organization_id")
        limit = pagination.page_size(size)
        key = pagination.decode_page_token(token, (str,))
        await self.authorizer.require(org_id, "members.list")
        async with self.db.session() as s:
            found = await store.list_members(s, org_id, key[0] if key else None, limit + 1)
        return pagination.page_of(found, limit, lambda m: [m.user_id])

    async def update_member(self, org_id: str, user_id: str, role_value: int) -> store.Member:
        principal = require_user()
        violations = _missing(organization_id=org_id, user_id=user_id)
        role = _role(role_value, violations)
        if violations or role is None:
            raise InvalidArgument(violations)
        async with self.db.transaction() as tx:
            actor = await self._actor_role(tx, org_id, principal)
            if actor < Role.ADMIN:
                raise PermissionDenied("only admins and owners manage members")
            current = await store.member_role(tx, org_id, user_id)
            if current is None:
                raise NotFound("not a member of this organization", reason="MEMBER_NOT_FOUND")
            domain.check_member_change(actor, current, role)
            if current is Role.OWNER and role is not Role.OWNER:
                domain.check_keeps_an_owner(await store.count_owners(tx, org_id) - 1)
            if current is not role:
                await store.set_member_role(tx, org_id, user_id, role)
                await write_event(
                    tx,
                    SCHEMA,
                    "member.role_changed",
                    organization_id=org_id,
                    aggregate_id=user_id,
                    payload={
                        "organization_id": org_id,
                        "user_id": user_id,
                        "role": role.db_name,
                        "previous_role": current.db_name,
                    },
                )
                await self.audit.record(
                    tx,
                    org_id,
                    "member.role_changed",
                    principal.subject,
                    "user",
                    user_id,
                    {"from": current.db_name, "to": role.db_name},
                )
            updated = await store.member(tx, org_id, user_id)
            assert updated is not None
        if current is not role:
            await self.access.announce(AccessChange((Scope(user_id, org_id),)))
        return updated

    async def remove_member(self, org_id: str, user_id: str) -> None:
        principal = require_user()
        violations = _missing(organization_id=org_id, user_id=user_id)
        if violations:
            raise InvalidArgument(violations)
        leaving = user_id == principal.subject
        async with self.db.transaction() as tx:
            actor = await self._actor_role(tx, org_id, principal)
            if not leaving and actor < Role.ADMIN:
                raise PermissionDenied("only admins and owners manage members")
            current = await store.member_role(tx, org_id, user_id)
            if current is None:
                raise NotFound("not a member of this organization", reason="MEMBER_NOT_FOUND")
            domain.check_member_change(actor, current, None, is_self=leaving)
            if current is Role.OWNER:
                domain.check_keeps_an_owner(await store.count_owners(tx, org_id) - 1)
            await store.delete_member(tx, org_id, user_id)
            await write_event(
                tx,
                SCHEMA,
                "member.removed",
                organization_id=org_id,
                aggregate_id=user_id,
                payload={"organization_id": org_id, "user_id": user_id},
            )
            await self.audit.record(
                tx,
                org_id,
                "member.removed",
                principal.subject,
                "user",
                user_id,
                {"role": current.db_name},
            )
        await self.access.announce(AccessChange((Scope(user_id, org_id),)))


def _missing(**fields: str) -> list[FieldViolation]:
    """A "required" violation for each field given empty, in order."""
    return [FieldViolation(name, "required") for name, value in fields.items() if not value]


def _role(value: int, violations: list[FieldViolation]) -> Role | None:
    try:
        return Role(value)
    except ValueError:
        violations.append(FieldViolation("role", "one of viewer, developer, admin, owner"))
        return None
