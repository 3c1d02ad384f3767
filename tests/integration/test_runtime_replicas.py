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
from services.runtime.domain import DeploymentState, ServerState, replica_share, rollout_limits
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


async def _roll(
    db: Database, scheduler: Scheduler, old: list[Deployment], new: list[Deployment]
) -> list[tuple[int, int]]:
    """Drive a rolling rollout as the agents and the deployer would (each placed replica
    starts and runs, then the rollout's next step), recording after every step how many
    replicas of both hold capacity and how many serve."""
    steps = []
    for _ in range(20):
        async with db.session() as s:
            now = [await store.get_deployment(s, d.id) for d in old + new]
        holding = sum(d.capacity_reserved for d in now)
        serving = sum(d.status in (S.RUNNING, S.CRASH_LOOP) for d in now)
        steps.append((holding, serving))
        fresh = now[len(old) :]
        if all(d.status is S.RUNNING for d in fresh):
            return steps
        for d in fresh:
            if d.status is S.SCHEDULING:
                await scheduler.mark_starting(d.id)
                await scheduler.mark_running(d.id)
                break
        await scheduler.advance_rollouts()
    raise AssertionError(f"the rollout never finished: {steps}")


async def test_a_rolling_rollout_with_one_surge_never_holds_more_than_one_extra_replica(
    db: Database, database_url: str
) -> None:
    scheduler = Scheduler(db)
    region = f"surge-{new_id()}"
    servers = await add_servers(db, region, 4, ram_mb=1000, cpu_millis=1000)
    first = replicated(region, 3)
    old = await _run_all(scheduler, await scheduler.create_set(first))
    new = await scheduler.create_set(replace(first, max_surge=1, max_unavailable=0))
    assert [d.status for d in new] == [S.SCHEDULING, S.QUEUED, S.QUEUED]
    assert [d.held for d in new] == [False, True, True]
    steps = await _roll(db, scheduler, old, new)
    assert max(h for h, _ in steps) == 4  # 3 + max_surge
    assert min(s for _, s in steps) == 3  # 3 - max_unavailable
    assert await _statuses(db, old) == [S.SUPERSEDED] * 3
    async with db.session() as s:
        replaced = await store.get_deployment(s, old[1].id)
    assert replaced.status_reason.startswith("superseded by ")
    books = await assert_invariant(database_url, servers)
    assert sum(b.reserved.ram_mb for b in books.values()) == 300


async def test_a_rolling_rollout_with_no_room_to_spare_replaces_one_at_a_time(
    db: Database, database_url: str
) -> None:
    scheduler = Scheduler(db)
    region = f"in-place-{new_id()}"
    # Room for exactly three replicas: no surge possible.
    servers = await add_servers(db, region, 3, ram_mb=100, cpu_millis=100)
    first = replicated(region, 3)
    old = await _run_all(scheduler, await scheduler.create_set(first))
    new = await scheduler.create_set(replace(first, max_surge=0, max_unavailable=1))
    # One old replica makes room at once, and the first new one takes its place.
    assert [d.status for d in new] == [S.SCHEDULING, S.QUEUED, S.QUEUED]
    assert sum(s is S.SUPERSEDED for s in await _statuses(db, old)) == 1
    steps = await _roll(db, scheduler, old, new)
    assert max(h for h, _ in steps) == 3
    assert min(s for _, s in steps) == 2
    assert await _statuses(db, old) == [S.SUPERSEDED] * 3
    books = await assert_invariant(database_url, servers)
    assert all(b.reserved == Resources(100, 100) for b in books.values())


async def test_a_rolling_rollout_that_fails_at_its_first_replica_leaves_the_old_serving(
    db: Database,
) -> None:
    scheduler = Scheduler(db)
    region = f"halt-{new_id()}"
    await add_servers(db, region, 4, ram_mb=1000, cpu_millis=1000)
    first = replicated(region, 3)
    old = await _run_all(scheduler, await scheduler.create_set(first))
    new = await scheduler.create_set(replace(first, max_surge=1, max_unavailable=0))
    await scheduler.mark_starting(new[0].id)
    await scheduler.fail(new[0].id, "health check timed out")
    assert await _statuses(db, new) == [S.FAILED] * 3  # the held ones end with it
    assert await _statuses(db, old) == [S.RUNNING] * 3
    assert await scheduler.advance_rollouts() == 0


def test_rollout_limits_default_to_all_at_once_and_refuse_what_cannot_progress() -> None:
    assert rollout_limits(3, None, None) == (3, 0)
    assert rollout_limits(3, 1, None) == (1, 0)
    assert rollout_limits(3, 0, 1) == (0, 1)
    for surge, unavailable, field in (
        (4, 0, "deployment.max_surge"),
        (1, -1, "deployment.max_unavailable"),
        (0, 0, "deployment.max_surge"),
    ):
        with pytest.raises(InvalidArgument) as refused:
            rollout_limits(3, surge, unavailable)
        assert refused.value.violations[0].field == field


async def test_a_newer_release_cancels_what_a_rolling_one_never_placed(db: Database) -> None:
    scheduler = Scheduler(db)
    region = f"overtaken-{new_id()}"
    await add_servers(db, region, 4, ram_mb=1000, cpu_millis=1000)
    first = replicated(region, 3)
    old = await _run_all(scheduler, await scheduler.create_set(first))
    rolling = await scheduler.create_set(replace(first, max_surge=1, max_unavailable=0))
    newest = await _run_all(scheduler, await scheduler.create_set(first))
    assert await _statuses(db, old) == [S.SUPERSEDED] * 3
    assert await scheduler.advance_rollouts() == 0
    statuses = await _statuses(db, rolling)
    assert statuses[1:] == [S.CANCELLED, S.CANCELLED]  # held, never placed
    assert await _statuses(db, newest) == [S.RUNNING] * 3  # the stale rollout ended none
