"""Telemetry from the agents: shipped log lines and metric samples checked against the
container they name (cached), trimmed or refused, and written."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from services.runtime.telemetry.model import ContainerRef, IngestLimits, MetricName, utcnow
from services.runtime.telemetry.store import (
    LogRow,
    MetricRow,
    container_refs,
    write_logs,
    write_metrics,
)
from shared.db import Database


class ContainerDirectory:
    """Container id -> where its telemetry belongs; rows never change, so cache the found."""

    def __init__(self, db: Database, max_entries: int = 100_000) -> None:
        self.db = db
        self.max_entries = max_entries
        self._known: dict[str, ContainerRef] = {}

    async def lookup(self, ids: Iterable[str]) -> dict[str, ContainerRef]:
        wanted = set(ids)
        found = {cid: self._known[cid] for cid in wanted if cid in self._known}
        missing = wanted - found.keys()
        if missing:
            async with self.db.session() as s:
                fetched = await container_refs(s, missing)
            if len(self._known) + len(fetched) > self.max_entries:
                self._known.clear()
            self._known.update(fetched)
            found.update(fetched)
        return found


@dataclass
class IncomingLine:
    """A shipped line, as the servicer decoded it."""

    container_id: str
    stream: str  # "stdout" | "stderr"
    text: str
    emitted_at: datetime
    sequence: int


@dataclass
class IngestStats:
    """Counters over every ShipLogs stream of this process (logs and benchmarks)."""

    lines_stored: int = 0
    lines_duplicate: int = 0  # re-sent lines already stored, skipped
    lines_rejected: int = 0
    lines_trimmed: int = 0


@dataclass
class LogIngest:
    """One ShipLogs stream: batches are written as they arrive (one COPY in flight while the
    next batch is decoded); the reply acknowledges the highest sequence stored per container."""

    db: Database
    directory: ContainerDirectory
    limits: IngestLimits
    stats: IngestStats = field(default_factory=IngestStats)
    acknowledged: dict[str, int] = field(default_factory=dict)
    stored: int = 0
    rejected: int = 0
    trimmed: int = 0
    rejected_reason: str = ""
    _writing: asyncio.Task[None] | None = None

    async def add(self, lines: Sequence[IncomingLine]) -> None:
        # The container row says where lines belong; the request's server_id is not trusted
        # for more (every agent holds the same service token).
        refs = await self.directory.lookup({line.container_id for line in lines})
        now = utcnow()
        rows: list[LogRow] = []
        highest: dict[str, int] = {}
        for line in lines:
            ref = refs.get(line.container_id)
            problem = ""
            if ref is None:
                problem = f"unknown container {line.container_id!r}"
            elif line.sequence < 1:
                problem = f"sequence {line.sequence} of {line.container_id!r} is not positive"
            else:
                problem = self.limits.time_problem(line.emitted_at, now)
            if problem:
                self._reject(problem)
                continue
            assert ref is not None
            text, trimmed = self.limits.clean_line(line.text)
            self.trimmed += trimmed
            self.stats.lines_trimmed += trimmed
            rows.append(
                (
                    ref.project_id,
                    ref.deployment_id,
                    ref.id,
                    line.stream,
                    text,
                    line.emitted_at,
                    line.sequence,
                )
            )
            if line.sequence > highest.get(ref.id, 0):
                highest[ref.id] = line.sequence
        await self._wait_writing()
        if rows:
            self._writing = asyncio.create_task(self._write(rows, highest))

    async def _write(self, rows: list[LogRow], highest: dict[str, int]) -> None:
        new = await write_logs(self.db, rows)
        self.stored += len(rows)
        self.stats.lines_stored += new
        self.stats.lines_duplicate += len(rows) - new
        for container_id, sequence in highest.items():
            if sequence > self.acknowledged.get(container_id, 0):
                self.acknowledged[container_id] = sequence

    async def _wait_writing(self) -> None:
        if self._writing is not None:
            writing, self._writing = self._writing, None
            await writing

    async def finish(self) -> None:
        await self._wait_writing()

    async def abandon(self) -> None:
        if self._writing is not None:
            self._writing.cancel()
            with contextlib.suppress(BaseException):
                await self._writing

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.stats.lines_rejected += 1
        if not self.rejected_reason:
            self.rejected_reason = reason


@dataclass(frozen=True)
class IncomingSample:
    container_id: str  # empty: the server's own totals
    metric: MetricName | None  # None: a metric this runtime does not know
    value: float
    sampled_at: datetime


async def write_samples(
    db: Database,
    directory: ContainerDirectory,
    limits: IngestLimits,
    server_id: str | None,
    samples: Sequence[IncomingSample],
) -> tuple[int, int]:
    """Store what is acceptable; (accepted, rejected). Re-sent samples count as accepted.

    A sample without a container is the server's own; `server_id` None: an unknown server.
    """
    refs = await directory.lookup({s.container_id for s in samples if s.container_id})
    now = utcnow()
    rows: list[MetricRow] = []
    rejected = 0
    for sample in samples:
        ref = refs.get(sample.container_id) if sample.container_id else None
        if (
            sample.metric is None
            or not math.isfinite(sample.value)
            or sample.value < 0
            or limits.time_problem(sample.sampled_at, now)
            or (sample.container_id and ref is None)
            or (not sample.container_id and server_id is None)
        ):
            rejected += 1
            continue
        if ref is not None:
            row: MetricRow = (
                ref.project_id,
                ref.deployment_id,
                ref.id,
                ref.server_id,
                sample.metric.value,
                sample.value,
                sample.sampled_at,
            )
        else:
            assert server_id is not None
            row = (
                None,
                None,
                None,
                server_id,
                sample.metric.value,
                sample.value,
                sample.sampled_at,
            )
        rows.append(row)
    await write_metrics(db, rows)
    return len(rows), rejected
