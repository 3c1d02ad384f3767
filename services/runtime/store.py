"""Runtime's tables and queries: the only file with SQL.

Statements are SQL text (asyncpg `$n` parameters), as in billing: the capacity arithmetic is
a handful of single statements whose exact shape (row locks, conditional updates, CTEs) is
the point, and they read more plainly as SQL than as expression trees.

Lock order, so that nothing deadlocks: project advisory lock (mark_running only) ->
deployment rows -> one server row. The reconciler locks servers only, in id order.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

import asyncpg

from services.runtime.domain import (
    SEVERAL_TENANTS,
    Candidate,
    DeploymentState,
    Isolation,
    Resources,
    ServerState,
    Tenancy,
)
from shared.db import Session
from shared.errors import AlreadyExists, InvalidArgument, NotFound
from shared.ids import new_id

S = "runtime"
T = TypeVar("T")


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Server:
    id: str
    name: str
    region: str
    agent_address: str
    drivers: tuple[str, ...]
    capacity: Resources
    reserved: Resources
    status: ServerState
    last_heartbeat_at: datetime | None
    created_at: datetime
    isolation: Isolation
    # The organization holding capacity here; SEVERAL_TENANTS for several, None for none.
    tenant_organization_id: str | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Server:
        return cls(
            id=row["id"],
            name=row["name"],
            region=row["region"],
            agent_address=row["agent_address"],
            drivers=tuple(row["drivers"]),
            capacity=Resources(row["ram_mb"], row["cpu_millis"]),
            reserved=Resources(row["ram_mb_reserved"], row["cpu_millis_reserved"]),
            status=ServerState(row["status"]),
            last_heartbeat_at=row["last_heartbeat_at"],
            created_at=row["created_at"],
            isolation=Isolation(row["isolation"]),
            tenant_organization_id=row["tenant_organization_id"],
        )

    def candidate(self) -> Candidate:
        return Candidate(self.id, self.capacity, self.reserved)


@dataclass(frozen=True)
class Deployment:
    id: str
    project_id: str
    organization_id: str
    server_id: str
    status: DeploymentState
    capacity_reserved: bool
    image: str | None
    command: str | None
    resources: Resources
    region: str
    health_check_path: str
    env_version: str
    exit_code: int | None
    status_reason: str
    rolled_back_from: str
    schedule_deadline: datetime | None
    sleep_after_seconds: int | None  # None: never put to sleep
    created_at: datetime
    updated_at: datetime
    restart_policy: str = "on-failure"  # what its agent does when the app ends on its own
    liveness_check_path: str = ""  # empty: no liveness check
    liveness_period_seconds: int = 10
    liveness_failure_threshold: int = 3

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Deployment:
        return cls(
            id=row["id"],
            project_id=row["project_id"],
            organization_id=row["organization_id"],
            server_id=row["server_id"] or "",
            status=DeploymentState(row["status"]),
            capacity_reserved=row["capacity_reserved"],
            image=row["image"],
            command=row["command"],
            resources=Resources(row["ram_mb"], row["cpu_millis"]),
            region=row["region"],
            health_check_path=row["health_check_path"] or "",
            env_version=row["env_version"] or "",
            exit_code=row["exit_code"],
            status_reason=row["status_reason"] or "",
            rolled_back_from=row["rolled_back_from"] or "",
            schedule_deadline=row["schedule_deadline"],
            sleep_after_seconds=row["sleep_after_seconds"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            restart_policy=row["restart_policy"],
            liveness_check_path=row["liveness_check_path"] or "",
            liveness_period_seconds=row["liveness_period_seconds"],
            liveness_failure_threshold=row["liveness_failure_threshold"],
        )


@dataclass(frozen=True)
class DeploymentSpec:
    """What a new deployment runs and needs, copied from the project at creation."""

    project_id: str
    organization_id: str
    resources: Resources
    region: str
    image: str | None = None
    command: str | None = None
    health_check_path: str = ""
    rolled_back_from: str = ""
    sleep_after_seconds: int | None = None  # the project's, when it sleeps idle apps
    restart_policy: str = "on-failure"  # the project's restart and liveness settings
    liveness_check_path: str = ""
    liveness_period_seconds: int = 10
    liveness_failure_threshold: int = 3


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str


# ------------------------------------------------------------------------ page tokens


def _encode(*parts: str) -> str:
    return base64.urlsafe_b64encode("\x1f".join(parts).encode()).decode()


def _decode(token: str, count: int) -> list[str]:
    try:
        parts = base64.urlsafe_b64decode(token.encode()).decode().split("\x1f")
    except (ValueError, UnicodeDecodeError):
        parts = []
    if len(parts) != count:
        raise InvalidArgument.field("page_token", "not a token from a previous page")
    return parts


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
    after = _decode(token, 1)[0] if token else ""
    rows = await s.fetch(
        f"SELECT * FROM {S}.servers WHERE id > $1 ORDER BY id LIMIT $2", after, size + 1
    )
    servers = [Server.from_row(r) for r in rows[:size]]
    more = len(rows) > size
    return Page(servers, _encode(servers[-1].id) if more else "")


async def set_server_status(tx: Session, server_id: str, status: ServerState) -> Server:
    row = await tx.fetchrow(
        f"UPDATE {S}.servers SET status = $2, updated_at = now() WHERE id = $1 RETURNING *",
        server_id,
        status.value,
    )
    if row is None:
        raise NotFound(f"server {server_id!r} does not exist")
    return Server.from_row(row)


# ----------------------------------------------------------------------- reservations


# The servers that could take `need` ($ram_mb MB, $cpu_millis mCPU) in $region with $driver.
_FITS = """status = 'active' AND region = $region AND $driver::text = ANY(drivers)
           AND ram_mb - ram_mb_reserved >= $ram_mb
           AND cpu_millis - cpu_millis_reserved >= $cpu_millis"""

# ...and may take an app of $organization_id: its apps are isolated, or it runs no other
# organization's (tenant_organization_id, kept by the statements that reserve and release),
# or organizations may share any server ($share_unisolated: settings.single_tenant).
_ADMITS = """($share_unisolated::boolean OR isolation = 'container'
              OR tenant_organization_id IS NULL
              OR tenant_organization_id = $organization_id::text)"""

# What a reservation makes of the server's tenant: ours if it had none or ours, else several.
_TENANT_AFTER = f"""CASE WHEN COALESCE(tenant_organization_id, $organization_id::text)
                             = $organization_id::text
                        THEN $organization_id::text ELSE '{SEVERAL_TENANTS}' END"""


def _reserve_sql(skip_locked: bool) -> str:
    # One statement that cannot over-commit. The subquery picks a fitting active server and
    # row-locks it; under READ COMMITTED a row changed since the statement's snapshot is
    # re-read and its WHERE re-checked once the lock is held, so the free space it tested is
    # the free space we add to. The outer WHERE repeats the test (belt and braces) and the
    # table's CHECKs refuse any counter above capacity anyway.
    #
    # The tenant works the same way: the statement that reserves sets the server's tenant,
    # and a placer of another organization that tested the row before it committed re-checks
    # _ADMITS on the committed row once it holds the lock, so two organizations never both
    # land on an empty server without isolation.
    #
    # First pass: best fit (fewest RAM left, then CPU) with SKIP LOCKED, so concurrent placers
    # fan out over the servers instead of queueing behind one row; a placement locks one
    # server row, where locking every candidate and choosing in Python serializes a region.
    # Second pass, only when every fitting server was locked: wait, in id order. Rows that
    # fail the re-check stay locked until commit, so waiters must all lock in one order or
    # two of them can deadlock; first pass placers never wait, so they cannot close a cycle.
    if skip_locked:
        order = "ram_mb - ram_mb_reserved, cpu_millis - cpu_millis_reserved, id"
        lock = "FOR UPDATE SKIP LOCKED"
    else:
        order, lock = "id", "FOR UPDATE"
    return f"""
        UPDATE {S}.servers
           SET ram_mb_reserved = ram_mb_reserved + $ram_mb,
               cpu_millis_reserved = cpu_millis_reserved + $cpu_millis,
               tenant_organization_id = {_TENANT_AFTER},
               updated_at = now()
         WHERE id = (
                SELECT id FROM {S}.servers
                 WHERE {_FITS} AND {_ADMITS}
                 ORDER BY {order}
                 LIMIT 1 {lock})
           AND ram_mb - ram_mb_reserved >= $ram_mb
           AND cpu_millis - cpu_millis_reserved >= $cpu_millis
           AND {_ADMITS}
        RETURNING id"""


# Is any server fitting and admitting the app (any_fits), and has any room at all
# (any_room), locked or not? (No lock: they only decide whether to retry, and what a
# waiting deployment's reason says.)
# (OFFSET 0 keeps `a` from being pulled up, which would run its EXISTS once per reference.)
_AVAILABILITY = f"""
    SELECT a.any_fits,
           CASE WHEN a.any_fits THEN true
                ELSE EXISTS (SELECT 1 FROM {S}.servers WHERE {_FITS}) END AS any_room
      FROM (SELECT EXISTS (SELECT 1 FROM {S}.servers
                            WHERE {_FITS} AND {_ADMITS}) AS any_fits
             OFFSET 0) a"""

_RESERVE_PARAMS = (
    "region",
    "driver",
    "ram_mb",
    "cpu_millis",
    "organization_id",
    "share_unisolated",
)


def _numbered(sql: str, names: tuple[str, ...]) -> str:
    """Named placeholders ($ids, ...) as asyncpg's numbers: names[0] is $1."""
    for number, name in sorted(enumerate(names, 1), key=lambda n: -len(n[1])):
        sql = sql.replace(f"${name}", f"${number}")
    return sql


