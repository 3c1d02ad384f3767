"""The plan catalog."""

from __future__ import annotations

from decimal import Decimal

import asyncpg

from services.billing.domain import Metric, Plan
from services.billing.store.records import S
from shared.db import Session
from shared.errors import NotFound
from shared.resources import Resources


def _plan(row: asyncpg.Record) -> Plan:
    return Plan(
        id=row["id"],
        name=row["name"],
        price_cents=row["price_cents"],
        currency=row["currency"],
        pool=Resources.from_row(row, prefix="pool_"),
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
