"""Billing's tables and queries: the only file with SQL.

Statements are written as SQL text (asyncpg `$n` parameters): the pool arithmetic, the COPY
staging insert and the billing-cycle aggregation are single statements whose exact shape
matters, and they read more plainly as SQL than as expression trees.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from services.billing.domain import (
    METRICS,
    InvoiceLine,
    InvoiceStatus,
    Metric,
    Plan,
    Resources,
    SubscriptionStatus,
    pool_shortfall,
)
from shared.db import Session
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.ids import new_id

S = "billing"
DEAD = "('canceled', 'incomplete_expired')"
HOBBY = "hobby"


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Subscription:
    id: str
    organization_id: str
    plan_id: str
    status: SubscriptionStatus
    current_period_start: datetime
    current_period_end: datetime
    pool: Resources
    allocated: Resources
    stripe_customer_id: str
    stripe_subscription_id: str
    stripe_synced_at: datetime | None
    created_at: datetime
    plan_version: int = 0  # counts plan changes
    stripe_plan_version: int | None = None  # the version Stripe is on; None: not created
    stripe_canceled_at: datetime | None = None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Subscription:
        return cls(
            id=row["id"],
            organization_id=row["organization_id"],
            plan_id=row["plan_id"],
            status=SubscriptionStatus(row["status"]),
            current_period_start=row["current_period_start"],
            current_period_end=row["current_period_end"],
            pool=Resources(row["pool_ram_mb"], row["pool_cpu_millis"], row["pool_bandwidth_gb"]),
            allocated=Resources(
                row["allocated_ram_mb"], row["allocated_cpu_millis"], row["allocated_bandwidth_gb"]
            ),
            stripe_customer_id=row["stripe_customer_id"] or "",
            stripe_subscription_id=row["stripe_subscription_id"] or "",
            stripe_synced_at=row["stripe_synced_at"],
            created_at=row["created_at"],
            plan_version=row["plan_version"],
            stripe_plan_version=row["stripe_plan_version"],
            stripe_canceled_at=row["stripe_canceled_at"],
        )


@dataclass(frozen=True)
class Allocation:
    organization_id: str
    project_id: str
    resources: Resources
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Allocation:
        return cls(
            organization_id=row["organization_id"],
            project_id=row["project_id"],
            resources=Resources(row["ram_mb"], row["cpu_millis"], row["bandwidth_gb"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


@dataclass(frozen=True)
class Invoice:
    id: str
    organization_id: str
    subscription_id: str
    period_start: datetime
    period_end: datetime
    status: InvoiceStatus
    lines: list[InvoiceLine]
    total_cents: int
    currency: str
    stripe_invoice_id: str
    sent: bool
    created_at: datetime
    due_at: datetime | None
    send_attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str = ""

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Invoice:
        return cls(
            id=row["id"],
            organization_id=row["organization_id"],
            subscription_id=row["subscription_id"],
            period_start=row["period_start"],
            period_end=row["period_end"],
            status=InvoiceStatus(row["status"]),
            lines=[InvoiceLine.from_json(line) for line in row["lines"] or []],
            total_cents=row["total_cents"],
            currency=row["currency"],
            stripe_invoice_id=row["stripe_invoice_id"] or "",
            sent=row["sent"],
            created_at=row["created_at"],
            due_at=row["due_at"],
            send_attempts=row["send_attempts"],
            next_attempt_at=row["next_attempt_at"],
            last_error=row["last_error"] or "",
        )


def _plan(row: asyncpg.Record) -> Plan:
    return Plan(
        id=row["id"],
        name=row["name"],
        price_cents=row["price_cents"],
        currency=row["currency"],
        pool=Resources(row["pool_ram_mb"], row["pool_cpu_millis"], row["pool_bandwidth_gb"]),
        included={
            Metric.RAM_MB_SECONDS: row["included_ram_mb_seconds"],
            Metric.CPU_MILLIS_SECONDS: row["included_cpu_millis_seconds"],
            Metric.BANDWIDTH_BYTES: row["included_bandwidth_bytes"],
        },
        unit_cents={
            Metric.RAM_MB_SECONDS: Decimal(row["overage_cents_per_ram_mb_second"]),
            Metric.CPU_MILLIS_SECONDS: Decimal(row["overage_cents_per_cpu_millis_second"]),
            Metric.BANDWIDTH_BYTES: Decimal(row["overage_cents_per_bandwidth_byte"]),
        },
        stripe_price_id=row["stripe_price_id"] or "",
    )


# ------------------------------------------------------------------------ page tokens


def encode_page_token(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode()).decode() if last else ""


def decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument.field("page_token", "not a token from a previous page") from None


# ------------------------------------------------------------------------------ plans


async def list_plans(s: Session) -> list[Plan]:
    rows = await s.fetch(f"SELECT * FROM {S}.plans WHERE active ORDER BY sort_order, id")
    return [_plan(r) for r in rows]


async def all_plans(s: Session) -> list[Plan]:
    """Every plan, retired ones too (a subscription may still be on one)."""
    rows = await s.fetch(f"SELECT * FROM {S}.plans ORDER BY sort_order, id")
    return [_plan(r) for r in rows]


async def set_plan_stripe_price(tx: Session, plan_id: str, price_id: str) -> None:
    await tx.execute(
        f"""UPDATE {S}.plans SET stripe_price_id = $2, updated_at = now()
            WHERE id = $1 AND stripe_price_id IS DISTINCT FROM $2""",
        plan_id,
        price_id,
    )


async def get_plan(s: Session, plan_id: str) -> Plan:
    row = await s.fetchrow(f"SELECT * FROM {S}.plans WHERE id = $1", plan_id)
    if row is None:
        raise NotFound(f"plan {plan_id!r} does not exist")
    return _plan(row)


# ---------------------------------------------------------------------- subscriptions


async def create_default_subscription(
    tx: Session, organization_id: str, period_start: datetime, period_end: datetime
) -> Subscription | None:
    """The hobby subscription an organization starts with; None if it has ever had one.

    Both ways in (identity's organization.created, and a call that finds the organization
    without one) come here. They take turns on a per-organization lock, and an organization
    whose subscription ended (deleted, or canceled in Stripe) never gets a new one here, so
    a late event or a racing caller can neither double it nor revive it."""
    await tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('billing.subscriptions'), hashtext($1))",
        organization_id,
    )
    row = await tx.fetchrow(
        f"""INSERT INTO {S}.subscriptions (
                id, organization_id, plan_id, status, current_period_start, current_period_end,
                pool_ram_mb, pool_cpu_millis, pool_bandwidth_gb, created_at)
            SELECT $1, $2, p.id, 'active', $3, $4,
                   p.pool_ram_mb, p.pool_cpu_millis, p.pool_bandwidth_gb, $3
            FROM {S}.plans p
            WHERE p.id = $5
              AND NOT EXISTS (SELECT 1 FROM {S}.subscriptions WHERE organization_id = $2)
            ON CONFLICT (organization_id) WHERE status NOT IN {DEAD} DO NOTHING
            RETURNING *""",
        new_id(),
        organization_id,
        period_start,
        period_end,
        HOBBY,
    )
    return Subscription.from_row(row) if row else None


async def has_subscription(s: Session, organization_id: str) -> bool:
    """Has the organization ever had a subscription (live or ended)?"""
    return bool(
        await s.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {S}.subscriptions WHERE organization_id = $1)",
            organization_id,
        )
    )


async def find_subscription(
    s: Session, organization_id: str, *, for_update: bool = False
) -> Subscription | None:
    """The organization's live subscription, else its latest one."""
    row = await s.fetchrow(
        f"""SELECT * FROM {S}.subscriptions WHERE organization_id = $1
            ORDER BY status IN {DEAD}, created_at DESC LIMIT 1
            {"FOR UPDATE" if for_update else ""}""",
        organization_id,
    )
    return Subscription.from_row(row) if row else None


