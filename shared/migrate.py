"""Database migrations: bootstrap roles and schemas, then one Alembic history per service.

Layout (all under ``migrations/``):

- ``env.py``: the one Alembic environment shared by the four histories (async, asyncpg);
  the service it works on comes from ``Config.attributes["service"]`` (set here) or from
  ``service = ...`` in the ``alembic.ini`` section (the CLI).
- ``<service>/versions/``: that service's revisions; its version table is
  ``<service>.alembic_version``.

Who owns what: ``migrate`` first runs an idempotent bootstrap as the admin URL's user
(a superuser, or a role with CREATEROLE that owns the database): the NOLOGIN role
``hangar_migrator`` that owns every schema and object, one LOGIN role per service with
USAGE on its own schema only, and default privileges so that whatever the migrator creates
in a service's schema is readable and writable by that service (DML only: services own
nothing and cannot create anything). Each migration then runs as ``hangar_migrator``
(``SET ROLE``), one transaction per revision.

The functions here are synchronous (they run their own event loop); from async code, await
``migrate_async`` instead of calling ``migrate``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import asyncpg
from alembic import command, op
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from shared.settings import MIGRATOR_ROLE, SERVICES, role_name

__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "async_engine",
    "bootstrap",
    "current_revisions",
    "downgrade",
    "head_revisions",
    "migrate",
    "migrate_async",
    "outbox_ddl",
    "outbox_drop_ddl",
]


P = ParamSpec("P")
T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# One lock per database: two processes migrating the same database take turns.
_LOCK_KEY = "hangar.migrate"

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


def execute_all(statements: Iterable[str]) -> Callable[[], None]:
    """A migration's `upgrade` or `downgrade` that runs `statements` in order:
    `upgrade = execute_all(UPGRADE)`."""
    listed = list(statements)

    def step() -> None:
        for statement in listed:
            op.execute(statement)

    return step


def _ident(name: str) -> str:
    """Our role and schema names are fixed lower-case identifiers; refuse anything else."""
    if not _IDENT.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


# --------------------------------------------------------------------------- connections


def _asyncpg_dsn(url: str) -> str:
    """A libpq-style URL for asyncpg.connect: ``postgresql+asyncpg://`` loses its driver tag."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("the database URL must look like postgresql://user:pass@host/db")
    return f"{scheme.split('+', 1)[0]}://{rest}"


def async_engine(url: str) -> AsyncEngine:
    """A SQLAlchemy engine (postgresql+asyncpg) whose connections asyncpg opens from ``url``.

    asyncpg parses the URL itself, so everything libpq-style URLs can say works as asyncpg
    understands it: a unix socket as ``?host=/tmp/dir`` (pgserver), ``sslmode=``, an empty
    password, percent-encoded credentials. SQLAlchemy only supplies the dialect. No pool:
    migrations use one connection and close it.
    """
    dsn = _asyncpg_dsn(url)

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(dsn)

    return create_async_engine("postgresql+asyncpg://", async_creator=connect, poolclass=NullPool)


