"""The database schema, read back from PostgreSQL's catalog (never from our own code).

- every seed table, index and unique constraint, in the owning service's schema;
- each service role: its own schema only, owns nothing, creates nothing;
- audit_logs refuses UPDATE, DELETE and TRUNCATE, whoever asks;
- logs and metrics are partitioned by day, ahead, and roll;
- the plans are seeded;
- migrations go down to base and up to head, twice, and end where they started.

Read-only checks use the session's migrated ``database_url``; anything that writes uses a
database of this module's own (``scratch_url``), so no other test sees these rows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NamedTuple

import asyncpg
import pytest

from shared.migrate import current_revisions, downgrade, head_revisions, migrate
from shared.settings import MIGRATOR_ROLE, SERVICES, role_name, url_with_credentials

ROOT = Path(__file__).resolve().parents[2]
ROLES = [role_name(svc) for svc in SERVICES]

TABLES: dict[str, set[str]] = {
    "identity": {
        "users",
        "organizations",
        "organization_members",
        "audit_logs",
        "refresh_tokens",
        "api_tokens",
        "login_throttle",
        "outbox",
        "event_cursors",
        "access_listeners",
    },
    "project": {
        "projects",
        "project_secrets",
        "organization_slugs",
        "domains",
        "domain_certificates",
        "outbox",
        "event_cursors",
    },
    "runtime": {
        "servers",
        "deployments",
        "containers",
        "logs",
        "metrics",
        "usage_windows",
        "usage_reports",
        "sources",
        "project_routes",
        "agent_join_tokens",
        "agent_certificates",
        "outbox",
        "event_cursors",
    },
    "billing": {
        "plans",
        "subscriptions",
        "allocations",
        "usage_records",
        "invoices",
        "webhook_events",
        "outbox",
        "event_cursors",
    },
}


class Index(NamedTuple):
    schema: str
    table: str
    name: str
    columns: tuple[str, ...]
    kind: str  # "index" | "unique" (a UNIQUE or PRIMARY KEY constraint) | "partial unique"


def ix(schema: str, table: str, *columns: str) -> Index:
    return Index(schema, table, f"ix_{table}_{'_'.join(columns)}", columns, "index")


def uq(schema: str, table: str, *columns: str) -> Index:
    return Index(schema, table, f"uq_{table}_{'_'.join(columns)}", columns, "unique")


# Every index and unique constraint the schemas must have: the tables' keys and lookups (first
# block), then those particular flows rely on (each table's role: docs/services/*.md).
INDEXES: list[Index] = [
    uq("identity", "users", "email"),
    uq("identity", "users", "oauth_provider", "oauth_subject"),
    uq("identity", "organizations", "slug"),
    ix("identity", "organizations", "owner_id"),
    uq("identity", "organization_members", "organization_id", "user_id"),
    uq("project", "projects", "organization_id", "slug"),
    ix("project", "projects", "organization_id", "created_at"),
    ix("project", "projects", "organization_id", "sleep_enabled"),
    ix("runtime", "servers", "status", "region"),
    ix("runtime", "deployments", "project_id", "created_at"),
    ix("runtime", "deployments", "server_id", "status"),
    ix("runtime", "deployments", "status", "created_at"),
    ix("runtime", "containers", "project_id", "status"),
    ix("runtime", "containers", "server_id", "status"),
    ix("runtime", "containers", "sleep_status", "last_request_at"),
    ix("runtime", "containers", "deployment_id", "process_type", "created_at"),
    ix("runtime", "sources", "project_id", "created_at"),
    ix("billing", "subscriptions", "organization_id", "status"),
    ix("billing", "subscriptions", "current_period_end"),
    ix("billing", "usage_records", "organization_id", "recorded_at"),
    ix("billing", "usage_records", "subscription_id", "metric_type", "recorded_at"),
    ix("billing", "invoices", "subscription_id", "created_at"),
    ix("billing", "invoices", "status", "due_at"),
    uq("project", "project_secrets", "project_id", "name"),
    uq("billing", "webhook_events", "provider", "provider_event_id"),
    # the flows' own
    uq("identity", "audit_logs", "event_id"),
    uq("identity", "audit_logs", "organization_id", "seq"),
    ix("identity", "audit_logs", "organization_id", "occurred_at"),
    ix("identity", "organization_members", "user_id"),
    uq("identity", "refresh_tokens", "token_hash"),
    ix("identity", "access_listeners", "lease_until"),
    ix("identity", "refresh_tokens", "family_id"),
    uq("runtime", "servers", "name"),
    Index(
        "runtime",
        "deployments",
        "uq_deployments_project_id_running",
        ("project_id", "replica_index"),
        "partial unique",
    ),
    ix("runtime", "deployments", "replica_set_id", "replica_index"),
    ix("runtime", "agent_join_tokens", "server_id"),
    ix("runtime", "logs", "project_id", "emitted_at"),
    ix("runtime", "metrics", "project_id", "metric", "sampled_at"),
    ix("runtime", "metrics", "server_id", "metric", "sampled_at"),
    Index(
        "billing",
        "subscriptions",
        "uq_subscriptions_organization_id_live",
        ("organization_id",),
        "partial unique",
    ),
    uq("billing", "subscriptions", "stripe_subscription_id"),
    uq("billing", "invoices", "stripe_invoice_id"),
    uq("billing", "invoices", "subscription_id", "period_start"),
    uq("billing", "usage_records", "organization_id", "idempotency_key"),
    *(uq(svc, "outbox", "id") for svc in SERVICES),
    *(Index(svc, "outbox", "pk_outbox", ("txid", "position"), "unique") for svc in SERVICES),
    *(
        Index(svc, "event_cursors", "pk_event_cursors", ("consumer", "source"), "unique")
        for svc in SERVICES
    ),
]

# Columns the flows depend on, with their types.
COLUMNS: dict[tuple[str, str], dict[str, str]] = {
    ("identity", "users"): {
        "password_hash": "text",
        "email_verified": "boolean",
        "is_platform_admin": "boolean",
    },
    ("identity", "organization_members"): {"role": "text"},
    ("identity", "audit_logs"): {"metadata": "jsonb", "seq": "bigint", "prev_hash": "text"},
    ("project", "projects"): {
        "ram_mb": "integer",
        "cpu_millis": "integer",
        "bandwidth_gb": "integer",
        "sleep_enabled": "boolean",
        "data_key_wrapped": "bytea",
        "data_key_id": "text",
    },
    ("project", "project_secrets"): {
        "ciphertext": "bytea",
        "nonce": "bytea",
        "key_version": "integer",
        "version": "integer",
    },
    ("runtime", "servers"): {
        "ram_mb": "integer",
        "cpu_millis": "integer",
        "ram_mb_reserved": "integer",
        "cpu_millis_reserved": "integer",
        "drivers": "text[]",
        "isolation": "text",
        "tenant_organization_id": "text",
    },
    ("runtime", "deployments"): {"capacity_reserved": "boolean", "exit_code": "integer"},
    ("runtime", "logs"): {"sequence": "bigint", "line": "text"},
    ("runtime", "metrics"): {"value": "double precision"},
    ("billing", "plans"): {
        "included_ram_mb_seconds": "bigint",
        "included_cpu_millis_seconds": "bigint",
        "included_bandwidth_bytes": "bigint",
        "overage_cents_per_ram_mb_second": "numeric",
        "overage_cents_per_cpu_millis_second": "numeric",
        "overage_cents_per_bandwidth_byte": "numeric",
    },
    ("billing", "subscriptions"): {
        "pool_ram_mb": "integer",
        "allocated_ram_mb": "integer",
        "stripe_customer_id": "text",
        "stripe_subscription_id": "text",
    },
    ("billing", "usage_records"): {"quantity": "bigint"},
    ("billing", "invoices"): {"total_cents": "bigint", "lines": "jsonb", "sent": "boolean"},
    ("billing", "webhook_events"): {"payload": "jsonb"},
    **{(svc, "outbox"): {"txid": "xid8", "position": "bigint"} for svc in SERVICES},
}


# ------------------------------------------------------------------------------ helpers


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


def as_service(url: str, passwords: dict[str, str], svc: str) -> str:
    return url_with_credentials(url, role_name(svc), passwords[svc])


async def utc_today(conn: asyncpg.Connection) -> dt.date:
    return await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")


async def partitions(conn: asyncpg.Connection, table: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = $1::regclass",
        f"runtime.{table}",
    )
    return {r["relname"] for r in rows}


CATALOG_SQL = """
WITH ns AS (SELECT oid, nspname FROM pg_namespace WHERE nspname = ANY($1::text[]))
SELECT format('rel %s.%s kind=%s owner=%s acl=%s bound=%s', ns.nspname, c.relname, c.relkind,
              pg_get_userbyid(c.relowner), c.relacl, pg_get_expr(c.relpartbound, c.oid))
  FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