_RESERVE_SKIP_LOCKED = _numbered(_reserve_sql(skip_locked=True), _RESERVE_PARAMS)
_RESERVE_WAITING = _numbered(_reserve_sql(skip_locked=False), _RESERVE_PARAMS)
_ANY_FITS = _numbered(_AVAILABILITY, _RESERVE_PARAMS)


def _reserve_args(
    region: str, driver: str, need: Resources, tenancy: Tenancy
) -> tuple[str, str, int, int, str, bool]:
    """_RESERVE_PARAMS' values, in order."""
    return (
        region,
        driver,
        need.ram_mb,
        need.cpu_millis,
        tenancy.organization_id,
        tenancy.share_unisolated,
    )


async def reserve_capacity(
    tx: Session, region: str, driver: str, need: Resources, tenancy: Tenancy
) -> str | None:
    """Add `need` to the best-fitting active server of the region that may take the tenant's
    app; its id, or None if none has room (or none with room may take it).

    When every fitting server is locked by other placements (they commit within a few
    milliseconds), try again shortly rather than queue behind one row; as a last resort wait
    for the locks, so a busy server is never mistaken for a full one.
    """
    args = _reserve_args(region, driver, need, tenancy)

    async def skip_locked() -> tuple[str | None, bool]:
        server_id = await tx.fetchval(_RESERVE_SKIP_LOCKED, *args)
        if server_id is not None:
            return str(server_id), True
        return None, bool(await tx.fetchval(_ANY_FITS, *args))

    async def waiting() -> str | None:
        server_id = await tx.fetchval(_RESERVE_WAITING, *args)
        return str(server_id) if server_id is not None else None

    return await _skip_locked_then_wait(skip_locked, waiting)