async def get_subscription(
    s: Session, organization_id: str, *, for_update: bool = False
) -> Subscription:
    sub = await find_subscription(s, organization_id, for_update=for_update)
    if sub is None:
        raise NotFound("this organization has no subscription")
    return sub


async def get_subscription_by_id(s: Session, subscription_id: str) -> Subscription:
    row = await s.fetchrow(f"SELECT * FROM {S}.subscriptions WHERE id = $1", subscription_id)
    if row is None:
        raise NotFound(f"subscription {subscription_id} does not exist")
    return Subscription.from_row(row)


async def change_plan(tx: Session, subscription_id: str, plan: Plan) -> Subscription:
    row = await tx.fetchrow(
        f"""UPDATE {S}.subscriptions SET plan_id = $2, pool_ram_mb = $3, pool_cpu_millis = $4,
                pool_bandwidth_gb = $5, plan_version = plan_version + 1, updated_at = now()
            WHERE id = $1 RETURNING *""",
        subscription_id,
        plan.id,
        plan.pool.ram_mb,
        plan.pool.cpu_millis,
        plan.pool.bandwidth_gb,
    )
    assert row is not None
    return Subscription.from_row(row)


async def cancel_organization(
    tx: Session, organization_id: str, now: datetime
) -> Subscription | None:
    """Cancel the live subscription and free its pool (allocations first: same lock order as
    ReserveAllocation, allocation then subscription)."""
    await tx.execute(f"DELETE FROM {S}.allocations WHERE organization_id = $1", organization_id)
    row = await tx.fetchrow(
        f"""UPDATE {S}.subscriptions SET status = 'canceled', canceled_at = $2,
                allocated_ram_mb = 0, allocated_cpu_millis = 0, allocated_bandwidth_gb = 0,
                updated_at = now()
            WHERE organization_id = $1 AND status NOT IN {DEAD} RETURNING *""",
        organization_id,
        now,
    )
    return Subscription.from_row(row) if row else None


