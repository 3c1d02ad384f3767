"""Every billing mutation leaves an audit entry in billing's outbox, in the same transaction
(shared's relay hands it to identity.AppendAuditEvents). RecordUsage is the exception by
design: it is runtime's hot path, a service-to-service ingest of metering data, and each
batch would otherwise add an outbox row per call; usage is auditable from usage_records.

Refused or no-op calls (a downgrade below what is allocated, a change to the current plan,
a replayed reservation) write no entry.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from hangar.billing.v1 import billing_pb2
from hangar.identity.v1 import identity_pb2 as ipb
from hangar.type.v1 import resources_pb2
from shared.ids import new_id
from tests.integration.test_billing_usage_and_cycle import HOBBY_RAM_INCLUDED, record
from tests.support import billing as billing_fixtures
from tests.support.billing import Billing, RecordingGateway, sign, stripe_event

identity = billing_fixtures.identity
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
    owner = await b.user()
    org = await b.create_org(owner)
    project = new_id()
    reserve = billing_pb2.ReserveAllocationRequest(
        organization_id=org,
        project_id=project,
        resources=resources_pb2.Resources(ram_mb=512, cpu_millis=500, bandwidth_gb=5),
    )
    await b.stub.ReserveAllocation(reserve, metadata=b.service("project"))
    await b.stub.ReserveAllocation(reserve, metadata=b.service("project"))  # replay: no-op
    await b.stub.ChangePlan(
        billing_pb2.ChangePlanRequest(organization_id=org, plan_id="pro"), metadata=owner.md
    )
    await b.stub.ChangePlan(  # already on pro: no-op
        billing_pb2.ChangePlanRequest(organization_id=org, plan_id="pro"), metadata=owner.md
    )
    big = billing_pb2.ReserveAllocationRequest(
        organization_id=org,
        project_id=project,
        resources=resources_pb2.Resources(ram_mb=4096, cpu_millis=500, bandwidth_gb=5),
    )
    await b.stub.ReserveAllocation(big, metadata=b.service("project"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await b.stub.ChangePlan(
            billing_pb2.ChangePlanRequest(organization_id=org, plan_id="hobby"),
            metadata=owner.md,
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await b.stub.ReleaseAllocation(
        billing_pb2.ReleaseAllocationRequest(organization_id=org, project_id=project),
        metadata=b.service("project"),
    )
    await b.stub.RecordUsage(  # not audited (hot path; module docstring)
        billing_pb2.RecordUsageRequest(
            records=[record(org, "u", HOBBY_RAM_INCLUDED * 100, b.clock.now())]
        ),
        metadata=b.service("runtime"),
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

    # billing's relay hands each entry to identity's audit chain, where the owner reads them.
    ours = sorted(await _audit(b, org))

    async def relayed() -> bool:
        reply = await b.identity.running.stub.ListAuditLogs(
            ipb.ListAuditLogsRequest(organization_id=org, page_size=100), metadata=owner.md
        )
        found = [
            (e.action, e.actor_id, e.target_id)
            for e in reply.audit_logs
            if e.action.startswith("billing.")
        ]
        return sorted(found) == ours

    deadline = asyncio.get_running_loop().time() + 15
    while not await relayed():
        assert asyncio.get_running_loop().time() < deadline, (
            "billing's audit never reached identity"
        )
        await asyncio.sleep(0.05)

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
    assert by_action["billing.plan_changed"] == (owner.id, sub_id)
    assert by_action["billing.allocation_reserved"][1] == project
    assert by_action["billing.invoice_status_changed"] == ("stripe", invoice_id)
    assert by_action["billing.invoice_sent"][0] == "service:billing"
