"""Telemetry in runtime: what the agents ship (log lines, metric samples), how it is stored,
read back and tailed, how partitions roll, and how samples become billed usage.

Writes are COPY into the day-partitioned `logs` and `metrics` tables. A re-shipped line or
sample (the agent re-sends what runtime did not acknowledge; ShipMetrics is retried) hits
the unique keys of migration runtime_0002; the batch is then written again through a
staging table with ON CONFLICT DO NOTHING, so nothing is stored twice and the common case
stays a plain COPY.

Tailing across replicas: each log write NOTIFYs `runtime_logs` with the (project,
container, sequence range) it stored, in the same transaction; every replica with tails
open LISTENs and fetches those rows once for all its tails of that project.

Usage: a window is computed once (advisory lock, then a ledger row per window) into one
report per container, billing metric and window, whose idempotency key billing dedupes on;
reports stay in the ledger until billing accepted them, so an outage delays usage and a
resend after a crash is counted once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import asyncpg

from shared.db import Database, Session
from shared.errors import InvalidArgument, ResourceExhausted
from shared.loops import run_every
from shared.settings import Settings

log = logging.getLogger(__name__)

S = "runtime"
NOTIFY_CHANNEL = "runtime_logs"
NOTIFY_PAYLOAD_LIMIT = 7000  # PostgreSQL refuses payloads of 8000 bytes or more
LOG_COLUMNS = (
    "project_id",
    "deployment_id",
    "container_id",
    "stream",
    "line",
    "emitted_at",
    "sequence",
)
METRIC_COLUMNS = (
    "project_id",
    "deployment_id",
    "container_id",
    "server_id",
    "metric",
    "value",
    "sampled_at",
)
LogRow = tuple[str, str, str, str, str, datetime, int]
MetricRow = tuple[str | None, str | None, str | None, str, str, float, datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------ domain


class MetricName(StrEnum):
    MEMORY_RSS_BYTES = "memory_rss_bytes"  # gauge
    CPU_MILLICORES = "cpu_millicores"  # gauge over the sample interval
    NETWORK_RX_BYTES = "network_rx_bytes"  # bytes during the sample interval
    NETWORK_TX_BYTES = "network_tx_bytes"


class UsageMetric(StrEnum):
    """Billing's metrics (billing.domain.Metric's values)."""

    RAM_MB_SECONDS = "ram_mb_seconds"
    CPU_MILLIS_SECONDS = "cpu_millis_seconds"
    BANDWIDTH_BYTES = "bandwidth_bytes"


class Aggregation(StrEnum):
    AVG = "avg"
    MAX = "max"


@dataclass(frozen=True)
class ContainerRef:
    """Where a container's telemetry belongs (from the containers row; never changes)."""

    id: str
    project_id: str
    deployment_id: str
    server_id: str
    organization_id: str


@dataclass(frozen=True)
class IngestLimits:
    """What a shipped line or sample may look like; the rest is refused or trimmed."""

    max_line_chars: int = 16 * 1024
    # Lines older than this have no partition for sure (yesterday's always exists).
    max_age: timedelta = timedelta(hours=23)
    max_skew: timedelta = timedelta(minutes=5)  # agent clocks ahead of ours

    def time_problem(self, at: datetime, now: datetime) -> str:
        """Why `at` is refused, or "" when it is acceptable."""
        if at > now + self.max_skew:
            return f"timestamp {at.isoformat()} is in the future"
        if at < now - self.max_age:
            return f"timestamp {at.isoformat()} is older than {self.max_age}"
        return ""

    def clean_line(self, text: str) -> tuple[str, bool]:
        """The line as stored (NUL cannot be stored in text), and whether it was trimmed."""
        trimmed = len(text) > self.max_line_chars
        if trimmed:
            text = text[: self.max_line_chars]
        if "\x00" in text:
            text = text.replace("\x00", "\ufffd")
        return text, trimmed


@dataclass(frozen=True)
class LogEntry:
    project_id: str
    deployment_id: str
    container_id: str
    stream: str
    line: str
    emitted_at: datetime
    sequence: int

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> LogEntry:
        return cls(
            row["project_id"],
            row["deployment_id"],
            row["container_id"],
            row["stream"],
            row["line"],
            row["emitted_at"],
            row["sequence"],
        )


@dataclass(frozen=True)
class LogQuery:
    project_id: str
    start: datetime
    end: datetime
    deployment_id: str = ""
    container_id: str = ""
    contains: str = ""