UNION ALL
SELECT format('col %s.%s.%s %s notnull=%s default=%s', ns.nspname, c.relname, a.attname,
              format_type(a.atttypid, a.atttypmod), a.attnotnull,
              pg_get_expr(d.adbin, d.adrelid))
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN ns ON ns.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'idx ' || pg_get_indexdef(i.indexrelid)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN ns ON ns.oid = c.relnamespace
UNION ALL
SELECT format('con %s.%s %s', ns.nspname, co.conname, pg_get_constraintdef(co.oid))
  FROM pg_constraint co JOIN ns ON ns.oid = co.connamespace
UNION ALL
SELECT 'trg ' || pg_get_triggerdef(t.oid)
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN ns ON ns.oid = c.relnamespace
 WHERE NOT t.tgisinternal
UNION ALL
SELECT format('fn %s owner=%s acl=%s %s', p.oid::regprocedure, pg_get_userbyid(p.proowner),
              p.proacl, pg_get_functiondef(p.oid))
  FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace
UNION ALL
SELECT format('schema %s owner=%s acl=%s', ns.nspname, pg_get_userbyid(n.nspowner), n.nspacl)
  FROM ns JOIN pg_namespace n ON n.oid = ns.oid
UNION ALL
SELECT format('defacl %s %s %s %s', pg_get_userbyid(da.defaclrole), ns.nspname,
              da.defaclobjtype, da.defaclacl)
  FROM pg_default_acl da LEFT JOIN ns ON ns.oid = da.defaclnamespace
