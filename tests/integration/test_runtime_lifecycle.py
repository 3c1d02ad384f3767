"""The deployment state machine on rows: every end releases capacity exactly once, in the
transaction that ends it, with its event; illegal moves are refused and change nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.runtime import store
from services.runtime.domain import DeploymentState
from services.runtime.scheduler import STATUS_CHANGED, Scheduler
from shared.db import Database
from shared.errors import FailedPrecondition
from shared.ids import new_id
from shared.resources import Resources
from tests.support.runtime import add_servers, assert_invariant, runtime_database, spec

S = DeploymentState


@pytest.fixture
async def db(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Database]:
    database = await runtime_database(database_url, db_passwords)
    yield database
    await database.close()


@pytest.fixture
async def fleet(db: Database) -> tuple[str, str]:
    """(region, server id): one server of 1000 MB / 1000 mCPU."""
    region = f"life-{new_id()}"
    (server,) = await add_servers(db, region, 1, ram_mb=1000, cpu_millis=1000)
    return region, server


async def _reserved(database_url: str, server: str) -> Resources:
    found = await assert_invariant(database_url, [server])
    return found[server].reserved


async def _events(db: Database, deployment_id: str) -> list[tuple[str, str, bool]]:
    async with db.session() as s:
        rows = await s.fetch(
            "SELECT payload FROM runtime.outbox WHERE type = $1 AND aggregate_id = $2"
            " ORDER BY txid, position",
            STATUS_CHANGED,
            deployment_id,
        )
    return [
        (r["payload"]["from"], r["payload"]["to"], r["payload"]["capacity_reserved"]) for r in rows
    ]


async def _run(scheduler: Scheduler, deployment_id: str) -> None:
    await scheduler.mark_starting(deployment_id)
    await scheduler.mark_running(deployment_id)


async def test_cancel_releases_once_and_a_second_cancel_is_refused(
    db: Database, database_url: str, fleet: tuple[str, str]
) -> None:
    region, server = fleet
    scheduler = Scheduler(db)
    d = await scheduler.create(spec(region, 300, 200))
    await scheduler.mark_starting(d.id)
    assert await _reserved(database_url, server) == Resources(300, 200)
    cancelled = await scheduler.cancel(d.id)
    assert cancelled.status is S.CANCELLED and not cancelled.capacity_reserved
    assert await _reserved(database_url, server) == Resources(0, 0)
    with pytest.raises(FailedPrecondition):
        await scheduler.cancel(d.id)
    assert await _reserved(database_url, server) == Resources(0, 0)
    assert await _events(db, d.id) == [
        ("", "queued", False),
        ("queued", "scheduling", True),
        ("scheduling", "starting", True),
        ("starting", "cancelled", False),
    ]


async def test_concurrent_cancel_and_failure_release_exactly_once(
    db: Database, database_url: str, fleet: tuple[str, str]
) -> None:
    region, server = fleet
    scheduler = Scheduler(db)
    other = await scheduler.create(spec(region, 100, 100))
    d = await scheduler.create(spec(region, 400, 300))
    await scheduler.mark_starting(d.id)
    outcomes = await asyncio.gather(
        *(scheduler.cancel(d.id) for _ in range(5)),
        *(scheduler.fail(d.id, "health check timed out") for _ in range(5)),
        return_exceptions=True,
    )
    ended = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(ended) == 1
    assert all(isinstance(o, FailedPrecondition) for o in outcomes if o not in ended)
    assert await _reserved(database_url, server) == other.resources


async def test_failure_records_reason_and_exit_code_and_releases(
    db: Database, database_url: str, fleet: tuple[str, str]
) -> None:
    region, server = fleet
    scheduler = Scheduler(db)
    d = await scheduler.create(spec(region, 250, 250))
    await _run(scheduler, d.id)
    failed = await scheduler.fail(d.id, "process exited", exit_code=3)
    assert (failed.status, failed.exit_code, failed.status_reason) == (
        S.FAILED,
        3,
        "process exited",
    )
    assert await _reserved(database_url, server) == Resources(0, 0)


async def test_running_supersedes_the_previous_one_and_releases_it(
    db: Database, database_url: str, fleet: tuple[str, str]
) -> None:
    region, server = fleet
    scheduler = Scheduler(db)
    project, org = new_id(), new_id()
    first = await scheduler.create(spec(region, 300, 100, project_id=project, organization_id=org))
    await _run(scheduler, first.id)
    second = await scheduler.create(spec(region, 200, 100, project_id=project, organization_id=org))
    await scheduler.mark_starting(second.id)
    assert await _reserved(database_url, server) == Resources(500, 200)  # both, while starting
    await scheduler.mark_running(second.id)
    assert await _reserved(database_url, server) == Resources(200, 100)
    async with db.session() as s:
        old = await store.get_deployment(s, first.id)
    assert old.status is S.SUPERSEDED and not old.capacity_reserved
    assert second.id in old.status_reason
    assert (await _events(db, first.id))[-1] == ("running", "superseded", False)


async def test_two_deployments_of_a_project_racing_to_running_leave_one_running(
    db: Database, database_url: str, fleet: tuple[str, str]
) -> None:
    region, server = fleet
    scheduler = Scheduler(db)
    project, org = new_id(), new_id()
    deployments = [
        await scheduler.create(spec(region, 100, 100, project_id=project, organization_id=org))
        for _ in range(4)
    ]
    for d in deployments:
        await scheduler.mark_starting(d.id)
    await asyncio.gather(*(scheduler.mark_running(d.id) for d in deployments))
    async with db.session() as s:
        statuses = [(await store.get_deployment(s, d.id)).status for d in deployments]
    assert sorted(statuses) == sorted([S.RUNNING, S.SUPERSEDED, S.SUPERSEDED, S.SUPERSEDED])
    assert await _reserved(database_url, server) == Resources(100, 100)


async def test_rollback_runs_the_last_good_spec_and_ends_the_current_rolled_back(
    db: Database, database_url: str, fleet: tuple[str, str]
) -> None:
    region, server = fleet
    scheduler = Scheduler(db)
    project, org = new_id(), new_id()
    good = await scheduler.create(
        spec(region, 200, 100, project_id=project, organization_id=org, command="good")
    )
    await _run(scheduler, good.id)
    bad = await scheduler.create(
        spec(region, 300, 100, project_id=project, organization_id=org, command="bad")
    )
    await _run(scheduler, bad.id)
    assert await _reserved(database_url, server) == Resources(300, 100)
    rollback = await scheduler.roll_back(bad.id)
    assert rollback.command == "good" and rollback.rolled_back_from == bad.id
    assert rollback.status is S.SCHEDULING
    # The current one keeps serving until the rollback runs.
    assert await _reserved(database_url, server) == Resources(500, 200)
    await _run(scheduler, rollback.id)
    async with db.session() as s:
        ended = await store.get_deployment(s, bad.id)
    assert ended.status is S.ROLLED_BACK and not ended.capacity_reserved
    assert await _reserved(database_url, server) == Resources(200, 100)
    with pytest.raises(FailedPrecondition):
        await scheduler.roll_back(bad.id)


async def test_rollback_with_nothing_earlier_is_refused(
    db: Database, fleet: tuple[str, str]
) -> None:
    region, _ = fleet
    scheduler = Scheduler(db)
    only = await scheduler.create(spec(region, 100, 100))
    await _run(scheduler, only.id)
    with pytest.raises(FailedPrecondition) as caught:
        await scheduler.roll_back(only.id)
    assert caught.value.reason == "NOTHING_TO_ROLL_BACK_TO"


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], S.RUNNING),  # scheduling -> running skips starting
        ([], S.QUEUED),  # placed ones never go back to the queue
        ([], S.SUPERSEDED),
        ([S.STARTING], S.SCHEDULING),  # backwards
        ([S.STARTING, S.RUNNING], S.CANCELLED),  # running cannot be cancelled
        ([S.STARTING, S.RUNNING], S.STARTING),
        ([S.STARTING, S.FAILED], S.RUNNING),  # ends are ends
        ([S.CANCELLED], S.FAILED),
    ],
)
async def test_illegal_transitions_are_refused_and_change_nothing(
    db: Database,
    database_url: str,
    fleet: tuple[str, str],
    path: list[DeploymentState],
    illegal: DeploymentState,
) -> None:
    region, server = fleet
    scheduler = Scheduler(db)
    d = await scheduler.create(spec(region, 100, 100))
    for step in path:
        await scheduler.transition(d.id, step)
    async with db.session() as s:
        before = await store.get_deployment(s, d.id)
    events_before = await _events(db, d.id)
    with pytest.raises(FailedPrecondition) as caught:
        await scheduler.transition(d.id, illegal)
    assert caught.value.reason == "ILLEGAL_TRANSITION"
    async with db.session() as s:
        assert await store.get_deployment(s, d.id) == before
    assert await _events(db, d.id) == events_before
    await assert_invariant(database_url, [server])


async def test_a_queued_deployment_cannot_start_or_run(db: Database) -> None:
    scheduler = Scheduler(db)
    queued = await scheduler.create(spec(f"empty-{new_id()}", 100, 100))
    assert queued.status is S.QUEUED
    for illegal in (S.STARTING, S.RUNNING, S.SUPERSEDED, S.ROLLED_BACK):
        with pytest.raises(FailedPrecondition):
            await scheduler.transition(queued.id, illegal)
    assert (await scheduler.cancel(queued.id)).status is S.CANCELLED