def alembic_config(service: str, connection: Connection | None = None) -> Config:
    """The Alembic Config of one service's history (no ini file needed)."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; expected one of {SERVICES}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option(
        "version_locations", str(MIGRATIONS_DIR / service / "versions").replace("%", "%%")
    )
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("service", service)
    cfg.attributes["service"] = service
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


# ----------------------------------------------------------------------------- bootstrap


def _bootstrap_statements() -> list[str]:
    """Idempotent DDL that must exist before any revision runs (roles are cluster-wide)."""
    migrator = _ident(MIGRATOR_ROLE)
    stmts: list[str] = []

    def create_role(name: str, options: str) -> None:
        # CREATE ROLE has no IF NOT EXISTS; a concurrent bootstrap on another database of
        # the same cluster may win the race, which is fine.
        stmts.append(
            f"""DO $$
            BEGIN
                IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{name}') THEN
                    CREATE ROLE {name} {options};
                END IF;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
            END $$"""
        )

    create_role(migrator, "NOLOGIN")
    for svc in SERVICES:
        create_role(_ident(role_name(svc)), "LOGIN")

    # The admin user must be able to SET ROLE hangar_migrator and use its privileges
    # (superusers always can). From PostgreSQL 16 a CREATEROLE user gets only ADMIN on the
    # roles it creates, without INHERIT or SET, so ask for both explicitly.
    stmts.append(
        f"""DO $$
        BEGIN
            IF current_setting('server_version_num')::int >= 160000 THEN
                IF NOT (pg_catalog.pg_has_role(current_user, '{migrator}', 'USAGE')
                        AND pg_catalog.pg_has_role(current_user, '{migrator}', 'SET')) THEN
                    EXECUTE format('GRANT {migrator} TO %I WITH INHERIT TRUE, SET TRUE',
                                   current_user);
                END IF;
            ELSIF NOT pg_catalog.pg_has_role(current_user, '{migrator}', 'USAGE') THEN
                EXECUTE format('GRANT {migrator} TO %I', current_user);
            END IF;
        END $$"""
    )

    # Before PostgreSQL 15 every role may CREATE in schema public; nobody needs to here.
    stmts.append(
        """DO $$
        BEGIN
            IF EXISTS (
                SELECT FROM pg_catalog.pg_namespace n, aclexplode(n.nspacl) a
                WHERE n.nspname = 'public' AND a.grantee = 0 AND a.privilege_type = 'CREATE'
            ) THEN
                REVOKE CREATE ON SCHEMA public FROM PUBLIC;
            END IF;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'cannot revoke CREATE on schema public from PUBLIC: not its owner';
        END $$"""
    )

    # Functions are executable by PUBLIC unless revoked; ours are granted per service below.
    stmts.append(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {migrator} REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC"
    )

    for svc in SERVICES:
        schema, role = _ident(svc), _ident(role_name(svc))
        prefix = f"ALTER DEFAULT PRIVILEGES FOR ROLE {migrator} IN SCHEMA {schema} GRANT"
        stmts += [
            f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {migrator}",
            f"REVOKE CREATE ON SCHEMA {schema} FROM {role}",
            f"GRANT USAGE ON SCHEMA {schema} TO {role}",
            f"{prefix} SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}",
            f"{prefix} USAGE, SELECT ON SEQUENCES TO {role}",
            f"{prefix} EXECUTE ON FUNCTIONS TO {role}",
        ]
    return stmts


def _bootstrap_sync(conn: Connection, passwords: Mapping[str, str]) -> None:
    for stmt in _bootstrap_statements():
        conn.exec_driver_sql(stmt)
    for svc, password in passwords.items():
        if svc not in SERVICES:
            raise ValueError(f"password given for unknown service {svc!r}")
        if not password:
            continue  # unset in the environment: leave the role's password as it is
        # Utility statements take no bind parameters: let the server quote the literal.
        stmt = conn.execute(
            text("SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', :role ::text, :pw ::text)"),
            {"role": role_name(svc), "pw": password},
        ).scalar_one()
        conn.exec_driver_sql(stmt)
    conn.commit()


def _lock(conn: Connection) -> None:
    """A session-level advisory lock: released when the connection closes, even on error."""
    conn.execute(text("SELECT pg_advisory_lock(hashtext(:k))"), {"k": _LOCK_KEY})
    conn.commit()


async def _with_connection(
    admin_url: str, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kw: P.kwargs
) -> T:
    """Run ``fn(sync_connection, ...)`` on one fresh connection, then close it."""
    engine = async_engine(admin_url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn, *args, **kw)
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------------ commands


def _bootstrap_locked(conn: Connection, passwords: Mapping[str, str]) -> None:
    _lock(conn)
    _bootstrap_sync(conn, passwords)


def _migrate_sync(conn: Connection, passwords: Mapping[str, str]) -> None:
    _lock(conn)
    _bootstrap_sync(conn, passwords)
    for svc in SERVICES:
        command.upgrade(alembic_config(svc, conn), "head")


def _downgrade_sync(conn: Connection, revision: str) -> None:
    _lock(conn)
    for svc in reversed(SERVICES):
        command.downgrade(alembic_config(svc, conn), revision)


def _current_sync(conn: Connection) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for svc in SERVICES:
        ctx = MigrationContext.configure(conn, opts={"version_table_schema": svc})
        heads = ctx.get_current_heads()
        out[svc] = heads[0] if heads else None
    conn.rollback()
    return out


async def migrate_async(admin_url: str, passwords: Mapping[str, str] | None = None) -> None:
    """``migrate`` for callers already inside an event loop."""
    await _with_connection(admin_url, _migrate_sync, dict(passwords or {}))


def migrate(admin_url: str, passwords: Mapping[str, str] | None = None) -> None:
    """Bootstrap roles and schemas, then upgrade every service's schema to head.

    ``passwords`` maps a service name to its login role's password; a role whose password is
    missing or empty keeps the one it has. Safe to run repeatedly and from several processes.
    """
    asyncio.run(migrate_async(admin_url, passwords))


def bootstrap(admin_url: str, passwords: Mapping[str, str] | None = None) -> None:
    """Only the bootstrap part of ``migrate`` (roles, schemas, grants): for the Alembic CLI."""
    asyncio.run(_with_connection(admin_url, _bootstrap_locked, dict(passwords or {})))


def downgrade(admin_url: str, revision: str = "base") -> None:
    """Downgrade every service (in reverse order) to ``revision``: "base" or relative ("-1").

    Roles and schemas stay (they belong to the bootstrap); so do the empty version tables.
    """
    asyncio.run(_with_connection(admin_url, _downgrade_sync, revision))


def current_revisions(admin_url: str) -> dict[str, str | None]:
    """Each service's revision in the database (None: not migrated, or at base)."""
    return asyncio.run(_with_connection(admin_url, _current_sync))