async def set_stripe_customer(tx: Session, subscription_id: str, customer_id: str) -> None:
    await tx.execute(
        f"UPDATE {S}.subscriptions SET stripe_customer_id = $2, updated_at = now() WHERE id = $1",
        subscription_id,
        customer_id,
    )


async def set_stripe_subscription(
    tx: Session, subscription_id: str, stripe_id: str, plan_version: int
) -> None:
    await tx.execute(
        f"""UPDATE {S}.subscriptions SET stripe_subscription_id = $2, stripe_plan_version = $3,
                updated_at = now()
            WHERE id = $1""",
        subscription_id,
        stripe_id,
        plan_version,
    )


async def set_stripe_plan_version(tx: Session, subscription_id: str, plan_version: int) -> None:
    await tx.execute(
        f"""UPDATE {S}.subscriptions SET stripe_plan_version = $2, updated_at = now()
            WHERE id = $1""",
        subscription_id,
        plan_version,
    )


async def set_stripe_canceled(tx: Session, subscription_id: str, at: datetime) -> None:
    await tx.execute(
        f"""UPDATE {S}.subscriptions SET stripe_canceled_at = coalesce(stripe_canceled_at, $2),
                updated_at = now()
            WHERE id = $1""",
        subscription_id,
        at,
    )


async def subscriptions_out_of_step(
    s: Session, after_id: str = "", limit: int = 50
) -> list[Subscription]:
    """Subscriptions whose Stripe side lags: live ones without a Stripe customer or
    subscription, or on an older plan version in Stripe; ended ones still live in Stripe."""
    rows = await s.fetch(
        f"""SELECT * FROM {S}.subscriptions
            WHERE id > $1 AND (
                (status NOT IN {DEAD} AND (
                    stripe_customer_id IS NULL OR stripe_subscription_id IS NULL
                    OR stripe_plan_version IS DISTINCT FROM plan_version))
                OR (status IN {DEAD} AND stripe_subscription_id IS NOT NULL
                    AND stripe_canceled_at IS NULL))
            ORDER BY id LIMIT $2""",
        after_id,
        limit,
    )
    return [Subscription.from_row(r) for r in rows]


async def lock_subscription_by_stripe(
    tx: Session, stripe_subscription_id: str, hangar_subscription_id: str
) -> Subscription | None:
    row = await tx.fetchrow(
        f"""SELECT * FROM {S}.subscriptions
            WHERE stripe_subscription_id = $1 OR id = $2 LIMIT 1 FOR UPDATE""",
        stripe_subscription_id,
        hangar_subscription_id,
    )
    return Subscription.from_row(row) if row else None


