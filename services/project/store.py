"""Project's tables and queries (SQLAlchemy Core on asyncpg); the only file with SQL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from services.project.domain import RESOURCES, OrganizationSlug, Project, ProjectSpec
from shared.db import Session, compile_query, from_row
from shared.resources import Resources

SCHEMA = "project"
metadata = sa.MetaData(schema=SCHEMA)

projects = sa.Table(
    "projects",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("organization_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("slug", sa.Text, nullable=False),
    sa.Column("ram_mb", sa.Integer, nullable=False),
    sa.Column("cpu_millis", sa.Integer, nullable=False),
    sa.Column("bandwidth_gb", sa.Integer, nullable=False),
    sa.Column("region", sa.Text, nullable=False),
    sa.Column("sleep_enabled", sa.Boolean, nullable=False),
    sa.Column("sleep_after_seconds", sa.Integer, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("repository_url", sa.Text),
    sa.Column("default_command", sa.Text),
    sa.Column("default_image", sa.Text),
    sa.Column("health_check_path", sa.Text),
    sa.Column("restart_policy", sa.Text, nullable=False),
    sa.Column("liveness_check_path", sa.Text),
    sa.Column("liveness_period_seconds", sa.Integer, nullable=False),
    sa.Column("liveness_failure_threshold", sa.Integer, nullable=False),
    sa.Column("data_key_wrapped", sa.LargeBinary),
    sa.Column("data_key_id", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

project_secrets = sa.Table(
    "project_secrets",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("project_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    sa.Column("nonce", sa.LargeBinary, nullable=False),
    sa.Column("key_version", sa.Integer, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# identity's organization slugs (domain.OrganizationSlug), for projects' hostnames.
organization_slugs = sa.Table(
    "organization_slugs",
    metadata,
    sa.Column("organization_id", sa.Text, primary_key=True),
    sa.Column("slug", sa.Text, nullable=False),
    sa.Column("event_txid", sa.BigInteger),
    sa.Column("event_position", sa.BigInteger),
    sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

_NULLABLE_TEXT = (
    "repository_url",
    "default_command",
    "default_image",
    "health_check_path",
    "liveness_check_path",
)
_PROJECT_COLUMNS = [c for c in projects.c if c.name not in ("data_key_wrapped", "data_key_id")]
# Reads join the organization's slug (NULL while unknown).
_PROJECT_READ = sa.select(*_PROJECT_COLUMNS, organization_slugs.c.slug.label("organization_slug"))
_WITH_SLUG = projects.outerjoin(
    organization_slugs, organization_slugs.c.organization_id == projects.c.organization_id
)


def _spec_values(spec: ProjectSpec, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Column values of a spec (every column, or those of the update paths `only`); the
    resources are three columns of their own."""
    columns = asdict(spec)
    columns.update(columns.pop(RESOURCES))
    names = [p.removeprefix(f"{RESOURCES}.") for p in only] if only else list(columns)
    values = {name: columns[name] for name in names}
    for name in _NULLABLE_TEXT:
        if name in values:
            values[name] = values[name] or None
    return values


def _project(row: asyncpg.Record) -> Project:
    spec = from_row(ProjectSpec, row, resources=Resources.from_row(row))
    return Project(
        row["id"],
        row["organization_id"],
        spec,
        row["created_at"],
        row["updated_at"],
        organization_slug=row.get("organization_slug") or "",
    )


# --------------------------------------------------------------------------- locks


async def lock_project(tx: Session, project_id: str) -> None:
    """Serializes everything that changes a project's allocation (create, resize, delete,
    reconcile) until this transaction ends."""
    await tx.execute("SELECT pg_advisory_xact_lock(hashtext('project:' || $1))", project_id)


