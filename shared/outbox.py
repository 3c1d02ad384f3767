"""Domain events: written to the service's `outbox` in the same transaction as the change,
served in order by `WatchEvents`, and consumed elsewhere with a cursor kept in the consumer's
own schema.

Order and completeness: rows are read in (txid, position) order and only from transactions
older than the oldest one still running (`pg_snapshot_xmin`). A transaction that commits late
therefore never lands behind a cursor that already moved past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from hangar.events.v1 import events_pb2
from shared.db import Database, Session
from shared.errors import InvalidArgument, Unavailable
from shared.ids import new_id

log = logging.getLogger(__name__)

START = "0.0"


@dataclass(frozen=True, order=True)
class Cursor:
    txid: int
    position: int

    @classmethod
    def parse(cls, text: str) -> Cursor:
        try:
            txid, position = (text or START).split(".")
            return cls(int(txid), int(position))
        except ValueError:
            raise InvalidArgument.field("after_cursor", "not a cursor from WatchEvents") from None

    def __str__(self) -> str:
        return f"{self.txid}.{self.position}"


async def write_event(
    tx: Session,
    schema: str,
    event_type: str,
    *,
    organization_id: str = "",
    aggregate_id: str = "",
    payload: dict[str, Any] | None = None,
) -> str:
    """Add an event to this transaction: it is published if and only if the change commits."""
    event_id = new_id()
    await tx.execute(
        f"INSERT INTO {schema}.outbox (id, type, organization_id, aggregate_id, payload)"
        " VALUES ($1, $2, $3, $4, $5)",
        event_id,
        event_type,
        organization_id,
        aggregate_id,
        payload or {},
    )
    tx.note_events()
    return event_id


def _to_proto(row: asyncpg.Record) -> events_pb2.Event:
    payload = struct_pb2.Struct()
    payload.update(row["payload"] or {})
    occurred = timestamp_pb2.Timestamp()
    occurred.FromDatetime(row["occurred_at"])
    return events_pb2.Event(
        id=row["id"],
        cursor=str(Cursor(int(row["txid"]), row["position"])),
        type=row["type"],
        organization_id=row["organization_id"] or "",
        aggregate_id=row["aggregate_id"] or "",
        payload=payload,
        occurred_at=occurred,
    )


class OutboxFeed:
    """Serves a service's outbox. One LISTEN connection per process wakes every watcher.

    Writers do not NOTIFY in their own transactions: PostgreSQL serialises the commits of
    all notifying transactions of a database on one lock, held across the commit's WAL
    flush, so a per-transaction NOTIFY (an outbox trigger) made every event-writing commit
    wait for the one before it. Instead the Database calls `poke` after such a commit: the
    process's own watchers wake at once and the other replicas get a NOTIFY from this
    connection, one at a time however many commits asked for it (coalesced). Rows written
    by anything else (a psql session, a one-off script) are found by the poll.
    """

    def __init__(self, db: Database, schema: str, *, poll_seconds: float = 0.5) -> None:
        self.db = db
        self.schema = schema
        self.channel = f"{schema}_outbox"
        self.poll_seconds = poll_seconds
        self._changed = asyncio.Event()
        self._ending = False  # set by end_watches: the server is shutting down
        self._listener: asyncpg.Connection | None = None
        self._notify_wanted = False
        self._notifier: asyncio.Task[None] | None = None
        self.pokes = 0  # commits that announced events
        self.notifies = 0  # NOTIFYs sent for them

    async def start(self) -> None:
        self._listener = await self.db.pool.acquire()
        await self._listener.add_listener(self.channel, self._on_notify)
        self.db.on_events = self.poke

    async def close(self) -> None:
        if self.db.on_events == self.poke:
            self.db.on_events = None
        if self._notifier is not None:
            self._notifier.cancel()
            with contextlib.suppress(BaseException):
                await self._notifier
            self._notifier = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.remove_listener(self.channel, self._on_notify)
            await self.db.pool.release(self._listener)
            self._listener = None

    def _on_notify(self, *_: object) -> None:
        self._changed.set()

    def end_watches(self) -> None:
        """The server is shutting down: every open `watch` ends now (UNAVAILABLE, so its
        consumer reconnects to another replica or to this one once it is back). Without
        this, the streams outlive the grace period and every shutdown takes all of it."""
        self._ending = True
        self._changed.set()  # wakes the waiting watchers; each sees `_ending` and ends

    def poke(self) -> None:
        """Events were committed by this process: wake its watchers and the other replicas'."""
        self._changed.set()
        self.pokes += 1
        self._notify_wanted = True
        if self._listener is not None and (self._notifier is None or self._notifier.done()):
            self._notifier = asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        # One NOTIFY in flight at a time; pokes that arrive meanwhile share the next one.
        while self._notify_wanted and self._listener is not None:
            self._notify_wanted = False
            try:
                await self._listener.execute(f"NOTIFY {self.channel}")
                self.notifies += 1
            except (asyncpg.PostgresError, OSError) as exc:  # the poll still finds the rows
                log.warning("outbox NOTIFY failed", extra={"error": repr(exc)})
                return

    async def read(
        self, after: Cursor, types: Sequence[str] = (), limit: int = 500
    ) -> list[events_pb2.Event]:
        async with self.db.session() as s:
            rows = await s.fetch(
                f"SELECT position, id, txid::text AS txid, type, organization_id, aggregate_id,"
                f" payload, occurred_at FROM {self.schema}.outbox"
                " WHERE (txid, position) > ($1::text::xid8, $2::bigint)"
                " AND txid < pg_snapshot_xmin(pg_current_snapshot())"
                " AND (cardinality($3::text[]) = 0 OR type = ANY($3::text[]))"
                " ORDER BY txid, position LIMIT $4",
                str(after.txid),
                after.position,
                list(types),
                limit,
            )
        return [_to_proto(r) for r in rows]

    async def watch(
        self, request: events_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.Event]:
        """The body of every service's WatchEvents: history after the cursor, then live."""
        cursor = Cursor.parse(request.after_cursor)
        while not self._ending:
            self._changed.clear()
            batch = await self.read(cursor, request.types)
            for event in batch:
                yield event
            if batch:
                cursor = Cursor.parse(batch[-1].cursor)
                continue
            if self._ending:  # checked after the clear: end_watches' wake-up is not lost
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.poll_seconds)
        raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")


