"""Every billing mutation leaves an audit entry in billing's outbox, in the same transaction
(shared's relay hands it to identity.AppendAuditEvents). RecordUsage is the exception by
design: it is runtime's hot path, a service-to-service ingest of metering data, and each
batch would otherwise add an outbox row per call; usage is auditable from usage_records.

Refused or no-op calls (a downgrade below what is allocated, a change to the current plan,
a replayed reservation) write no entry.
"""

from __future__ import annotations

import grpc
import pytest

from hangar.billing.v1 import billing_pb2
from shared.ids import new_id
from tests.integration.test_billing_usage_and_cycle import HOBBY_RAM_INCLUDED, record
from tests.support import billing as billing_fixtures
from tests.support.billing import Billing, RecordingGateway, service, sign, stripe_event, user

billing = billing_fixtures.billing
start_billing = billing_fixtures.start_billing


async def _audit(b: Billing, org: str) -> list[tuple[str, str, str]]:
    """(action, actor, target id) of the org's audit entries, in commit order."""
    async with b.app.db.session() as s:
        rows = await s.fetch(
            "SELECT payload FROM billing.outbox WHERE organization_id = $1"
            " AND type LIKE 'audit.%' ORDER BY txid, position",
            org,
        )
    return [
        (r["payload"]["action"], r["payload"]["actor_id"], r["payload"]["target_id"]) for r in rows
    ]


async def test_each_mutation_is_audited_once_and_no_ops_are_not(start_billing) -> None:  # type: ignore[no-untyped-def]
    from google.api import httpbody_pb2

    gateway = RecordingGateway()
    b: Billing = await start_billing(gateway=gateway)
    owner = new_id()
    org = await b.create_org(owner)
    project = new_id()
    reserve = billing_pb2.ReserveAllocationRequest(
        organization_id=org,
        project_id=project,
        resources=billing_pb2.Resources(ram_mb=512, cpu_millis=500, bandwidth_gb=5),
    )
    await b.stub.ReserveAllocation(reserve, metadata=service("project"))
    await b.stub.ReserveAllocation(reserve, metadata=service("project"))  # replay: no-op
    await b.stub.ChangePlan(
        billing_pb2.ChangePlanRequest(organization_id=org, plan_id="pro"), metadata=user(owner)
    )
    await b.stub.ChangePlan(  # already on pro: no-op
        billing_pb2.ChangePlanRequest(organization_id=org, plan_id="pro"), metadata=user(owner)
    )
    big = billing_pb2.ReserveAllocationRequest(
        organization_id=org,
        project_id=project,
        resources=billing_pb2.Resources(ram_mb=4096, cpu_millis=500, bandwidth_gb=5),
    )
    await b.stub.ReserveAllocation(big, metadata=service("project"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await b.stub.ChangePlan(
            billing_pb2.ChangePlanRequest(organization_id=org, plan_id="hobby"),
            metadata=user(owner),
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await b.stub.ReleaseAllocation(
        billing_pb2.ReleaseAllocationRequest(organization_id=org, project_id=project),
        metadata=service("project"),
    )
    await b.stub.RecordUsage(  # not audited (hot path; module docstring)
        billing_pb2.RecordUsageRequest(
            records=[record(org, "u", HOBBY_RAM_INCLUDED * 100, b.clock.now())]
        ),
        metadata=service("runtime"),
    )
    async with b.app.db.session() as s:
        sub_id = await s.fetchval(
            "SELECT id FROM billing.subscriptions WHERE organization_id = $1", org
        )
    b.clock.advance(days=32)
    await b.app.cycle.close_one_period()
    while await b.app.cycle.close_one_period():
        pass
    await b.app.cycle.sync_subscription(sub_id)
    await b.app.cycle.send_due_invoices()
    async with b.app.db.session() as s:
        invoice_id = await s.fetchval(
            "SELECT id FROM billing.invoices WHERE organization_id = $1 AND total_cents > 0", org
        )
    paid = stripe_event(
        "invoice.paid",
        {
            "id": f"in_{invoice_id}",
            "object": "invoice",
            "status": "paid",
            "metadata": {"hangar_invoice_id": invoice_id},
        },
    )
    await b.stub.HandleStripeWebhook(
        billing_pb2.HandleStripeWebhookRequest(
            body=httpbody_pb2.HttpBody(content_type="application/json", data=paid),
            stripe_signature=sign(paid),
        )
    )
    await b.delete_org(org)
    await b.app.cycle.sync_subscription(sub_id)

    entries = await _audit(b, org)
    actions = [action for action, _, _ in entries]
    assert actions == [
        "billing.subscription_created",
        "billing.allocation_reserved",
        "billing.plan_changed",
        "billing.stripe_subscription_created",  # the sync ChangePlan runs after its commit
        "billing.allocation_reserved",
        "billing.allocation_released",
        "billing.invoice_created",
        "billing.invoice_sent",
        "billing.invoice_status_changed",
        "billing.subscription_canceled",
        "billing.stripe_subscription_canceled",
    ], actions
    by_action = {action: (actor, target) for action, actor, target in entries}
    assert by_action["billing.plan_changed"] == (owner, sub_id)
    assert by_action["billing.allocation_reserved"][1] == project
    assert by_action["billing.invoice_status_changed"] == ("stripe", invoice_id)
    assert by_action["billing.invoice_sent"][0] == "service:billing"
