"""The organization's pool over real gRPC and PostgreSQL: reservations, releases, plans.

Organizations, owners and tokens are identity's own (tests/support/billing.py); project's
calls carry project's real service token. Which callers the internal RPCs refuse is in
test_billing_tenancy."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hangar.billing.v1 import billing_pb2
from hangar.type.v1 import resources_pb2
from shared.ids import new_id
from tests.support import billing as billing_fixtures
from tests.support.billing import Billing, User

identity = billing_fixtures.identity
billing = billing_fixtures.billing
start_billing = billing_fixtures.start_billing


def _reserve(org: str, project: str, ram: int, cpu: int = 0, bw: int = 0):  # type: ignore[no-untyped-def]
    return billing_pb2.ReserveAllocationRequest(
        organization_id=org,
        project_id=project,
        resources=resources_pb2.Resources(ram_mb=ram, cpu_millis=cpu, bandwidth_gb=bw),
    )


async def _allocated(b: Billing, org: str, owner: User) -> resources_pb2.Resources:
    sub = await b.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=owner.md
    )
    return sub.allocated


def _details(error: grpc.aio.AioRpcError) -> dict[str, object]:
    status = rpc_status.from_call(error)
    assert status is not None
    out: dict[str, object] = {}
    for d in status.details:
        for kind in (error_details_pb2.QuotaFailure, error_details_pb2.ErrorInfo):
            msg = kind()
            if d.Is(msg.DESCRIPTOR):
                d.Unpack(msg)
                out[kind.DESCRIPTOR.name] = msg
    return out


async def test_concurrent_reservations_never_exceed_the_pool(billing: Billing) -> None:
    """50 concurrent callers asking for more than the hobby pool (1024 MB, 1000 mCPU)."""
    owner = billing.owner
    org = await billing.create_org(owner)
    project_md = billing.service("project")
    rng = random.Random(4)
    sizes = {
        new_id(): (rng.choice([32, 64, 96, 128]), rng.choice([10, 50, 100])) for _ in range(50)
    }
    assert sum(r for r, _ in sizes.values()) > 1024

    async def reserve(project: str, ram: int, cpu: int) -> tuple[str, bool]:
        try:
            await billing.stub.ReserveAllocation(
                _reserve(org, project, ram, cpu), metadata=project_md
            )
            return project, True
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return project, False

    results = await asyncio.gather(*(reserve(p, r, c) for p, (r, c) in sizes.items()))
    accepted = [p for p, ok in results if ok]
    assert 0 < len(accepted) < 50
    allocated = await _allocated(billing, org, owner)
    assert allocated.ram_mb == sum(sizes[p][0] for p in accepted) <= 1024
    assert allocated.cpu_millis == sum(sizes[p][1] for p in accepted) <= 1000
    listed = await billing.stub.ListAllocations(
        billing_pb2.ListAllocationsRequest(organization_id=org, page_size=500), metadata=project_md
    )
    assert sorted(a.project_id for a in listed.allocations) == sorted(accepted)


async def test_same_project_reserved_concurrently_counts_once(billing: Billing) -> None:
    owner, project = billing.owner, new_id()
    org = await billing.create_org(owner)
    project_md = billing.service("project")
    await asyncio.gather(
        *(
            billing.stub.ReserveAllocation(_reserve(org, project, 256, 100), metadata=project_md)
            for _ in range(20)
        )
    )
    allocated = await _allocated(billing, org, owner)
    assert (allocated.ram_mb, allocated.cpu_millis) == (256, 100)


async def test_reserve_is_idempotent_resize_applies_delta_and_shrink_never_fails(
    billing: Billing,
) -> None:
    owner, a, b = billing.owner, new_id(), new_id()
    org = await billing.create_org(owner)
    project_md = billing.service("project")
    await billing.stub.ReserveAllocation(_reserve(org, a, 512, 500, 5), metadata=project_md)
    await billing.stub.ReserveAllocation(_reserve(org, a, 512, 500, 5), metadata=project_md)
    assert (await _allocated(billing, org, owner)).ram_mb == 512
    await billing.stub.ReserveAllocation(_reserve(org, b, 512, 500, 5), metadata=project_md)
    # The pool is now full; growing fails, shrinking always works.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing.stub.ReserveAllocation(_reserve(org, a, 600, 500, 5), metadata=project_md)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await billing.stub.ReserveAllocation(_reserve(org, a, 128, 100, 1), metadata=project_md)
    allocated = await _allocated(billing, org, owner)
    assert (allocated.ram_mb, allocated.cpu_millis, allocated.bandwidth_gb) == (640, 600, 6)


async def test_shortfall_names_each_short_resource_in_a_quota_failure(billing: Billing) -> None:
    owner = billing.owner
    org = await billing.create_org(owner)
    project_md = billing.service("project")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing.stub.ReserveAllocation(
            _reserve(org, new_id(), 2048, 100, 50), metadata=project_md
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    quota = _details(caught.value)["QuotaFailure"]
    subjects = [v.subject for v in quota.violations]  # type: ignore[attr-defined]
    assert subjects == ["organization pool: ram_mb", "organization pool: bandwidth_gb"]
    assert "1024" in quota.violations[0].description  # type: ignore[attr-defined]
    assert (await _allocated(billing, org, owner)).ram_mb == 0


async def test_release_frees_the_pool_and_is_idempotent(billing: Billing) -> None:
    owner, project = billing.owner, new_id()
    org = await billing.create_org(owner)
    project_md = billing.service("project")
    await billing.stub.ReserveAllocation(_reserve(org, project, 300, 300, 3), metadata=project_md)
    release = billing_pb2.ReleaseAllocationRequest(organization_id=org, project_id=project)
    await billing.stub.ReleaseAllocation(release, metadata=project_md)
    await billing.stub.ReleaseAllocation(release, metadata=project_md)
    allocated = await _allocated(billing, org, owner)
    assert (allocated.ram_mb, allocated.cpu_millis, allocated.bandwidth_gb) == (0, 0, 0)


async def test_downgrade_below_allocated_is_refused_naming_the_numbers(billing: Billing) -> None:
    owner = billing.owner
    org = await billing.create_org(owner)
    project_md = billing.service("project")
    change = billing_pb2.ChangePlanRequest(organization_id=org, plan_id="pro")
    sub = await billing.stub.ChangePlan(change, metadata=owner.md)
    assert (sub.plan_id, sub.pool.ram_mb) == ("pro", 8192)
    await billing.stub.ReserveAllocation(_reserve(org, new_id(), 4096, 500, 5), metadata=project_md)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing.stub.ChangePlan(
            billing_pb2.ChangePlanRequest(organization_id=org, plan_id="hobby"),
            metadata=owner.md,
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ram_mb: 4096 allocated, hobby allows 1024" in (caught.value.details() or "")
    sub = await billing.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=owner.md
    )
    assert sub.plan_id == "pro"


async def test_change_plan_needs_admin(billing: Billing) -> None:
    """identity's roles decide: viewers and developers may not manage billing, admins may."""
    org = await billing.create_org()
    change = billing_pb2.ChangePlanRequest(organization_id=org, plan_id="pro")
    for role in ("viewer", "developer"):
        member = await billing.identity.add_member(org, role)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await billing.stub.ChangePlan(change, metadata=member.md)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, role
    admin = await billing.identity.add_member(org, "admin")
    assert (await billing.stub.ChangePlan(change, metadata=admin.md)).plan_id == "pro"


