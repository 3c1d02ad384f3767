"""Placement: reserving and releasing server capacity, and the statements that place a
deployment (or create one already placed) with its outbox rows in one round trip."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import asyncpg

from services.runtime.domain import SEVERAL_TENANTS, Tenancy
from services.runtime.store.records import Deployment, DeploymentSpec, S
from shared.db import Session
from shared.ids import new_id
from shared.resources import Resources

T = TypeVar("T")


# ----------------------------------------------------------------------- reservations


# The servers that could take `need` ($ram_mb MB, $cpu_millis mCPU) in $region with $driver.
# A build needs the container sandbox ($sandbox): tenant code never builds unconfined.
_FITS = """status = 'active' AND region = $region AND $driver::text = ANY(drivers)
           AND (NOT $sandbox::boolean OR isolation = 'container')
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


# Does the server (row `servers`) hold capacity for another replica of $replica_set_id?
# (An uncorrelated subquery: run once per statement and hashed, not once per candidate.)
_HOLDS_SIBLING = f"""id IN (SELECT sibling.server_id FROM {S}.deployments sibling
                            WHERE sibling.replica_set_id = $replica_set_id::text
                              AND sibling.capacity_reserved)"""


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
    #
    # NO KEY UPDATE, not UPDATE: the counters change, never the key. A plain FOR UPDATE also
    # conflicts with the KEY SHARE lock every insert of a deployment or container referencing
    # the server takes for its foreign key, so a start recording its container made the first
    # pass skip the best-fitting server.
    #
    # Replicas spread: a server already holding a replica of the same set ($replica_set_id)
    # comes after every server that holds none, so two share a server only when no other
    # fits. (The waiting pass keeps its one lock order instead: it is the last resort.)
    if skip_locked:
        order = f"""{_HOLDS_SIBLING}, ram_mb - ram_mb_reserved,
                    cpu_millis - cpu_millis_reserved, id"""
        lock = "FOR NO KEY UPDATE SKIP LOCKED"
    else:
        order, lock = "id", "FOR NO KEY UPDATE"
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
    "sandbox",
    "replica_set_id",
)


@dataclass(frozen=True)
class _Statement:
    """SQL written with named placeholders ($ids, ...), numbered for asyncpg: `names` are
    the ones it uses, in their numbers' order ($1 is names[0])."""

    sql: str
    names: tuple[str, ...]

    @classmethod
    def numbered(cls, sql: str, names: tuple[str, ...]) -> _Statement:
        used = tuple(n for n in names if re.search(rf"\${n}\b", sql))
        for number, name in sorted(enumerate(used, 1), key=lambda n: -len(n[1])):
            sql = sql.replace(f"${name}", f"${number}")
        return cls(sql, used)

    def args(self, values: Mapping[str, object]) -> tuple[object, ...]:
        return tuple(values[name] for name in self.names)


_RESERVE_SKIP_LOCKED = _Statement.numbered(_reserve_sql(skip_locked=True), _RESERVE_PARAMS)
_RESERVE_WAITING = _Statement.numbered(_reserve_sql(skip_locked=False), _RESERVE_PARAMS)
_ANY_FITS = _Statement.numbered(_AVAILABILITY, _RESERVE_PARAMS)


def _reserve_values(
    region: str, driver: str, need: Resources, tenancy: Tenancy, replica_set_id: str = ""
) -> dict[str, object]:
    """_RESERVE_PARAMS' values."""
    return {
        "region": region,
        "driver": driver,
        "ram_mb": need.ram_mb,
        "cpu_millis": need.cpu_millis,
        "organization_id": tenancy.organization_id,
        "share_unisolated": tenancy.share_unisolated,
        "sandbox": tenancy.sandbox,
        "replica_set_id": replica_set_id,
    }


async def reserve_capacity(
    tx: Session, region: str, driver: str, need: Resources, tenancy: Tenancy
) -> str | None:
    """Add `need` to the best-fitting active server of the region that may take the tenant's
    app; its id, or None if none has room (or none with room may take it).

    When every fitting server is locked by other placements (they commit within a few
    milliseconds), try again shortly rather than queue behind one row; as a last resort wait
    for the locks, so a busy server is never mistaken for a full one.
    """
    values = _reserve_values(region, driver, need, tenancy)

    async def skip_locked() -> tuple[str | None, bool]:
        server_id = await tx.fetchval(_RESERVE_SKIP_LOCKED.sql, *_RESERVE_SKIP_LOCKED.args(values))
        if server_id is not None:
            return str(server_id), True
        return None, bool(await tx.fetchval(_ANY_FITS.sql, *_ANY_FITS.args(values)))

    async def waiting() -> str | None:
        server_id = await tx.fetchval(_RESERVE_WAITING.sql, *_RESERVE_WAITING.args(values))
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


