"""Subscriptions: opening, plan changes, cancellation, and their Stripe bookkeeping."""

from __future__ import annotations

from datetime import datetime

from services.billing.domain import Plan, SubscriptionStatus
from services.billing.store.records import DEAD, HOBBY, S, Subscription
from shared.db import Session
from shared.errors import NotFound
from shared.ids import new_id

NO_SUBSCRIPTION = "NO_SUBSCRIPTION"
NO_ACTIVE_SUBSCRIPTION = "NO_ACTIVE_SUBSCRIPTION"


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
        raise NotFound("this organization has no subscription", reason=NO_SUBSCRIPTION)
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
