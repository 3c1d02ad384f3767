"""Sending invoices to Stripe: a per-invoice retry schedule, and no double sends.

Our side only, with the recording gateway (localstripe cannot create standalone invoices; see
test_billing_stripe): one invoice whose send keeps failing backs off exponentially and never
holds up the others; two billing replicas sending at once send each invoice once.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from hangar.billing.v1 import billing_pb2
from services.billing.domain import send_backoff_seconds
from tests.integration.test_billing_usage_and_cycle import HOBBY_RAM_INCLUDED, record
from tests.support import billing as billing_fixtures
from tests.support.billing import Billing, RecordingGateway

identity = billing_fixtures.identity
billing = billing_fixtures.billing
start_billing = billing_fixtures.start_billing

BASE = 60.0


async def _org_with_overage(b: Billing) -> str:
    org = await b.create_org()
    await b.stub.RecordUsage(
        billing_pb2.RecordUsageRequest(
            records=[record(org, "u", HOBBY_RAM_INCLUDED + 10**10, b.clock.now())]
        ),
        metadata=b.service("runtime"),
    )
    return org


async def _state(b: Billing, org: str) -> dict[str, object]:
    async with b.app.db.session() as s:
        row = await s.fetchrow(
            "SELECT id, sent, send_attempts, next_attempt_at, last_error, stripe_invoice_id"
            " FROM billing.invoices WHERE organization_id = $1 AND total_cents > 0",
            org,
        )
    assert row is not None
    return dict(row)


def test_backoff_doubles_and_is_capped() -> None:
    assert [send_backoff_seconds(n, 60, 600) for n in range(6)] == [0, 60, 120, 240, 480, 600]
    assert send_backoff_seconds(10_000, 60, 600) == 600


async def test_a_failing_invoice_backs_off_while_the_others_are_sent(start_billing) -> None:  # type: ignore[no-untyped-def]
    gateway = RecordingGateway()
    b: Billing = await start_billing(gateway=gateway)
    failing = await _org_with_overage(b)
    fine = [await _org_with_overage(b) for _ in range(3)]
    gateway.fail_for.add(failing)
    b.clock.advance(days=32)
    while await b.app.cycle.close_one_period():
        pass
    claimed_at = b.clock.now()
    await b.app.cycle.send_due_invoices()

    for org in fine:
        assert (await _state(b, org))["sent"]
    bad = await _state(b, failing)
    assert not bad["sent"] and bad["send_attempts"] == 1
    assert bad["next_attempt_at"] == claimed_at + timedelta(seconds=BASE)
    assert "unreachable" in str(bad["last_error"])

    # Not due yet: the next pass leaves it alone.
    b.clock.advance(seconds=BASE - 1)
    await b.app.cycle.send_due_invoices()
    assert (await _state(b, failing))["send_attempts"] == 1

    # Due: tried again, fails again, and waits twice as long.
    for attempt, wait in ((2, 2 * BASE), (3, 4 * BASE)):
        b.clock.advance(seconds=BASE * 4)
        now = b.clock.now()
        await b.app.cycle.send_due_invoices()
        bad = await _state(b, failing)
        assert bad["send_attempts"] == attempt and not bad["sent"]
        assert bad["next_attempt_at"] == now + timedelta(seconds=wait)
        assert wait == send_backoff_seconds(attempt, BASE, 6 * 3600)

    # Stripe recovers: sent on the next due attempt, the error cleared; the others were
    # each sent exactly once all along.
    gateway.fail_for.clear()
    b.clock.advance(seconds=4 * BASE)
    await b.app.cycle.send_due_invoices()
    good = await _state(b, failing)
    assert good["sent"] and good["send_attempts"] == 4 and good["last_error"] is None
    assert good["next_attempt_at"] is None and good["stripe_invoice_id"] == f"in_{good['id']}"
    for org in fine:
        state = await _state(b, org)
        assert gateway.attempts[str(state["id"])] == 1 and state["send_attempts"] == 1
    assert gateway.attempts[str(good["id"])] == 4


async def test_two_replicas_sending_at_once_send_each_invoice_once(start_billing) -> None:  # type: ignore[no-untyped-def]
    """The claim is booked before Stripe is called, and Stripe is slow here (0.2 s a send),
    so the second replica sees every claimed invoice as not due and moves on."""
    one_gateway, two_gateway = RecordingGateway(delay=0.2), RecordingGateway(delay=0.2)
    one: Billing = await start_billing(gateway=one_gateway)
    two: Billing = await start_billing(gateway=two_gateway)
    orgs = [await _org_with_overage(one) for _ in range(6)]
    for b in (one, two):
        b.clock.advance(days=32)
    while await one.app.cycle.close_one_period():
        pass
    await asyncio.gather(
        one.app.cycle.send_due_invoices(),
        two.app.cycle.send_due_invoices(),
        one.app.cycle.send_due_invoices(),
        two.app.cycle.send_due_invoices(),
    )
    for org in orgs:
        state = await _state(one, org)
        invoice_id = str(state["id"])
        sends = one_gateway.attempts.get(invoice_id, 0) + two_gateway.attempts.get(invoice_id, 0)
        assert state["sent"] and sends == 1 and state["send_attempts"] == 1
    # and the work was shared, not done by one replica while the other waited on a lock
    mine = {str((await _state(one, org))["id"]) for org in orgs}
    assert mine & set(one_gateway.attempts) and mine & set(two_gateway.attempts)