# Seconds between SKIP LOCKED attempts while every fitting server is momentarily locked.
_SKIP_LOCKED_BACKOFF = (0.001, 0.002, 0.004, 0.008)


async def _skip_locked_then_wait(
    skip_locked: Callable[[], Awaitable[tuple[T | None, bool]]],
    waiting: Callable[[], Awaitable[T | None]],
) -> T | None:
    """The attempts of every placement: SKIP LOCKED (which answers what it got and whether
    any server fits at all, locked or not), again after a short jittered sleep while the
    fitting servers are only locked (their placements commit within milliseconds), then
    once waiting for the locks, so a busy server is never mistaken for a full one."""
    for attempt in range(len(_SKIP_LOCKED_BACKOFF) + 1):
        got, any_fits = await skip_locked()
        if got is not None:
            return got
        if attempt == len(_SKIP_LOCKED_BACKOFF) or not any_fits:
            break
        await asyncio.sleep(_SKIP_LOCKED_BACKOFF[attempt] * (0.5 + random.random()))
    return await waiting()


async def release_capacity(tx: Session, deployment_id: str) -> bool:
    """Give a deployment's capacity back to its server, exactly once.

    One statement: the flag flips only WHERE capacity_reserved, and the counters drop only
    for a row that flag flip returned, so a second call (or a racing one) changes nothing.
    The release that empties the server clears its tenant: every reservation holds some RAM
    and CPU, so counters at zero mean no deployment holds capacity there. A racing release
    waits for the server row and computes this from the counters as the other one left them.
    A release that leaves one organization on a server several shared keeps SEVERAL_TENANTS
    (which admits fewer organizations, never more); the reconciler narrows it.
    """
    released = await tx.fetchval(
        f"""WITH released AS (
                UPDATE {S}.deployments SET capacity_reserved = false, updated_at = now()
                 WHERE id = $1 AND capacity_reserved
                RETURNING server_id, ram_mb, cpu_millis)
            UPDATE {S}.servers s
               SET ram_mb_reserved = s.ram_mb_reserved - r.ram_mb,
                   cpu_millis_reserved = s.cpu_millis_reserved - r.cpu_millis,
                   tenant_organization_id = CASE
                       WHEN s.ram_mb_reserved = r.ram_mb AND s.cpu_millis_reserved = r.cpu_millis
                       THEN NULL ELSE s.tenant_organization_id END,
                   updated_at = now()
              FROM released r WHERE s.id = r.server_id
            RETURNING s.id""",
        deployment_id,
    )
    return released is not None


async def lock_servers(tx: Session) -> list[Server]:
    rows = await tx.fetch(f"SELECT * FROM {S}.servers ORDER BY id FOR UPDATE")
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
        {r["server_id"]: Resources(r["ram_mb"], r["cpu_millis"]) for r in rows},
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


async def try_advisory_xact_lock(tx: Session, key: str) -> bool:
    return bool(await tx.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", key))


async def advisory_xact_lock(tx: Session, key: str) -> None:
    await tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)


# ------------------------------------------------------------------------ deployments


async def insert_deployment(
    tx: Session, spec: DeploymentSpec, schedule_deadline: datetime
) -> Deployment:
    row = await tx.fetchrow(
        f"""INSERT INTO {S}.deployments (id, project_id, organization_id, image, command,
                ram_mb, cpu_millis, region, health_check_path, rolled_back_from,
                schedule_deadline, sleep_after_seconds, restart_policy, liveness_check_path,
                liveness_period_seconds, liveness_failure_threshold)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULLIF($9, ''), NULLIF($10, ''), $11, $12,
                    $13, NULLIF($14, ''), $15, $16)
            RETURNING *""",
        new_id(),
        spec.project_id,
        spec.organization_id,
        spec.image,
        spec.command,
        spec.resources.ram_mb,
        spec.resources.cpu_millis,
        spec.region,
        spec.health_check_path,
        spec.rolled_back_from,
        schedule_deadline,
        spec.sleep_after_seconds,
        spec.restart_policy,
        spec.liveness_check_path,
        spec.liveness_period_seconds,
        spec.liveness_failure_threshold,
    )
    assert row is not None
    return Deployment.from_row(row)


async def get_deployment(s: Session, deployment_id: str) -> Deployment:
    row = await s.fetchrow(f"SELECT * FROM {S}.deployments WHERE id = $1", deployment_id)
    if row is None:
        raise NotFound(f"deployment {deployment_id!r} does not exist")
    return Deployment.from_row(row)


async def lock_deployment(tx: Session, deployment_id: str) -> Deployment:
    row = await tx.fetchrow(
        f"SELECT * FROM {S}.deployments WHERE id = $1 FOR UPDATE", deployment_id
    )
    if row is None:
        raise NotFound(f"deployment {deployment_id!r} does not exist")
    return Deployment.from_row(row)


async def claim_queued(tx: Session, after: tuple[datetime, str] | None) -> Deployment | None:
    """The oldest queued deployment after `after` that no other replica is working on."""
    row = await tx.fetchrow(
        f"""SELECT * FROM {S}.deployments
             WHERE status = 'queued'
               AND ($1::timestamptz IS NULL OR (created_at, id) > ($1, $2))
             ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED""",
        after[0] if after else None,
        after[1] if after else "",
    )
    return Deployment.from_row(row) if row else None


