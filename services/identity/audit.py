"""Identity's audit trail use cases: its own entries, written in the caller's transaction;
batches from other services (AppendAuditEvents); reading and verifying an organization's
chain. SQL in audit_store.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.identity import audit_store, domain
from services.identity.service_auth import LocalAuthorizer
from shared import pagination
from shared.auth import require_caller, require_service
from shared.db import Database, Session
from shared.errors import FieldViolation, InvalidArgument
from shared.ids import new_id
from shared.pagination import Page
from shared.validation import require_id

SERVICE = "identity"
MAX_AUDIT_BATCH = 1000


@dataclass(frozen=True)
class AuditEventIn:
    """One event from AppendAuditEvents, already taken out of its proto."""

    id: str
    organization_id: str
    actor_id: str
    action: str
    target_type: str
    target_id: str
    metadata: dict[str, Any]
    occurred_at: datetime | None


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    checked: int
    first_broken_entry_id: str


class AuditTrail:
    def __init__(self, db: Database, authorizer: LocalAuthorizer) -> None:
        self.db = db
        self.authorizer = authorizer

    async def record(
        self,
        tx: Session,
        org_id: str | None,
        action: str,
        actor_id: str,
        target_type: str,
        target_id: str,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Identity's own entry, appended to the chain in the caller's transaction."""
        await audit_store.lock_audit_chain(tx, org_id)
        tail = await audit_store.chain_tail(tx, org_id)
        await audit_store.append_audit(
            tx,
            entry_id=new_id(),
            event_id=new_id(),
            organization_id=org_id,
            service=SERVICE,
            actor_id=actor_id,
            action=action,
            target_type=target_type,
            target_id=target_id,
            metadata=domain.canonical_metadata(metadata or {}),
            occurred_at=datetime.now(UTC),
            tail=tail,
        )

    async def append_audit_events(self, events: Sequence[AuditEventIn]) -> tuple[int, int]:
        caller = require_service()
        if len(events) > MAX_AUDIT_BATCH:
            raise InvalidArgument.field("events", f"at most {MAX_AUDIT_BATCH} per call")
        violations: list[FieldViolation] = []
        for i, event in enumerate(events):
            if not event.id:
                violations.append(FieldViolation(f"events[{i}].id", "required"))
            elif len(event.id) > 100:
                violations.append(FieldViolation(f"events[{i}].id", "too long"))
            if not event.action:
                violations.append(FieldViolation(f"events[{i}].action", "required"))
            try:
                domain.check_metadata(event.metadata, f"events[{i}].metadata")
            except InvalidArgument as exc:
                violations += exc.violations
        if violations:
            raise InvalidArgument(violations)
        unique: dict[str, AuditEventIn] = {}
        for event in events:
            unique.setdefault(event.id, event)
        chains: dict[str, list[AuditEventIn]] = {}
        for event in unique.values():
            chains.setdefault(event.organization_id, []).append(event)
        accepted = 0
        now = datetime.now(UTC)
        async with self.db.transaction() as tx:
            for org_id in sorted(chains):  # one lock order: concurrent batches cannot deadlock
                chain_id = org_id or None
                await audit_store.lock_audit_chain(tx, chain_id)
                batch = chains[org_id]
                seen = await audit_store.existing_event_ids(tx, [e.id for e in batch])
                tail = await audit_store.chain_tail(tx, chain_id)
                for event in batch:
                    if event.id in seen:
                        continue
                    tail = await audit_store.append_audit(
                        tx,
                        entry_id=new_id(),
                        event_id=event.id,
                        organization_id=chain_id,
                        service=caller.subject,
                        actor_id=event.actor_id,
                        action=event.action,
                        target_type=event.target_type,
                        target_id=event.target_id,
                        metadata=domain.canonical_metadata(event.metadata),
                        occurred_at=event.occurred_at or now,
                        tail=tail,
                    )
                    accepted += 1
        return accepted, len(events) - accepted

    async def list_audit_logs(
        self,
        org_id: str,
        size: int,
        token: str,
        *,
        actor_id: str = "",
        action: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> Page[audit_store.StoredAudit]:
        require_id(org_id, "organization_id")
        limit = pagination.page_size(size)
        key = pagination.decode_page_token(token, (int,))
        await self._require_audit_read(org_id)
        async with self.db.session() as s:
            found = await audit_store.list_audit(
                s,
                org_id,
                before_seq=key[0] if key else None,
                limit=limit + 1,
                actor_id=actor_id,
                action=action,
                start=start,
                end=end,
            )
        return pagination.page_of(found, limit, lambda a: [a.entry.seq])

    async def _require_audit_read(self, org_id: str) -> None:
        """Members with audit.read, and platform admins for any organization: a deleted
        organization has no members left, and its trail stays readable to the operators."""
        if require_caller().is_platform_admin:
            return
        await self.authorizer.require(org_id, "audit.read")

    async def verify_audit_chain(self, org_id: str) -> ChainReport:
        require_id(org_id, "organization_id")
        await self._require_audit_read(org_id)
        checked, prev, after = 0, None, 0
        async with self.db.session() as s:
            while True:
                page = await audit_store.audit_chain_page(s, org_id, after, 1000)
                if not page:
                    return ChainReport(True, checked, "")
                broken = domain.first_broken([(p.entry, p.hash) for p in page], prev)
                if broken is not None:
                    return ChainReport(False, checked + broken + 1, page[broken].entry.event_id)
                checked += len(page)
                prev, after = page[-1].hash, page[-1].entry.seq
