"""The outbox pattern on real PostgreSQL: events appear in commit-safe order, a transaction
that commits late is never skipped, and a consumer applies each event once even with two
replicas running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from hangar.events.v1 import events_pb2
from shared.db import Database, Session
from shared.errors import Unavailable
from shared.migrate import migrate
from shared.outbox import START, Cursor, EventConsumer, OutboxFeed, write_event
from shared.settings import role_name, url_with_credentials

SCHEMA = "identity"  # any service schema has the same outbox; identity's role writes it


@pytest.fixture(scope="module")
def outbox_database_url(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    """A database of this module's own: these tests read the whole feed from its start."""
    url = create_database("hangar_outbox")
    migrate(url, db_passwords)
    return url


@pytest.fixture
async def db(outbox_database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Database]:
    url = url_with_credentials(outbox_database_url, role_name(SCHEMA), db_passwords[SCHEMA])
    database = await Database.connect(url, min_size=1, max_size=6)
    async with database.session() as s:
        await s.execute(f"DELETE FROM {SCHEMA}.outbox")
        await s.execute(f"DELETE FROM {SCHEMA}.event_cursors")
    yield database
    await database.close()


async def test_event_of_an_older_open_transaction_holds_back_newer_ones(db: Database) -> None:
    feed = OutboxFeed(db, SCHEMA)
    async with db.pool.acquire() as slow_conn:
        slow_tx = slow_conn.transaction()
        await slow_tx.start()
        await write_event(Session(slow_conn), SCHEMA, "test.slow", aggregate_id="slow")
        async with db.transaction() as fast:
            await write_event(fast, SCHEMA, "test.fast", aggregate_id="fast")
        # The fast one committed, but serving it now would let a cursor pass the slow one.
        assert await feed.read(Cursor.parse(START)) == []
        await slow_tx.commit()
    events = await feed.read(Cursor.parse(START))
    assert [e.aggregate_id for e in events] == ["slow", "fast"]
    assert Cursor.parse(events[0].cursor) < Cursor.parse(events[1].cursor)
    assert await feed.read(Cursor.parse(events[-1].cursor)) == []


async def test_rolled_back_change_publishes_nothing(db: Database) -> None:
    feed = OutboxFeed(db, SCHEMA)
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await write_event(tx, SCHEMA, "test.rolled_back")
            raise RuntimeError("the change failed")
    assert await feed.read(Cursor.parse(START)) == []


async def test_watch_streams_history_then_live_events(db: Database) -> None:
    feed = OutboxFeed(db, SCHEMA, poll_seconds=0.2)
    await feed.start()
    try:
        async with db.transaction() as tx:
            await write_event(tx, SCHEMA, "test.first", organization_id="org-a")
        received: list[events_pb2.Event] = []

        async def watch() -> None:
            async for event in feed.watch(events_pb2.WatchEventsRequest(), None):  # type: ignore[arg-type]
                received.append(event)
                if len(received) == 2:
                    return

        task = asyncio.create_task(watch())
        await asyncio.sleep(0.3)
        async with db.transaction() as tx:
            await write_event(tx, SCHEMA, "test.second", payload={"n": 2})
        await asyncio.wait_for(task, 10)
        assert [e.type for e in received] == ["test.first", "test.second"]
        assert received[0].organization_id == "org-a"
        assert received[1].payload["n"] == 2
    finally:
        await feed.close()


async def test_end_watches_ends_waiting_and_new_watchers_at_once(db: Database) -> None:
    """At shutdown the server ends its streams (UNAVAILABLE: the consumer reconnects) instead
    of leaving them to the end of the grace period; a long poll interval does not delay it."""
    feed = OutboxFeed(db, SCHEMA, poll_seconds=60)
    await feed.start()
    try:
        async with db.transaction() as tx:
            await write_event(tx, SCHEMA, "test.history")
        received: asyncio.Queue[events_pb2.Event] = asyncio.Queue()

        async def watch() -> None:
            async for event in feed.watch(events_pb2.WatchEventsRequest(), None):  # type: ignore[arg-type]
                received.put_nowait(event)

        watchers = [asyncio.create_task(watch()) for _ in range(3)]
        for _ in watchers:  # each has its history, then waits for the next event
            await asyncio.wait_for(received.get(), 10)
        feed.end_watches()
        results = await asyncio.wait_for(asyncio.gather(*watchers, return_exceptions=True), 5)
        assert [type(r) for r in results] == [Unavailable] * 3
        with pytest.raises(Unavailable):
            await asyncio.wait_for(watch(), 5)
    finally:
        await feed.close()


