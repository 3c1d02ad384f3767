"""Identity's tables (SQLAlchemy Core, mirroring migrations/identity) and their queries; the
audit trail's are in audit_store.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.identity.domain import Role
from shared.auth import API_TOKEN_SESSION
from shared.db import Database, Session, compile_query

metadata = MetaData(schema="identity")

users = Table(
    "users",
    metadata,
    Column("id", Text, primary_key=True),
    Column("email", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("password_hash", Text),
    Column("email_verified", Boolean, nullable=False),
    Column("oauth_provider", Text),
    Column("oauth_subject", Text),
    Column("is_platform_admin", Boolean, nullable=False),
    Column("signup_request_id", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

organizations = Table(
    "organizations",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("slug", Text, nullable=False),
    Column("owner_id", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

members = Table(
    "organization_members",
    metadata,
    Column("organization_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("id", Text, primary_key=True),
    Column("user_id", Text, nullable=False),
    Column("family_id", Text, nullable=False),
    Column("token_hash", LargeBinary, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

login_throttle = Table(
    "login_throttle",
    metadata,
    Column("email", Text, primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("last_failure_at", DateTime(timezone=True)),
    Column("blocked_until", DateTime(timezone=True)),
)


@dataclass(frozen=True)
class User:
    id: str
    email: str
    name: str
    password_hash: str | None
    email_verified: bool
    oauth_provider: str | None
    oauth_subject: str | None
    is_platform_admin: bool
    created_at: datetime


@dataclass(frozen=True)
class Organization:
    id: str
    name: str
    slug: str
    owner_id: str
    created_at: datetime


@dataclass(frozen=True)
class Member:
    user_id: str
    email: str
    role: Role


def _user(row: asyncpg.Record | None) -> User | None:
    if row is None:
        return None
    return User(**{k: row[k] for k in User.__dataclass_fields__})


def _org(row: asyncpg.Record | None) -> Organization | None:
    if row is None:
        return None
    return Organization(**{k: row[k] for k in Organization.__dataclass_fields__})


_USER_COLUMNS = [users.c[name] for name in User.__dataclass_fields__]
_ORG_COLUMNS = [organizations.c[name] for name in Organization.__dataclass_fields__]

# --------------------------------------------------------------------------- users


async def insert_user(
    tx: Session,
    *,
    user_id: str,
    email: str,
    name: str,
    password_hash: str | None,
    email_verified: bool = False,
    oauth_provider: str | None = None,
    oauth_subject: str | None = None,
    signup_request_id: str | None = None,
) -> User | None:
    """The new user, or None when the email, the OAuth identity or the sign-up request id
    is taken."""
    stmt = (
        pg_insert(users)
        .values(
            id=user_id,
            email=email,
            name=name,
            password_hash=password_hash,
            email_verified=email_verified,
            oauth_provider=oauth_provider,
            oauth_subject=oauth_subject,
            is_platform_admin=False,
            signup_request_id=signup_request_id,
        )
        .on_conflict_do_nothing()
        .returning(*_USER_COLUMNS)
    )
    return _user(await tx.fetchrow(stmt))


async def user_by_email(s: Session, email: str) -> User | None:
    return _user(await s.fetchrow(select(*_USER_COLUMNS).where(users.c.email == email)))


async def user_by_signup_request(s: Session, request_id: str) -> User | None:
    stmt = select(*_USER_COLUMNS).where(users.c.signup_request_id == request_id)
    return _user(await s.fetchrow(stmt))


async def user_by_id(s: Session, user_id: str) -> User | None:
    return _user(await s.fetchrow(select(*_USER_COLUMNS).where(users.c.id == user_id)))


async def user_by_oauth(s: Session, provider: str, subject: str) -> User | None:
    stmt = select(*_USER_COLUMNS).where(
        users.c.oauth_provider == provider, users.c.oauth_subject == subject
    )
    return _user(await s.fetchrow(stmt))


async def set_password_hash(tx: Session, user_id: str, password_hash: str) -> None:
    await tx.execute(
        update(users)
        .where(users.c.id == user_id)
        .values(password_hash=password_hash, updated_at=func.now())
    )


async def bind_oauth(
    tx: Session, user_id: str, provider: str, subject: str, *, email_verified: bool
) -> bool:
    """Bind an OAuth identity to a user without one; False if the identity is taken."""
    try:
        status = await tx.execute(
            update(users)
            .where(users.c.id == user_id, users.c.oauth_provider.is_(None))
            .values(
                oauth_provider=provider,
                oauth_subject=subject,
                email_verified=users.c.email_verified | email_verified,
                updated_at=func.now(),
            )
        )
    except asyncpg.UniqueViolationError:
        return False
    return status.endswith(" 1")


async def set_platform_admin(tx: Session, email: str, value: bool = True) -> bool:
    status = await tx.execute(
        update(users)
        .where(users.c.email == email)
        .values(is_platform_admin=value, updated_at=func.now())
    )
    return status.endswith(" 1")


# -------------------------------------------------------------------- refresh tokens


async def insert_refresh_token(
    tx: Session,
    *,
    token_id: str,
    user_id: str,
    family_id: str,
    token_hash: bytes,
    expires_at: datetime,
) -> None:
    await tx.execute(
        insert(refresh_tokens).values(
            id=token_id,
            user_id=user_id,
            family_id=family_id,
            token_hash=token_hash,
            expires_at=expires_at,
        )
    )


async def use_refresh_token(tx: Session, token_hash: bytes) -> tuple[str, str] | None:
    """Mark a live token used; (user_id, family_id), or None if it is not live.

    The row lock makes a concurrent second use wait, then find it used. A token its family's
    revocation missed (rotated in while the family was being revoked) is not live either.
    """
    revoked = refresh_tokens.alias("revoked")
    row = await tx.fetchrow(
        update(refresh_tokens)
        .where(
            refresh_tokens.c.token_hash == token_hash,
            refresh_tokens.c.used_at.is_(None),
            refresh_tokens.c.revoked_at.is_(None),
            refresh_tokens.c.expires_at > func.now(),
            ~exists().where(
                revoked.c.family_id == refresh_tokens.c.family_id,
                revoked.c.revoked_at.is_not(None),
            ),
        )
        .values(used_at=func.now())
        .returning(refresh_tokens.c.user_id, refresh_tokens.c.family_id)
    )
    return None if row is None else (row["user_id"], row["family_id"])


async def refresh_token_family(s: Session, token_hash: bytes) -> str | None:
    family_id: str | None = await s.fetchval(
        select(refresh_tokens.c.family_id).where(refresh_tokens.c.token_hash == token_hash)
    )
    return family_id


async def revoke_family(tx: Session, family_id: str) -> None:
    await tx.execute(
        update(refresh_tokens)
        .where(refresh_tokens.c.family_id == family_id, refresh_tokens.c.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )


# Every user request to identity checks its session: compiled once, then plain asyncpg.
# NULL (no rows: never issued, or cleaned up long after its tokens expired) is not active.
_SESSION_ACTIVE_SQL = (
    "SELECT bool_and(revoked_at IS NULL) FROM identity.refresh_tokens WHERE family_id = $1"
)


_TOKEN_ACTIVE_SQL = """SELECT revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
                         FROM identity.api_tokens WHERE id = $1"""


async def session_active(db: Database, family_id: str) -> bool:
    """Whether a session (refresh-token family, the access tokens' `sid`; or an API token,
    "tok_<id>") is not revoked (nor, for a token, expired)."""
    if family_id.startswith(API_TOKEN_SESSION):
        token_id = family_id.removeprefix(API_TOKEN_SESSION)
        return bool(await db.pool.fetchval(_TOKEN_ACTIVE_SQL, token_id))
    return bool(await db.pool.fetchval(_SESSION_ACTIVE_SQL, family_id))


async def revoked_sessions(s: Session, since: timedelta) -> list[tuple[str, datetime]]:
    """Sessions revoked within `since`: (family id, when), newest revocation per family."""
    stmt = (
        select(refresh_tokens.c.family_id, func.max(refresh_tokens.c.revoked_at))
        .where(refresh_tokens.c.revoked_at > func.now() - since)
        .group_by(refresh_tokens.c.family_id)
    )
    return [(r[0], r[1]) for r in await s.fetch(stmt)]


# ------------------------------------------------------------------ login throttle


async def blocked_until(s: Session, email: str) -> datetime | None:
    until: datetime | None = await s.fetchval(
        select(login_throttle.c.blocked_until).where(
            login_throttle.c.email == email, login_throttle.c.blocked_until > func.now()
        )
    )
    return until


async def record_login_failure(tx: Session, email: str, memory: timedelta) -> int:
    """Count one more failure (forgetting old ones); the number of recent failures."""
    new_row = pg_insert(login_throttle).values(email=email, failures=1, last_failure_at=func.now())
    stmt = new_row.on_conflict_do_update(
        index_elements=[login_throttle.c.email],
        set_={
            "failures": func.coalesce(
                _case_recent(login_throttle.c.last_failure_at, memory, login_throttle.c.failures),
                0,
            )
            + 1,
            "last_failure_at": func.now(),
        },
    ).returning(login_throttle.c.failures)
    return int(await tx.fetchval(stmt))


def _case_recent(column: Any, memory: timedelta, value: Any) -> Any:
    """`value` while `column` is recent, else 0 (old failures are forgotten)."""
    return case((column > func.now() - memory, value), else_=0)


async def block_login(tx: Session, email: str, duration: timedelta) -> None:
    await tx.execute(
        update(login_throttle)
        .where(login_throttle.c.email == email)
        .values(blocked_until=func.now() + duration)
    )


async def clear_login_failures(tx: Session, email: str) -> None:
    await tx.execute(delete(login_throttle).where(login_throttle.c.email == email))


# ------------------------------------------------------------------- organizations


async def insert_organization(
    tx: Session, *, org_id: str, name: str, slug: str, owner_id: str
) -> Organization | None:
    """The new organization, or None when the slug is taken."""
    stmt = (
        pg_insert(organizations)
        .values(id=org_id, name=name, slug=slug, owner_id=owner_id)
        .on_conflict_do_nothing(index_elements=[organizations.c.slug])
        .returning(*_ORG_COLUMNS)
    )
    return _org(await tx.fetchrow(stmt))


async def organization(s: Session, org_id: str, *, lock: bool = False) -> Organization | None:
    stmt = select(*_ORG_COLUMNS).where(organizations.c.id == org_id)
    if lock:
        stmt = stmt.with_for_update()
    return _org(await s.fetchrow(stmt))


async def organizations_of(
    s: Session, user_id: str, after: tuple[datetime, str] | None, limit: int
) -> list[Organization]:
    stmt = (
        select(*_ORG_COLUMNS)
        .join(members, members.c.organization_id == organizations.c.id)
        .where(members.c.user_id == user_id)
        .order_by(organizations.c.created_at, organizations.c.id)
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(tuple_(organizations.c.created_at, organizations.c.id) > tuple_(*after))
    return [o for o in map(_org, await s.fetch(stmt)) if o is not None]


class SlugTaken(Exception):
    pass


async def update_organization(
    tx: Session, org_id: str, changes: dict[str, str]
) -> Organization | None:
    try:
        row = await tx.fetchrow(
            update(organizations)
            .where(organizations.c.id == org_id)
            .values(**changes, updated_at=func.now())
            .returning(*_ORG_COLUMNS)
        )
    except asyncpg.UniqueViolationError:
        raise SlugTaken from None
    return _org(row)


async def delete_organization(tx: Session, org_id: str) -> None:
    await tx.execute(delete(organizations).where(organizations.c.id == org_id))


# ------------------------------------------------------------------------- members

# The Authorize hot path: compiled once, then plain asyncpg.
_ROLE_SQL, _ = compile_query(
    select(members.c.role).where(
        members.c.organization_id == bindparam("org", ""),
        members.c.user_id == bindparam("user", ""),
    )
)


async def member_role_now(db: Database, org_id: str, user_id: str) -> Role | None:
    """member_role outside any transaction, straight on the pool (Authorize's hot path)."""
    name = await db.pool.fetchval(_ROLE_SQL, org_id, user_id)
    return None if name is None else _ROLES[name]


_ROLES = {role.db_name: role for role in Role}


async def member_role(s: Session, org_id: str, user_id: str) -> Role | None:
    name = await s.fetchval(_ROLE_SQL, org_id, user_id)
    return None if name is None else Role.parse(name)


async def insert_member(tx: Session, org_id: str, user_id: str, role: Role) -> bool:
    stmt = (
        pg_insert(members)
        .values(organization_id=org_id, user_id=user_id, role=role.db_name)
        .on_conflict_do_nothing()
        .returning(members.c.user_id)
    )
    return await tx.fetchval(stmt) is not None


async def set_member_role(tx: Session, org_id: str, user_id: str, role: Role) -> None:
    await tx.execute(
        update(members)
        .where(members.c.organization_id == org_id, members.c.user_id == user_id)
        .values(role=role.db_name, updated_at=func.now())
    )


async def delete_member(tx: Session, org_id: str, user_id: str) -> None:
    await tx.execute(
        delete(members).where(members.c.organization_id == org_id, members.c.user_id == user_id)
    )


async def count_owners(tx: Session, org_id: str) -> int:
    stmt = select(func.count()).where(
        members.c.organization_id == org_id, members.c.role == Role.OWNER.db_name
    )
    return int(await tx.fetchval(stmt))


async def member(s: Session, org_id: str, user_id: str) -> Member | None:
    rows = await _members(s, org_id, and_(members.c.user_id == user_id), 1)
    return rows[0] if rows else None


async def list_members(s: Session, org_id: str, after: str | None, limit: int) -> list[Member]:
    where = members.c.user_id > after if after is not None else None
    return await _members(s, org_id, where, limit)


async def _members(s: Session, org_id: str, where: Any, limit: int) -> list[Member]:
    stmt = (
        select(members.c.user_id, users.c.email, members.c.role)
        .join(users, users.c.id == members.c.user_id)
        .where(members.c.organization_id == org_id)
        .order_by(members.c.user_id)
        .limit(limit)
    )
    if where is not None:
        stmt = stmt.where(where)
    return [Member(r["user_id"], r["email"], Role.parse(r["role"])) for r in await s.fetch(stmt)]


# ----------------------------------------------------------------------------- clean-up


async def delete_dead_refresh_families(s: Session, limit: int) -> int:
    """Delete up to `limit` refresh-token families whose newest token has expired: nothing
    in them can be used, and a replay of one of them can no longer lead anywhere, so reuse
    detection (which needs a live family) loses nothing. How many rows went."""
    result = await s.execute(
        """DELETE FROM identity.refresh_tokens
            WHERE family_id IN (SELECT family_id FROM identity.refresh_tokens
                                 GROUP BY family_id HAVING max(expires_at) < now()
                                 LIMIT $1)""",
        limit,
    )
    return int(result.split()[-1])


async def delete_stale_login_throttle(s: Session, memory: timedelta, limit: int) -> int:
    """Delete throttle rows that count nothing any more (failures older than `memory`, no
    block in force): a later failure starts from zero either way."""
    result = await s.execute(
        """DELETE FROM identity.login_throttle
            WHERE email IN (SELECT email FROM identity.login_throttle
                             WHERE last_failure_at < now() - $1::interval
                               AND (blocked_until IS NULL OR blocked_until < now())
                             LIMIT $2)""",
        memory,
        limit,
    )
    return int(result.split()[-1])