async def apply_stripe_subscription_status(
    tx: Session,
    subscription_id: str,
    status: SubscriptionStatus,
    event_created: datetime,
    *,
    free_pool: bool,
) -> None:
    if free_pool:
        await tx.execute(f"DELETE FROM {S}.allocations WHERE subscription_id = $1", subscription_id)
    await tx.execute(
        f"""UPDATE {S}.subscriptions SET status = $2, stripe_synced_at = $3, updated_at = now(),
                canceled_at = CASE WHEN $2 = 'canceled' THEN $3 ELSE canceled_at END,
                stripe_canceled_at = CASE WHEN $2 = 'canceled'
                    THEN coalesce(stripe_canceled_at, $3) ELSE stripe_canceled_at END,
                allocated_ram_mb = CASE WHEN $4 THEN 0 ELSE allocated_ram_mb END,
                allocated_cpu_millis = CASE WHEN $4 THEN 0 ELSE allocated_cpu_millis END,
                allocated_bandwidth_gb = CASE WHEN $4 THEN 0 ELSE allocated_bandwidth_gb END
            WHERE id = $1""",
        subscription_id,
        status.value,
        event_created,
        free_pool,
    )


# ------------------------------------------------------------------------ allocations


async def reserve_allocation(
    tx: Session, organization_id: str, project_id: str, size: Resources
) -> tuple[Allocation, bool]:
    """Record or resize a project's allocation with one conditional update of the pool.

    The allocation row is created (at zero) before it is read FOR UPDATE, so two concurrent
    reservations of the same project serialize on it and never both apply a delta.
    """
    await tx.execute(
        f"""INSERT INTO {S}.allocations
                (project_id, organization_id, subscription_id, ram_mb, cpu_millis, bandwidth_gb)
            SELECT $1, $2, id, 0, 0, 0 FROM {S}.subscriptions
            WHERE organization_id = $2 AND status NOT IN {DEAD}
            ON CONFLICT (project_id) DO NOTHING""",
        project_id,
        organization_id,
    )
    row = await tx.fetchrow(
        f"SELECT * FROM {S}.allocations WHERE project_id = $1 FOR UPDATE", project_id
    )
    if row is None:
        raise FailedPrecondition(
            "this organization has no active subscription", reason="NO_ACTIVE_SUBSCRIPTION"
        )
    current = Allocation.from_row(row)
    if current.organization_id != organization_id:
        raise FailedPrecondition(
            "this project's allocation belongs to another organization",
            reason="ALLOCATION_ORGANIZATION_MISMATCH",
        )
    delta = size - current.resources
    if delta == Resources():
        return current, False
    updated = await tx.fetchrow(
        f"""UPDATE {S}.subscriptions SET
                allocated_ram_mb = allocated_ram_mb + $2,
                allocated_cpu_millis = allocated_cpu_millis + $3,
                allocated_bandwidth_gb = allocated_bandwidth_gb + $4,
                updated_at = now()
            WHERE id = $1
              AND allocated_ram_mb + $2 <= pool_ram_mb
              AND allocated_cpu_millis + $3 <= pool_cpu_millis
              AND allocated_bandwidth_gb + $4 <= pool_bandwidth_gb
            RETURNING id""",
        row["subscription_id"],
        delta.ram_mb,
        delta.cpu_millis,
        delta.bandwidth_gb,
    )
    if updated is None:
        sub = await get_subscription_by_id(tx, row["subscription_id"])
        raise pool_shortfall(sub.pool, sub.allocated, delta)
    saved = await tx.fetchrow(
        f"""UPDATE {S}.allocations SET ram_mb = $2, cpu_millis = $3, bandwidth_gb = $4,
                updated_at = clock_timestamp()
            WHERE project_id = $1 RETURNING *""",
        project_id,
        size.ram_mb,
        size.cpu_millis,
        size.bandwidth_gb,
    )
    assert saved is not None
    return Allocation.from_row(saved), True


async def release_allocation(tx: Session, organization_id: str, project_id: str) -> bool:
    row = await tx.fetchrow(
        f"""DELETE FROM {S}.allocations WHERE project_id = $1 AND organization_id = $2
            RETURNING *""",
        project_id,
        organization_id,
    )
    if row is None:
        return False
    await tx.execute(
        f"""UPDATE {S}.subscriptions SET
                allocated_ram_mb = allocated_ram_mb - $2,
                allocated_cpu_millis = allocated_cpu_millis - $3,
                allocated_bandwidth_gb = allocated_bandwidth_gb - $4,
                updated_at = now()
            WHERE id = $1""",
        row["subscription_id"],
        row["ram_mb"],
        row["cpu_millis"],
        row["bandwidth_gb"],
    )
    return True