async def test_a_commit_wakes_another_replicas_watcher_without_waiting_for_its_poll(
    db: Database, outbox_database_url: str, db_passwords: dict[str, str]
) -> None:
    """The writer's process NOTIFYs after its commit (the outbox has no trigger any more):
    replica B, polling only every 60 s, still sees replica A's event as it commits."""
    url = url_with_credentials(outbox_database_url, role_name(SCHEMA), db_passwords[SCHEMA])
    other = await Database.connect(url, min_size=1, max_size=2)
    writer, watcher = OutboxFeed(db, SCHEMA), OutboxFeed(other, SCHEMA, poll_seconds=60)
    await writer.start()
    await watcher.start()
    try:
        received: asyncio.Queue[events_pb2.Event] = asyncio.Queue()

        async def watch() -> None:
            async for event in watcher.watch(events_pb2.WatchEventsRequest(), None):  # type: ignore[arg-type]
                received.put_nowait(event)

        task = asyncio.create_task(watch())
        await asyncio.sleep(0.2)  # the watcher has read the (empty) history and waits
        async with db.transaction() as tx:
            await write_event(tx, SCHEMA, "test.replicated", aggregate_id="a")
        async with db.session() as s:  # autocommit writes announce themselves too
            await write_event(s, SCHEMA, "test.replicated", aggregate_id="b")
        got = [await asyncio.wait_for(received.get(), 30) for _ in range(2)]
        assert [e.aggregate_id for e in got] == ["a", "b"]
        task.cancel()
    finally:
        await watcher.close()
        await writer.close()
        await other.close()


async def test_pokes_while_a_notify_is_pending_share_it(db: Database) -> None:
    """However many commits poke at once, one NOTIFY is sent for them (coalesced)."""
    feed = OutboxFeed(db, SCHEMA)
    await feed.start()
    seen: list[str] = []
    done = asyncio.Event()
    async with db.pool.acquire() as listener:

        def on_notify(_conn: object, _pid: int, channel: str, _payload: str) -> None:
            seen.append(channel)
            if channel == "test_sentinel":
                done.set()

        await listener.add_listener(feed.channel, on_notify)
        await listener.add_listener("test_sentinel", on_notify)
        try:
            for _ in range(100):
                feed.poke()
            assert feed._notifier is not None
            await feed._notifier
            async with db.session() as s:  # delivered after anything committed before it
                await s.execute("NOTIFY test_sentinel")
            await asyncio.wait_for(done.wait(), 30)
        finally:
            await listener.remove_listener(feed.channel, on_notify)
            await listener.remove_listener("test_sentinel", on_notify)
            await feed.close()
    assert seen == [feed.channel, "test_sentinel"]


async def test_two_consumer_replicas_apply_each_event_once_and_resume(db: Database) -> None:
    feed = OutboxFeed(db, SCHEMA, poll_seconds=0.1)
    await feed.start()
    applied: list[str] = []

    async def handler(tx: Session, event: events_pb2.Event) -> None:
        applied.append(event.id)

    def consumer() -> EventConsumer:
        return EventConsumer(
            db,
            SCHEMA,
            consumer="test-consumer",
            source=SCHEMA,
            watch=lambda request: feed.watch(request, None),  # type: ignore[arg-type]
            handler=handler,
            retry_seconds=0.1,
        )

    try:
        ids = []
        for i in range(20):
            async with db.transaction() as tx:
                ids.append(await write_event(tx, SCHEMA, "test.n", payload={"i": i}))
        replicas = [asyncio.create_task(consumer().run()) for _ in range(2)]
        for _ in range(100):
            if len(applied) >= 20:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # room for a wrongly duplicated delivery to show up
        for task in replicas:
            task.cancel()
        await asyncio.gather(*replicas, return_exceptions=True)
        assert applied == ids

        # A restarted consumer resumes after its stored cursor: nothing is applied twice.
        async with db.transaction() as tx:
            late = await write_event(tx, SCHEMA, "test.n", payload={"i": 20})
        restarted = asyncio.create_task(consumer().run())
        for _ in range(100):
            if len(applied) > 20:
                break
            await asyncio.sleep(0.1)
        restarted.cancel()
        await asyncio.gather(restarted, return_exceptions=True)
        assert applied == [*ids, late]
    finally:
        await feed.close()


def test_cursor_rejects_garbage() -> None:
    from shared.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as caught:
        Cursor.parse("not-a-cursor")
    assert caught.value.violations[0].field == "after_cursor"
