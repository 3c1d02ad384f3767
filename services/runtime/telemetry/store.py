"""Telemetry's SQL: the only module of the package that talks to PostgreSQL in SQL.

Writes are COPY into the day-partitioned `logs` and `metrics` tables. A re-shipped line or
sample (the agent re-sends what runtime did not acknowledge; ShipMetrics is retried) hits
the unique keys of migration runtime_0002; the batch is then written again through a
staging table with ON CONFLICT DO NOTHING, so nothing is stored twice and the common case
stays a plain COPY.

Each log write NOTIFYs `runtime_logs` with the (project, container, sequence range) it
stored, in the same transaction, for the tail hub of every replica.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.runtime.telemetry.model import (
    Aggregation,
    ContainerRef,
    LogEntry,
    LogQuery,
    MetricQuery,
    MetricSeries,
    UsageMetric,
    UsageReport,
    decode_log_token,
    encode_log_token,
    usage_key,
)
from shared.db import Database, Session

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


async def try_lock(tx: Session, key: str) -> bool:
    """The transaction-scoped advisory lock `key`, if no other replica holds it."""
    return bool(await tx.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", key))


async def ping(conn: asyncpg.Connection) -> None:
    """A round trip on `conn`: a dead connection shows here."""
    await conn.fetchval("SELECT 1")


async def server_id_of(s: Session, id_or_name: str) -> str | None:
    found = await s.fetchval(
        f"SELECT id FROM {S}.servers WHERE id = $1 OR name = $1 ORDER BY id = $1 DESC LIMIT 1",
        id_or_name,
    )
    return None if found is None else str(found)


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
    agg = {Aggregation.MAX: "max", Aggregation.SUM: "sum"}.get(q.aggregation, "avg")
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
           CASE metric WHEN 'memory_rss_bytes' THEN '{UsageMetric.RAM_MB_SECONDS.value}'
                       WHEN 'cpu_millicores' THEN '{UsageMetric.CPU_MILLIS_SECONDS.value}'
                       ELSE '{UsageMetric.BANDWIDTH_BYTES.value}' END AS usage_metric,
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
