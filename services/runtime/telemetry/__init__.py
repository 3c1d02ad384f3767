"""Telemetry in runtime: what the agents ship (log lines, metric samples), how it is stored,
read back and tailed, how partitions roll, and how samples become billed usage.

    model       plain types: metric names, queries, log entries, usage reports (no I/O)
    store       the SQL: COPY with dedupe, reads, partitions, the usage ledger
    ingest      shipped lines and samples checked, trimmed or refused, and written
    hub         this replica's tails, fed by LISTEN/NOTIFY
    partitions  day partitions created ahead and dropped past retention
    usage       usage windows computed once and sent to billing until accepted
    service     `Telemetry`, the one object the server and the servicer hold

Callers import from this package; the modules are how it is kept, not its interface.
"""

from services.runtime.telemetry.hub import LogHub, TailSubscription
from services.runtime.telemetry.ingest import (
    ContainerDirectory,
    IncomingLine,
    IncomingSample,
    IngestStats,
    LogIngest,
)
from services.runtime.telemetry.model import (
    Aggregation,
    ContainerRef,
    IngestLimits,
    LogEntry,
    LogQuery,
    MetricName,
    MetricQuery,
    MetricSeries,
    UsageMetric,
    UsageReport,
    decode_log_token,
    encode_log_token,
    usage_key,
    utcnow,
    window_start_of,
)
from services.runtime.telemetry.partitions import PartitionMaintenance
from services.runtime.telemetry.service import Telemetry
from services.runtime.telemetry.store import (
    LOG_COLUMNS,
    METRIC_COLUMNS,
    NOTIFY_CHANNEL,
    NOTIFY_PAYLOAD_LIMIT,
    LogRow,
    MetricRow,
    S,
    claim_unsent_reports,
    compute_usage,
    container_refs,
    drop_partitions_before,
    earliest_sample_since,
    ensure_partitions,
    last_lines,
    lines_in_ranges,
    mark_failed,
    mark_sent,
    parse_notify_payload,
    query_logs,
    query_metrics,
    record_window,
    usage_cursor,
    write_logs,
    write_metrics,
)
from services.runtime.telemetry.usage import UsageReporter, UsageSender

__all__ = [
    "LOG_COLUMNS",
    "METRIC_COLUMNS",
    "NOTIFY_CHANNEL",
    "NOTIFY_PAYLOAD_LIMIT",
    "Aggregation",
    "ContainerDirectory",
    "ContainerRef",
    "IncomingLine",
    "IncomingSample",
    "IngestLimits",
    "IngestStats",
    "LogEntry",
    "LogHub",
    "LogIngest",
    "LogQuery",
    "LogRow",
    "MetricName",
    "MetricQuery",
    "MetricRow",
    "MetricSeries",
    "PartitionMaintenance",
    "S",
    "TailSubscription",
    "Telemetry",
    "UsageMetric",
    "UsageReport",
    "UsageReporter",
    "UsageSender",
    "claim_unsent_reports",
    "compute_usage",
    "container_refs",
    "decode_log_token",
    "drop_partitions_before",
    "earliest_sample_since",
    "encode_log_token",
    "ensure_partitions",
    "last_lines",
    "lines_in_ranges",
    "mark_failed",
    "mark_sent",
    "parse_notify_payload",
    "query_logs",
    "query_metrics",
    "record_window",
    "usage_cursor",
    "usage_key",
    "utcnow",
    "window_start_of",
    "write_logs",
    "write_metrics",
]