"""


async def catalog(url: str) -> list[str]:
    """Every object of the service schemas, with owner and grants, as sorted text."""
    async with connect(url) as conn:
        rows = await conn.fetch(CATALOG_SQL, list(SERVICES))
    return sorted(r[0] for r in rows)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scratch_url(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    """A migrated database that only this module writes to."""
    url = create_database("hangar_schema")
    migrate(url, db_passwords)
    return url


# -------------------------------------------------------------------- tables and indexes


async def test_every_table_is_in_its_service_schema(database_url: str) -> None:
    async with connect(database_url) as conn:
        rows = await conn.fetch(
            "SELECT n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
            " AND n.nspname = ANY($1::text[])",
            list(SERVICES),
        )
        public = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
    found: dict[str, set[str]] = {svc: set() for svc in SERVICES}
    for r in rows:
        found[r["nspname"]].add(r["relname"])
    for svc in SERVICES:
        assert found[svc] - {"alembic_version"} == TABLES[svc], svc
    assert public == 0


async def test_every_seed_index_and_unique_constraint_exists(database_url: str) -> None:
    async with connect(database_url) as conn:
        rows = await conn.fetch(
            """
            SELECT n.nspname AS schema, t.relname AS table, c.relname AS name,
                   i.indisunique AS is_unique, i.indpred IS NOT NULL AS partial,
                   co.contype::text AS contype, t.relispartition AS on_partition,
                   array(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o)
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                         ORDER BY k.o)::text[] AS columns
            FROM pg_index i
            JOIN pg_class c ON c.oid = i.indexrelid
            JOIN pg_class t ON t.oid = i.indrelid
            JOIN pg_namespace n ON n.oid = t.relnamespace
            LEFT JOIN pg_constraint co ON co.conindid = i.indexrelid AND co.contype IN ('u', 'p')
            WHERE n.nspname = ANY($1::text[])
            """,
            list(SERVICES),
        )
    by_name = {(r["schema"], r["name"]): r for r in rows}
    missing = []
    for want in INDEXES:
        row = by_name.get((want.schema, want.name))
        if row is None:
            missing.append(want)
            continue
        assert row["table"] == want.table, want
        assert tuple(row["columns"]) == want.columns, want
        if want.kind == "index":
            assert not row["is_unique"] and not row["partial"], want
        elif want.kind == "unique":
            assert row["is_unique"] and not row["partial"] and row["contype"] in ("u", "p"), want
        else:
            assert row["is_unique"] and row["partial"], want
    assert not missing, missing
    # Every index is named by us (partitions' copies and primary keys aside).
    unnamed = [
        key
        for key, r in by_name.items()
        if not r["on_partition"]
        and not key[1].startswith(("ix_", "uq_", "pk_"))
        and key[1] not in (f"{r['table']}_pkey", "alembic_version_pkc")
    ]
    assert not unnamed, unnamed


async def test_columns_and_types(database_url: str) -> None:
    async with connect(database_url) as conn:
        rows = await conn.fetch(
            """
            SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod) AS type
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p')
              AND NOT c.relispartition AND c.relname <> 'alembic_version'
              AND a.attnum > 0 AND NOT a.attisdropped
            """,
            list(SERVICES),
        )
        enums = await conn.fetchval(
            "SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
            " WHERE t.typtype = 'e' AND n.nspname = ANY($1::text[])",
            list(SERVICES),
        )
    types = {(r["nspname"], r["relname"], r["attname"]): r["type"] for r in rows}
    for (schema, table), columns in COLUMNS.items():
        for column, type_ in columns.items():
            assert types.get((schema, table, column)) == type_, (schema, table, column)
    for (schema, table, column), type_ in types.items():
        if column.endswith("_at"):  # every timestamp is timestamptz
            assert type_ == "timestamp with time zone", (schema, table, column)
        if column == "id" or column.endswith("_id"):  # cuid2 ids (and Stripe's) are text
            assert type_ == "text", (schema, table, column)
    assert enums == 0  # states are text with CHECK constraints


# ------------------------------------------------------------------------ roles and rights


@pytest.mark.parametrize("svc", SERVICES)
async def test_service_role_reads_its_own_schema_only(
    database_url: str, db_passwords: dict[str, str], svc: str
) -> None:
    async with connect(as_service(database_url, db_passwords, svc)) as conn:
        assert await conn.fetchval("SELECT current_user") == role_name(svc)
        for table in sorted(TABLES[svc]):
            await conn.fetch(f"SELECT * FROM {svc}.{table} LIMIT 1")
        for other in SERVICES:
            if other == svc:
                continue
            for table in sorted(TABLES[other]):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetch(f"SELECT * FROM {other}.{table} LIMIT 1")


async def test_service_roles_own_nothing_and_create_nothing(database_url: str) -> None:
    async with connect(database_url) as conn:
        owned = await conn.fetch(
            """
            SELECT 'relation ' || c.oid::regclass::text FROM pg_class c
             WHERE pg_get_userbyid(c.relowner) = ANY($1::text[])
            UNION ALL SELECT 'schema ' || nspname FROM pg_namespace
             WHERE pg_get_userbyid(nspowner) = ANY($1::text[])
            UNION ALL SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p
             WHERE pg_get_userbyid(p.proowner) = ANY($1::text[])
            UNION ALL SELECT 'type ' || t.oid::regtype::text FROM pg_type t
             WHERE pg_get_userbyid(t.typowner) = ANY($1::text[])
            UNION ALL SELECT 'database ' || datname FROM pg_database
             WHERE pg_get_userbyid(datdba) = ANY($1::text[])
            """,
            ROLES,
        )
        assert owned == []
        can_create = await conn.fetch(
            "SELECT r.rolname, n.nspname FROM pg_roles r CROSS JOIN pg_namespace n"
            " WHERE r.rolname = ANY($1::text[])"
            " AND (has_schema_privilege(r.oid, n.oid, 'CREATE')"
            "      OR has_database_privilege(r.oid, current_database(), 'CREATE'))",
            ROLES,
        )
        assert can_create == []
        powerful = await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])"
            " AND (rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls OR rolreplication"
            "      OR NOT rolcanlogin)",
            ROLES,
        )
        assert powerful == []
        usage = await conn.fetch(
            "SELECT r.rolname, n.nspname FROM pg_roles r CROSS JOIN pg_namespace n"
            " WHERE r.rolname = ANY($1::text[]) AND n.nspname = ANY($2::text[])"
            " AND has_schema_privilege(r.oid, n.oid, 'USAGE')",
            ROLES,
            list(SERVICES),
        )
        assert sorted((r["rolname"], r["nspname"]) for r in usage) == sorted(
            (role_name(svc), svc) for svc in SERVICES
        )
        # the migrator owns every object of the service schemas
        foreign = await conn.fetch(
            "SELECT c.oid::regclass::text FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = ANY($1::text[]) AND pg_get_userbyid(c.relowner) <> $2"
            " UNION ALL SELECT nspname FROM pg_namespace"
            " WHERE nspname = ANY($1::text[]) AND pg_get_userbyid(nspowner) <> $2",
            list(SERVICES),
            MIGRATOR_ROLE,
        )
        assert foreign == []


@pytest.mark.parametrize("svc", SERVICES)
async def test_service_role_cannot_alter_its_version_table(
    database_url: str, db_passwords: dict[str, str], svc: str
) -> None:
    async with connect(as_service(database_url, db_passwords, svc)) as conn:
        assert await conn.fetchval(f"SELECT version_num FROM {svc}.alembic_version") is not None
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"DELETE FROM {svc}.alembic_version")


# ----------------------------------------------------------------------------- audit_logs

INSERT_AUDIT = """
INSERT INTO identity.audit_logs
    (id, event_id, organization_id, seq, service, actor_id, actor_type, action,
     occurred_at, hash)