def head_revisions() -> dict[str, str]:
    """Each service's newest revision in the code."""
    heads: dict[str, str] = {}
    for svc in SERVICES:
        head = ScriptDirectory.from_config(alembic_config(svc)).get_current_head()
        assert head is not None, f"{svc} has no revisions"
        heads[svc] = head
    return heads


# ------------------------------------------------------------ DDL shared by the revisions
#
# Revision scripts call these. They are part of migration history: never change what they
# emit for an existing revision; write a new revision (with new DDL) instead.


def outbox_ddl(schema: str) -> list[str]:
    """The transactional outbox and the consumer-cursor table of one service schema.

    Consumers read ``ORDER BY txid, position`` and only rows with
    ``txid < pg_snapshot_xmin(pg_current_snapshot())``: every transaction that could still
    commit an earlier row is then finished, so a late-committing writer is never skipped.
    An insert notifies channel ``<schema>_outbox`` (once per statement; payload empty).
    """
    s = _ident(schema)
    return [
        f"""CREATE TABLE {s}.outbox (
            position        bigserial NOT NULL,
            id              text NOT NULL,
            txid            xid8 NOT NULL DEFAULT pg_current_xact_id(),
            type            text NOT NULL,
            organization_id text,
            aggregate_id    text,
            payload         jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            occurred_at     timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_outbox PRIMARY KEY (txid, position),
            CONSTRAINT uq_outbox_id UNIQUE (id)
        )""",
        f"""CREATE FUNCTION {s}.outbox_notify() RETURNS trigger
            LANGUAGE plpgsql SET search_path = pg_catalog AS $$
        BEGIN
            PERFORM pg_notify('{s}_outbox', '');
            RETURN NULL;
        END $$""",
        f"""CREATE TRIGGER trg_outbox_notify AFTER INSERT ON {s}.outbox
            FOR EACH STATEMENT EXECUTE FUNCTION {s}.outbox_notify()""",
        f"""CREATE TABLE {s}.event_cursors (
            consumer   text NOT NULL,
            source     text NOT NULL,
            cursor     text NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_event_cursors PRIMARY KEY (consumer, source)
        )""",
    ]


def outbox_notify_ddl(schema: str) -> list[str]:
    """The per-statement NOTIFY trigger of outbox_ddl (what outbox_notify_drop_ddl removes)."""
    return outbox_ddl(schema)[1:3]


def outbox_notify_drop_ddl(schema: str) -> list[str]:
    """Drop the outbox's NOTIFY trigger: a NOTIFY in the writer's transaction serialises the
    commits of every notifying transaction; the writing process notifies after commit
    instead (shared.outbox.OutboxFeed.poke)."""
    s = _ident(schema)
    return [
        f"DROP TRIGGER trg_outbox_notify ON {s}.outbox",
        f"DROP FUNCTION {s}.outbox_notify()",
    ]


def outbox_drop_ddl(schema: str) -> list[str]:
    s = _ident(schema)
    return [
        f"DROP TABLE {s}.event_cursors",
        f"DROP TABLE {s}.outbox",
        f"DROP FUNCTION {s}.outbox_notify()",
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m shared.migrate [upgrade | downgrade [REV] | current]`` with DATABASE_URL."""
    import sys

    from shared.settings import Settings

    args = sys.argv[1:] if argv is None else argv
    settings = Settings.from_env("migrate")
    if not settings.database_url:
        print("DATABASE_URL is not set", file=sys.stderr)
        return 2
    cmd = args[0] if args else "upgrade"
    if cmd == "upgrade":
        migrate(settings.database_url, settings.db_passwords)
    elif cmd == "downgrade":
        downgrade(settings.database_url, args[1] if len(args) > 1 else "base")
    elif cmd == "current":
        for svc, rev in current_revisions(settings.database_url).items():
            print(f"{svc}: {rev or '(base)'}")
    else:
        print(f"unknown command {cmd!r}: upgrade | downgrade [REV] | current", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
