"""Partition upkeep: the day partitions of `logs` and `metrics` are created ahead and dropped
past retention, by one replica at a time."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from services.runtime.telemetry.model import utcnow
from services.runtime.telemetry.store import drop_partitions_before, ensure_partitions, try_lock
from shared.db import Database
from shared.loops import run_every

log = logging.getLogger(__name__)


class PartitionMaintenance:
    """Creates partitions ahead and drops those past retention; one replica at a time."""

    LOCK_KEY = "runtime.telemetry.partitions"

    def __init__(
        self, db: Database, *, days_ahead: int, retention_days: int, interval_seconds: float
    ) -> None:
        self.db = db
        self.days_ahead = days_ahead
        self.retention_days = retention_days
        self.interval = interval_seconds

    async def run_once(self, now: datetime | None = None) -> tuple[list[str], list[str]] | None:
        """(created, dropped) partitions; None when another replica holds the lock."""
        cutoff = (now or utcnow()) - timedelta(days=self.retention_days)
        async with self.db.transaction() as tx:
            if not await try_lock(tx, self.LOCK_KEY):
                return None
            created = await ensure_partitions(tx, self.days_ahead)
            dropped = await drop_partitions_before(tx, cutoff)
        if created or dropped:
            log.info("telemetry partitions rolled", extra={"created": created, "dropped": dropped})
        return created, dropped

    async def run(self) -> None:
        await run_every(self.interval, self.run_once, "partition maintenance")