VALUES ($1, $1, 'org_audit', $2, 'identity', 'usr_1', 'user', 'member.added', now(), 'h')
"""

REFUSED = [
    "UPDATE identity.audit_logs SET action = 'forged'",
    "DELETE FROM identity.audit_logs",
    "TRUNCATE identity.audit_logs",
]


async def test_audit_logs_refuse_update_delete_truncate(
    scratch_url: str, db_passwords: dict[str, str]
) -> None:
    async with connect(as_service(scratch_url, db_passwords, "identity")) as conn:
        await conn.execute(INSERT_AUDIT, "aud_1", 1)
        assert await conn.fetchval("SELECT count(*) FROM identity.audit_logs") == 1
    for svc in SERVICES:
        async with connect(as_service(scratch_url, db_passwords, svc)) as conn:
            for sql in REFUSED:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
    # The owner (and a superuser) holds every privilege: the triggers refuse them too.
    async with connect(scratch_url) as conn:
        for role in (MIGRATOR_ROLE, None):
            await conn.execute(f"SET ROLE {role}" if role else "RESET ROLE")
            for sql in REFUSED:
                with pytest.raises(asyncpg.PostgresError, match="append-only"):
                    await conn.execute(sql)
        await conn.execute("RESET ROLE")
        row = await conn.fetchrow(
            "SELECT count(*) AS n, min(action) AS action FROM identity.audit_logs"
        )
        assert (row["n"], row["action"]) == (1, "member.added")


# ------------------------------------------------------------------------------ partitions


async def test_logs_and_metrics_are_partitioned_by_day_ahead(database_url: str) -> None:
    async with connect(database_url) as conn:
        today = await utc_today(conn)
        for table, key in (("logs", "emitted_at"), ("metrics", "sampled_at")):
            row = await conn.fetchrow(
                "SELECT p.partstrat::text, a.attname FROM pg_partitioned_table p"
                " JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]"
                " WHERE p.partrelid = $1::regclass",
                f"runtime.{table}",
            )
            assert (row["partstrat"], row["attname"]) == ("r", key)
            wanted = {f"{table}_p{today + dt.timedelta(days=d):%Y%m%d}" for d in range(-1, 8)}
            assert wanted <= await partitions(conn, table)
            default = await conn.fetchval(
                "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = $1::regclass"
                " AND partdefid <> 0",
                f"runtime.{table}",
            )
            assert default == 0


async def test_partitions_roll(scratch_url: str, db_passwords: dict[str, str]) -> None:
    async with connect(as_service(scratch_url, db_passwords, "runtime")) as conn:
        today = await utc_today(conn)
        day = lambda d: f"{today + dt.timedelta(days=d):%Y%m%d}"  # noqa: E731
        before = {t: await partitions(conn, t) for t in ("logs", "metrics")}

        # idempotent: nothing new for the same horizon
        assert await conn.fetch("SELECT * FROM runtime.ensure_partitions(7)") == []
        assert {t: await partitions(conn, t) for t in before} == before

        # a row lands in today's partition; one outside every partition is refused
        await conn.execute(
            "INSERT INTO runtime.logs (project_id, deployment_id, container_id, stream, line,"
            " emitted_at, sequence) VALUES ('prj', 'dep', 'ctr', 'stdout', 'hello', now(), 1)"
        )
        where = await conn.fetchval("SELECT tableoid::regclass::text FROM runtime.logs")
        assert where == f"runtime.logs_p{day(0)}"
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO runtime.metrics (server_id, metric, value, sampled_at)"
                " VALUES ('srv', 'cpu', 1, now() - interval '400 days')"
            )

        # further ahead: only the new days
        created = [r[0] for r in await conn.fetch("SELECT * FROM runtime.ensure_partitions(9)")]
        assert sorted(created) == sorted(f"{t}_p{day(d)}" for t in before for d in (8, 9))

        # the service cannot drop a partition itself (it owns none) ...
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"DROP TABLE runtime.logs_p{day(-1)}")
        # ... but retention does it through the function
        dropped = [
            r[0]
            for r in await conn.fetch("SELECT * FROM runtime.drop_partitions_before($1)", today)
        ]
        assert dropped == [f"logs_p{day(-1)}", f"metrics_p{day(-1)}"]
        assert f"logs_p{day(-1)}" not in await partitions(conn, "logs")
        assert await conn.fetchval("SELECT count(*) FROM runtime.logs") == 1  # today's kept
        # and ensure_partitions brings yesterday back
        again = [r[0] for r in await conn.fetch("SELECT * FROM runtime.ensure_partitions(7)")]
        assert sorted(again) == dropped


async def test_other_services_cannot_roll_partitions(
    scratch_url: str, db_passwords: dict[str, str]
) -> None:
    async with connect(as_service(scratch_url, db_passwords, "billing")) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM runtime.drop_partitions_before(current_date)")


# ---------------------------------------------------------------------- outbox and checks


@pytest.mark.parametrize("svc", SERVICES)
async def test_outbox_insert_is_readable_in_order_and_notifies_no_one_in_its_transaction(
    scratch_url: str, db_passwords: dict[str, str], svc: str
) -> None:
    """A NOTIFY inside the writer's transaction would serialise every event-writing commit
    (migration 000x_outbox_notify_after_commit): the writer's process notifies after commit."""
    async with connect(as_service(scratch_url, db_passwords, svc)) as conn:
        heard: asyncio.Queue[str] = asyncio.Queue()
        for channel in (f"{svc}_outbox", "test_sentinel"):
            await conn.add_listener(channel, lambda *args: heard.put_nowait(args[2]))
        async with conn.transaction():
            await conn.execute(
                f"INSERT INTO {svc}.outbox (id, type, payload) VALUES"
                " ('evt_1', 'thing.happened', '{}'), ('evt_2', 'thing.happened', '{}')"
            )
        await conn.execute("NOTIFY test_sentinel")  # delivered after anything before it
        assert await asyncio.wait_for(heard.get(), timeout=5) == "test_sentinel"
        rows = await conn.fetch(
            f"SELECT id FROM {svc}.outbox"
            " WHERE txid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY txid, position"
        )
        assert [r["id"] for r in rows] == ["evt_1", "evt_2"]
        await conn.execute(
            f"INSERT INTO {svc}.event_cursors (consumer, source, cursor) VALUES ('me', 'x', '1')"
            " ON CONFLICT (consumer, source) DO UPDATE SET cursor = excluded.cursor"
        )