async def lock_running_of_project(
    tx: Session, project_id: str, excluding: str
) -> Deployment | None:
    """The project's serving deployment (running or crash-looping; at most one), locked."""
    row = await tx.fetchrow(
        f"""SELECT * FROM {S}.deployments
             WHERE project_id = $1 AND status IN ('running', 'crash_loop') AND id <> $2
             FOR UPDATE""",
        project_id,
        excluding,
    )
    return Deployment.from_row(row) if row else None


async def update_deployment(
    tx: Session,
    deployment_id: str,
    status: DeploymentState,
    *,
    reason: str | None = None,
    exit_code: int | None = None,
    server_id: str | None = None,
    capacity_reserved: bool | None = None,
    env_version: str | None = None,
) -> Deployment:
    """Set the status (and what changes with it); the caller checked the transition."""
    row = await tx.fetchrow(
        f"""UPDATE {S}.deployments
               SET status = $2,
                   status_reason = COALESCE($3, status_reason),
                   exit_code = COALESCE($4, exit_code),
                   server_id = COALESCE($5, server_id),
                   capacity_reserved = COALESCE($6, capacity_reserved),
                   env_version = COALESCE($7, env_version),
                   updated_at = now()
             WHERE id = $1 RETURNING *""",
        deployment_id,
        status.value,
        reason,
        exit_code,
        server_id,
        capacity_reserved,
        env_version,
    )
    if row is None:
        raise NotFound(f"deployment {deployment_id!r} does not exist")
    return Deployment.from_row(row)


async def list_deployments(s: Session, project_id: str, size: int, token: str) -> Page[Deployment]:
    """Newest first; keyset on (created_at, id)."""
    if token:
        created, last_id = _decode(token, 2)
        after: tuple[datetime | None, str] = (datetime.fromisoformat(created), last_id)
    else:
        after = (None, "")
    rows = await s.fetch(
        f"""SELECT * FROM {S}.deployments
             WHERE project_id = $1
               AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
             ORDER BY created_at DESC, id DESC LIMIT $4""",
        project_id,
        after[0],
        after[1],
        size + 1,
    )
    items = [Deployment.from_row(r) for r in rows[:size]]
    more = len(rows) > size
    token_out = _encode(items[-1].created_at.isoformat(), items[-1].id) if more else ""
    return Page(items, token_out)


async def project_organization(s: Session, project_id: str) -> str | None:
    """The organization a project's deployments were made in, if it has any."""
    value = await s.fetchval(
        f"SELECT organization_id FROM {S}.deployments WHERE project_id = $1 LIMIT 1", project_id
    )
    return str(value) if value is not None else None


async def last_successful_before(s: Session, current: Deployment) -> Deployment | None:
    """The newest earlier deployment of the project that ran and was replaced normally."""
    row = await s.fetchrow(
        f"""SELECT * FROM {S}.deployments
             WHERE project_id = $1 AND status = 'superseded' AND id <> $2
               AND created_at <= $3
             ORDER BY created_at DESC, id DESC LIMIT 1""",
        current.project_id,
        current.id,
        current.created_at,
    )
    return Deployment.from_row(row) if row else None


async def set_env_version(tx: Session, deployment_id: str, env_version: str) -> None:
    # updated_at stays: it dates the placement, which the start timeout counts from.
    await tx.execute(
        f"UPDATE {S}.deployments SET env_version = $2 WHERE id = $1",
        deployment_id,
        env_version,
    )


async def deployment_ids(
    s: Session, statuses: tuple[DeploymentState, ...], *, project_id: str = "", limit: int = 500
) -> list[str]:
    """Deployments in these states (of one project, if given), oldest first."""
    rows = await s.fetch(
        f"""SELECT id FROM {S}.deployments
             WHERE status = ANY($1::text[]) AND ($2 = '' OR project_id = $2)
             ORDER BY created_at, id LIMIT $3""",
        [state.value for state in statuses],
        project_id,
        limit,
    )
    return [r["id"] for r in rows]


