"""The reconciler repairs counters that drifted from the deployments holding capacity, and
two replicas running it at once leave them consistent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.runtime import store
from services.runtime.domain import SEVERAL_TENANTS, DeploymentState, Isolation
from services.runtime.reconciler import Reconciler
from services.runtime.scheduler import Scheduler
from shared.db import Database
from shared.ids import new_id
from shared.resources import Resources
from tests.support.runtime import add_servers, assert_invariant, counters, runtime_database, spec


@pytest.fixture
async def db(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Database]:
    database = await runtime_database(database_url, db_passwords)
    yield database
    await database.close()


async def _corrupt(admin_url: str, values: dict[str, Resources]) -> None:
    """What a crash or a hand edit could leave: counters set directly, as a superuser."""
    conn = await asyncpg.connect(admin_url)
    try:
        for server_id, r in values.items():
            await conn.execute(
                "UPDATE runtime.servers SET ram_mb_reserved = $2, cpu_millis_reserved = $3"
                " WHERE id = $1",
                server_id,
                r.ram_mb,
                r.cpu_millis,
            )
    finally:
        await conn.close()


async def _fleet_with_deployments(db: Database, admin_url: str) -> tuple[list[str], dict]:
    """Three servers holding some deployments; (server ids, the true reserved counters)."""
    region = f"recon-{new_id()}"
    servers = await add_servers(db, region, 3, ram_mb=1000, cpu_millis=1000)
    scheduler = Scheduler(db)
    for ram, cpu in [(300, 100), (200, 200), (500, 400), (100, 50), (700, 700)]:
        await scheduler.create(spec(region, ram, cpu))
    found = await assert_invariant(admin_url, servers)
    return servers, {sid: c.reserved for sid, c in found.items()}


async def test_reconciler_repairs_leaked_and_lost_reservations(
    db: Database, database_url: str
) -> None:
    servers, truth = await _fleet_with_deployments(db, database_url)
    # Best fit fills servers one by one: corrupt a full one, a busy one, leave one alone.
    lost, untouched, leaked = sorted(servers, key=lambda sid: truth[sid].ram_mb, reverse=True)
    await _corrupt(
        database_url,
        {leaked: Resources(900, 999), lost: Resources(0, 0)},
    )
    report = await Reconciler(db).reconcile_once()
    assert report is not None
    assert truth[lost] != Resources(0, 0)
    assert {d.server_id for d in report.repaired if d.server_id in servers} == {leaked, lost}
    assert untouched not in {d.server_id for d in report.repaired}
    found = await assert_invariant(database_url, servers)
    assert {sid: c.reserved for sid, c in found.items()} == truth
    again = await Reconciler(db).reconcile_once()
    assert again is not None and not again.repaired


async def test_two_reconcilers_at_once_leave_consistent_counters(
    db: Database, database_url: str, db_passwords: dict[str, str]
) -> None:
    servers, truth = await _fleet_with_deployments(db, database_url)
    await _corrupt(database_url, {sid: Resources(13, 17) for sid in servers})
    other = await runtime_database(database_url, db_passwords, max_size=4)
    try:
        reports = await asyncio.gather(
            *(Reconciler(db).reconcile_once() for _ in range(3)),
            *(Reconciler(other).reconcile_once() for _ in range(3)),
        )
    finally:
        await other.close()
    repaired = [d.server_id for r in reports if r is not None for d in r.repaired]
    # Each drifted server was repaired by exactly one of them; the others skipped or found none.
    assert sorted(s for s in repaired if s in servers) == sorted(servers)
    found = await assert_invariant(database_url, servers)
    assert {sid: c.reserved for sid, c in found.items()} == truth


async def test_reconciling_while_placements_and_releases_run_keeps_the_invariant(
    db: Database, database_url: str
) -> None:
    region = f"recon-busy-{new_id()}"
    servers = await add_servers(db, region, 4, ram_mb=2000, cpu_millis=2000)
    scheduler = Scheduler(db)
    reconciler = Reconciler(db)
    stop = asyncio.Event()
    repairs: list[str] = []

    async def reconcile_repeatedly() -> None:
        while not stop.is_set():
            report = await reconciler.reconcile_once()
            if report is not None:
                repairs.extend(d.server_id for d in report.repaired if d.server_id in servers)
                repairs.extend(t.server_id for t in report.retenanted if t.server_id in servers)

    async def churn(i: int) -> None:
        d = await scheduler.create(spec(region, 100 + 10 * (i % 5), 100))
        if d.server_id:
            await scheduler.mark_starting(d.id)
            if i % 2:
                await scheduler.cancel(d.id)
            else:
                await scheduler.fail(d.id, "exited", exit_code=1)

    task = asyncio.create_task(reconcile_repeatedly())
    await asyncio.gather(*(churn(i) for i in range(120)))
    stop.set()
    await task
    assert repairs == []  # nothing to repair: every change moved counters and flags together
    found = await counters(database_url, servers)
    assert all(c.reserved == c.actual == Resources(0, 0) for c in found.values())
    assert await _tenants(db, servers) == {sid: None for sid in servers}


async def _tenants(db: Database, server_ids: list[str]) -> dict[str, str | None]:
    async with db.session() as s:
        return {sid: (await store.get_server(s, sid)).tenant_organization_id for sid in server_ids}


async def _set_tenants(admin_url: str, values: dict[str, str | None]) -> None:
    """A hand edit (or a crash's leftovers) on servers' tenants, as a superuser."""
    conn = await asyncpg.connect(admin_url)
    try:
        for server_id, tenant in values.items():
            await conn.execute(
                "UPDATE runtime.servers SET tenant_organization_id = $2 WHERE id = $1",
                server_id,
                tenant,
            )
    finally:
        await conn.close()


async def test_reconciler_repairs_server_tenants(db: Database, database_url: str) -> None:
    region = f"recon-tenant-{new_id()}"
    unisolated = await add_servers(db, region, 2, 1000, 1000, isolation=Isolation.NONE)
    (shared,) = await add_servers(db, f"{region}-boxed", 1, 1000, 1000)
    scheduler = Scheduler(db)
    x, y = new_id(), new_id()
    held = (await scheduler.create(spec(region, 600, 100, organization_id=x))).server_id
    (empty,) = set(unisolated) - {held}
    for org in (x, y):
        await scheduler.create(spec(f"{region}-boxed", 100, 100, organization_id=org))
    assert await _tenants(db, [held, empty, shared]) == {
        held: x,
        empty: None,
        shared: SEVERAL_TENANTS,
    }
    await _set_tenants(database_url, {held: None, empty: "ghost", shared: y})
    report = await Reconciler(db).reconcile_once()
    assert report is not None
    repaired = {t.server_id: (t.recorded, t.actual) for t in report.retenanted}
    assert {sid: repaired.get(sid) for sid in (held, empty, shared)} == {
        held: (None, x),
        empty: ("ghost", None),
        shared: (y, SEVERAL_TENANTS),
    }
    # Repaired: Y's app is refused where X's runs, and goes to the free server.
    placed = await scheduler.create(spec(region, 100, 100, organization_id=y))
    assert placed.status is DeploymentState.SCHEDULING and placed.server_id == empty


async def test_churn_of_several_organizations_never_shares_an_unisolated_server(
    db: Database, database_url: str
) -> None:
    region = f"recon-orgs-{new_id()}"
    servers = await add_servers(db, region, 3, 1000, 1000, isolation=Isolation.NONE)
    organizations = [new_id() for _ in range(5)]
    scheduler = Scheduler(db)
    reconciler = Reconciler(db)
    stop = asyncio.Event()
    repairs: list[str] = []
    most: list[int] = []

    async def reconcile_repeatedly() -> None:
        while not stop.is_set():
            report = await reconciler.reconcile_once()
            if report is not None:
                repairs.extend(t.server_id for t in report.retenanted if t.server_id in servers)

    async def watch() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            while not stop.is_set():
                most.append(
                    await conn.fetchval(
                        "SELECT COALESCE(max(n), 0) FROM (SELECT count(DISTINCT organization_id)"
                        " AS n FROM runtime.deployments WHERE server_id = ANY($1::text[])"
                        " AND capacity_reserved GROUP BY server_id) x",
                        servers,
                    )
                )
                await asyncio.sleep(0.002)
        finally:
            await conn.close()

    async def churn(i: int) -> None:
        org = organizations[i % len(organizations)]
        d = await scheduler.create(spec(region, 100, 100, organization_id=org))
        if d.server_id:
            await asyncio.sleep(0.001 * (i % 7))
            await scheduler.mark_starting(d.id)
            if i % 2:
                await scheduler.cancel(d.id)
            else:
                await scheduler.fail(d.id, "exited", exit_code=1)
        else:
            await scheduler.cancel(d.id)

    tasks = [asyncio.create_task(reconcile_repeatedly()), asyncio.create_task(watch())]
    await asyncio.gather(*(churn(i) for i in range(150)))
    stop.set()
    await asyncio.gather(*tasks)
    assert most and max(most) <= 1
    assert repairs == []  # every release that emptied a server freed it in the same statement
    await assert_invariant(database_url, servers)
    assert await _tenants(db, servers) == {sid: None for sid in servers}
