"""Who may call what, against the real identity service (tests/support/billing.py).

Org-scoped RPCs: each one, called by a member of another organization, for an organization
(or invoice) that does not exist, by a viewer (reads yes, ChangePlan no), and with no token,
answers as AIP-193 asks: PERMISSION_DENIED, never NOT_FOUND, to someone without access;
UNAUTHENTICATED without a token or with one identity did not sign. Roles come from identity's
AddMember, the answer from identity.Authorize, tokens from SignUp and IssueServiceToken.

Internal RPCs (project's ReserveAllocation / ReleaseAllocation / ListAllocations, runtime's
RecordUsage): only the named service's token passes; user tokens, even the organization
owner's, and every other service's token are PERMISSION_DENIED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest

from hangar.billing.v1 import billing_pb2
from hangar.type.v1 import resources_pb2
from shared.ids import new_id
from tests.integration.test_billing_usage_and_cycle import HOBBY_RAM_INCLUDED, record
from tests.support import billing as billing_fixtures
from tests.support.billing import Billing, Metadata, User, forged, launch_billing
from tests.support.identity import bearer

identity = billing_fixtures.identity


@dataclass
class World:
    """One billing server; org A (owner, viewer) with an invoice; a stranger who owns org B."""

    billing: Billing
    org: str
    invoice: str
    owner: User
    viewer: User
    stranger: User


@pytest.fixture(scope="module")
async def world(
    identity: billing_fixtures.Identity, database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[World]:
    b = await launch_billing(identity, database_url, db_passwords)
    try:
        owner, stranger = await b.user(), await b.user()
        org = await b.create_org(owner)
        await b.create_org(stranger)
        viewer = await identity.add_member(org, "viewer")
        await b.stub.RecordUsage(
            billing_pb2.RecordUsageRequest(
                records=[record(org, "u", HOBBY_RAM_INCLUDED + 1, b.clock.now())]
            ),
            metadata=b.service("runtime"),
        )
        b.clock.advance(days=32)
        await b.app.cycle.run_once()
        invoices = await b.stub.ListInvoices(
            billing_pb2.ListInvoicesRequest(organization_id=org), metadata=owner.md
        )
        yield World(b, org, invoices.invoices[0].id, owner, viewer, stranger)
    finally:
        await b.stop()


Call = Callable[[Billing, str, str, Metadata], Awaitable[object]]  # (b, org, invoice id, md)

READS: dict[str, Call] = {
    "GetSubscription": lambda b, org, _inv, md: b.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=md
    ),
    "GetUsageSummary": lambda b, org, _inv, md: b.stub.GetUsageSummary(
        billing_pb2.GetUsageSummaryRequest(organization_id=org), metadata=md
    ),
    "ListInvoices": lambda b, org, _inv, md: b.stub.ListInvoices(
        billing_pb2.ListInvoicesRequest(organization_id=org), metadata=md
    ),
    "GetInvoice": lambda b, _org, inv, md: b.stub.GetInvoice(
        billing_pb2.GetInvoiceRequest(id=inv), metadata=md
    ),
}
WRITES: dict[str, Call] = {
    "ChangePlan": lambda b, org, _inv, md: b.stub.ChangePlan(
        billing_pb2.ChangePlanRequest(organization_id=org, plan_id="pro"), metadata=md
    ),
}
ORG_SCOPED = {**READS, **WRITES}
CALLERS = ("member of another org", "org that does not exist", "viewer", "no token", "forged")

DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("rpc", sorted(ORG_SCOPED))
async def test_org_scoped_rpcs_answer_only_the_organization_s_members(
    world: World, rpc: str, caller: str
) -> None:
    call, b, w = ORG_SCOPED[rpc], world.billing, world
    assert await _code(call(b, w.org, w.invoice, w.owner.md)) == grpc.StatusCode.OK  # the owner may
    org, invoice, md, expected = {
        "member of another org": (w.org, w.invoice, w.stranger.md, DENIED),
        # The owner of A, for an organization (and an invoice) nobody has: the same answer
        # as for someone else's, so existence does not leak.
        "org that does not exist": (new_id(), new_id(), w.owner.md, DENIED),
        "viewer": (w.org, w.invoice, w.viewer.md, DENIED if rpc in WRITES else grpc.StatusCode.OK),
        "no token": (w.org, w.invoice, (), UNAUTHENTICATED),
        # The owner's own claims, signed by a key identity never published.
        "forged": (w.org, w.invoice, bearer(forged(w.owner.token)), UNAUTHENTICATED),
    }[caller]
    assert await _code(call(b, org, invoice, md)) == expected, (rpc, caller)


def _reserve(org: str) -> billing_pb2.ReserveAllocationRequest:
    return billing_pb2.ReserveAllocationRequest(
        organization_id=org,
        project_id=new_id(),
        resources=resources_pb2.Resources(ram_mb=1, cpu_millis=1, bandwidth_gb=0),
    )


INTERNAL: dict[str, tuple[str, Callable[[Billing, str, Metadata], Awaitable[object]]]] = {
    "ReserveAllocation": (
        "project",
        lambda b, org, md: b.stub.ReserveAllocation(_reserve(org), metadata=md),
    ),
    "ReleaseAllocation": (
        "project",
        lambda b, org, md: b.stub.ReleaseAllocation(
            billing_pb2.ReleaseAllocationRequest(organization_id=org, project_id=new_id()),
            metadata=md,
        ),
    ),
    "ListAllocations": (
        "project",
        lambda b, org, md: b.stub.ListAllocations(
            billing_pb2.ListAllocationsRequest(organization_id=org), metadata=md
        ),
    ),
    "RecordUsage": (
        "runtime",
        lambda b, org, md: b.stub.RecordUsage(
            billing_pb2.RecordUsageRequest(records=[record(org, new_id(), 1, b.clock.now())]),
            metadata=md,
        ),
    ),
}


@pytest.mark.parametrize("rpc", sorted(INTERNAL))
async def test_internal_rpcs_take_only_their_service_s_token(world: World, rpc: str) -> None:
    service, call = INTERNAL[rpc]
    b, w = world.billing, world
    assert await _code(call(b, w.org, b.service(service))) == grpc.StatusCode.OK
    others = [name for name in ("project", "runtime", "agent", "billing") if name != service]
    refused = {
        "the organization owner": w.owner.md,
        "a viewer": w.viewer.md,
        **{f"service {name}": b.service(name) for name in others},
    }
    for who, md in refused.items():
        assert await _code(call(b, w.org, md)) == DENIED, (rpc, who)
    for who, md in {
        "no token": (),
        "forged service token": bearer(forged(b.identity.tokens[service])),
        "not a JWT": bearer(f"service:{service}"),
    }.items():
        assert await _code(call(b, w.org, md)) == UNAUTHENTICATED, (rpc, who)


@pytest.mark.parametrize("rpc", sorted(ORG_SCOPED))
async def test_service_tokens_get_no_org_scoped_billing_access(world: World, rpc: str) -> None:
    """No service has a reason to read an organization's invoices or change its plan; the
    agent's token, which lives on the servers running customers' code, least of all."""
    b, w = world.billing, world
    for name in ("agent", "runtime"):
        code = await _code(ORG_SCOPED[rpc](b, w.org, w.invoice, b.service(name)))
        assert code == DENIED, (rpc, name)