async def try_lock(tx: Session, name: str) -> bool:
    return bool(await tx.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", name))


# ------------------------------------------------------------------------ projects


async def insert_project(
    tx: Session,
    *,
    project_id: str,
    organization_id: str,
    spec: ProjectSpec,
    data_key_wrapped: bytes | None,
    data_key_id: str | None,
) -> Project | None:
    """The new project, or None when the org already has a project with this slug."""
    statement = (
        pg.insert(projects)
        .values(
            id=project_id,
            organization_id=organization_id,
            data_key_wrapped=data_key_wrapped,
            data_key_id=data_key_id,
            created_at=sa.func.now(),
            updated_at=sa.func.now(),
            **_spec_values(spec),
        )
        .on_conflict_do_nothing(constraint="uq_projects_organization_id_slug")
        .returning(*_PROJECT_COLUMNS)
    )
    row = await tx.fetchrow(statement)
    return _project(row) if row else None


# The hot read (GetProject and every project-scoped RPC's access check), compiled once.
_GET_PROJECT_SQL, _ = compile_query(
    _PROJECT_READ.select_from(_WITH_SLUG).where(projects.c.id == sa.bindparam("project_id", ""))
)


async def get_project(s: Session, project_id: str) -> Project | None:
    row = await s.fetchrow(_GET_PROJECT_SQL, project_id)
    return _project(row) if row else None


async def slug_taken(s: Session, organization_id: str, slug: str, except_id: str = "") -> bool:
    statement = sa.select(sa.literal(1)).where(
        projects.c.organization_id == organization_id,
        projects.c.slug == slug,
        projects.c.id != except_id,
    )
    return await s.fetchval(statement) is not None


async def list_projects(
    s: Session,
    organization_id: str,
    *,
    sleep_enabled: bool | None,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[Project]:
    statement = _PROJECT_READ.select_from(_WITH_SLUG).where(
        projects.c.organization_id == organization_id
    )
    if sleep_enabled is not None:
        statement = statement.where(projects.c.sleep_enabled == sleep_enabled)
    if after is not None:
        statement = statement.where(
            sa.tuple_(projects.c.created_at, projects.c.id) > sa.tuple_(*after)
        )
    statement = statement.order_by(projects.c.created_at, projects.c.id).limit(limit)
    return [_project(r) for r in await s.fetch(statement)]


async def update_project(
    tx: Session, project_id: str, spec: ProjectSpec, paths: Sequence[str]
) -> Project | None:
    """None when the slug is taken by another project of the org."""
    statement = (
        sa.update(projects)
        .where(projects.c.id == project_id)
        .values(updated_at=sa.func.now(), **_spec_values(spec, paths))
        .returning(*_PROJECT_COLUMNS)
    )
    try:
        async with tx.conn.transaction():  # a savepoint: a unique violation keeps tx usable
            row = await tx.fetchrow(statement)
    except asyncpg.UniqueViolationError:
        return None
    return _project(row) if row else None


async def delete_project(tx: Session, project_id: str) -> Project | None:
    """Deletes the project; its secrets go with it (ON DELETE CASCADE)."""
    statement = sa.delete(projects).where(projects.c.id == project_id).returning(*_PROJECT_COLUMNS)
    row = await tx.fetchrow(statement)
    return _project(row) if row else None


async def delete_organization_projects(tx: Session, organization_id: str) -> list[Project]:
    statement = (
        sa.delete(projects)
        .where(projects.c.organization_id == organization_id)
        .returning(*_PROJECT_COLUMNS)
    )
    return [_project(r) for r in await tx.fetch(statement)]


async def organization_projects(tx: Session, organization_id: str) -> list[Project]:
    """Every project of the organization, with the slug stored for it."""
    statement = (
        _PROJECT_READ.select_from(_WITH_SLUG)
        .where(projects.c.organization_id == organization_id)
        .order_by(projects.c.id)
    )
    return [_project(r) for r in await tx.fetch(statement)]


# --------------------------------------------------------------- organization slugs


def _organization_slug(row: asyncpg.Record) -> OrganizationSlug:
    txid, position = row["event_txid"], row["event_position"]
    return OrganizationSlug(
        row["organization_id"],
        row["slug"],
        None if txid is None else (txid, position),
        row["as_of"],
    )


async def organization_slug(
    s: Session, organization_id: str, *, lock: bool = False, share: bool = False
) -> OrganizationSlug | None:
    """`lock`: FOR UPDATE (a change to it); `share`: FOR SHARE (a project written with it
    commits before the slug can change, so the change's events see that project)."""
    statement = sa.select(organization_slugs).where(
        organization_slugs.c.organization_id == organization_id
    )
    if lock or share:
        statement = statement.with_for_update(read=not lock)
    row = await s.fetchrow(statement)
    return _organization_slug(row) if row else None


async def insert_organization_slug(tx: Session, slug: OrganizationSlug) -> bool:
    """False when a row for the organization exists already (it is kept)."""
    statement = (
        pg.insert(organization_slugs)
        .values(
            organization_id=slug.organization_id,
            slug=slug.slug,
            event_txid=slug.cursor[0] if slug.cursor else None,
            event_position=slug.cursor[1] if slug.cursor else None,
            as_of=slug.as_of,
            updated_at=sa.func.now(),
        )
        .on_conflict_do_nothing(index_elements=[organization_slugs.c.organization_id])
        .returning(organization_slugs.c.organization_id)
    )
    return await tx.fetchval(statement) is not None


async def set_organization_slug(tx: Session, slug: OrganizationSlug) -> None:
    assert slug.cursor is not None  # only events overwrite
    await tx.execute(
        sa.update(organization_slugs)
        .where(organization_slugs.c.organization_id == slug.organization_id)
        .values(
            slug=slug.slug,
            event_txid=slug.cursor[0],
            event_position=slug.cursor[1],
            as_of=slug.as_of,
            updated_at=sa.func.now(),
        )
    )


async def delete_organization_slug(tx: Session, organization_id: str) -> None:
    await tx.execute(
        sa.delete(organization_slugs).where(organization_slugs.c.organization_id == organization_id)
    )


async def database_now(s: Session) -> datetime:
    """The database's clock (identity's event times come from it)."""
    now: datetime = await s.fetchval("SELECT clock_timestamp()")
    return now


@dataclass(frozen=True)
class ProjectSize:
    id: str
    organization_id: str
    resources: Resources


async def project_sizes(s: Session, after_id: str, limit: int) -> list[ProjectSize]:
    statement = (
        sa.select(
            projects.c.id,
            projects.c.organization_id,
            projects.c.ram_mb,
            projects.c.cpu_millis,
            projects.c.bandwidth_gb,
        )
        .where(projects.c.id > after_id)
        .order_by(projects.c.id)
        .limit(limit)
    )
    return [
        ProjectSize(
            r["id"],
            r["organization_id"],
            Resources.from_row(r),
        )
        for r in await s.fetch(statement)
    ]


# ------------------------------------------------------------------------ data keys


@dataclass(frozen=True)
class WrappedKey:
    project_id: str
    organization_id: str
    wrapped: bytes
    key_id: str


async def data_key(s: Session, project_id: str) -> WrappedKey | None:
    statement = sa.select(
        projects.c.id,
        projects.c.organization_id,
        projects.c.data_key_wrapped,
        projects.c.data_key_id,
    ).where(projects.c.id == project_id)
    row = await s.fetchrow(statement)
    if row is None or row["data_key_wrapped"] is None:
        return None
    return WrappedKey(
        row["id"], row["organization_id"], row["data_key_wrapped"], row["data_key_id"]
    )


async def claim_keys_to_rewrap(tx: Session, target_key_id: str, limit: int) -> list[WrappedKey]:
    """Data keys not yet under `target_key_id`, locked; rows other replicas hold are skipped."""
    statement = (
        sa.select(
            projects.c.id,
            projects.c.organization_id,
            projects.c.data_key_wrapped,
            projects.c.data_key_id,
        )
        .where(projects.c.data_key_id.is_not(None), projects.c.data_key_id != target_key_id)
        .order_by(projects.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [
        WrappedKey(r["id"], r["organization_id"], r["data_key_wrapped"], r["data_key_id"])
        for r in await tx.fetch(statement)
    ]


async def set_data_key(tx: Session, project_id: str, wrapped: bytes, key_id: str) -> None:
    await tx.execute(
        sa.update(projects)
        .where(projects.c.id == project_id)
        .values(data_key_wrapped=wrapped, data_key_id=key_id)
    )


async def set_data_key_if_missing(
    tx: Session, project_id: str, wrapped: bytes, key_id: str
) -> None:
    await tx.execute(
        sa.update(projects)
        .where(projects.c.id == project_id, projects.c.data_key_wrapped.is_(None))
        .values(data_key_wrapped=wrapped, data_key_id=key_id)
    )


async def data_key_ids(s: Session) -> dict[str, int]:
    """How many data keys each master key id wraps."""
    statement = (
        sa.select(projects.c.data_key_id, sa.func.count())
        .where(projects.c.data_key_id.is_not(None))
        .group_by(projects.c.data_key_id)
    )
    return {r[0]: r[1] for r in await s.fetch(statement)}


# ------------------------------------------------------------------------- secrets


@dataclass(frozen=True)
class StoredSecret:
    name: str
    version: int
    updated_at: datetime
    ciphertext: bytes = b""
    nonce: bytes = b""
    key_version: int = 0


def _secret(row: asyncpg.Record) -> StoredSecret:
    return StoredSecret(
        name=row["name"],
        version=row["version"],
        updated_at=row["updated_at"],
        ciphertext=row.get("ciphertext", b""),
        nonce=row.get("nonce", b""),
        key_version=row.get("key_version", 0),
    )


async def upsert_secret(
    tx: Session,
    *,
    secret_id: str,
    project_id: str,
    name: str,
    ciphertext: bytes,
    nonce: bytes,
    key_version: int,
) -> StoredSecret:
    insert = pg.insert(project_secrets).values(
        id=secret_id,
        project_id=project_id,
        name=name,
        ciphertext=ciphertext,
        nonce=nonce,
        key_version=key_version,
        version=1,
        created_at=sa.func.now(),
        updated_at=sa.func.now(),
    )
    statement = insert.on_conflict_do_update(
        constraint="uq_project_secrets_project_id_name",
        set_={
            "ciphertext": insert.excluded.ciphertext,
            "nonce": insert.excluded.nonce,
            "key_version": insert.excluded.key_version,
            "version": project_secrets.c.version + 1,
            "updated_at": sa.func.now(),
        },
    ).returning(project_secrets.c.name, project_secrets.c.version, project_secrets.c.updated_at)
    row = await tx.fetchrow(statement)
    assert row is not None
    return _secret(row)


async def list_secrets(
    s: Session, project_id: str, after_name: str, limit: int
) -> list[StoredSecret]:
    statement = (
        sa.select(project_secrets.c.name, project_secrets.c.version, project_secrets.c.updated_at)
        .where(project_secrets.c.project_id == project_id, project_secrets.c.name > after_name)
        .order_by(project_secrets.c.name)
        .limit(limit)
    )
    return [_secret(r) for r in await s.fetch(statement)]


_SEALED_COLUMNS = (
    project_secrets.c.name,
    project_secrets.c.version,
    project_secrets.c.updated_at,
    project_secrets.c.ciphertext,
    project_secrets.c.nonce,
    project_secrets.c.key_version,
)


async def get_secret(s: Session, project_id: str, name: str) -> StoredSecret | None:
    statement = sa.select(*_SEALED_COLUMNS).where(
        project_secrets.c.project_id == project_id, project_secrets.c.name == name
    )
    row = await s.fetchrow(statement)
    return _secret(row) if row else None


async def all_secrets(s: Session, project_id: str) -> list[StoredSecret]:
    statement = (
        sa.select(*_SEALED_COLUMNS)
        .where(project_secrets.c.project_id == project_id)
        .order_by(project_secrets.c.name)
    )
    return [_secret(r) for r in await s.fetch(statement)]


async def delete_secret(tx: Session, project_id: str, name: str) -> StoredSecret | None:
    statement = (
        sa.delete(project_secrets)
        .where(project_secrets.c.project_id == project_id, project_secrets.c.name == name)
        .returning(project_secrets.c.name, project_secrets.c.version, project_secrets.c.updated_at)
    )
    row = await tx.fetchrow(statement)
    return _secret(row) if row else None


# ------------------------------------------------------------------ custom domains

domains = sa.Table(
    "domains",
    metadata,
    sa.Column("hostname", sa.Text, primary_key=True),
    sa.Column("project_id", sa.Text, nullable=False),
    sa.Column("token", sa.Text, nullable=False),
    sa.Column("verified_at", sa.DateTime(timezone=True)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class StoredDomain:
    hostname: str
    project_id: str
    token: str
    verified_at: datetime | None
    created_at: datetime


async def insert_domain(
    tx: Session, project_id: str, hostname: str, token: str
) -> StoredDomain | None:
    """The new domain; None when the name is already some project's."""
    statement = (
        pg.insert(domains)
        .values(hostname=hostname, project_id=project_id, token=token, created_at=sa.func.now())
        .on_conflict_do_nothing(index_elements=["hostname"])
        .returning(*domains.c)
    )
    row = await tx.fetchrow(statement)
    return from_row(StoredDomain, row) if row else None


async def project_domains(s: Session, project_id: str) -> list[StoredDomain]:
    statement = (
        sa.select(domains).where(domains.c.project_id == project_id).order_by(domains.c.hostname)
    )
    return [from_row(StoredDomain, r) for r in await s.fetch(statement)]


async def get_domain(s: Session, project_id: str, hostname: str) -> StoredDomain | None:
    statement = sa.select(domains).where(
        domains.c.project_id == project_id, domains.c.hostname == hostname
    )
    row = await s.fetchrow(statement)
    return from_row(StoredDomain, row) if row else None


async def set_domain_verified(tx: Session, project_id: str, hostname: str) -> StoredDomain | None:
    statement = (
        sa.update(domains)
        .where(domains.c.project_id == project_id, domains.c.hostname == hostname)
        .values(verified_at=sa.func.coalesce(domains.c.verified_at, sa.func.now()))
        .returning(*domains.c)
    )
    row = await tx.fetchrow(statement)
    return from_row(StoredDomain, row) if row else None


async def delete_domain(tx: Session, project_id: str, hostname: str) -> bool:
    statement = (
        sa.delete(domains)
        .where(domains.c.project_id == project_id, domains.c.hostname == hostname)
        .returning(domains.c.hostname)
    )
    return await tx.fetchrow(statement) is not None
