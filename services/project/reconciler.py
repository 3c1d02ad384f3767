"""Project's background loops, each safe with any number of replicas:

- `AllocationReleaser`: follows the outbox's `project.deleted` events and calls
  billing.ReleaseAllocation for each until billing accepts (it is idempotent), moving its
  cursor only after that. One replica at a time (transaction-level advisory lock).
- `Reconciler`: compares projects with billing's allocations and repairs both ways: an
  allocation with no project is released, a project whose allocation is missing or has the
  wrong size is re-reserved. Each repair re-checks under the project's lock, so an in-flight
  create or resize is never undone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from services.project import store
from services.project.service import Allocation, BillingPool
from shared.db import Database
from shared.errors import DomainError
from shared.loops import run_every
from shared.outbox import START, Cursor, OutboxFeed

log = logging.getLogger(__name__)

RELEASER = "allocation-releaser"


class AllocationReleaser:
    def __init__(
        self,
        db: Database,
        feed: OutboxFeed,
        pool: BillingPool,
        *,
        poll_seconds: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.db = db
        self.feed = feed
        self.pool = pool
        self.poll_seconds = poll_seconds
        self.max_backoff = max_backoff

    async def release_once(self) -> int:
        """Release one batch; how many allocations billing confirmed released."""
        async with self.db.transaction() as tx:
            if not await store.try_lock(tx, f"{store.SCHEMA}:{RELEASER}"):
                return 0  # another replica is releasing
            cursor = Cursor.parse(
                await tx.fetchval(
                    f"SELECT cursor FROM {store.SCHEMA}.event_cursors"
                    " WHERE consumer = $1 AND source = $2",
                    RELEASER,
                    store.SCHEMA,
                )
                or START
            )
            events = await self.feed.read(cursor, ["project.deleted"], limit=100)
            if not events:
                return 0
            for event in events:
                await self.pool.release(event.organization_id, event.aggregate_id)
            await tx.execute(
                f"INSERT INTO {store.SCHEMA}.event_cursors (consumer, source, cursor, updated_at)"
                " VALUES ($1, $2, $3, now()) ON CONFLICT (consumer, source)"
                " DO UPDATE SET cursor = excluded.cursor, updated_at = now()",
                RELEASER,
                store.SCHEMA,
                events[-1].cursor,
            )
            return len(events)

    async def run(self) -> None:
        backoff = self.poll_seconds
        while True:
            try:
                released = await self.release_once()
                backoff = self.poll_seconds
                if released:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "allocation release: billing did not accept", extra={"error": repr(exc)}
                )
                backoff = min(backoff * 2, self.max_backoff)
            await asyncio.sleep(backoff)


@dataclass
class Repairs:
    released: int = 0  # allocations without a project
    reserved: int = 0  # projects whose allocation was missing or the wrong size
    failed: int = 0


class Reconciler:
    def __init__(self, db: Database, pool: BillingPool, *, interval_seconds: float = 30.0) -> None:
        self.db = db
        self.pool = pool
        self.interval_seconds = interval_seconds

    async def reconcile_once(self) -> Repairs | None:
        """One pass; None when another replica holds the reconciler's lock."""
        async with self.db.transaction() as lock_tx:
            if not await store.try_lock(lock_tx, f"{store.SCHEMA}:reconciler"):
                return None
            allocations = {a.project_id: a async for a in self.pool.allocations()}
            repairs = Repairs()
            seen: set[str] = set()
            after = ""
            while True:
                async with self.db.session() as s:
                    batch = await store.project_sizes(s, after, 1000)
                if not batch:
                    break
                after = batch[-1].id
                for project in batch:
                    seen.add(project.id)
                    allocation = allocations.get(project.id)
                    if allocation is None or allocation.resources != project.resources:
                        await self._repair(project.id, repairs)
            for allocation in allocations.values():
                if allocation.project_id not in seen:
                    await self._repair_orphan(allocation, repairs)
        if repairs.released or repairs.reserved or repairs.failed:
            log.info("reconciled allocations", extra=vars(repairs))
        return repairs

    async def _repair(self, project_id: str, repairs: Repairs) -> None:
        """Re-reserve a project's size, after re-checking under its lock."""
        try:
            async with self.db.transaction() as tx:
                await store.lock_project(tx, project_id)
                project = await store.get_project(tx, project_id)
                if project is None:
                    return  # deleted meanwhile: its allocation is the releaser's (or orphan's)
                size = project.spec.resources
                current = [
                    a
                    async for a in self.pool.allocations(project.organization_id)
                    if a.project_id == project_id
                ]
                if current and current[0].resources == size:
                    return
                await self.pool.reserve(project.organization_id, project_id, size)
                repairs.reserved += 1
        except DomainError as exc:
            repairs.failed += 1
            log.warning(
                "could not re-reserve a project's allocation",
                extra={"project_id": project_id, "reason": exc.reason},
            )

    async def _repair_orphan(self, allocation: Allocation, repairs: Repairs) -> None:
        try:
            async with self.db.transaction() as tx:
                # A create in flight holds this lock from before its reservation to its commit.
                await store.lock_project(tx, allocation.project_id)
                if await store.get_project(tx, allocation.project_id) is not None:
                    return
                await self.pool.release(allocation.organization_id, allocation.project_id)
                repairs.released += 1
        except DomainError as exc:
            repairs.failed += 1
            log.warning(
                "could not release a leaked allocation",
                extra={"project_id": allocation.project_id, "reason": exc.reason},
            )

    async def run(self) -> None:
        await run_every(self.interval_seconds, self.reconcile_once, "reconciler pass")
