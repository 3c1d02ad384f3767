"""Project allocations out of a subscription's pool."""

from __future__ import annotations

from services.billing.domain import pool_shortfall
from services.billing.store.records import DEAD, Allocation, S
from services.billing.store.subscriptions import NO_ACTIVE_SUBSCRIPTION, get_subscription_by_id
from shared.db import Session
from shared.errors import FailedPrecondition
from shared.resources import Resources


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
            "this organization has no active subscription", reason=NO_ACTIVE_SUBSCRIPTION
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
