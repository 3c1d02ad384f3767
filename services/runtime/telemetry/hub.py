"""Tailing across replicas: each log write NOTIFYs `runtime_logs` with the (project,
container, sequence range) it stored; every replica with tails open LISTENs and fetches those
rows once for all its tails of that project."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta

import asyncpg

from services.runtime.telemetry.model import LogEntry, utcnow
from services.runtime.telemetry.store import (
    NOTIFY_CHANNEL,
    lines_in_ranges,
    parse_notify_payload,
    ping,
)
from shared.db import Database
from shared.errors import ResourceExhausted

log = logging.getLogger(__name__)


class TailSubscription:
    """What one TailLogs call receives: batches of new lines of its project, deduplicated."""

    def __init__(self, project_id: str, max_batches: int) -> None:
        self.project_id = project_id
        self.queue: asyncio.Queue[list[LogEntry] | None] = asyncio.Queue(max_batches)
        self.delivered: dict[str, int] = {}
        self.overflowed = False

    def offer(self, batch: list[LogEntry]) -> None:
        try:
            self.queue.put_nowait(batch)
        except asyncio.QueueFull:
            self.overflowed = True

    def fresh(self, entries: Iterable[LogEntry]) -> list[LogEntry]:
        """Entries not delivered yet (a line both in history and notified goes out once)."""
        out = []
        for e in entries:
            if e.sequence > self.delivered.get(e.container_id, 0):
                self.delivered[e.container_id] = e.sequence
                out.append(e)
        return out

    async def batches(self) -> AsyncIterator[list[LogEntry]]:
        while True:
            if self.overflowed:
                raise ResourceExhausted(
                    "this tail fell too far behind the project's logs; start it again",
                    reason="TAIL_TOO_SLOW",
                )
            batch = await self.queue.get()
            if batch is None:
                return
            fresh = self.fresh(batch)
            if fresh:
                yield fresh


class LogHub:
    """This replica's tails: LISTENs while any tail is open and fans new lines out.

    The listening connection is taken from the pool on the first subscription and given
    back when the last one goes (so closing the pool never waits on it).
    """

    def __init__(self, db: Database, *, lookback: timedelta, max_batches: int = 1000) -> None:
        self.db = db
        self.lookback = lookback
        self.max_batches = max_batches
        self._subs: dict[str, set[TailSubscription]] = defaultdict(set)
        self._notes: asyncio.Queue[str] = asyncio.Queue()
        self._listening = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def subscribe(self, project_id: str) -> AsyncIterator[TailSubscription]:
        sub = TailSubscription(project_id, self.max_batches)
        self._subs[project_id].add(sub)
        self._changed.set()
        try:
            if self._task is None or self._task.done():
                self._listening.clear()
                self._task = asyncio.create_task(self._listen())
            await asyncio.wait_for(self._listening.wait(), 10)
            yield sub
        finally:
            subs = self._subs.get(project_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[project_id]
            self._changed.set()

    async def _listen(self) -> None:
        while self._subs:
            try:
                async with self.db.pool.acquire() as conn:
                    await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                    try:
                        self._listening.set()
                        await self._serve(conn)
                    finally:
                        self._listening.clear()
                        if not conn.is_closed():
                            await conn.remove_listener(NOTIFY_CHANNEL, self._on_notify)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("log tail listener lost its connection; reconnecting")
                await asyncio.sleep(0.5)

    async def _serve(self, conn: asyncpg.Connection) -> None:
        while self._subs and not conn.is_closed():
            self._changed.clear()
            getter = asyncio.ensure_future(self._notes.get())
            changed = asyncio.ensure_future(self._changed.wait())
            done, pending = await asyncio.wait(
                {getter, changed}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            if getter in done:
                payloads = [getter.result()]
                while not self._notes.empty():
                    payloads.append(self._notes.get_nowait())
                await self._deliver(payloads)
            elif not done:
                await ping(conn)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._notes.put_nowait(payload)

    async def _deliver(self, payloads: list[str]) -> None:
        ranges = [r for p in payloads for r in parse_notify_payload(p) if r[0] in self._subs]
        if not ranges:
            return
        async with self.db.session() as s:
            entries = await lines_in_ranges(s, ranges, utcnow() - self.lookback)
        by_project: dict[str, list[LogEntry]] = defaultdict(list)
        for e in entries:
            by_project[e.project_id].append(e)
        for project_id, batch in by_project.items():
            for sub in self._subs.get(project_id, ()):
                sub.offer(batch)

    async def close(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.queue.put_nowait(None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
