"""Runtime's telemetry in one object, as the server and the servicer use it: ingestion,
reads, the tail hub and the two background loops."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from services.runtime.telemetry.hub import LogHub
from services.runtime.telemetry.ingest import (
    ContainerDirectory,
    IncomingSample,
    IngestStats,
    LogIngest,
    write_samples,
)
from services.runtime.telemetry.model import (
    IngestLimits,
    LogEntry,
    LogQuery,
    MetricQuery,
    MetricSeries,
    utcnow,
)
from services.runtime.telemetry.partitions import PartitionMaintenance
from services.runtime.telemetry.store import last_lines, query_logs, query_metrics, server_id_of
from services.runtime.telemetry.usage import UsageReporter, UsageSender
from shared.db import Database
from shared.settings import Settings


class Telemetry:
    """Runtime's telemetry: ingestion, reads, the tail hub and the two background loops."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        send_usage: UsageSender,
        *,
        limits: IngestLimits | None = None,
    ) -> None:
        self.db = db
        self.limits = limits or IngestLimits()
        self.retention = timedelta(days=settings.telemetry_retention_days)
        self.directory = ContainerDirectory(db)
        self.stats = IngestStats()
        self.hub = LogHub(db, lookback=self.limits.max_age + self.limits.max_skew)
        self.partitions = PartitionMaintenance(
            db,
            days_ahead=settings.telemetry_partitions_ahead_days,
            retention_days=settings.telemetry_retention_days,
            interval_seconds=settings.telemetry_maintenance_seconds,
        )
        self.usage = UsageReporter(
            db,
            send_usage,
            window=timedelta(seconds=settings.telemetry_usage_window_seconds),
            lateness=timedelta(seconds=settings.telemetry_usage_lateness_seconds),
            nominal_interval=timedelta(seconds=settings.telemetry_sample_seconds),
            interval_seconds=settings.telemetry_usage_seconds,
        )
        self._servers: dict[str, str] = {}

    def log_ingest(self) -> LogIngest:
        return LogIngest(self.db, self.directory, self.limits, self.stats)

    async def server_id(self, id_or_name: str) -> str | None:
        """A server's id from its id or its name (agents may know only their name)."""
        if not id_or_name:
            return None
        if id_or_name not in self._servers:
            async with self.db.session() as s:
                found = await server_id_of(s, id_or_name)
            if found is None:
                return None
            self._servers[id_or_name] = found
        return self._servers[id_or_name]

    async def write_samples(
        self, server: str, samples: Sequence[IncomingSample]
    ) -> tuple[int, int]:
        """Store what is acceptable; (accepted, rejected). Re-sent samples count as accepted."""
        server_id = await self.server_id(server)
        return await write_samples(self.db, self.directory, self.limits, server_id, samples)

    async def query_logs(self, q: LogQuery, size: int, token: str) -> tuple[list[LogEntry], str]:
        async with self.db.session() as s:
            return await query_logs(s, q, size, token)

    async def last_lines(self, project_id: str, count: int) -> list[LogEntry]:
        async with self.db.session() as s:
            return await last_lines(s, project_id, count, utcnow() - self.retention)

    async def query_metrics(self, q: MetricQuery) -> list[MetricSeries]:
        async with self.db.session() as s:
            return await query_metrics(s, q.validate())

    def loops(self) -> list[Callable[[], Awaitable[None]]]:
        """Replica-safe background loops to run while the server does."""
        return [self.partitions.run, self.usage.run]

    async def close(self) -> None:
        await self.hub.close()