async def test_organization_deleted_cancels_and_frees_the_pool(billing: Billing) -> None:
    """identity.DeleteOrganization reaches billing over identity's feed; the event handled a
    second time (at-least-once delivery) changes nothing more."""
    org = await billing.create_org(await billing.user())
    project_md = billing.service("project")
    await billing.stub.ReserveAllocation(_reserve(org, new_id(), 100, 100, 1), metadata=project_md)
    await billing.delete_org(org)
    await billing.redeliver(await billing.identity_event(org, "organization.deleted"))
    async with billing.app.db.session() as s:
        rows = await s.fetch(
            "SELECT status, allocated_ram_mb, allocated_cpu_millis, allocated_bandwidth_gb"
            " FROM billing.subscriptions WHERE organization_id = $1",
            org,
        )
        audited = await s.fetchval(
            "SELECT count(*) FROM billing.outbox WHERE organization_id = $1"
            " AND type = 'audit.billing.subscription_canceled'",
            org,
        )
    assert [tuple(r.values()) for r in rows] == [("canceled", 0, 0, 0)] and audited == 1
    # Its owner is no longer a member: identity says no, so billing says no.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing.stub.GetSubscription(
            billing_pb2.GetSubscriptionRequest(organization_id=org),
            metadata=billing.identity.owners[org].md,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await billing.stub.ListAllocations(
        billing_pb2.ListAllocationsRequest(organization_id=org), metadata=project_md
    )
    assert list(listed.allocations) == []


async def test_organization_created_twice_makes_one_subscription(billing: Billing) -> None:
    org = await billing.create_org()
    await billing.redeliver(await billing.identity_event(org, "organization.created"))
    async with billing.app.db.session() as s:
        count = await s.fetchval(
            "SELECT count(*) FROM billing.subscriptions WHERE organization_id = $1", org
        )
    assert count == 1