async def any_active_server_with_driver(s: Session, driver: str) -> bool:
    return bool(
        await s.fetchval(
            f"""SELECT EXISTS (SELECT 1 FROM {S}.servers
                 WHERE status = 'active' AND $1::text = ANY(drivers))""",
            driver,
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


# ------------------------------------------------------------------------- containers


@dataclass(frozen=True)
class RestartState:
    """A container's restarts as its agent reports them."""

    count: int = 0
    crash_loop: bool = False
    last_exit_reason: str = ""


# Database container states; "stopped" and "failed" are ends.
CONTAINER_LIVE = ("starting", "running", "stopping")
_CONTAINER_RANK = {"starting": 0, "running": 1, "stopping": 2, "stopped": 3, "failed": 3}


@dataclass(frozen=True)
class Container:
    id: str
    project_id: str
    deployment_id: str
    server_id: str
    status: str
    sleep_status: str
    address: str
    pid: int | None
    exit_code: int | None
    last_request_at: datetime | None
    started_at: datetime | None
    stopped_at: datetime | None
    created_at: datetime
    restart_count: int = 0  # times its agent started the app again after it crashed
    crash_loop: bool = False
    last_exit_reason: str = ""

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Container:
        return cls(
            id=row["id"],
            project_id=row["project_id"],
            deployment_id=row["deployment_id"],
            server_id=row["server_id"],
            status=row["status"],
            sleep_status=row["sleep_status"],
            address=row["address"] or "",
            pid=row["pid"],
            exit_code=row["exit_code"],
            last_request_at=row["last_request_at"],
            started_at=row["started_at"],
            stopped_at=row["stopped_at"],
            created_at=row["created_at"],
            restart_count=row["restart_count"],
            crash_loop=row["crash_loop"],
            last_exit_reason=row["last_exit_reason"] or "",
        )

    @property
    def live(self) -> bool:
        return self.status in CONTAINER_LIVE


async def container_of(s: Session, deployment_id: str) -> Container | None:
    """The deployment's newest container (one per deployment until sleep/wake)."""
    row = await s.fetchrow(
        f"""SELECT * FROM {S}.containers WHERE deployment_id = $1
             ORDER BY created_at DESC, id DESC LIMIT 1""",
        deployment_id,
    )
    return Container.from_row(row) if row else None


async def insert_container(tx: Session, deployment: Deployment) -> Container:
    row = await tx.fetchrow(
        f"""INSERT INTO {S}.containers (id, project_id, deployment_id, server_id)
            VALUES ($1, $2, $3, $4) RETURNING *""",
        new_id(),
        deployment.project_id,
        deployment.id,
        deployment.server_id,
    )
    assert row is not None
    return Container.from_row(row)


async def get_container(s: Session, container_id: str) -> Container | None:
    row = await s.fetchrow(f"SELECT * FROM {S}.containers WHERE id = $1", container_id)
    return Container.from_row(row) if row else None


async def lock_container(tx: Session, container_id: str) -> Container | None:
    row = await tx.fetchrow(f"SELECT * FROM {S}.containers WHERE id = $1 FOR UPDATE", container_id)
    return Container.from_row(row) if row else None


async def update_container(
    tx: Session,
    container_id: str,
    *,
    status: str | None = None,
    address: str | None = None,
    pid: int | None = None,
    exit_code: int | None = None,
    started_at: datetime | None = None,
    last_request_at: datetime | None = None,
    sleep_status: str | None = None,
    restarts: RestartState | None = None,
) -> Container | None:
    """Move a container forward; a report older than what is recorded changes no status.
    A restart (a higher restart count) starts its life over: starting again after running."""
    current = await lock_container(tx, container_id)
    if current is None:
        return None
    new_status = current.status
    restarted = restarts is not None and restarts.count > current.restart_count
    if status is not None and (
        _CONTAINER_RANK[status] > _CONTAINER_RANK[current.status]
        or (restarted and current.live and status in CONTAINER_LIVE)
    ):
        new_status = status
    if restarts is not None and restarts.count < current.restart_count:
        restarts = None  # an older report: what is recorded stands
    ended_now = new_status in ("stopped", "failed") and current.live
    row = await tx.fetchrow(
        f"""UPDATE {S}.containers
               SET status = $2,
                   address = COALESCE($3, address),
                   pid = COALESCE($4, pid),
                   exit_code = COALESCE($5, exit_code),
                   started_at = COALESCE(started_at, $6),
                   last_request_at = GREATEST(last_request_at, $7),
                   stopped_at = CASE WHEN $8 THEN now() ELSE stopped_at END,
                   sleep_status = COALESCE($9, sleep_status),
                   restart_count = COALESCE($10, restart_count),
                   crash_loop = COALESCE($11, crash_loop),
                   last_exit_reason = COALESCE(NULLIF($12, ''), last_exit_reason),
                   updated_at = now()
             WHERE id = $1 RETURNING *""",
        container_id,
        new_status,
        address,
        pid,
        exit_code,
        started_at,
        last_request_at,
        ended_now,
        sleep_status,
        restarts.count if restarts is not None else None,
        restarts.crash_loop if restarts is not None else None,
        restarts.last_exit_reason if restarts is not None else None,
    )
    assert row is not None
    return Container.from_row(row)


async def list_containers(s: Session, project_id: str, size: int, token: str) -> Page[Container]:
    """A project's live containers (starting, running, stopping; awake or asleep), by id."""
    after = _decode(token, 1)[0] if token else ""
    rows = await s.fetch(
        f"""SELECT * FROM {S}.containers
             WHERE project_id = $1 AND status = ANY($2::text[]) AND id > $3
             ORDER BY id LIMIT $4""",
        project_id,
        list(CONTAINER_LIVE),
        after,
        size + 1,
    )
    items = [Container.from_row(r) for r in rows[:size]]
    return Page(items, _encode(items[-1].id) if len(rows) > size else "")


async def record_activity(
    s: Session, server_id: str, seen: list[tuple[str, datetime | None, str | None]]
) -> int:
    """What a heartbeat says of its live containers: (id, last request, sleep status), in
    one statement; only rows it changes are written. How many changed."""
    if not seen:
        return 0
    ids, requests, sleeps = (list(column) for column in zip(*seen, strict=True))
    result = await s.execute(
        f"""UPDATE {S}.containers c
               SET last_request_at = GREATEST(c.last_request_at, r.last_request_at),
                   sleep_status = COALESCE(r.sleep_status, c.sleep_status),
                   updated_at = now()
              FROM unnest($2::text[], $3::timestamptz[], $4::text[])
                   AS r(id, last_request_at, sleep_status)
             WHERE c.id = r.id AND c.server_id = $1 AND c.status = ANY($5::text[])
               AND (r.last_request_at > c.last_request_at
                    OR (c.last_request_at IS NULL AND r.last_request_at IS NOT NULL)
                    OR r.sleep_status <> c.sleep_status)""",
        server_id,
        ids,
        requests,
        sleeps,
        list(CONTAINER_LIVE),
    )
    return int(result.split()[-1])


@dataclass(frozen=True)
class IdleContainer:
    container: Container
    agent_address: str
    idle_since: datetime  # its last request, else its start


async def idle_containers(s: Session, now: datetime, limit: int) -> list[IdleContainer]:
    """Awake running containers of running deployments with sleep on, idle past their
    deployment's sleep_after_seconds at `now`, longest idle first."""
    rows = await s.fetch(
        f"""SELECT c.*, s.agent_address, i.idle_since
              FROM {S}.containers c
              JOIN {S}.deployments d ON d.id = c.deployment_id
              JOIN {S}.servers s ON s.id = c.server_id
             CROSS JOIN LATERAL (SELECT COALESCE(c.last_request_at, c.started_at, c.created_at)
                                        AS idle_since) i
             WHERE c.sleep_status = 'awake' AND c.status = 'running'
               AND d.status = 'running' AND d.sleep_after_seconds IS NOT NULL
               AND s.status <> 'down'
               AND i.idle_since < $1::timestamptz - make_interval(secs => d.sleep_after_seconds)
             ORDER BY i.idle_since
             LIMIT $2""",
        now,
        limit,
    )
    return [IdleContainer(Container.from_row(r), r["agent_address"], r["idle_since"]) for r in rows]


async def set_sleep_after(tx: Session, project_id: str, sleep_after_seconds: int | None) -> int:
    """A project's sleep setting changed: its deployments that have not ended follow it."""
    result = await tx.execute(
        f"""UPDATE {S}.deployments SET sleep_after_seconds = $2, updated_at = now()
             WHERE project_id = $1 AND sleep_after_seconds IS DISTINCT FROM $2
               AND status NOT IN ('superseded', 'failed', 'cancelled', 'rolled_back')""",
        project_id,
        sleep_after_seconds,
    )
    return int(result.split()[-1])


async def containers_to_stop(s: Session, limit: int = 200) -> list[tuple[Container, str]]:
    """Live containers whose deployment has ended, with their agent's address."""
    rows = await s.fetch(
        f"""SELECT c.*, s.agent_address FROM {S}.containers c
              JOIN {S}.deployments d ON d.id = c.deployment_id
              JOIN {S}.servers s ON s.id = c.server_id
             WHERE c.status = ANY($1::text[])
               AND d.status IN ('superseded', 'failed', 'cancelled', 'rolled_back')
             ORDER BY c.created_at LIMIT $2""",
        list(CONTAINER_LIVE),
        limit,
    )
    return [(Container.from_row(r), r["agent_address"]) for r in rows]


async def deployments_on_agents(
    s: Session, statuses: tuple[DeploymentState, ...], settled_seconds: float
) -> list[tuple[str, str, str, str]]:
    """(deployment id, container id, server id, agent address) of deployments in these states
    unchanged for `settled_seconds`, on servers that are not down."""
    rows = await s.fetch(
        f"""SELECT d.id, c.id AS container_id, d.server_id, s.agent_address
              FROM {S}.deployments d
              JOIN {S}.servers s ON s.id = d.server_id
              LEFT JOIN LATERAL (SELECT id FROM {S}.containers
                                  WHERE deployment_id = d.id
                                  ORDER BY created_at DESC, id DESC LIMIT 1) c ON true
             WHERE d.status = ANY($1::text[]) AND s.status <> 'down'
               AND d.updated_at < now() - make_interval(secs => $2)
             ORDER BY d.server_id, d.id""",
        [state.value for state in statuses],
        settled_seconds,
    )
    return [(r["id"], r["container_id"] or "", r["server_id"], r["agent_address"]) for r in rows]


async def container_statuses(
    s: Session, container_ids: list[str]
) -> dict[str, tuple[str, RestartState]]:
    """What is recorded of these containers: status, and restarts as last reported."""
    rows = await s.fetch(
        f"""SELECT id, status, restart_count, crash_loop, last_exit_reason
              FROM {S}.containers WHERE id = ANY($1::text[])""",
        container_ids,
    )
    return {
        r["id"]: (
            r["status"],
            RestartState(r["restart_count"], r["crash_loop"], r["last_exit_reason"] or ""),
        )
        for r in rows
    }


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


@dataclass(frozen=True)
class ContainerClaim:
    """What runtime wants of a container an agent runs: its row, its deployment's status,
    and whether it is that deployment's newest container."""

    container: Container
    deployment_status: DeploymentState
    newest: bool


async def container_claims(s: Session, container_ids: list[str]) -> dict[str, ContainerClaim]:
    """The claims on these containers; an id runtime has no row for is absent."""
    rows = await s.fetch(
        f"""SELECT c.*, d.status AS deployment_status,
                   c.id = (SELECT n.id FROM {S}.containers n WHERE n.deployment_id = d.id
                            ORDER BY n.created_at DESC, n.id DESC LIMIT 1) AS newest
              FROM {S}.containers c
              JOIN {S}.deployments d ON d.id = c.deployment_id
             WHERE c.id = ANY($1::text[])""",
        container_ids,
    )
    return {
        r["id"]: ContainerClaim(
            Container.from_row(r), DeploymentState(r["deployment_status"]), bool(r["newest"])
        )
        for r in rows
    }


# ------------------------------------------------------------ placement in one statement


def _reserved_cte(skip_locked: bool) -> str:
    return _reserve_sql(skip_locked).replace("RETURNING id", "RETURNING id AS server_id")


def _status_payload(before: str, after: str, server: str, reserved: str) -> str:
    """A deployment.status_changed payload over row `d` (as Scheduler._changed writes it)."""
    return f"""jsonb_build_object(
               'deployment_id', d.id, 'project_id', d.project_id, 'from', {before}::text,
               'to', {after}::text, 'server_id', {server}, 'capacity_reserved', {reserved},
               'reason', '')"""


# The move of a queued deployment to scheduling (reason '' as the move sets it).
_PLACED_PAYLOAD = _status_payload("'queued'", "d.status", "d.server_id", "d.capacity_reserved")


def _status_changes_sql(source: str, payloads: list[str], *, keep: str = "true") -> str:
    """Outbox rows for status changes of the deployment row(s) in CTE `source`: per change
    its event then its audit entry, in that order. Parameters: $ids text[] (one id a row),
    $event_type, $audit_type, $actor_id; `keep` filters the rows (v.n counts from 1)."""
    values = ", ".join(
        f"({2 * i + 1}, false, {payload}), ({2 * i + 2}, true, {payload})"
        for i, payload in enumerate(payloads)
    )
    return f"""
            INSERT INTO {S}.outbox (id, type, organization_id, aggregate_id, payload)
            SELECT ($ids::text[])[v.n], CASE WHEN v.audit THEN $audit_type ELSE $event_type END,
                   d.organization_id, d.id,
                   CASE WHEN v.audit THEN jsonb_build_object(
                            'actor_id', $actor_id::text, 'action', $event_type::text,
                            'target_type', 'deployment', 'target_id', d.id,
                            'metadata', v.payload - 'deployment_id')
                        ELSE v.payload END
              FROM {source} d CROSS JOIN LATERAL (VALUES {values}) v(n, audit, payload)
             WHERE {keep}
             ORDER BY v.n"""


_PLACE_PARAMS = (*_RESERVE_PARAMS, "deployment_id", "ids", "event_type", "audit_type", "actor_id")


def _place_sql(skip_locked: bool) -> str:
    # The reservation of _reserve_sql, the deployment's move to scheduling, its
    # status_changed event and its audit entry in one statement: the server row is locked
    # for one round trip (plus the commit) instead of four.
    sql = f"""
        WITH reserved AS ({_reserved_cte(skip_locked)}),
        placed AS (
            UPDATE {S}.deployments d
               SET status = 'scheduling', status_reason = '', server_id = r.server_id,
                   capacity_reserved = true, updated_at = now()
              FROM reserved r
             WHERE d.id = $deployment_id
            RETURNING d.*),
        written AS ({_status_changes_sql("placed", [_PLACED_PAYLOAD])})
        -- Exactly one row: the placed deployment, or (nothing placed) NULLs and whether any
        -- server fits (and admits the app) at all, locked or not, and whether any has room,
        -- so a miss needs no second round trip.
        SELECT p.*,
               CASE WHEN p.id IS NULL THEN EXISTS (
                   SELECT 1 FROM {S}.servers WHERE {_FITS} AND {_ADMITS}) END AS any_fits,
               CASE WHEN p.id IS NULL THEN EXISTS (
                   SELECT 1 FROM {S}.servers WHERE {_FITS}) END AS any_room
          FROM (SELECT) one LEFT JOIN placed p ON true"""
    return _numbered(sql, _PLACE_PARAMS)


_PLACE_SKIP_LOCKED = _place_sql(skip_locked=True)
_PLACE_WAITING = _place_sql(skip_locked=False)


@dataclass(frozen=True)
class Placement:
    """What place_deployment did: the placed deployment, or nothing and why."""

    placed: Deployment | None
    # Nothing placed although servers had room: none of them may take this organization's
    # app (no isolation, and another organization's apps run there).
    tenants_in_the_way: bool = False


async def place_deployment(
    tx: Session,
    deployment: Deployment,
    driver: str,
    tenancy: Tenancy,
    *,
    event_type: str,
    audit_type: str,
    actor_id: str,
) -> Placement:
    """reserve_capacity + the move to scheduling + its event and audit entry, as one
    statement per attempt.

    A miss costs one round trip: the statement also says whether any server fits at all,
    and whether any has room. The event and audit ids are made once: an attempt that placed
    nothing inserted nothing.
    """
    args = (
        *_reserve_args(deployment.region, driver, deployment.resources, tenancy),
        deployment.id,
        [new_id(), new_id()],
        event_type,
        audit_type,
        actor_id,
    )

    misses: list[asyncpg.Record] = []

    async def skip_locked() -> tuple[asyncpg.Record | None, bool]:
        # In a savepoint: a server row that failed the re-check stays locked by a statement
        # that placed nothing; rolling back to the savepoint unlocks it, so this transaction
        # never holds a row while it sleeps or waits for another (no deadlock cycle).
        savepoint = tx.conn.transaction()
        await savepoint.start()
        row = await tx.fetchrow(_PLACE_SKIP_LOCKED, *args)
        assert row is not None
        if row["id"] is not None:
            await savepoint.commit()
            return row, True
        await savepoint.rollback()
        misses.append(row)
        return None, bool(row["any_fits"])

    async def waiting() -> asyncpg.Record | None:
        row = await tx.fetchrow(_PLACE_WAITING, *args)
        assert row is not None
        if row["id"] is not None:
            return row
        misses.append(row)
        return None

    placed = await _skip_locked_then_wait(skip_locked, waiting)
    if placed is None:
        last = misses[-1]
        return Placement(None, tenants_in_the_way=bool(last["any_room"] and not last["any_fits"]))
    tx.note_events()
    return Placement(Deployment.from_row(placed))


async def set_waiting_reason(tx: Session, deployment: Deployment, reason: str) -> Deployment:
    """Why a queued deployment still waits (written only when it changes)."""
    if deployment.status_reason == reason:
        return deployment
    row = await tx.fetchrow(
        f"""UPDATE {S}.deployments SET status_reason = $2, updated_at = now()
             WHERE id = $1 AND status = 'queued' RETURNING *""",
        deployment.id,
        reason,
    )
    return Deployment.from_row(row) if row is not None else deployment


# ------------------------------------------------------- a new deployment in one statement

_CREATE_PARAMS = (
    *_RESERVE_PARAMS,
    "id",
    "project_id",
    "image",
    "command",
    "health_check_path",
    "rolled_back_from",
    "schedule_deadline",
    "final",
    "event_type",
    "audit_type",
    "actor_id",
    "ids",
    "sleep_after_seconds",
    "waiting_reason",
    "restart_policy",
    "liveness_check_path",
    "liveness_period_seconds",
    "liveness_failure_threshold",
)


def _create_sql(skip_locked: bool) -> str:
    # CreateDeployment as one statement run on its own (its own transaction, one round trip):
    # the reservation of _reserve_sql, the deployment inserted already placed (or queued),
    # and the outbox rows place_deployment's path would write -- the creation's event and
    # audit entry, then the placement's -- in that order. The server row is locked for this
    # one statement; a row that failed the re-check is unlocked when it ends, so a miss holds
    # no lock while the caller waits to try again.
    queued = _status_payload("''", "'queued'", "''::text", "false")
    sql = f"""
        WITH reserved AS ({_reserved_cte(skip_locked)}),
        fits AS ({_AVAILABILITY}),
        made AS (
            INSERT INTO {S}.deployments (id, project_id, organization_id, image, command,
                    ram_mb, cpu_millis, region, health_check_path, rolled_back_from,
                    schedule_deadline, sleep_after_seconds, restart_policy,
                    liveness_check_path, liveness_period_seconds, liveness_failure_threshold,
                    status, status_reason, server_id, capacity_reserved)
            SELECT $id, $project_id, $organization_id, $image, $command, $ram_mb,
                   $cpu_millis, $region, NULLIF($health_check_path, ''),
                   NULLIF($rolled_back_from, ''), $schedule_deadline, $sleep_after_seconds,
                   $restart_policy, NULLIF($liveness_check_path, ''),
                   $liveness_period_seconds::integer, $liveness_failure_threshold::integer,
                   CASE WHEN r.server_id IS NULL THEN 'queued' ELSE 'scheduling' END,
                   CASE WHEN r.server_id IS NOT NULL THEN ''
                        WHEN f.any_room AND NOT f.any_fits THEN $waiting_reason::text END,
                   r.server_id, r.server_id IS NOT NULL
              FROM fits f LEFT JOIN reserved r ON true
             -- A miss while fitting servers were only locked inserts nothing: try again.
             WHERE r.server_id IS NOT NULL OR $final OR NOT f.any_fits
            RETURNING *),
        written AS ({
        _status_changes_sql(
            "made", [queued, _PLACED_PAYLOAD], keep="v.n <= 2 OR d.capacity_reserved"
        )
    })
        SELECT d.*, f.any_fits FROM fits f LEFT JOIN made d ON true"""
    return _numbered(sql, _CREATE_PARAMS)


_CREATE_SKIP_LOCKED = _create_sql(skip_locked=True)
_CREATE_WAITING = _create_sql(skip_locked=False)


async def create_deployment(
    s: Session,
    spec: DeploymentSpec,
    schedule_deadline: datetime,
    driver: str,
    *,
    share_unisolated: bool,
    waiting_reason: str,
    event_type: str,
    audit_type: str,
    actor_id: str,
) -> Deployment:
    """insert_deployment, its status_changed event and audit entry, and place_deployment,
    as one statement per attempt on a session outside any transaction.

    The deployment comes back `scheduling` with its reservation, or `queued` when no server
    has room (the last attempt inserts it either way), with `waiting_reason` as its reason
    when servers had room but none may take its organization's app.
    """
    tenancy = Tenancy(spec.organization_id, share_unisolated)
    deployment_id, ids = new_id(), [new_id() for _ in range(4)]

    def args(final: bool) -> tuple[object, ...]:
        return (
            *_reserve_args(spec.region, driver, spec.resources, tenancy),
            deployment_id,
            spec.project_id,
            spec.image,
            spec.command,
            spec.health_check_path,
            spec.rolled_back_from,
            schedule_deadline,
            final,
            event_type,
            audit_type,
            actor_id,
            ids,
            spec.sleep_after_seconds,
            waiting_reason,
            spec.restart_policy,
            spec.liveness_check_path,
            spec.liveness_period_seconds,
            spec.liveness_failure_threshold,
        )

    async def skip_locked() -> tuple[asyncpg.Record | None, bool]:
        row = await s.fetchrow(_CREATE_SKIP_LOCKED, *args(False))
        assert row is not None
        # Nothing inserted means fitting servers were only locked: always worth a retry.
        return (row if row["id"] is not None else None), True

    async def waiting() -> asyncpg.Record | None:
        return await s.fetchrow(_CREATE_WAITING, *args(True))

    row = await _skip_locked_then_wait(skip_locked, waiting)
    assert row is not None and row["id"] is not None
    s.note_events()
    return Deployment.from_row(row)
