"""The billing cycle's queries: claim an ended period, bill its usage into an invoice,
advance the period, and claim and mark invoices to send."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from services.billing.domain import InvoiceLine, InvoiceStatus, Metric
from services.billing.store.records import DEAD, BilledUsage, Invoice, S, Subscription
from shared.db import Session
from shared.ids import new_id


async def claim_due_subscription(tx: Session, now: datetime) -> Subscription | None:
    """One subscription whose period has ended, locked; replicas skip each other's."""
    row = await tx.fetchrow(
        f"""SELECT * FROM {S}.subscriptions
            WHERE current_period_end <= $1 AND status NOT IN {DEAD}
            ORDER BY current_period_end LIMIT 1
            FOR UPDATE SKIP LOCKED""",
        now,
    )
    return Subscription.from_row(row) if row else None


async def insert_invoice(tx: Session, sub: Subscription, currency: str) -> str | None:
    """The period's invoice row; None if this period already has one."""
    invoice_id: str | None = await tx.fetchval(
        f"""INSERT INTO {S}.invoices (id, organization_id, subscription_id, period_start,
                period_end, currency)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (subscription_id, period_start) DO NOTHING RETURNING id""",
        new_id(),
        sub.organization_id,
        sub.id,
        sub.current_period_start,
        sub.current_period_end,
        currency,
    )
    return invoice_id


async def bill_unbilled_usage(tx: Session, sub: Subscription, invoice_id: str) -> list[BilledUsage]:
    """Mark every not-yet-billed record up to the period's end as billed by `invoice_id`;
    returns the quantities per metric and per period (late usage keeps its own period)."""
    rows = await tx.fetch(
        f"""WITH billed AS (
                UPDATE {S}.usage_records SET invoice_id = $2
                WHERE subscription_id = $1 AND invoice_id IS NULL AND recorded_at < $4
                RETURNING metric_type, quantity, recorded_at
            )
            SELECT b.metric_type,
                   CASE WHEN b.recorded_at >= $3 THEN NULL ELSE i.period_start END
                       AS period_start,
                   sum(b.quantity)::bigint AS quantity
            FROM billed b LEFT JOIN {S}.invoices i
              ON i.subscription_id = $1 AND i.id <> $2
             AND b.recorded_at >= i.period_start AND b.recorded_at < i.period_end
            GROUP BY 1, 2""",
        sub.id,
        invoice_id,
        sub.current_period_start,
        sub.current_period_end,
    )
    return [
        BilledUsage(Metric(r["metric_type"]), r["period_start"], int(r["quantity"])) for r in rows
    ]


async def earlier_invoice(tx: Session, subscription_id: str, period_start: datetime) -> Invoice:
    row = await tx.fetchrow(
        f"SELECT * FROM {S}.invoices WHERE subscription_id = $1 AND period_start = $2",
        subscription_id,
        period_start,
    )
    assert row is not None
    return Invoice.from_row(row)


async def billed_quantity(
    tx: Session, invoice: Invoice, metric: Metric, excluding_invoice_id: str
) -> int:
    """Usage of `invoice`'s period already billed (on it or on later adjustments)."""
    value = await tx.fetchval(
        f"""SELECT coalesce(sum(quantity), 0)::bigint FROM {S}.usage_records
            WHERE subscription_id = $1 AND metric_type = $2
              AND recorded_at >= $3 AND recorded_at < $4
              AND invoice_id IS NOT NULL AND invoice_id <> $5""",
        invoice.subscription_id,
        metric.value,
        invoice.period_start,
        invoice.period_end,
        excluding_invoice_id,
    )
    return int(value)


async def finish_invoice(
    tx: Session,
    invoice_id: str,
    lines: Iterable[InvoiceLine],
    total_cents: int,
    status: InvoiceStatus,
    due_at: datetime | None,
) -> Invoice:
    row = await tx.fetchrow(
        f"""UPDATE {S}.invoices SET lines = $2, total_cents = $3, status = $4, due_at = $5,
                paid_at = CASE WHEN $4 = 'paid' THEN now() END, updated_at = now()
            WHERE id = $1 RETURNING *""",
        invoice_id,
        [line.to_json() for line in lines],
        total_cents,
        status.value,
        due_at,
    )
    assert row is not None
    return Invoice.from_row(row)


async def advance_period(tx: Session, subscription_id: str, start: datetime, end: datetime) -> None:
    await tx.execute(
        f"""UPDATE {S}.subscriptions SET current_period_start = $2, current_period_end = $3,
                updated_at = now() WHERE id = $1""",
        subscription_id,
        start,
        end,
    )


async def claim_invoice_to_send(
    tx: Session, now: datetime, backoff_base_seconds: float, backoff_max_seconds: float
) -> Invoice | None:
    """Claim the next unsent invoice that is due, in one statement: count the attempt and
    book the next one (base x 2^(attempts-1), capped) before Stripe is called. That booking
    is the claim: until then no replica picks the invoice again, no lock is held while
    Stripe answers, and an invoice that keeps failing waits its turn behind the others.
    (domain.send_backoff_seconds states the same rule; the tests hold the two together.)"""
    row = await tx.fetchrow(
        f"""UPDATE {S}.invoices i SET
                send_attempts = i.send_attempts + 1,
                next_attempt_at = $1 + make_interval(
                    secs => least($3::float8, $2::float8 * power(2, least(i.send_attempts, 62)))),
                updated_at = now()
            WHERE i.id = (
                SELECT id FROM {S}.invoices
                WHERE NOT sent AND status = 'draft' AND total_cents > 0
                  AND (next_attempt_at IS NULL OR next_attempt_at <= $1)
                ORDER BY next_attempt_at NULLS FIRST, created_at
                LIMIT 1 FOR UPDATE SKIP LOCKED)
            RETURNING i.*""",
        now,
        backoff_base_seconds,
        backoff_max_seconds,
    )
    return Invoice.from_row(row) if row else None


async def record_send_failure(
    tx: Session, invoice_id: str, error: str, stripe_invoice_id: str = ""
) -> None:
    """Keep the error (and the Stripe draft, if one was made) for the next attempt."""
    await tx.execute(
        f"""UPDATE {S}.invoices SET last_error = $2,
                stripe_invoice_id = coalesce(stripe_invoice_id, nullif($3, '')),
                updated_at = now()
            WHERE id = $1 AND NOT sent""",
        invoice_id,
        error[:1000],
        stripe_invoice_id,
    )


async def mark_invoice_sent(
    tx: Session,
    invoice_id: str,
    stripe_invoice_id: str,
    status: InvoiceStatus,
    hosted_invoice_url: str = "",
) -> Invoice | None:
    """None if the invoice was already marked sent (nothing changes twice)."""
    row = await tx.fetchrow(
        f"""UPDATE {S}.invoices SET sent = true, stripe_invoice_id = $2,
                status = CASE WHEN status = 'draft' THEN $3 ELSE status END,
                hosted_invoice_url = coalesce(nullif($4, ''), hosted_invoice_url),
                next_attempt_at = NULL, last_error = NULL, updated_at = now()
            WHERE id = $1 AND NOT sent RETURNING *""",
        invoice_id,
        stripe_invoice_id,
        status.value,
        hosted_invoice_url,
    )
    return Invoice.from_row(row) if row else None
