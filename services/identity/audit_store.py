"""The audit trail's table and queries: one hash chain per organization (and one for entries
without an organization), appended under an advisory lock. The rest of identity's SQL is in
store.py, whose MetaData this table shares."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import BigInteger, Column, DateTime, Table, Text, insert, select
from sqlalchemy.dialects.postgresql import JSONB

from services.identity.domain import AuditEntry, actor_type_of, audit_hash
from services.identity.store import metadata
from shared.db import Session

audit_logs = Table(
    "audit_logs",
    metadata,
    Column("id", Text, primary_key=True),
    Column("event_id", Text, nullable=False),
    Column("organization_id", Text),
    Column("seq", BigInteger, nullable=False),
    Column("service", Text, nullable=False),
    Column("actor_id", Text),
    Column("actor_type", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("target_type", Text),
    Column("target_id", Text),
    Column("metadata", JSONB, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("prev_hash", Text),
    Column("hash", Text, nullable=False),
)


def _chain(org_id: str | None) -> Any:
    return (
        audit_logs.c.organization_id.is_(None)
        if org_id is None
        else audit_logs.c.organization_id == org_id
    )


async def lock_audit_chain(tx: Session, org_id: str | None) -> None:
    """Appends to one chain take turns until commit (seq and prev_hash stay linear)."""
    await tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"identity.audit:{org_id or ''}")


async def existing_event_ids(tx: Session, event_ids: list[str]) -> set[str]:
    rows = await tx.fetch(select(audit_logs.c.event_id).where(audit_logs.c.event_id.in_(event_ids)))
    return {r["event_id"] for r in rows}


async def chain_tail(tx: Session, org_id: str | None) -> tuple[int, str | None]:
    row = await tx.fetchrow(
        select(audit_logs.c.seq, audit_logs.c.hash)
        .where(_chain(org_id))
        .order_by(audit_logs.c.seq.desc())
        .limit(1)
    )
    return (0, None) if row is None else (row["seq"], row["hash"])


async def append_audit(
    tx: Session,
    *,
    entry_id: str,
    event_id: str,
    organization_id: str | None,
    service: str,
    actor_id: str,
    action: str,
    target_type: str,
    target_id: str,
    metadata: dict[str, Any],
    occurred_at: datetime,
    tail: tuple[int, str | None],
) -> tuple[int, str | None]:
    """Insert one entry after `tail` (the chain must be locked); returns the new tail."""
    entry = AuditEntry(
        event_id=event_id,
        organization_id=organization_id,
        seq=tail[0] + 1,
        service=service,
        actor_id=actor_id or None,
        actor_type=actor_type_of(actor_id),
        action=action,
        target_type=target_type or None,
        target_id=target_id or None,
        metadata=metadata,
        occurred_at=occurred_at,
        prev_hash=tail[1],
    )
    digest = audit_hash(entry)
    await tx.execute(
        insert(audit_logs).values(
            id=entry_id,
            event_id=entry.event_id,
            organization_id=entry.organization_id,
            seq=entry.seq,
            service=entry.service,
            actor_id=entry.actor_id,
            actor_type=entry.actor_type,
            action=entry.action,
            target_type=entry.target_type,
            target_id=entry.target_id,
            metadata=entry.metadata,
            occurred_at=entry.occurred_at,
            prev_hash=entry.prev_hash,
            hash=digest,
        )
    )
    return entry.seq, digest


def _entry(row: asyncpg.Record) -> AuditEntry:
    return AuditEntry(
        event_id=row["event_id"],
        organization_id=row["organization_id"],
        seq=row["seq"],
        service=row["service"],
        actor_id=row["actor_id"],
        actor_type=row["actor_type"],
        action=row["action"],
        target_type=row["target_type"],
        target_id=row["target_id"],
        metadata=row["metadata"],
        occurred_at=row["occurred_at"],
        prev_hash=row["prev_hash"],
    )


@dataclass(frozen=True)
class StoredAudit:
    entry: AuditEntry
    hash: str


async def list_audit(
    s: Session,
    org_id: str,
    *,
    before_seq: int | None,
    limit: int,
    actor_id: str = "",
    action: str = "",
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[StoredAudit]:
    stmt = (
        select(audit_logs)
        .where(audit_logs.c.organization_id == org_id)
        .order_by(audit_logs.c.seq.desc())
        .limit(limit)
    )
    if before_seq is not None:
        stmt = stmt.where(audit_logs.c.seq < before_seq)
    if actor_id:
        stmt = stmt.where(audit_logs.c.actor_id == actor_id)
    if action:
        stmt = stmt.where(audit_logs.c.action == action)
    if start is not None:
        stmt = stmt.where(audit_logs.c.occurred_at >= start)
    if end is not None:
        stmt = stmt.where(audit_logs.c.occurred_at < end)
    return [StoredAudit(_entry(r), r["hash"]) for r in await s.fetch(stmt)]


async def audit_chain_page(
    s: Session, org_id: str | None, after_seq: int, limit: int
) -> list[StoredAudit]:
    stmt = (
        select(audit_logs)
        .where(_chain(org_id), audit_logs.c.seq > after_seq)
        .order_by(audit_logs.c.seq)
        .limit(limit)
    )
    return [StoredAudit(_entry(r), r["hash"]) for r in await s.fetch(stmt)]
