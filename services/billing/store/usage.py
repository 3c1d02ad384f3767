"""Usage records: the batched, idempotent insert and the period totals."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from services.billing.domain import METRICS, Metric
from services.billing.store.records import DEAD, S, UsageRow
from shared.db import Session
from shared.errors import FailedPrecondition

STAGING = "billing_usage_staging"
STAGING_COLUMNS = (
    "id",
    "organization_id",
    "project_id",
    "metric_type",
    "quantity",
    "recorded_at",
    "idempotency_key",
)


async def record_usage(tx: Session, rows: Sequence[UsageRow]) -> tuple[int, int]:
    """COPY the batch into a per-connection staging table, then one INSERT ... ON CONFLICT DO
    NOTHING. Returns (accepted, duplicates). Runs inside the caller's transaction, so a
    failure stores nothing and burns no idempotency key."""
    await tx.execute(
        f"""CREATE TEMP TABLE IF NOT EXISTS {STAGING} (
                id text, organization_id text, project_id text, metric_type text,
                quantity bigint, recorded_at timestamptz, idempotency_key text
            ) ON COMMIT DELETE ROWS"""
    )
    await tx.conn.copy_records_to_table(STAGING, records=rows, columns=STAGING_COLUMNS)
    result = await tx.fetchrow(
        f"""WITH subs AS (
                SELECT DISTINCT ON (organization_id) organization_id, id
                FROM {S}.subscriptions
                WHERE organization_id IN (SELECT DISTINCT organization_id FROM {STAGING})
                ORDER BY organization_id, status IN {DEAD}, created_at DESC
            ), ins AS (
                INSERT INTO {S}.usage_records (id, organization_id, subscription_id, project_id,
                    metric_type, quantity, recorded_at, idempotency_key)
                SELECT st.id, st.organization_id, subs.id, st.project_id, st.metric_type,
                       st.quantity, st.recorded_at, st.idempotency_key
                FROM {STAGING} st JOIN subs USING (organization_id)
                ON CONFLICT (organization_id, idempotency_key) DO NOTHING
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM ins) AS accepted,
                   (SELECT array_agg(DISTINCT organization_id) FROM {STAGING}
                    WHERE organization_id NOT IN (SELECT organization_id FROM subs)) AS orphans"""
    )
    assert result is not None
    if result["orphans"]:
        raise FailedPrecondition(
            "no subscription for organization(s): " + ", ".join(sorted(result["orphans"])),
            reason="NO_SUBSCRIPTION",
        )
    accepted = int(result["accepted"])
    return accepted, len(rows) - accepted


async def usage_totals(
    s: Session, subscription_id: str, start: datetime, end: datetime
) -> dict[Metric, int]:
    rows = await s.fetch(
        f"""SELECT metric_type, sum(quantity)::bigint AS total FROM {S}.usage_records
            WHERE subscription_id = $1 AND recorded_at >= $2 AND recorded_at < $3
            GROUP BY metric_type""",
        subscription_id,
        start,
        end,
    )
    totals = dict.fromkeys(METRICS, 0)
    for r in rows:
        totals[Metric(r["metric_type"])] = int(r["total"])
    return totals