BAD_ROWS = [
    (
        "runtime",
        "INSERT INTO runtime.servers (id, name, region, agent_address, ram_mb, cpu_millis,"
        " ram_mb_reserved) VALUES ('s1', 's1', 'local', 'x', 100, 100, 101)",
    ),
    (
        "runtime",
        "INSERT INTO runtime.servers (id, name, region, agent_address, ram_mb, cpu_millis,"
        " isolation) VALUES ('s1', 's1', 'local', 'x', 100, 100, 'vm')",
    ),
    (
        "runtime",
        "INSERT INTO runtime.deployments (id, project_id, organization_id, command, ram_mb,"
        " cpu_millis, region, capacity_reserved, replica_set_id)"
        " VALUES ('d1', 'p', 'o', 'x', 1, 1, 'r', true, 'd1')",
    ),
    (
        "runtime",
        "INSERT INTO runtime.deployments (id, project_id, organization_id, command, ram_mb,"
        " cpu_millis, region, status, replica_set_id)"
        " VALUES ('d1', 'p', 'o', 'x', 1, 1, 'r', 'exploded', 'd1')",
    ),
    (
        "runtime",
        "INSERT INTO runtime.deployments (id, project_id, organization_id, command, ram_mb,"
        " cpu_millis, region, replica_set_id, replica_index, replicas)"
        " VALUES ('d1', 'p', 'o', 'x', 1, 1, 'r', 'd1', 2, 2)",
    ),
    (
        "project",
        "INSERT INTO project.projects (id, organization_id, name, slug, ram_mb, cpu_millis,"
        " bandwidth_gb, region) VALUES ('p1', 'o', 'n', 'Not A Slug', 1, 1, 1, 'r')",
    ),
    (
        "billing",
        "INSERT INTO billing.subscriptions (id, organization_id, plan_id, status,"
        " current_period_start, current_period_end, pool_ram_mb, pool_cpu_millis,"
        " pool_bandwidth_gb, allocated_ram_mb) VALUES ('s1', 'o', 'hobby', 'active',"
        " now(), now() + interval '30 days', 100, 100, 1, 101)",
    ),
    (
        "billing",
        "INSERT INTO billing.webhook_events (id, provider_event_id, type, payload, status)"
        " VALUES ('w1', 'evt', 't', '{}', 'maybe')",
    ),
    (
        "identity",
        "INSERT INTO identity.users (id, email) VALUES ('u1', 'Mixed@Case.example')",
    ),
]