@dataclass(frozen=True)
class MetricQuery:
    project_id: str
    metric: MetricName
    start: datetime
    end: datetime
    step: timedelta
    aggregation: Aggregation = Aggregation.AVG
    container_id: str = ""
    server_id: str = ""
    server_totals: bool = False  # the server's own samples (platform admins), not the project's

    MAX_POINTS = 11_000

    def validate(self) -> MetricQuery:
        if self.end <= self.start:
            raise InvalidArgument.field("end_time", "must be after start_time")
        if self.step < timedelta(seconds=1):
            raise InvalidArgument.field("step", "at least 1s")
        if (self.end - self.start) / self.step > self.MAX_POINTS:
            raise InvalidArgument.field("step", f"at most {self.MAX_POINTS} points per series")
        if self.server_totals and not self.server_id:
            raise InvalidArgument.field("server_id", "required for server totals")
        return self


@dataclass(frozen=True)
class MetricSeries:
    container_id: str
    server_id: str
    points: list[tuple[datetime, float]]


@dataclass(frozen=True)
class UsageReport:
    idempotency_key: str
    organization_id: str
    project_id: str
    container_id: str
    metric: UsageMetric
    window_start: datetime
    window_end: datetime
    quantity: int


def usage_key(container_id: str, metric: UsageMetric, window_start: datetime) -> str:
    """Counted once by billing: container + metric + window."""
    return f"{container_id}:{metric.value}:{window_start.astimezone(UTC).isoformat()}"