def _place_sql(skip_locked: bool) -> _Statement:
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
    return _Statement.numbered(sql, _PLACE_PARAMS)


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
    values = {
        **_reserve_values(
            deployment.region, driver, deployment.resources, tenancy, deployment.replica_set_id
        ),
        "deployment_id": deployment.id,
        "ids": [new_id(), new_id()],
        "event_type": event_type,
        "audit_type": audit_type,
        "actor_id": actor_id,
    }

    misses: list[asyncpg.Record] = []

    async def skip_locked() -> tuple[asyncpg.Record | None, bool]:
        # In a savepoint: a server row that failed the re-check stays locked by a statement
        # that placed nothing; rolling back to the savepoint unlocks it, so this transaction
        # never holds a row while it sleeps or waits for another (no deadlock cycle).
        savepoint = tx.conn.transaction()
        await savepoint.start()
        row = await tx.fetchrow(_PLACE_SKIP_LOCKED.sql, *_PLACE_SKIP_LOCKED.args(values))
        assert row is not None
        if row["id"] is not None:
            await savepoint.commit()
            return row, True
        await savepoint.rollback()
        misses.append(row)
        return None, bool(row["any_fits"])

    async def waiting() -> asyncpg.Record | None:
        row = await tx.fetchrow(_PLACE_WAITING.sql, *_PLACE_WAITING.args(values))
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
    "source_sha256",
    "slug_sha256",
    "process_type",
    "release_reason",
    "created_by",
    "processes",
    "image_command",
)


def _create_sql(skip_locked: bool) -> _Statement:
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
                    source_sha256, slug_sha256, process_type, release_reason, created_by,
                    processes, image_command, status, status_reason, server_id, capacity_reserved,
                    replica_set_id)
            SELECT $id, $project_id, $organization_id, $image, $command, $ram_mb,
                   $cpu_millis, $region, NULLIF($health_check_path, ''),
                   NULLIF($rolled_back_from, ''), $schedule_deadline, $sleep_after_seconds,
                   $restart_policy, NULLIF($liveness_check_path, ''),
                   $liveness_period_seconds::integer, $liveness_failure_threshold::integer,
                   $source_sha256::text, NULLIF($slug_sha256::text, ''), $process_type::text,
                   $release_reason::text, $created_by::text, $processes::jsonb,
                   NULLIF($image_command::text, ''),
                   CASE WHEN r.server_id IS NULL THEN 'queued' ELSE 'scheduling' END,
                   CASE WHEN r.server_id IS NOT NULL THEN ''
                        WHEN f.any_room AND NOT f.any_fits THEN $waiting_reason::text END,
                   r.server_id, r.server_id IS NOT NULL, $id
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
    return _Statement.numbered(sql, _CREATE_PARAMS)


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
    tenancy = Tenancy(spec.organization_id, share_unisolated, sandbox=spec.needs_sandbox)
    deployment_id, ids = new_id(), [new_id() for _ in range(4)]

    def values(final: bool) -> dict[str, object]:
        return {
            **_reserve_values(spec.region, driver, spec.resources, tenancy, deployment_id),
            "id": deployment_id,
            "project_id": spec.project_id,
            "image": spec.image,
            "command": spec.command,
            "health_check_path": spec.health_check_path,
            "rolled_back_from": spec.rolled_back_from,
            "schedule_deadline": schedule_deadline,
            "final": final,
            "event_type": event_type,
            "audit_type": audit_type,
            "actor_id": actor_id,
            "ids": ids,
            "sleep_after_seconds": spec.sleep_after_seconds,
            "waiting_reason": waiting_reason,
            "restart_policy": spec.restart_policy,
            "liveness_check_path": spec.liveness_check_path,
            "liveness_period_seconds": spec.liveness_period_seconds,
            "liveness_failure_threshold": spec.liveness_failure_threshold,
            "source_sha256": spec.source_sha256,
            "slug_sha256": spec.slug_sha256,
            "process_type": spec.process_type,
            "release_reason": spec.release_reason.value,
            "created_by": spec.created_by,
            "processes": spec.processes_json,
            "image_command": spec.image_command,
        }

    async def skip_locked() -> tuple[asyncpg.Record | None, bool]:
        row = await s.fetchrow(_CREATE_SKIP_LOCKED.sql, *_CREATE_SKIP_LOCKED.args(values(False)))
        assert row is not None
        # Nothing inserted means fitting servers were only locked: always worth a retry.
        return (row if row["id"] is not None else None), True

    async def waiting() -> asyncpg.Record | None:
        return await s.fetchrow(_CREATE_WAITING.sql, *_CREATE_WAITING.args(values(True)))

    row = await _skip_locked_then_wait(skip_locked, waiting)
    assert row is not None and row["id"] is not None
    s.note_events()
    return Deployment.from_row(row)
