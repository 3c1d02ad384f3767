"""The audit trail from any service: `record_audit` in the transaction of the change, and an
`AuditRelay` loop that delivers those entries to identity.AppendAuditEvents.

Entries ride in the service's own outbox as events of type ``audit.<action>`` (so they commit
or vanish with the change). The relay reads them in outbox order, sends them in batches and
moves its cursor (``event_cursors``: consumer ``audit-relay``, source ``identity``) only once
identity accepted the batch. Identity is idempotent on the event id, so a batch resent after a
crash is stored once. One replica relays at a time (a transaction-level advisory lock).

Never put secrets, passwords or tokens in `metadata`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from shared.auth import API_TOKEN_SESSION, CLAIM_SESSION, IDENTITY_SERVICE
from shared.clients import Clients
from shared.context import current_principal
from shared.db import Database, Session
from shared.outbox import START, Cursor, write_event

log = logging.getLogger(__name__)

AUDIT_PREFIX = "audit."
RELAY_CONSUMER = "audit-relay"
RELAY_TARGET = "identity"


def current_actor() -> str:
    """The actor id of the call in progress: a user id, or "service:<name>"."""
    principal = current_principal()
    if principal.is_service:
        return f"service:{principal.subject}"
    return principal.subject


async def record_audit(
    tx: Session,
    schema: str,
    *,
    organization_id: str,
    action: str,
    target_type: str = "",
    target_id: str = "",
    metadata: dict[str, Any] | None = None,
    actor_id: str | None = None,
) -> str:
    """Add an audit entry to this transaction; the relay delivers it after commit. A write
    made with an API token names the token in the entry's metadata (`api_token`)."""
    metadata = dict(metadata or {})
    session = str(current_principal().claims.get(CLAIM_SESSION) or "")
    if session.startswith(API_TOKEN_SESSION):
        metadata.setdefault("api_token", session.removeprefix(API_TOKEN_SESSION))
    return await write_event(
        tx,
        schema,
        AUDIT_PREFIX + action,
        organization_id=organization_id,
        aggregate_id=target_id,
        payload={
            "actor_id": current_actor() if actor_id is None else actor_id,
            "action": action,
            "target_type": target_type,
            "target_id": target_id,
            "metadata": metadata,
        },
    )


def _to_event(row: Any) -> identity_pb2.AuditEvent:
    payload = row["payload"] or {}
    metadata = struct_pb2.Struct()
    metadata.update(payload.get("metadata") or {})
    occurred = timestamp_pb2.Timestamp()
    occurred.FromDatetime(row["occurred_at"])
    return identity_pb2.AuditEvent(
        id=row["id"],
        organization_id=row["organization_id"] or "",
        actor_id=payload.get("actor_id", ""),
        action=payload.get("action") or row["type"].removeprefix(AUDIT_PREFIX),
        target_type=payload.get("target_type", ""),
        target_id=payload.get("target_id", ""),
        metadata=metadata,
        occurred_at=occurred,
    )


class AuditRelay:
    """Delivers a service's audit outbox to identity, retried until accepted."""

    def __init__(
        self,
        db: Database,
        schema: str,
        clients: Clients,
        *,
        batch_size: int = 200,
        poll_seconds: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.db = db
        self.schema = schema
        self.clients = clients
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.max_backoff = max_backoff

    async def relay_once(self) -> int:
        """Send one batch; the number of entries identity confirmed (0: nothing to do)."""
        async with self.db.transaction() as tx:
            if not await tx.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtext($1))", f"{self.schema}:audit-relay"
            ):
                return 0  # another replica is relaying
            cursor = Cursor.parse(
                await tx.fetchval(
                    f"SELECT cursor FROM {self.schema}.event_cursors"
                    " WHERE consumer = $1 AND source = $2",
                    RELAY_CONSUMER,
                    RELAY_TARGET,
                )
                or START
            )
            rows = await tx.fetch(
                f"SELECT position, id, txid::text AS txid, type, organization_id, payload,"
                f" occurred_at FROM {self.schema}.outbox"
                " WHERE (txid, position) > ($1::text::xid8, $2::bigint)"
                " AND txid < pg_snapshot_xmin(pg_current_snapshot())"
                " AND type LIKE 'audit.%'"
                " ORDER BY txid, position LIMIT $3",
                str(cursor.txid),
                cursor.position,
                self.batch_size,
            )
            if not rows:
                return 0
            stub = self.clients.stub(
                "identity", identity_pb2_grpc.IdentityServiceStub, IDENTITY_SERVICE
            )
            reply = await stub.AppendAuditEvents(
                identity_pb2.AppendAuditEventsRequest(events=[_to_event(r) for r in rows])
            )
            last = rows[-1]
            await tx.execute(
                f"INSERT INTO {self.schema}.event_cursors (consumer, source, cursor, updated_at)"
                " VALUES ($1, $2, $3, now()) ON CONFLICT (consumer, source)"
                " DO UPDATE SET cursor = excluded.cursor, updated_at = now()",
                RELAY_CONSUMER,
                RELAY_TARGET,
                str(Cursor(int(last["txid"]), last["position"])),
            )
            return int(reply.accepted + reply.duplicates)

    async def run(self) -> None:
        """Relay forever (an `add_loop` loop); backs off while identity is unreachable."""
        backoff = self.poll_seconds
        while True:
            try:
                sent = await self.relay_once()
                backoff = self.poll_seconds
                if sent:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("audit relay: identity did not accept", extra={"error": repr(exc)})
                backoff = min(backoff * 2, self.max_backoff)
            await asyncio.sleep(backoff)
