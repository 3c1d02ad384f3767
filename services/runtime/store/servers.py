"""Servers: registration, liveness (heartbeats, silence), and the books the reconciler
keeps (locks, reservation sums, tenants)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from services.runtime.domain import Isolation, ServerState
from services.runtime.store.records import S, Server
from shared.db import Session
from shared.errors import AlreadyExists, NotFound
from shared.ids import new_id
from shared.pagination import Page, decode_page_token, encode_page_token
from shared.resources import Resources

# ---------------------------------------------------------------------------- servers


async def insert_server(
    tx: Session,
    *,
    name: str,
    region: str,
    agent_address: str,
    capacity: Resources,
    drivers: tuple[str, ...] = ("process",),
    isolation: Isolation = Isolation.NONE,
) -> Server:
    try:
        row = await tx.fetchrow(
            f"""INSERT INTO {S}.servers (id, name, region, agent_address, drivers,
                    ram_mb, cpu_millis, isolation)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *""",
            new_id(),
            name,
            region,
            agent_address,
            list(drivers),
            capacity.ram_mb,
            capacity.cpu_millis,
            isolation.value,
        )
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(f"a server named {name!r} exists", reason="SERVER_EXISTS") from None
    assert row is not None
    return Server.from_row(row)


async def get_server(s: Session, server_id: str) -> Server:
    row = await s.fetchrow(f"SELECT * FROM {S}.servers WHERE id = $1", server_id)
    if row is None:
        raise NotFound(f"server {server_id!r} does not exist")
    return Server.from_row(row)


async def list_servers(s: Session, size: int, token: str) -> Page[Server]:
    key = decode_page_token(token, (str,))
    after = key[0] if key else ""
    rows = await s.fetch(
        f"SELECT * FROM {S}.servers WHERE id > $1 ORDER BY id LIMIT $2", after, size + 1
    )
    servers = [Server.from_row(r) for r in rows[:size]]
    more = len(rows) > size
    return Page(servers, encode_page_token([servers[-1].id]) if more else "")


async def set_server_status(tx: Session, server_id: str, status: ServerState) -> Server:
    row = await tx.fetchrow(
        f"UPDATE {S}.servers SET status = $2, updated_at = now() WHERE id = $1 RETURNING *",
        server_id,
        status.value,
    )
    if row is None:
        raise NotFound(f"server {server_id!r} does not exist")
    return Server.from_row(row)


async def any_active_sandbox_server(s: Session, region: str) -> bool:
    """Does any active server of the region run apps (builds, images) in the container
    sandbox?"""
    return bool(
        await s.fetchval(
            f"""SELECT EXISTS (SELECT 1 FROM {S}.servers
                 WHERE status = 'active' AND isolation = 'container' AND region = $1)""",
            region,
        )
    )


# ------------------------------------------------------------------- server liveness


async def record_heartbeat(
    tx: Session, server: str, isolation: Isolation | None = None
) -> Server | None:
    """A beat from the agent of `server` (id or name): a down server is active again, and
    the server's isolation is what the agent's driver has (None: the agent did not say)."""
    row = await tx.fetchrow(
        f"""UPDATE {S}.servers
               SET last_heartbeat_at = now(),
                   status = CASE WHEN status = 'down' THEN 'active' ELSE status END,
                   isolation = COALESCE($2, isolation),
                   updated_at = now()
             WHERE id = (SELECT id FROM {S}.servers WHERE id = $1 OR name = $1
                          ORDER BY id = $1 DESC LIMIT 1)
            RETURNING *""",
        server,
        isolation.value if isolation is not None else None,
    )
    return Server.from_row(row) if row else None


async def find_server(s: Session, server: str) -> Server | None:
    row = await s.fetchrow(
        f"SELECT * FROM {S}.servers WHERE id = $1 OR name = $1 ORDER BY id = $1 DESC LIMIT 1",
        server,
    )
    return Server.from_row(row) if row else None


async def mark_silent_servers_down(tx: Session, silence_seconds: float) -> list[str]:
    """Active servers whose agent beat once and then fell silent that long ago.

    A server whose agent never beat stays as registered: a start there fails (and releases)
    after the start timeout. One statement, so two replicas running it change each row once.
    """
    rows = await tx.fetch(
        f"""UPDATE {S}.servers SET status = 'down', updated_at = now()
             WHERE status = 'active'
               AND last_heartbeat_at < now() - make_interval(secs => $1)
            RETURNING id""",
        silence_seconds,
    )
    return [r["id"] for r in rows]


async def upsert_local_server(
    tx: Session, *, name: str, region: str, agent_address: str, capacity: Resources
) -> Server:
    """Register a server by name, or point an existing one at its agent (idempotent).

    Capacity of an existing server is left alone: it may not drop below what is reserved.
    """
    row = await tx.fetchrow(
        f"""INSERT INTO {S}.servers (id, name, region, agent_address, ram_mb, cpu_millis)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (name) DO UPDATE
               SET agent_address = excluded.agent_address, updated_at = now()
            RETURNING *""",
        new_id(),
        name,
        region,
        agent_address,
        capacity.ram_mb,
        capacity.cpu_millis,
    )
    assert row is not None
    return Server.from_row(row)


async def agents_heard_from(s: Session, within_seconds: float) -> list[tuple[str, str]]:
    """(server id, agent address) of servers whose agent beat within `within_seconds`: the
    agent at that address is that server's, and alive."""
    rows = await s.fetch(
        f"""SELECT id, agent_address FROM {S}.servers
             WHERE status <> 'down'
               AND last_heartbeat_at > now() - make_interval(secs => $1)
             ORDER BY id""",
        within_seconds,
    )
    return [(r["id"], r["agent_address"]) for r in rows]


# ------------------------------------------------------------- the reconciler's books


async def lock_servers(tx: Session) -> list[Server]:
    # NO KEY UPDATE: enough to hold placements and releases off (they take the same), without
    # holding up the foreign-key checks of deployments and containers being written.
    rows = await tx.fetch(f"SELECT * FROM {S}.servers ORDER BY id FOR NO KEY UPDATE")
    return [Server.from_row(r) for r in rows]


@dataclass(frozen=True)
class Reservations:
    """Per server, what its deployments with capacity_reserved hold, and whose they are."""

    sums: dict[str, Resources]
    organizations: dict[str, list[str]]  # distinct organization ids


async def reservations(tx: Session) -> Reservations:
    rows = await tx.fetch(
        f"""SELECT server_id, sum(ram_mb)::int AS ram_mb, sum(cpu_millis)::int AS cpu_millis,
                   array_agg(DISTINCT organization_id) AS organizations
              FROM {S}.deployments WHERE capacity_reserved GROUP BY server_id"""
    )
    return Reservations(
        {r["server_id"]: Resources.from_row(r) for r in rows},
        {r["server_id"]: list(r["organizations"]) for r in rows},
    )


async def set_reserved(tx: Session, server_id: str, reserved: Resources) -> None:
    await tx.execute(
        f"""UPDATE {S}.servers SET ram_mb_reserved = $2, cpu_millis_reserved = $3,
                updated_at = now() WHERE id = $1""",
        server_id,
        reserved.ram_mb,
        reserved.cpu_millis,
    )


async def set_tenant(tx: Session, server_id: str, tenant: str | None) -> None:
    await tx.execute(
        f"""UPDATE {S}.servers SET tenant_organization_id = $2, updated_at = now()
             WHERE id = $1""",
        server_id,
        tenant,
    )
