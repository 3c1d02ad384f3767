"""Project's use cases: authorize, apply the rules, reserve from the pool, write the change with
its outbox event and audit entry in one transaction."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import grpc

from hangar.billing.v1 import billing_pb2, billing_pb2_grpc
from services.project import domain, store
from services.project.crypto import (
    DATA_KEY_VERSION,
    DecryptionFailed,
    Keyring,
    Sealed,
    UnknownMasterKey,
    new_data_key,
    open_secret,
    seal_secret,
)
from services.project.domain import Project, ProjectSpec, PublicAddress
from services.project.hostnames import OrganizationSlugs
from shared import pagination
from shared.audit import current_actor, record_audit
from shared.auth import (
    Authorizer,
    require_caller,
    require_platform_admin,
    require_service,
    require_token_project,
)
from shared.clients import Clients
from shared.context import current_principal
from shared.db import Database, Session
from shared.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    from_downstream,
)
from shared.ids import new_id
from shared.outbox import write_event
from shared.pagination import Page
from shared.resources import Resources
from shared.validation import require_id

# Secrets and projects list in smaller pages than the AIP-158 default maximum.
MAX_PAGE_SIZE = 500

log = logging.getLogger(__name__)

SCHEMA = store.SCHEMA
BILLING_SERVICE = billing_pb2.DESCRIPTOR.services_by_name["BillingService"]


# ------------------------------------------------------------------ billing's pool


# Billing's refusals our callers see (its quota details kept); anything else is UNAVAILABLE.
_BILLING_PASSED_ON = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: "POOL_EXHAUSTED",
    grpc.StatusCode.FAILED_PRECONDITION: "BILLING_PRECONDITION",
}


@dataclass(frozen=True)
class Allocation:
    organization_id: str
    project_id: str
    resources: Resources


class BillingPool:
    """The organization's pool, through billing's internal allocation RPCs."""

    def __init__(self, clients: Clients) -> None:
        self.clients = clients

    @property
    def _stub(self) -> billing_pb2_grpc.BillingServiceStub:
        return self.clients.stub("billing", billing_pb2_grpc.BillingServiceStub, BILLING_SERVICE)

    async def reserve(self, organization_id: str, project_id: str, size: Resources) -> None:
        try:
            await self._stub.ReserveAllocation(
                billing_pb2.ReserveAllocationRequest(
                    organization_id=organization_id,
                    project_id=project_id,
                    resources=size.to_proto(),
                )
            )
        except grpc.aio.AioRpcError as exc:
            raise from_downstream(exc, "billing", _BILLING_PASSED_ON) from None

    async def release(self, organization_id: str, project_id: str) -> None:
        try:
            await self._stub.ReleaseAllocation(
                billing_pb2.ReleaseAllocationRequest(
                    organization_id=organization_id, project_id=project_id
                )
            )
        except grpc.aio.AioRpcError as exc:
            raise from_downstream(exc, "billing", _BILLING_PASSED_ON) from None

    async def allocations(self, organization_id: str = "") -> AsyncIterator[Allocation]:
        token = ""
        while True:
            try:
                reply = await self._stub.ListAllocations(
                    billing_pb2.ListAllocationsRequest(
                        organization_id=organization_id, page_size=500, page_token=token
                    )
                )
            except grpc.aio.AioRpcError as exc:
                raise from_downstream(exc, "billing", _BILLING_PASSED_ON) from None
            for a in reply.allocations:
                yield Allocation(a.organization_id, a.project_id, Resources.from_proto(a.resources))
            token = reply.next_page_token
            if not token:
                return


async def release_quietly(pool: BillingPool, organization_id: str, project_id: str) -> None:
    """Best effort: what it cannot release now, the reconciler releases later."""
    try:
        await pool.release(organization_id, project_id)
    except Exception as exc:
        log.warning(
            "allocation not released; the reconciler will",
            extra={"project_id": project_id, "error": type(exc).__name__},
        )


# ------------------------------------------------------------------ events, audit


def project_payload(project: Project, address: PublicAddress) -> dict[str, Any]:
    payload = {"id": project.id, "organization_id": project.organization_id}
    payload.update(asdict(project.spec))
    if hostname := address.hostname(project):  # never "": runtime would drop its route
        payload["hostname"] = hostname
    return payload


async def config_changed(tx: Session, project: Project, secret: str, *, restart: bool) -> None:
    """project.config_changed: a secret was set or deleted (runtime restarts the running
    release with the new config as a new release when `restart`). Names, never values."""
    await write_event(
        tx,
        SCHEMA,
        "project.config_changed",
        organization_id=project.organization_id,
        aggregate_id=project.id,
        payload={"secret": secret, "restart": restart, "actor": current_actor() or ""},
    )


async def project_deleted(tx: Session, project: Project, *, cause: str) -> None:
    """The outbox event (the allocation releaser acts on it) and the audit entry of a delete."""
    await write_event(
        tx,
        SCHEMA,
        "project.deleted",
        organization_id=project.organization_id,
        aggregate_id=project.id,
        payload={
            "id": project.id,
            "organization_id": project.organization_id,
            "slug": project.spec.slug,
            "cause": cause,
        },
    )
    await record_audit(
        tx,
        SCHEMA,
        organization_id=project.organization_id,
        action="project.deleted",
        target_type="project",
        target_id=project.id,
        metadata={"slug": project.spec.slug, "cause": cause},
        actor_id=None if cause == "request" else "service:project",
    )


@dataclass(frozen=True)
class ResolvedSecrets:
    env: dict[str, str]
    version_hash: str


class Projects:
    """Every ProjectService use case; api.py only translates protos."""

    def __init__(
        self,
        db: Database,
        authorizer: Authorizer,
        pool: BillingPool,
        keyring: Keyring,
        slugs: OrganizationSlugs | None = None,
    ) -> None:
        self.db = db
        self.authorizer = authorizer
        self.pool = pool
        self.keyring = keyring
        self.slugs = slugs or OrganizationSlugs(db, PublicAddress(), None)
        self.address = self.slugs.address

    # -------------------------------------------------------------- access

    async def _project_for(self, project_id: str, permission: str) -> Project:
        """The project after checking `permission` in its org. AIP-193: a user who may not see
        it gets PERMISSION_DENIED whether or not it exists; NOT_FOUND only for services, the
        one caller kind allowed in every organization."""
        field = "project_id" if permission.startswith(("secrets", "domains")) else "id"
        require_id(project_id, field)
        async with self.db.session() as s:
            project = await store.get_project(s, project_id)
        if project is None:
            principal = require_caller()
            if principal.is_service:
                raise NotFound("no such project")
            raise PermissionDenied("you cannot access this project, or it does not exist")
        require_token_project(project.id)
        await self.authorizer.require(project.organization_id, permission)
        return project

    async def authorized(self, project_id: str, permission: str) -> Project:
        """The project, once the caller holds `permission` in its organization."""
        return await self._project_for(project_id, permission)

    # ------------------------------------------------------------ projects

    async def create_project(self, organization_id: str, spec: ProjectSpec) -> Project:
        require_id(organization_id, "organization_id")
        await self.authorizer.require(organization_id, domain.PERM_CREATE)
        spec = domain.validate_spec(domain.with_create_defaults(spec))
        async with self.db.session() as s:
            if await store.slug_taken(s, organization_id, spec.slug):
                raise _slug_taken()
        # Before billing: UNAVAILABLE here leaves nothing reserved or written.
        known = await self.slugs.lookup(organization_id)
        if known is not None and (bad := domain.label_violation(spec.slug, known.slug)):
            raise InvalidArgument(bad)
        project_id = new_id()
        # Without a keyring the project still exists; its secrets wait for one.
        key_id = self.keyring.active_id if self.keyring.configured else None
        wrapped = self.keyring.wrap(project_id, new_data_key()) if key_id else None
        async with self.db.transaction() as tx:
            await store.lock_project(tx, project_id)
            await self.pool.reserve(organization_id, project_id, spec.resources)
            try:
                project = await store.insert_project(
                    tx,
                    project_id=project_id,
                    organization_id=organization_id,
                    spec=spec,
                    data_key_wrapped=wrapped,
                    data_key_id=key_id,
                )
                if project is None:
                    raise _slug_taken()
                project = await self._with_organization_slug(tx, project)
                await write_event(
                    tx,
                    SCHEMA,
                    "project.created",
                    organization_id=organization_id,
                    aggregate_id=project_id,
                    payload=project_payload(project, self.address),
                )
                await record_audit(
                    tx,
                    SCHEMA,
                    organization_id=organization_id,
                    action="project.created",
                    target_type="project",
                    target_id=project_id,
                    metadata={"slug": spec.slug, **asdict(spec.resources)},
                )
            except BaseException:
                # The row will not exist: give the reservation back (still under the lock).
                await asyncio.shield(release_quietly(self.pool, organization_id, project_id))
                raise
        return project

    async def _with_organization_slug(self, tx: Session, project: Project) -> Project:
        stored = await store.organization_slug(tx, project.organization_id, share=True)
        return replace(project, organization_slug=stored.slug if stored else "")

    async def get_project(self, project_id: str) -> Project:
        project = await self._project_for(project_id, domain.PERM_GET)
        return (await self.slugs.fill([project]))[0]

    async def list_projects(
        self, organization_id: str, page_size: int, page_token: str, sleep_enabled: bool | None
    ) -> Page[Project]:
        require_id(organization_id, "organization_id")
        await self.authorizer.require(organization_id, domain.PERM_LIST)
        limit = pagination.page_size(page_size, maximum=MAX_PAGE_SIZE)
        key = pagination.decode_page_token(page_token, (str, str))
        after = None
        if key is not None:
            from datetime import datetime

            try:
                after = (datetime.fromisoformat(key[0]), key[1])
            except ValueError:
                raise InvalidArgument.field(
                    "page_token", "not a page token from this list"
                ) from None
        async with self.db.session() as s:
            rows = await store.list_projects(
                s, organization_id, sleep_enabled=sleep_enabled, after=after, limit=limit + 1
            )
        page = pagination.page_of(rows, limit, lambda p: [p.created_at.isoformat(), p.id])
        return replace(page, items=await self.slugs.fill(page.items))

    async def update_project(
        self,
        project_id: str,
        requested: ProjectSpec,
        paths: Sequence[str],
        set_fields: Sequence[str],
    ) -> Project:
        touched = domain.update_paths(paths, set_fields)
        current = await self._project_for(project_id, domain.PERM_UPDATE)
        domain.validate_spec(requested, only=touched)
        if not current.organization_slug:
            await self.slugs.lookup(current.organization_id)
        async with self.db.transaction() as tx:
            await store.lock_project(tx, project_id)
            current = await store.get_project(tx, project_id) or _gone()
            current = await self._with_organization_slug(tx, current)
            new_spec = domain.validate_spec(domain.apply_update(current.spec, requested, touched))
            changed = [
                p
                for p in touched
                if domain.spec_value(new_spec, p) != domain.spec_value(current.spec, p)
            ]
            if not changed:
                return current
            if "slug" in changed:
                if await store.slug_taken(
                    tx, current.organization_id, new_spec.slug, except_id=project_id
                ):
                    raise _slug_taken()
                if bad := domain.label_violation(new_spec.slug, current.organization_slug):
                    raise InvalidArgument(bad)
            resized = new_spec.resources != current.spec.resources
            if resized:
                await self._resize(current, new_spec.resources)
            try:
                updated = await store.update_project(tx, project_id, new_spec, changed)
                if updated is None:
                    raise _slug_taken()
                updated = replace(updated, organization_slug=current.organization_slug)
                renamed = self.address.hostname(updated) != self.address.hostname(current)
                await write_event(
                    tx,
                    SCHEMA,
                    "project.updated",
                    organization_id=updated.organization_id,
                    aggregate_id=project_id,
                    payload={
                        **project_payload(updated, self.address),
                        "changed": [*changed, "hostname"] if renamed else changed,
                    },
                )
                await record_audit(
                    tx,
                    SCHEMA,
                    organization_id=updated.organization_id,
                    action="project.updated",
                    target_type="project",
                    target_id=project_id,
                    metadata={"changed": changed},
                )
            except BaseException:
                if resized:  # put the pool back to the size the row keeps
                    await asyncio.shield(self._restore_size(current))
                raise
        return updated

    async def _resize(self, current: Project, size: Resources) -> None:
        try:
            await self.pool.reserve(current.organization_id, current.id, size)
        except ResourceExhausted:
            if size.fits_in(current.spec.resources):
                log.error("billing refused a shrink", extra={"project_id": current.id})
            raise
        except DomainError as exc:
            if not size.fits_in(current.spec.resources):
                raise
            # A shrink never fails for the pool's sake: the reconciler applies it later.
            log.warning(
                "shrink not yet applied to the pool",
                extra={"project_id": current.id, "error": exc.reason},
            )

    async def _restore_size(self, project: Project) -> None:
        try:
            await self.pool.reserve(project.organization_id, project.id, project.spec.resources)
        except Exception as exc:
            log.warning(
                "allocation not restored; the reconciler will",
                extra={"project_id": project.id, "error": type(exc).__name__},
            )

    async def delete_project(self, project_id: str) -> None:
        await self._project_for(project_id, domain.PERM_DELETE)
        async with self.db.transaction() as tx:
            await store.lock_project(tx, project_id)
            project = await store.delete_project(tx, project_id)
            if project is None:
                raise NotFound("no such project")
            await project_deleted(tx, project, cause="request")

    async def delete_organization(self, tx: Session, organization_id: str) -> int:
        """organization.deleted: the tenant's projects and secrets go; idempotent."""
        deleted = await store.delete_organization_projects(tx, organization_id)
        await self.slugs.forget(tx, organization_id)
        for project in deleted:
            await project_deleted(tx, project, cause="organization.deleted")
        return len(deleted)

    # ------------------------------------------------------------- secrets

    async def data_key(self, s: Session, project_id: str) -> bytes:
        """The project's data key, unwrapped (FAILED_PRECONDITION without a usable keyring)."""
        return await self._data_key(s, project_id)

    async def _data_key(self, s: Session, project_id: str) -> bytes:
        wrapped = await store.data_key(s, project_id)
        if wrapped is None:
            if not self.keyring.configured:
                raise FailedPrecondition(
                    "secrets need a master key (HANGAR_PROJECT_MASTER_KEYS)",
                    reason="MASTER_KEY_UNAVAILABLE",
                )
            # Created while no keyring was configured: give it a data key now.
            data_key = new_data_key()
            await store.set_data_key_if_missing(
                s, project_id, self.keyring.wrap(project_id, data_key), self.keyring.active_id
            )
            wrapped = await store.data_key(s, project_id)
            if wrapped is None:
                raise NotFound("no such project")
        try:
            return self.keyring.unwrap(project_id, wrapped.wrapped, wrapped.key_id)
        except (UnknownMasterKey, DecryptionFailed):
            log.error("data key did not unwrap", extra={"project_id": project_id})
            raise FailedPrecondition(
                "this project's secrets cannot be decrypted with the configured master keys",
                reason="MASTER_KEY_UNAVAILABLE",
            ) from None

    async def set_secret(
        self, project_id: str, name: str, value: str, *, restart: bool = True
    ) -> store.StoredSecret:
        domain.check_secret_name(name)
        plaintext = domain.check_secret_value(value)
        project = await self._project_for(project_id, domain.PERM_SECRETS_WRITE)
        async with self.db.transaction() as tx:
            sealed = seal_secret(await self._data_key(tx, project_id), project_id, name, plaintext)
            secret = await store.upsert_secret(
                tx,
                secret_id=new_id(),
                project_id=project_id,
                name=name,
                ciphertext=sealed.ciphertext,
                nonce=sealed.nonce,
                key_version=DATA_KEY_VERSION,
            )
            await record_audit(
                tx,
                SCHEMA,
                organization_id=project.organization_id,
                action="secret.set",
                target_type="project",
                target_id=project_id,
                metadata={"name": name, "version": secret.version},
            )
            await config_changed(tx, project, name, restart=restart)
        return secret

    async def list_secrets(
        self, project_id: str, page_size: int, page_token: str
    ) -> Page[store.StoredSecret]:
        await self._project_for(project_id, domain.PERM_SECRETS_LIST)
        limit = pagination.page_size(page_size, maximum=MAX_PAGE_SIZE)
        key = pagination.decode_page_token(page_token, (str,))
        async with self.db.session() as s:
            rows = await store.list_secrets(s, project_id, key[0] if key else "", limit + 1)
        return pagination.page_of(rows, limit, lambda secret: [secret.name])

    async def delete_secret(self, project_id: str, name: str, *, restart: bool = True) -> None:
        domain.check_secret_name(name)
        project = await self._project_for(project_id, domain.PERM_SECRETS_DELETE)
        async with self.db.transaction() as tx:
            secret = await store.delete_secret(tx, project_id, name)
            if secret is None:
                raise NotFound("no such secret")
            await record_audit(
                tx,
                SCHEMA,
                organization_id=project.organization_id,
                action="secret.deleted",
                target_type="project",
                target_id=project_id,
                metadata={"name": name, "version": secret.version},
            )
            await config_changed(tx, project, name, restart=restart)

    async def reveal_secret(self, project_id: str, name: str) -> tuple[store.StoredSecret, str]:
        domain.check_secret_name(name)
        project = await self._project_for(project_id, domain.PERM_SECRETS_REVEAL)
        if not current_principal().is_user:
            raise PermissionDenied("secrets are revealed to people; services use ResolveSecrets")
        async with self.db.transaction() as tx:
            secret = await store.get_secret(tx, project_id, name)
            if secret is None:
                raise NotFound("no such secret")
            value = self._open(await self._data_key(tx, project_id), project_id, secret)
            await record_audit(
                tx,
                SCHEMA,
                organization_id=project.organization_id,
                action="secret.revealed",
                target_type="project",
                target_id=project_id,
                metadata={"name": name, "version": secret.version},
            )
        return secret, value

    def _open(self, data_key: bytes, project_id: str, secret: store.StoredSecret) -> str:
        try:
            plaintext = open_secret(
                data_key,
                project_id,
                secret.name,
                secret.key_version,
                Sealed(secret.ciphertext, secret.nonce),
            )
        except DecryptionFailed:
            extra = {"project_id": project_id, "secret_name": secret.name}
            log.error("secret did not decrypt", extra=extra)
            raise FailedPrecondition(
                f"secret {secret.name} does not decrypt", reason="SECRET_CORRUPT"
            ) from None
        return plaintext.decode()

    async def resolve_secrets(self, project_id: str) -> ResolvedSecrets:
        require_service("runtime")
        require_id(project_id, "project_id")
        async with self.db.transaction(isolation="repeatable_read") as tx:
            if await store.get_project(tx, project_id) is None:
                raise NotFound("no such project")
            secrets = await store.all_secrets(tx, project_id)
            data_key = await self._data_key(tx, project_id) if secrets else b""
        env = {s.name: self._open(data_key, project_id, s) for s in secrets}
        return ResolvedSecrets(
            env, domain.secrets_version_hash((s.name, s.version) for s in secrets)
        )

    async def rotate_master_key(self, key_id: str) -> tuple[str, int]:
        """Re-wraps every data key under `key_id` (default: the active one), in batches."""
        require_platform_admin()
        target = key_id or self.keyring.active_id
        if target not in self.keyring.keys:
            raise InvalidArgument.field("key_id", "not a master key id in the keyring")
        rewrapped = 0
        while True:
            async with self.db.transaction() as tx:
                batch = await store.claim_keys_to_rewrap(tx, target, 200)
                for key in batch:
                    try:
                        wrapped = self.keyring.rewrap(
                            key.project_id, key.wrapped, key.key_id, target
                        )
                    except (UnknownMasterKey, DecryptionFailed):
                        raise FailedPrecondition(
                            f"a data key is wrapped under {key.key_id!r}, which the keyring"
                            " cannot use; add it back before rotating",
                            reason="MASTER_KEY_UNAVAILABLE",
                        ) from None
                    await store.set_data_key(tx, key.project_id, wrapped, target)
                if batch:
                    await record_audit(
                        tx,
                        SCHEMA,
                        organization_id="",
                        action="master_key.rotated",
                        target_type="master_key",
                        target_id=target,
                        metadata={"rewrapped": len(batch)},
                    )
            rewrapped += len(batch)
            if not batch:
                return target, rewrapped


def _slug_taken() -> AlreadyExists:
    return AlreadyExists(
        "a project with this slug exists in the organization",
        reason="SLUG_TAKEN",
        metadata={"field": "project.slug"},
    )


def _gone() -> Project:
    raise NotFound("no such project")
