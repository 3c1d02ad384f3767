"""Placement on a real PostgreSQL with real concurrent callers: best fit, no over-commit,
queued until room frees or the deadline passes."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.runtime import store
from services.runtime.domain import DeploymentState, ServerState
from services.runtime.scheduler import Scheduler
from shared.db import Database
from shared.ids import new_id
from shared.resources import Resources
from tests.support.runtime import add_servers, assert_invariant, runtime_database, spec

S = DeploymentState


@pytest.fixture
async def db(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Database]:
    database = await runtime_database(database_url, db_passwords)
    yield database
    await database.close()


async def _statuses(db: Database, ids: list[str]) -> Counter[str]:
    async with db.session() as s:
        rows = await s.fetch(
            "SELECT status FROM runtime.deployments WHERE id = ANY($1::text[])", ids
        )
    return Counter(r["status"] for r in rows)


async def test_200_concurrent_placements_on_room_for_50_place_exactly_50(
    db: Database, database_url: str
) -> None:
    region = f"race-{new_id()}"
    servers = await add_servers(db, region, count=5, ram_mb=1000, cpu_millis=1000)
    scheduler = Scheduler(db)
    stop = asyncio.Event()
    peaks: list[tuple[int, int, int, int]] = []

    async def watch_counters() -> None:
        # Read as a superuser while placements run: never above capacity at any moment.
        conn = await asyncpg.connect(database_url)
        try:
            while not stop.is_set():
                rows = await conn.fetch(
                    "SELECT ram_mb, cpu_millis, ram_mb_reserved, cpu_millis_reserved"
                    " FROM runtime.servers WHERE id = ANY($1::text[])",
                    servers,
                )
                peaks.extend(tuple(r) for r in rows)
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch_counters())
    results = await asyncio.gather(*(scheduler.create(spec(region, 100, 100)) for _ in range(200)))
    stop.set()
    await watcher

    placed = [d for d in results if d.status is S.SCHEDULING]
    assert len(placed) == 50
    assert all(d.capacity_reserved and d.server_id in servers for d in placed)
    assert Counter(d.server_id for d in placed) == {sid: 10 for sid in servers}
    assert all(d.status is S.QUEUED and not d.capacity_reserved for d in results if d not in placed)
    assert await _statuses(db, [d.id for d in results]) == {"scheduling": 50, "queued": 150}
    found = await assert_invariant(database_url, servers)
    assert all(c.reserved == Resources(1000, 1000) for c in found.values())
    assert peaks and all(r <= ram and c <= cpu for ram, cpu, r, c in peaks)


async def test_mixed_sizes_under_contention_never_over_commit(
    db: Database, database_url: str
) -> None:
    region = f"mixed-{new_id()}"
    servers = await add_servers(db, region, count=5, ram_mb=2048, cpu_millis=2000)
    scheduler = Scheduler(db)
    sizes = [(64 * (1 + i % 7), 50 * (1 + i % 5)) for i in range(300)]
    results = await asyncio.gather(*(scheduler.create(spec(region, r, c)) for r, c in sizes))
    placed = [d for d in results if d.status is S.SCHEDULING]
    assert 0 < len(placed) < len(sizes)
    found = await assert_invariant(database_url, servers)
    assert sum(c.reserved.ram_mb for c in found.values()) == sum(d.resources.ram_mb for d in placed)


async def test_placement_is_best_fit_and_skips_draining_and_other_regions(
    db: Database, database_url: str
) -> None:
    region = f"fit-{new_id()}"
    roomy, snug, cpu_poor = await add_servers(db, region, 3, ram_mb=4096, cpu_millis=4000)
    draining, elsewhere = await add_servers(db, f"other-{new_id()}", 2, 512, 500)
    async with db.transaction() as tx:
        await store.set_reserved(tx, snug, Resources(3584, 1000))  # 512 MB left
        await store.set_reserved(tx, cpu_poor, Resources(3700, 3950))  # 396 MB, 50 mCPU
        await store.set_server_status(tx, draining, ServerState.DRAINING)
    # Those counters are hand-set: balance them with reserved deployments the invariant sees.
    scheduler = Scheduler(db)
    first = await scheduler.create(spec(region, 256, 100))
    assert first.server_id == snug  # leaves 256 MB, the least of the servers it fits
    second = await scheduler.create(spec(region, 300, 100))
    assert second.server_id == roomy  # snug has 256 MB left now; cpu_poor lacks CPU
    nowhere = await scheduler.create(spec(f"void-{new_id()}", 64, 10))
    assert nowhere.status is S.QUEUED and not nowhere.server_id
    async with db.transaction() as tx:
        await store.set_reserved(tx, snug, Resources(256, 100))
        await store.set_reserved(tx, cpu_poor, Resources(0, 0))
    await assert_invariant(database_url, [roomy, snug, cpu_poor, draining, elsewhere])


async def test_a_queued_deployment_is_placed_once_room_frees(
    db: Database, database_url: str
) -> None:
    region = f"queue-{new_id()}"
    (server,) = await add_servers(db, region, 1, ram_mb=512, cpu_millis=500)
    scheduler = Scheduler(db)
    holder = await scheduler.create(spec(region, 512, 500))
    waiting = await scheduler.create(spec(region, 256, 100))
    assert waiting.status is S.QUEUED
    pass1 = await scheduler.place_queued()  # the whole queue: other tests' rows too
    assert pass1.waiting >= 1
    async with db.session() as s:
        assert (await store.get_deployment(s, waiting.id)).status is S.QUEUED
    await scheduler.cancel(holder.id)
    await scheduler.place_queued()
    async with db.session() as s:
        placed = await store.get_deployment(s, waiting.id)
    assert placed.status is S.SCHEDULING and placed.server_id == server
    await assert_invariant(database_url, [server])


async def test_two_replicas_retrying_the_queue_place_each_deployment_once(
    db: Database, database_url: str
) -> None:
    region = f"replicas-{new_id()}"
    servers = await add_servers(db, region, 2, ram_mb=1000, cpu_millis=1000)
    scheduler = Scheduler(db)
    blockers = [await scheduler.create(spec(region, 1000, 1000)) for _ in servers]
    queued = await asyncio.gather(*(scheduler.create(spec(region, 100, 100)) for _ in range(30)))
    assert all(d.status is S.QUEUED for d in queued)
    for blocker in blockers:
        await scheduler.cancel(blocker.id)
    replicas = [Scheduler(db), Scheduler(db)]
    passes = await asyncio.gather(*(r.place_queued() for r in replicas for _ in range(3)))
    assert sum(p.placed for p in passes) == 20
    assert (await _statuses(db, [d.id for d in queued]))["scheduling"] == 20
    await assert_invariant(database_url, servers)


async def test_past_its_deadline_a_queued_deployment_fails_with_the_reason(
    db: Database, database_url: str
) -> None:
    region = f"deadline-{new_id()}"
    (server,) = await add_servers(db, region, 1, ram_mb=256, cpu_millis=250)
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    scheduler = Scheduler(db, schedule_timeout_seconds=60, clock=lambda: now[0])
    too_big = await scheduler.create(spec(region, 512, 100))
    assert too_big.status is S.QUEUED
    now[0] += timedelta(seconds=59)
    await scheduler.place_queued()
    async with db.session() as s:
        assert (await store.get_deployment(s, too_big.id)).status is S.QUEUED
    now[0] += timedelta(seconds=2)
    await scheduler.place_queued()
    async with db.session() as s:
        failed = await store.get_deployment(s, too_big.id)
    assert failed.status is S.FAILED and not failed.capacity_reserved
    assert region in failed.status_reason and "512 MB" in failed.status_reason
    await assert_invariant(database_url, [server])


async def _outbox(db: Database, deployment_id: str) -> list[tuple[str, dict[str, object]]]:
    async with db.session() as s:
        rows = await s.fetch(
            "SELECT type, payload FROM runtime.outbox WHERE aggregate_id = $1"
            " ORDER BY txid, position",
            deployment_id,
        )
    return [(r["type"], r["payload"]) for r in rows]


def _comparable(deployment: store.Deployment, written: list[tuple[str, dict]]) -> list[object]:
    """The outbox rows with this deployment's own ids replaced by placeholders."""
    own = {deployment.id: "<deployment>", deployment.server_id: "<server>"}

    def plain(value: object) -> object:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return own.get(value, value) if isinstance(value, str) else value

    return [(kind, plain(payload)) for kind, payload in written]


