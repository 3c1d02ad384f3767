"""Replicas on rows: a release of N replicas is N deployments of one set, placed on servers
that hold no other replica of it while one fits, with capacity counted once per replica; a
set runs whole or not at all (a replica failing before its set serves takes its siblings
with it), a newer set supersedes every replica of the serving one at once, and a replica
moved off a down server stays in its set, away from its siblings."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from services.runtime import store
from services.runtime.domain import DeploymentState, ServerState, replica_share
from services.runtime.scheduler import Scheduler
from services.runtime.store import Deployment, DeploymentSpec
from shared.db import Database
from shared.errors import InvalidArgument
from shared.ids import new_id
from shared.resources import Resources
from tests.support.runtime import add_servers, assert_invariant, runtime_database, spec

S = DeploymentState


@pytest.fixture
async def db(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Database]:
    database = await runtime_database(database_url, db_passwords)
    yield database
    await database.close()


def replicated(
    region: str, replicas: int, ram_mb: int = 100, cpu_millis: int = 100
) -> DeploymentSpec:
    return replace(spec(region, ram_mb, cpu_millis), replicas=replicas)


async def _run_all(scheduler: Scheduler, replicas: list[Deployment]) -> list[Deployment]:
    for replica in replicas:
        await scheduler.mark_starting(replica.id)
    return [await scheduler.mark_running(replica.id) for replica in replicas]


async def _statuses(db: Database, deployments: list[Deployment]) -> list[S]:
    async with db.session() as s:
        return [(await store.get_deployment(s, d.id)).status for d in deployments]


async def test_replicas_spread_over_servers_and_share_one_only_when_none_other_fits(
    db: Database, database_url: str
) -> None:
    scheduler = Scheduler(db)
    region = f"spread-{new_id()}"
    servers = await add_servers(db, region, 3, ram_mb=1000, cpu_millis=1000)
    placed = await scheduler.create_set(replicated(region, 3, 300, 200))
    assert [p.status for p in placed] == [S.SCHEDULING] * 3
    assert sorted(p.server_id for p in placed) == sorted(servers)
    assert [p.replica_index for p in placed] == [0, 1, 2]
    assert {p.replica_set_id for p in placed} == {placed[0].id}
    assert all(p.replicas == 3 for p in placed)
    books = await assert_invariant(database_url, servers)
    assert all(books[s].reserved == Resources(300, 200) for s in servers)

    # Four more replicas on three servers: one server takes two, none takes three.
    more = await scheduler.create_set(replicated(region, 4, 100, 100))
    assert sorted(Counter(p.server_id for p in more).values()) == [1, 1, 2]

    lone = f"lone-{new_id()}"
    (server,) = await add_servers(db, lone, 1, ram_mb=1000, cpu_millis=1000)
    together = await scheduler.create_set(replicated(lone, 2, 300, 200))
    assert [p.server_id for p in together] == [server, server]
    assert (await assert_invariant(database_url, [server]))[server].reserved == Resources(600, 400)


async def test_a_replica_failing_before_its_set_serves_takes_the_set_down(
    db: Database, database_url: str
) -> None:
    scheduler = Scheduler(db)
    region = f"whole-{new_id()}"
    # Room for two replicas: the third waits in the queue.
    servers = await add_servers(db, region, 2, ram_mb=300, cpu_millis=300)
    placed = await scheduler.create_set(replicated(region, 3, 200, 200))
    assert [p.status for p in placed] == [S.SCHEDULING, S.SCHEDULING, S.QUEUED]
    await scheduler.mark_starting(placed[0].id)
    await scheduler.fail(placed[1].id, "health check timed out")
    statuses = await _statuses(db, placed)
    assert statuses == [S.FAILED, S.FAILED, S.FAILED]
    async with db.session() as s:
        sibling = await store.get_deployment(s, placed[0].id)
    assert "replica 1 of this release failed: health check timed out" in sibling.status_reason
    books = await assert_invariant(database_url, servers)
    assert all(books[s].reserved == Resources(0, 0) for s in servers)

    cancelled = await scheduler.create_set(replicated(region, 2, 100, 100))
    await scheduler.cancel(cancelled[1].id)
    assert await _statuses(db, cancelled) == [S.CANCELLED, S.CANCELLED]


async def test_a_serving_set_goes_on_when_one_replica_fails(
    db: Database, database_url: str
) -> None:
    scheduler = Scheduler(db)
    region = f"goes-on-{new_id()}"
    servers = await add_servers(db, region, 2, ram_mb=1000, cpu_millis=1000)
    placed = await _run_all(scheduler, await scheduler.create_set(replicated(region, 2)))
    await scheduler.fail(placed[0].id, "the app exited", exit_code=1)
    assert await _statuses(db, placed) == [S.FAILED, S.RUNNING]
    books = await assert_invariant(database_url, servers)
    assert books[placed[1].server_id].reserved == Resources(100, 100)
    assert books[placed[0].server_id].reserved == Resources(0, 0)


async def test_a_newer_set_supersedes_every_replica_of_the_serving_one_at_once(
    db: Database, database_url: str
) -> None:
    scheduler = Scheduler(db)
    region = f"switch-{new_id()}"
    servers = await add_servers(db, region, 3, ram_mb=1000, cpu_millis=1000)
    first = replicated(region, 3)
    old = await _run_all(scheduler, await scheduler.create_set(first))
    # The project scales down to two: both old replicas of index < 2 and the third end.
    new = await scheduler.create_set(replace(first, replicas=2))
    await scheduler.mark_starting(new[0].id)
    await scheduler.mark_starting(new[1].id)
    await scheduler.mark_running(new[0].id)
    assert await _statuses(db, old) == [S.SUPERSEDED] * 3
    await scheduler.mark_running(new[1].id)  # joins its set: supersedes nothing more
    assert await _statuses(db, new) == [S.RUNNING, S.RUNNING]
    async with db.session() as s:
        ended = await store.get_deployment(s, old[2].id)
    assert ended.status_reason == f"superseded by {new[0].id}"
    books = await assert_invariant(database_url, servers)
    assert sum(b.reserved.ram_mb for b in books.values()) == 200

    # Rolled back: the earlier release comes back with its three replicas.
    back = await scheduler.roll_back(new[1].id)
    assert back.replicas == 3 and back.release_reason.value == "rollback"
    async with db.session() as s:
        rows = await s.fetch(
            "SELECT id FROM runtime.deployments WHERE replica_set_id = $1 ORDER BY replica_index",
            back.replica_set_id,
        )
        rollback = [await store.get_deployment(s, r["id"]) for r in rows]
    assert [r.replica_index for r in rollback] == [0, 1, 2]
    await _run_all(scheduler, rollback)
    assert await _statuses(db, new) == [S.ROLLED_BACK, S.ROLLED_BACK]


async def test_a_replica_moved_off_a_down_server_stays_in_its_set_away_from_its_sibling(
    db: Database, database_url: str
) -> None:
    scheduler = Scheduler(db)
    region = f"move-{new_id()}"
    servers = await add_servers(db, region, 3, ram_mb=1000, cpu_millis=1000)
    placed = await _run_all(scheduler, await scheduler.create_set(replicated(region, 2)))
    down, sibling = placed[0], placed[1]
    spare = next(s for s in servers if s not in (down.server_id, sibling.server_id))
    async with db.transaction() as tx:
        await store.set_server_status(tx, down.server_id, ServerState.DOWN)
    async with db.transaction() as tx:
        moved = await scheduler.fail_over(tx, down.id)
    assert moved is not None
    assert (moved.replica_set_id, moved.replica_index, moved.server_id) == (
        down.replica_set_id,
        0,
        spare,
    )
    assert await _statuses(db, placed) == [S.FAILED, S.RUNNING]  # the sibling serves on
    await scheduler.mark_starting(moved.id)
    await scheduler.mark_running(moved.id)
    assert await _statuses(db, [sibling, moved]) == [S.RUNNING, S.RUNNING]
    books = await assert_invariant(database_url, servers)
    assert books[down.server_id].reserved == Resources(0, 0)
    assert books[spare].reserved == books[sibling.server_id].reserved == Resources(100, 100)


async def test_concurrent_sets_never_over_commit(db: Database, database_url: str) -> None:
    scheduler = Scheduler(db)
    region = f"race-{new_id()}"
    servers = await add_servers(db, region, 4, ram_mb=500, cpu_millis=500)
    sets = await asyncio.gather(
        *(scheduler.create_set(replicated(region, 3, 100, 100)) for _ in range(10))
    )
    placed = [d for s in sets for d in s if d.status is S.SCHEDULING]
    assert len(placed) == 20  # 4 servers x 5 replicas of 100 MB; the other ten wait
    books = await assert_invariant(database_url, servers)
    assert all(b.reserved == Resources(500, 500) for b in books.values())
    for members in sets:
        assert len({m.replica_set_id for m in members}) == 1
        assert sorted(m.replica_index for m in members) == [0, 1, 2]


def test_replicas_divide_the_project_s_resources_and_refuse_too_small_shares() -> None:
    assert replica_share(Resources(256, 250), 0) == (1, Resources(256, 250))
    assert replica_share(Resources(256, 250), 3) == (3, Resources(85, 83))
    for bad in (-1, 21):
        with pytest.raises(InvalidArgument) as refused:
            replica_share(Resources(4096, 4000), bad)
        assert refused.value.violations[0].field == "deployment.replicas"
    with pytest.raises(InvalidArgument) as small:
        replica_share(Resources(64, 50), 5)
    assert "12 MB and 10 mCPU each" in small.value.violations[0].description
