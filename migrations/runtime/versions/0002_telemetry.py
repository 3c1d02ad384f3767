"""runtime: telemetry dedupe keys, a time index for usage, and the usage ledger

Revision ID: runtime_0002
Revises: runtime_0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from shared.migrate import execute_all

revision = "runtime_0002"
down_revision = "runtime_0001"
branch_labels = None
depends_on = None

UPGRADE = [
    # A re-shipped log line (the agent re-sends what runtime did not acknowledge) carries
    # the same container, sequence and emitted_at, so this key drops it. A unique index on
    # a partitioned table must include the partition key (emitted_at); it also serves reads
    # by container and the tail's fetch of (container, sequence range).
    """CREATE UNIQUE INDEX uq_logs_container_id_sequence_emitted_at
        ON runtime.logs (container_id, sequence, emitted_at)""",
    # ShipMetrics is retried on UNAVAILABLE: a sample stored twice would bill twice.
    # NULLS NOT DISTINCT: server totals have no container.
    """CREATE UNIQUE INDEX uq_metrics_server_id_container_id_metric_sampled_at
        ON runtime.metrics (server_id, container_id, metric, sampled_at) NULLS NOT DISTINCT""",
    # The usage loop reads every sample of a time window; BRIN fits append-mostly time data.
    "CREATE INDEX ix_metrics_sampled_at_brin ON runtime.metrics USING brin (sampled_at)",
    # Usage ledger: one row per usage window computed (the cursor is its maximum), and one
    # report per container, billing metric and window, kept until billing accepted it.
    """CREATE TABLE runtime.usage_windows (
        window_start timestamptz PRIMARY KEY,
        window_end   timestamptz NOT NULL,
        reports      integer NOT NULL,
        computed_at  timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_usage_windows_range CHECK (window_end > window_start)
    )""",
    """CREATE TABLE runtime.usage_reports (
        idempotency_key text PRIMARY KEY,     -- <container>:<metric>:<window start>
        organization_id text NOT NULL,
        project_id      text NOT NULL,
        container_id    text NOT NULL,
        metric          text NOT NULL,
        window_start    timestamptz NOT NULL,
        window_end      timestamptz NOT NULL,
        quantity        bigint NOT NULL,
        created_at      timestamptz NOT NULL DEFAULT now(),
        sent_at         timestamptz,
        attempts        integer NOT NULL DEFAULT 0,
        next_attempt_at timestamptz NOT NULL DEFAULT now(),
        last_error      text,
        CONSTRAINT ck_usage_reports_metric
            CHECK (metric IN ('ram_mb_seconds', 'cpu_millis_seconds', 'bandwidth_bytes')),
        CONSTRAINT ck_usage_reports_quantity CHECK (quantity >= 0)
    )""",
    """CREATE INDEX ix_usage_reports_unsent_next_attempt_at
        ON runtime.usage_reports (next_attempt_at) WHERE sent_at IS NULL""",
]

DOWNGRADE = [
    "DROP TABLE runtime.usage_reports",
    "DROP TABLE runtime.usage_windows",
    "DROP INDEX runtime.ix_metrics_sampled_at_brin",
    "DROP INDEX runtime.uq_metrics_server_id_container_id_metric_sampled_at",
    "DROP INDEX runtime.uq_logs_container_id_sequence_emitted_at",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