@pytest.mark.parametrize("room", [True, False], ids=["placed", "queued"])
async def test_one_statement_create_writes_what_the_transactional_path_writes(
    db: Database, room: bool
) -> None:
    """CreateDeployment as one statement (as shipped) and as insert + place in a
    transaction: the same row, the same events and audit entries in the same order."""
    results = []
    for reserve in (None, store.reserve_capacity):
        region = f"same-{new_id()}"
        await add_servers(db, region, 1, ram_mb=512 if room else 64, cpu_millis=500)
        made = await Scheduler(db, reserve=reserve).create(
            spec(region, 256, 100, project_id="p-same", organization_id="o-same")
        )
        assert made.status is (S.SCHEDULING if room else S.QUEUED)
        assert made.capacity_reserved is room and bool(made.server_id) is room
        results.append((made, _comparable(made, await _outbox(db, made.id))))
    (one, one_written), (two, two_written) = results
    assert one_written == two_written
    assert len(one_written) == (4 if room else 2)  # an event and an audit entry per change
    assert (one.status_reason, one.schedule_deadline is not None) == (
        two.status_reason,
        two.schedule_deadline is not None,
    )


async def test_create_while_the_only_fitting_server_is_locked_waits_for_it(
    db: Database, database_url: str
) -> None:
    """SKIP LOCKED misses while another transaction holds the row: the create tries again,
    then waits, and is placed once the row is free (never queued for a busy server)."""
    region = f"locked-{new_id()}"
    (server,) = await add_servers(db, region, 1, ram_mb=512, cpu_millis=500)
    scheduler = Scheduler(db)
    holder = await asyncpg.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM runtime.servers WHERE id = $1 FOR UPDATE", server)
        creating = asyncio.create_task(scheduler.create(spec(region, 256, 100)))
        await asyncio.sleep(0.3)  # past every SKIP LOCKED attempt: now waiting on the row
        assert not creating.done()
        await tx.rollback()
        placed = await asyncio.wait_for(creating, 30)
    finally:
        await holder.close()
    assert placed.status is S.SCHEDULING and placed.server_id == server
    await assert_invariant(database_url, [server])