@pytest.mark.parametrize(("svc", "sql"), BAD_ROWS)
async def test_check_constraints_refuse_bad_rows(
    scratch_url: str, db_passwords: dict[str, str], svc: str, sql: str
) -> None:
    async with connect(as_service(scratch_url, db_passwords, svc)) as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(sql)


async def test_project_secret_nonce_is_96_bits(
    scratch_url: str, db_passwords: dict[str, str]
) -> None:
    async with connect(as_service(scratch_url, db_passwords, "project")) as conn:
        await conn.execute(
            "INSERT INTO project.projects (id, organization_id, name, slug, ram_mb, cpu_millis,"
            " bandwidth_gb, region) VALUES ('p_nonce', 'o', 'n', 'nonce', 1, 1, 1, 'r')"
        )
        insert = (
            "INSERT INTO project.project_secrets (id, project_id, name, ciphertext, nonce,"
            " key_version) VALUES ($1, 'p_nonce', $2, $3, $4, 1)"
        )
        await conn.execute(insert, "sec_1", "DATABASE_URL", b"c" * 32, b"n" * 12)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(insert, "sec_2", "OTHER", b"c" * 32, b"n" * 11)
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(insert, "sec_3", "DATABASE_URL", b"c" * 32, b"n" * 12)


# ----------------------------------------------------------------------------------- plans