EventHandler = Callable[[Session, events_pb2.Event], Awaitable[None]]


class EventConsumer:
    """Applies another service's events to this service, each exactly once.

    The handler runs in the same transaction that moves the cursor. A session-level advisory
    lock keeps a second replica from consuming the same feed at the same time.
    """

    def __init__(
        self,
        db: Database,
        schema: str,
        *,
        consumer: str,
        source: str,
        watch: Callable[[events_pb2.WatchEventsRequest], AsyncIterator[events_pb2.Event]],
        handler: EventHandler,
        types: Sequence[str] = (),
        retry_seconds: float = 1.0,
    ) -> None:
        self.db = db
        self.schema = schema
        self.consumer = consumer
        self.source = source
        self.watch = watch
        self.handler = handler
        self.types = list(types)
        self.retry_seconds = retry_seconds

    async def load_cursor(self) -> str:
        async with self.db.session() as s:
            value = await s.fetchval(
                f"SELECT cursor FROM {self.schema}.event_cursors"
                " WHERE consumer = $1 AND source = $2",
                self.consumer,
                self.source,
            )
        return value or START

    async def apply(self, event: events_pb2.Event) -> None:
        async with self.db.transaction() as tx:
            await self.handler(tx, event)
            await tx.execute(
                f"INSERT INTO {self.schema}.event_cursors (consumer, source, cursor, updated_at)"
                " VALUES ($1, $2, $3, now()) ON CONFLICT (consumer, source)"
                " DO UPDATE SET cursor = excluded.cursor, updated_at = now()",
                self.consumer,
                self.source,
                event.cursor,
            )

    async def run(self) -> None:
        """Consume forever; reconnects after failures. Cancel the task to stop."""
        lock_key = f"{self.schema}:{self.consumer}:{self.source}"
        while True:
            try:
                async with self.db.advisory_lock(lock_key) as held:
                    if held is None:
                        await asyncio.sleep(self.retry_seconds)
                        continue
                    await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "event consumer interrupted",
                    extra={"consumer": self.consumer, "source": self.source, "error": repr(exc)},
                )
                await asyncio.sleep(self.retry_seconds)

    async def _consume(self) -> None:
        request = events_pb2.WatchEventsRequest(
            after_cursor=await self.load_cursor(), types=self.types
        )
        async for event in self.watch(request):
            await self.apply(event)


def event_time(event: events_pb2.Event) -> datetime:
    at: datetime = event.occurred_at.ToDatetime()
    return at
