"""Access changes between identity replicas travel as NOTIFY payloads under PostgreSQL's
8000-byte limit (services/identity/access_relay.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from services.identity.access import AccessChange, RevokedSession, Scope
from services.identity.access_relay import PAYLOAD_LIMIT, _change_from, _parts


def test_a_change_too_big_for_one_notify_is_split_and_loses_nothing() -> None:
    forget = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    change = AccessChange(
        tuple(Scope(f"usr_{i:032d}", f"org_{i:032d}") for i in range(300)),
        tuple(RevokedSession(f"ses_{i:032d}", forget) for i in range(300)),
    )
    parts = _parts(change)
    assert len(parts) > 1
    payloads = [_envelope(p) for p in parts]
    assert all(len(p.encode()) < PAYLOAD_LIMIT + 100 < 8000 for p in payloads)
    merged = [_change_from(p) for p in parts]
    assert tuple(s for m in merged for s in m.scopes) == change.scopes
    assert tuple(r for m in merged for r in m.revoked_sessions) == change.revoked_sessions


def _envelope(part: dict[str, object]) -> str:
    return json.dumps({"o": "idr_0123456789abcdef", "n": 2**40, **part})


def test_a_usual_change_is_one_notify_and_reads_back_the_same() -> None:
    forget = datetime(2026, 12, 7, 12, 0, 30, tzinfo=UTC)
    change = AccessChange((Scope("usr_1", ""),), (RevokedSession("ses_1", forget),))
    (part,) = _parts(change)
    assert _change_from(json.loads(_envelope(part))) == change
