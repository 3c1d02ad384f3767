"""Stripe webhook deliveries, recorded once per event."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from services.billing.store.records import S
from shared.db import Session
from shared.ids import new_id


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