async def list_allocations(
    s: Session, organization_id: str, after_project_id: str, limit: int
) -> list[Allocation]:
    rows = await s.fetch(
        f"""SELECT * FROM {S}.allocations
            WHERE ($1 = '' OR organization_id = $1) AND project_id > $2
            ORDER BY project_id LIMIT $3""",
        organization_id,
        after_project_id,
        limit,
    )
    return [Allocation.from_row(r) for r in rows]


# ------------------------------------------------------------------------------ usage

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

UsageRow = tuple[str, str, str, str, int, datetime, str]


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


# --------------------------------------------------------------------- billing cycle


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
    return await tx.fetchval(
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


@dataclass(frozen=True)
class BilledUsage:
    metric: Metric
    period_start: datetime | None  # None: the invoice's own period
    quantity: int


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
    tx: Session, invoice_id: str, stripe_invoice_id: str, status: InvoiceStatus
) -> Invoice | None:
    """None if the invoice was already marked sent (nothing changes twice)."""
    row = await tx.fetchrow(
        f"""UPDATE {S}.invoices SET sent = true, stripe_invoice_id = $2,
                status = CASE WHEN status = 'draft' THEN $3 ELSE status END,
                next_attempt_at = NULL, last_error = NULL, updated_at = now()
            WHERE id = $1 AND NOT sent RETURNING *""",
        invoice_id,
        stripe_invoice_id,
        status.value,
    )
    return Invoice.from_row(row) if row else None


# ----------------------------------------------------------------------------- invoices


async def list_invoices(
    s: Session, organization_id: str, after: tuple[datetime, str] | None, limit: int
) -> list[Invoice]:
    if after is None:
        rows = await s.fetch(
            f"""SELECT * FROM {S}.invoices WHERE organization_id = $1
                ORDER BY created_at DESC, id DESC LIMIT $2""",
            organization_id,
            limit,
        )
    else:
        rows = await s.fetch(
            f"""SELECT * FROM {S}.invoices WHERE organization_id = $1
                  AND (created_at, id) < ($2, $3)
                ORDER BY created_at DESC, id DESC LIMIT $4""",
            organization_id,
            after[0],
            after[1],
            limit,
        )
    return [Invoice.from_row(r) for r in rows]


async def get_invoice(s: Session, invoice_id: str) -> Invoice | None:
    row = await s.fetchrow(f"SELECT * FROM {S}.invoices WHERE id = $1", invoice_id)
    return Invoice.from_row(row) if row else None


async def lock_invoice_for_stripe(
    tx: Session, stripe_invoice_id: str, hangar_invoice_id: str
) -> Invoice | None:
    row = await tx.fetchrow(
        f"""SELECT * FROM {S}.invoices WHERE stripe_invoice_id = $1 OR id = $2
            LIMIT 1 FOR UPDATE""",
        stripe_invoice_id,
        hangar_invoice_id,
    )
    return Invoice.from_row(row) if row else None


async def apply_invoice_status(
    tx: Session,
    invoice_id: str,
    status: InvoiceStatus,
    stripe_invoice_id: str,
    event_created: datetime,
) -> None:
    await tx.execute(
        f"""UPDATE {S}.invoices SET status = $2, stripe_synced_at = $4, updated_at = now(),
                stripe_invoice_id = coalesce(stripe_invoice_id, nullif($3, '')),
                paid_at = CASE WHEN $2 = 'paid' THEN $4 ELSE paid_at END
            WHERE id = $1""",
        invoice_id,
        status.value,
        stripe_invoice_id,
        event_created,
    )


# ----------------------------------------------------------------------------- webhooks


async def record_webhook_event(
    tx: Session, event_id: str, event_type: str, payload: dict[str, Any], created: datetime
) -> bool:
    """True if this is the first delivery of the event (concurrent ones wait, then see it)."""
    inserted = await tx.fetchval(
        f"""INSERT INTO {S}.webhook_events (id, provider, provider_event_id, type, payload,
                event_created_at)
            VALUES ($1, 'stripe', $2, $3, $4, $5)
            ON CONFLICT (provider, provider_event_id) DO NOTHING RETURNING id""",
        new_id(),
        event_id,
        event_type,
        payload,
        created,
    )
    return inserted is not None


async def finish_webhook_event(tx: Session, event_id: str, note: str = "") -> None:
    await tx.execute(
        f"""UPDATE {S}.webhook_events SET status = 'processed', processed_at = now(),
                error = nullif($2, '')
            WHERE provider = 'stripe' AND provider_event_id = $1""",
        event_id,
        note,
    )