def window_start_of(at: datetime, width: timedelta) -> datetime:
    """The start of the fixed (epoch-aligned) usage window holding `at`."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((at - epoch) // width) * width


# ------------------------------------------------------------------------ page tokens


def encode_log_token(entry: LogEntry) -> str:
    text = f"{entry.emitted_at.isoformat()}\x1f{entry.container_id}\x1f{entry.sequence}"
    return base64.urlsafe_b64encode(text.encode()).decode()


def decode_log_token(token: str) -> tuple[datetime, str, int]:
    try:
        at, container_id, sequence = base64.urlsafe_b64decode(token.encode()).decode().split("\x1f")
        return datetime.fromisoformat(at), container_id, int(sequence)
    except ValueError:
        raise InvalidArgument.field("page_token", "not a token from a previous page") from None


# ------------------------------------------------------------------------------ store


async def container_refs(s: Session, ids: Iterable[str]) -> dict[str, ContainerRef]:
    rows = await s.fetch(
        f"""SELECT c.id, c.project_id, c.deployment_id, c.server_id, d.organization_id
              FROM {S}.containers c JOIN {S}.deployments d ON d.id = c.deployment_id
             WHERE c.id = ANY($1::text[])""",
        list(ids),
    )
    return {
        r["id"]: ContainerRef(
            r["id"], r["project_id"], r["deployment_id"], r["server_id"], r["organization_id"]
        )
        for r in rows
    }


def _notify_payloads(stored: Iterable[tuple[str, str, int, int]]) -> list[str]:
    """(project, container, first, last) ranges as NOTIFY payloads under the size limit."""
    payloads: list[str] = []
    current: list[str] = []
    size = 0
    for project_id, container_id, first, last in stored:
        item = f"{project_id}\t{container_id}\t{first}\t{last}"
        if current and size + len(item) + 1 > NOTIFY_PAYLOAD_LIMIT:
            payloads.append("\n".join(current))
            current, size = [], 0
        current.append(item)
        size += len(item) + 1
    if current:
        payloads.append("\n".join(current))
    return payloads


def parse_notify_payload(payload: str) -> list[tuple[str, str, int, int]]:
    ranges = []
    for item in payload.split("\n"):
        parts = item.split("\t")
        if len(parts) == 4:
            ranges.append((parts[0], parts[1], int(parts[2]), int(parts[3])))
    return ranges


def _ranges(rows: Iterable[tuple[str, str, int]]) -> list[tuple[str, str, int, int]]:
    spans: dict[tuple[str, str], list[int]] = {}
    for project_id, container_id, sequence in rows:
        span = spans.get((project_id, container_id))
        if span is None:
            spans[(project_id, container_id)] = [sequence, sequence]
        else:
            span[0] = min(span[0], sequence)
            span[1] = max(span[1], sequence)
    return [(p, c, lo, hi) for (p, c), (lo, hi) in spans.items()]


async def _copy_deduplicated(
    db: Database,
    table: str,
    columns: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    returning: str,
) -> list[asyncpg.Record] | None:
    """COPY `rows` into `table`; None when all went in, else the rows the dedupe path stored."""
    try:
        async with db.transaction() as tx:
            await tx.conn.copy_records_to_table(
                table, schema_name=S, records=rows, columns=list(columns)
            )
            if table == "logs":
                await _notify(tx, _ranges((r[0], r[2], r[6]) for r in rows))
        return None
    except asyncpg.UniqueViolationError:
        pass  # some were stored before: a re-send after a lost acknowledgement
    staging = f"staging_{table}"
    async with db.transaction() as tx:
        await tx.execute(
            f"""CREATE TEMP TABLE IF NOT EXISTS {staging}
                (LIKE {S}.{table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"""
        )
        await tx.conn.copy_records_to_table(staging, records=rows, columns=list(columns))
        cols = ", ".join(columns)
        stored = await tx.fetch(
            f"""INSERT INTO {S}.{table} ({cols}) SELECT {cols} FROM {staging}
                ON CONFLICT DO NOTHING RETURNING {returning}"""
        )
        if table == "logs":
            await _notify(tx, _ranges((r[0], r[1], r[2]) for r in stored))
    return stored


async def _notify(tx: Session, ranges: list[tuple[str, str, int, int]]) -> None:
    for payload in _notify_payloads(ranges):
        await tx.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload)


async def write_logs(db: Database, rows: Sequence[LogRow]) -> int:
    """Store lines (COPY); returns how many were new (re-sent ones are skipped)."""
    if not rows:
        return 0
    stored = await _copy_deduplicated(
        db, "logs", LOG_COLUMNS, rows, "project_id, container_id, sequence"
    )
    return len(rows) if stored is None else len(stored)


async def write_metrics(db: Database, rows: Sequence[MetricRow]) -> int:
    if not rows:
        return 0
    stored = await _copy_deduplicated(db, "metrics", METRIC_COLUMNS, rows, "1")
    return len(rows) if stored is None else len(stored)


_LOG_SELECT = (
    f"SELECT project_id, deployment_id, container_id, stream, line, emitted_at, sequence"
    f" FROM {S}.logs"
)


async def query_logs(s: Session, q: LogQuery, size: int, token: str) -> tuple[list[LogEntry], str]:
    """Newest first; keyset on (emitted_at, container_id, sequence)."""
    after = decode_log_token(token) if token else None
    rows = await s.fetch(
        f"""{_LOG_SELECT}
             WHERE project_id = $1 AND emitted_at >= $2 AND emitted_at < $3
               AND ($4 = '' OR deployment_id = $4)
               AND ($5 = '' OR container_id = $5)
               AND ($6 = '' OR strpos(line, $6) > 0)
               AND ($7::timestamptz IS NULL OR (emitted_at, container_id, sequence) < ($7, $8, $9))
             ORDER BY emitted_at DESC, container_id DESC, sequence DESC
             LIMIT $10""",
        q.project_id,
        q.start,
        q.end,
        q.deployment_id,
        q.container_id,
        q.contains,
        after[0] if after else None,
        after[1] if after else "",
        after[2] if after else 0,
        size + 1,
    )
    entries = [LogEntry.from_row(r) for r in rows[:size]]
    return entries, encode_log_token(entries[-1]) if len(rows) > size else ""


async def last_lines(s: Session, project_id: str, count: int, since: datetime) -> list[LogEntry]:
    """The project's newest `count` lines, oldest first."""
    if count <= 0:
        return []
    rows = await s.fetch(
        f"""{_LOG_SELECT} WHERE project_id = $1 AND emitted_at >= $2
             ORDER BY emitted_at DESC, container_id DESC, sequence DESC LIMIT $3""",
        project_id,
        since,
        count,
    )
    return [LogEntry.from_row(r) for r in reversed(rows)]


async def lines_in_ranges(
    s: Session, ranges: Sequence[tuple[str, str, int, int]], since: datetime
) -> list[LogEntry]:
    """The stored lines of (project, container, first..last) ranges, in emitted order."""
    rows = await s.fetch(
        f"""SELECT l.project_id, l.deployment_id, l.container_id, l.stream, l.line,
                   l.emitted_at, l.sequence
              FROM {S}.logs l
              JOIN unnest($1::text[], $2::int8[], $3::int8[]) AS r(container_id, lo, hi)
                ON l.container_id = r.container_id AND l.sequence BETWEEN r.lo AND r.hi
             WHERE l.emitted_at >= $4
             ORDER BY l.emitted_at, l.container_id, l.sequence""",
        [r[1] for r in ranges],
        [r[2] for r in ranges],
        [r[3] for r in ranges],
        since,
    )
    return [LogEntry.from_row(r) for r in rows]


async def query_metrics(s: Session, q: MetricQuery) -> list[MetricSeries]:
    """One series per container (or the server), points per non-empty step, ascending."""
    agg = "max" if q.aggregation is Aggregation.MAX else "avg"
    args: list[Any] = [q.metric.value, q.start, q.end, q.step]
    if q.server_totals:
        args.append(q.server_id)
        scope = "server_id = $5 AND container_id IS NULL"
    else:
        args += [q.project_id, q.container_id, q.server_id]
        scope = "project_id = $5 AND ($6 = '' OR container_id = $6) AND ($7 = '' OR server_id = $7)"
    rows = await s.fetch(
        f"""SELECT coalesce(container_id, '') AS container_id, server_id,
                   date_bin($4::interval, sampled_at, $2) AS bucket, {agg}(value) AS value
              FROM {S}.metrics
             WHERE {scope} AND metric = $1 AND sampled_at >= $2 AND sampled_at < $3
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
        *args,
    )
    series: dict[tuple[str, str], list[tuple[datetime, float]]] = {}
    for r in rows:
        series.setdefault((r["container_id"], r["server_id"]), []).append(
            (r["bucket"], float(r["value"]))
        )
    return [MetricSeries(c, srv, points) for (c, srv), points in series.items()]


async def ensure_partitions(tx: Session, days_ahead: int) -> list[str]:
    rows = await tx.fetch(f"SELECT * FROM {S}.ensure_partitions($1) AS p", days_ahead)
    return [r["p"] for r in rows]


async def drop_partitions_before(tx: Session, cutoff: datetime) -> list[str]:
    rows = await tx.fetch(f"SELECT * FROM {S}.drop_partitions_before($1) AS p", cutoff.date())
    return [r["p"] for r in rows]


# Usage of one window from the samples. Each gauge sample stands for the time since the
# container's previous sample of that metric, capped at max_gap (an agent outage is not
# billed as if the last reading held); a first sample stands for the nominal interval.
# Network samples are already bytes per interval and are summed.
_USAGE_SQL = f"""
WITH samples AS (
    SELECT container_id, metric, value, sampled_at,
           lag(sampled_at) OVER (PARTITION BY container_id, metric ORDER BY sampled_at) AS prev
      FROM {S}.metrics
     WHERE container_id IS NOT NULL
       AND sampled_at >= $1::timestamptz - $3::interval AND sampled_at < $2
), per_sample AS (
    SELECT container_id,
           CASE metric WHEN 'memory_rss_bytes' THEN 'ram_mb_seconds'
                       WHEN 'cpu_millicores' THEN 'cpu_millis_seconds'
                       ELSE 'bandwidth_bytes' END AS usage_metric,
           CASE WHEN metric IN ('network_rx_bytes', 'network_tx_bytes') THEN value
                ELSE value * extract(epoch FROM least(
                         coalesce(sampled_at - prev, $4::interval), $3::interval))
                     / CASE metric WHEN 'memory_rss_bytes' THEN 1048576.0 ELSE 1.0 END
           END AS quantity
      FROM samples WHERE sampled_at >= $1
)
SELECT p.container_id, p.usage_metric, round(sum(p.quantity))::bigint AS quantity,
       c.project_id, d.organization_id
  FROM per_sample p
  JOIN {S}.containers c ON c.id = p.container_id
  JOIN {S}.deployments d ON d.id = c.deployment_id
 GROUP BY p.container_id, p.usage_metric, c.project_id, d.organization_id
"""


async def compute_usage(
    tx: Session, start: datetime, end: datetime, max_gap: timedelta, nominal: timedelta
) -> list[UsageReport]:
    rows = await tx.fetch(_USAGE_SQL, start, end, max_gap, nominal)
    reports = []
    for r in rows:
        metric = UsageMetric(r["usage_metric"])
        if r["quantity"] <= 0:
            continue
        reports.append(
            UsageReport(
                idempotency_key=usage_key(r["container_id"], metric, start),
                organization_id=r["organization_id"],
                project_id=r["project_id"],
                container_id=r["container_id"],
                metric=metric,
                window_start=start,
                window_end=end,
                quantity=int(r["quantity"]),
            )
        )
    return reports


async def usage_cursor(tx: Session) -> datetime | None:
    """The end of the last computed window."""
    value = await tx.fetchval(f"SELECT max(window_end) FROM {S}.usage_windows")
    return value if isinstance(value, datetime) else None


async def earliest_sample_since(tx: Session, since: datetime) -> datetime | None:
    value = await tx.fetchval(
        f"SELECT min(sampled_at) FROM {S}.metrics WHERE container_id IS NOT NULL"
        " AND sampled_at >= $1",
        since,
    )
    return value if isinstance(value, datetime) else None


async def record_window(
    tx: Session, start: datetime, end: datetime, reports: Sequence[UsageReport]
) -> None:
    await tx.execute(
        f"""INSERT INTO {S}.usage_reports (idempotency_key, organization_id, project_id,
                container_id, metric, window_start, window_end, quantity)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::timestamptz[], $7::timestamptz[], $8::int8[])
            ON CONFLICT (idempotency_key) DO NOTHING""",
        [r.idempotency_key for r in reports],
        [r.organization_id for r in reports],
        [r.project_id for r in reports],
        [r.container_id for r in reports],
        [r.metric.value for r in reports],
        [r.window_start for r in reports],
        [r.window_end for r in reports],
        [r.quantity for r in reports],
    )
    await tx.execute(
        f"""INSERT INTO {S}.usage_windows (window_start, window_end, reports)
            VALUES ($1, $2, $3) ON CONFLICT (window_start) DO NOTHING""",
        start,
        end,
        len(reports),
    )


async def claim_unsent_reports(tx: Session, limit: int) -> list[UsageReport]:
    """Unsent reports due now, row-locked so that another replica skips them."""
    rows = await tx.fetch(
        f"""SELECT * FROM {S}.usage_reports
             WHERE sent_at IS NULL AND next_attempt_at <= now()
             ORDER BY next_attempt_at, window_start LIMIT $1 FOR UPDATE SKIP LOCKED""",
        limit,
    )
    return [
        UsageReport(
            r["idempotency_key"],
            r["organization_id"],
            r["project_id"],
            r["container_id"],
            UsageMetric(r["metric"]),
            r["window_start"],
            r["window_end"],
            r["quantity"],
        )
        for r in rows
    ]


async def mark_sent(tx: Session, keys: Sequence[str]) -> None:
    await tx.execute(
        f"UPDATE {S}.usage_reports SET sent_at = now(), last_error = NULL"
        " WHERE idempotency_key = ANY($1::text[])",
        list(keys),
    )


async def mark_failed(tx: Session, keys: Sequence[str], error: str, retry_in: timedelta) -> None:
    await tx.execute(
        f"""UPDATE {S}.usage_reports
               SET attempts = attempts + 1, last_error = $2,
                   next_attempt_at = now() + $3::interval * least(power(2, attempts), 64)
             WHERE idempotency_key = ANY($1::text[])""",
        list(keys),
        error[:500],
        retry_in,
    )


# ------------------------------------------------------------------------- ingestion


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


# ---------------------------------------------------------------------------- tailing


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
                await conn.fetchval("SELECT 1")  # a dead connection shows here

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


# ------------------------------------------------------------------------ maintenance


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
            got = await tx.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", self.LOCK_KEY)
            if not got:
                return None
            created = await ensure_partitions(tx, self.days_ahead)
            dropped = await drop_partitions_before(tx, cutoff)
        if created or dropped:
            log.info("telemetry partitions rolled", extra={"created": created, "dropped": dropped})
        return created, dropped

    async def run(self) -> None:
        await run_every(self.interval, self.run_once, "partition maintenance")


# ------------------------------------------------------------------------------ usage

UsageSender = Callable[[list[UsageReport]], Awaitable[None]]


class UsageReporter:
    """Turns samples into usage windows and sends them to billing until accepted.

    compute: under an advisory lock, each window that ended more than `lateness` ago is
    computed once into the ledger (runtime.usage_windows + usage_reports) in one
    transaction. send: unsent reports are claimed FOR UPDATE SKIP LOCKED, sent per
    organization with their idempotency keys, and marked sent; a failure schedules a retry
    with backoff. Billing counts a key once, so a crash between its accept and our mark
    re-sends a duplicate it ignores.
    """

    LOCK_KEY = "runtime.telemetry.usage"

    def __init__(
        self,
        db: Database,
        send: UsageSender,
        *,
        window: timedelta,
        lateness: timedelta,
        nominal_interval: timedelta,
        interval_seconds: float,
        retry: timedelta = timedelta(seconds=5),
        batch: int = 1000,
        max_windows_per_round: int = 100,
    ) -> None:
        self.db = db
        self.send = send
        self.window = window
        self.lateness = lateness
        self.nominal = nominal_interval
        self.max_gap = nominal_interval * 3
        self.interval = interval_seconds
        self.retry = retry
        self.batch = batch
        self.max_windows = max_windows_per_round

    async def compute_due(self, now: datetime | None = None) -> int:
        """Compute every window that is due; how many were computed (0 if locked out)."""
        now = now or utcnow()
        computed = 0
        async with self.db.transaction() as tx:
            got = await tx.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", self.LOCK_KEY)
            if not got:
                return 0
            start = await usage_cursor(tx)
            if start is None:
                first = await earliest_sample_since(tx, now - timedelta(days=1))
                start = window_start_of(first or now, self.window)
            while computed < self.max_windows and start + self.window + self.lateness <= now:
                end = start + self.window
                reports = await compute_usage(tx, start, end, self.max_gap, self.nominal)
                await record_window(tx, start, end, reports)
                computed += 1
                start = end
        return computed

    async def send_due(self) -> int:
        """Send unsent reports; how many billing accepted (or had already)."""
        sent = 0
        while True:
            async with self.db.transaction() as tx:
                reports = await claim_unsent_reports(tx, self.batch)
                if not reports:
                    return sent
                by_org: dict[str, list[UsageReport]] = defaultdict(list)
                for r in reports:
                    by_org[r.organization_id].append(r)
                failures = 0
                outage = ""
                for org_reports in by_org.values():
                    keys = [r.idempotency_key for r in org_reports]
                    if outage:  # billing is unreachable: do not wait on it once per org
                        await mark_failed(tx, keys, outage, self.retry)
                        continue
                    try:
                        await self.send(org_reports)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # any failure: keep the reports, retry later
                        failures += 1
                        await mark_failed(tx, keys, _describe(exc), self.retry)
                        if _unreachable(exc):
                            outage = _describe(exc)
                            log.warning("billing unreachable; usage waits", extra={"error": outage})
                        continue
                    await mark_sent(tx, keys)
                    sent += len(keys)
            if failures or len(reports) < self.batch:
                return sent

    async def run_once(self) -> None:
        await self.compute_due()
        await self.send_due()

    async def run(self) -> None:
        await run_every(self.interval, self.run_once, "usage round")


def _unreachable(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    name = getattr(code(), "name", "") if callable(code) else ""
    return name in ("UNAVAILABLE", "DEADLINE_EXCEEDED") or isinstance(exc, OSError)


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code()}: {details()}"
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------- facade


@dataclass(frozen=True)
class IncomingSample:
    container_id: str  # empty: the server's own totals
    metric: MetricName | None  # None: a metric this runtime does not know
    value: float
    sampled_at: datetime


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
                found = await s.fetchval(
                    f"SELECT id FROM {S}.servers WHERE id = $1 OR name = $1 ORDER BY id = $1 DESC"
                    " LIMIT 1",
                    id_or_name,
                )
            if found is None:
                return None
            self._servers[id_or_name] = str(found)
        return self._servers[id_or_name]

    async def write_samples(
        self, server: str, samples: Sequence[IncomingSample]
    ) -> tuple[int, int]:
        """Store what is acceptable; (accepted, rejected). Re-sent samples count as accepted."""
        server_id = await self.server_id(server)
        refs = await self.directory.lookup({s.container_id for s in samples if s.container_id})
        now = utcnow()
        rows: list[MetricRow] = []
        rejected = 0
        for sample in samples:
            ref = refs.get(sample.container_id) if sample.container_id else None
            if (
                sample.metric is None
                or not math.isfinite(sample.value)
                or sample.value < 0
                or self.limits.time_problem(sample.sampled_at, now)
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
        await write_metrics(self.db, rows)
        return len(rows), rejected

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