async def test_three_plans_are_seeded(database_url: str) -> None:
    async with connect(database_url) as conn:
        plans = await conn.fetch("SELECT * FROM billing.plans ORDER BY sort_order")
    assert [p["id"] for p in plans] == ["hobby", "pro", "team"]
    assert plans[0]["price_cents"] == 0
    assert 0 < plans[1]["price_cents"] < plans[2]["price_cents"]
    for resource in ("ram_mb", "cpu_millis", "bandwidth_gb"):
        pools = [p[f"pool_{resource}"] for p in plans]
        assert 0 < pools[0] < pools[1] < pools[2], resource
    for p in plans:
        for metric in ("ram_mb_seconds", "cpu_millis_seconds", "bandwidth_bytes"):
            assert p[f"included_{metric}"] > 0, (p["id"], metric)
        for unit in ("ram_mb_second", "cpu_millis_second", "bandwidth_byte"):
            assert p[f"overage_cents_per_{unit}"] > 0, (p["id"], unit)
        assert p["active"]


# ------------------------------------------------------------------------------ migrations


@pytest.fixture
def fresh_url(create_database: Callable[[str], str]) -> str:
    return create_database("hangar_roundtrip")


async def test_downgrade_to_base_and_upgrade_to_head_twice(
    fresh_url: str, db_passwords: dict[str, str]
) -> None:
    heads = head_revisions()
    assert set(heads) == set(SERVICES)
    assert await asyncio.to_thread(current_revisions, fresh_url) == dict.fromkeys(SERVICES)
    await asyncio.to_thread(migrate, fresh_url, db_passwords)
    assert await asyncio.to_thread(current_revisions, fresh_url) == heads
    first = await catalog(fresh_url)
    assert any(line.startswith("rel runtime.logs_p") for line in first)

    for _ in range(2):
        await asyncio.to_thread(downgrade, fresh_url)
        assert await asyncio.to_thread(current_revisions, fresh_url) == dict.fromkeys(SERVICES)
        async with connect(fresh_url) as conn:
            left = await conn.fetch(
                "SELECT n.nspname, c.relname FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = ANY($1::text[]) AND c.relkind NOT IN ('i', 'I', 'c', 't')",
                list(SERVICES),
            )
            functions = await conn.fetchval(
                "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = ANY($1::text[])",
                list(SERVICES),
            )
        assert sorted(tuple(r) for r in left) == sorted((s, "alembic_version") for s in SERVICES)
        assert functions == 0

        await asyncio.to_thread(migrate, fresh_url, db_passwords)
        assert await asyncio.to_thread(current_revisions, fresh_url) == heads
        assert await catalog(fresh_url) == first

    # migrating again at head changes nothing
    await asyncio.to_thread(migrate, fresh_url, db_passwords)
    assert await catalog(fresh_url) == first


def test_alembic_cli_works_per_service(database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": database_url}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alembic",
            "-c",
            str(ROOT / "alembic.ini"),
            "-n",
            "project",
            "current",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"{head_revisions()['project']} (head)" in result.stdout
