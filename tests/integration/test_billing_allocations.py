"""The organization's pool over real gRPC and PostgreSQL: reservations, releases, plans."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hangar.billing.v1 import billing_pb2
from shared.ids import new_id
from tests.support import billing as billing_fixtures
from tests.support.billing import Billing, service, user

billing = billing_fixtures.billing
start_billing = billing_fixtures.start_billing

PROJECT = service("project")


def _reserve(org: str, project: str, ram: int, cpu: int = 0, bw: int = 0):  # type: ignore[no-untyped-def]
    return billing_pb2.ReserveAllocationRequest(
        organization_id=org,
        project_id=project,
        resources=billing_pb2.Resources(ram_mb=ram, cpu_millis=cpu, bandwidth_gb=bw),
    )


async def _allocated(b: Billing, org: str, owner: str) -> billing_pb2.Resources:
    sub = await b.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=user(owner)
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
    owner = new_id()
    org = await billing.create_org(owner)
    rng = random.Random(4)
    sizes = {
        new_id(): (rng.choice([32, 64, 96, 128]), rng.choice([10, 50, 100])) for _ in range(50)
    }
    assert sum(r for r, _ in sizes.values()) > 1024

    async def reserve(project: str, ram: int, cpu: int) -> tuple[str, bool]:
        try:
            await billing.stub.ReserveAllocation(_reserve(org, project, ram, cpu), metadata=PROJECT)
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
        billing_pb2.ListAllocationsRequest(organization_id=org, page_size=500), metadata=PROJECT
    )
    assert sorted(a.project_id for a in listed.allocations) == sorted(accepted)


async def test_same_project_reserved_concurrently_counts_once(billing: Billing) -> None:
    owner, project = new_id(), new_id()
    org = await billing.create_org(owner)
    await asyncio.gather(
        *(
            billing.stub.ReserveAllocation(_reserve(org, project, 256, 100), metadata=PROJECT)
            for _ in range(20)
        )
    )
    allocated = await _allocated(billing, org, owner)
    assert (allocated.ram_mb, allocated.cpu_millis) == (256, 100)


async def test_reserve_is_idempotent_resize_applies_delta_and_shrink_never_fails(
    billing: Billing,
) -> None:
    owner, a, b = new_id(), new_id(), new_id()
    org = await billing.create_org(owner)
    await billing.stub.ReserveAllocation(_reserve(org, a, 512, 500, 5), metadata=PROJECT)
    await billing.stub.ReserveAllocation(_reserve(org, a, 512, 500, 5), metadata=PROJECT)
    assert (await _allocated(billing, org, owner)).ram_mb == 512
    await billing.stub.ReserveAllocation(_reserve(org, b, 512, 500, 5), metadata=PROJECT)
    # The pool is now full; growing fails, shrinking always works.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing.stub.ReserveAllocation(_reserve(org, a, 600, 500, 5), metadata=PROJECT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await billing.stub.ReserveAllocation(_reserve(org, a, 128, 100, 1), metadata=PROJECT)
    allocated = await _allocated(billing, org, owner)
    assert (allocated.ram_mb, allocated.cpu_millis, allocated.bandwidth_gb) == (640, 600, 6)


async def test_shortfall_names_each_short_resource_in_a_quota_failure(billing: Billing) -> None:
    owner = new_id()
    org = await billing.create_org(owner)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing.stub.ReserveAllocation(
            _reserve(org, new_id(), 2048, 100, 50), metadata=PROJECT
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    quota = _details(caught.value)["QuotaFailure"]
    subjects = [v.subject for v in quota.violations]  # type: ignore[attr-defined]
    assert subjects == ["organization pool: ram_mb", "organization pool: bandwidth_gb"]
    assert "1024" in quota.violations[0].description  # type: ignore[attr-defined]
    assert (await _allocated(billing, org, owner)).ram_mb == 0


async def test_release_frees_the_pool_and_is_idempotent(billing: Billing) -> None:
    owner, project = new_id(), new_id()
    org = await billing.create_org(owner)
    await billing.stub.ReserveAllocation(_reserve(org, project, 300, 300, 3), metadata=PROJECT)
    release = billing_pb2.ReleaseAllocationRequest(organization_id=org, project_id=project)
    await billing.stub.ReleaseAllocation(release, metadata=PROJECT)
    await billing.stub.ReleaseAllocation(release, metadata=PROJECT)
    allocated = await _allocated(billing, org, owner)
    assert (allocated.ram_mb, allocated.cpu_millis, allocated.bandwidth_gb) == (0, 0, 0)


async def test_downgrade_below_allocated_is_refused_naming_the_numbers(billing: Billing) -> None:
    owner = new_id()
    org = await billing.create_org(owner)
    change = billing_pb2.ChangePlanRequest(organization_id=org, plan_id="pro")
    sub = await billing.stub.ChangePlan(change, metadata=user(owner))
    assert (sub.plan_id, sub.pool.ram_mb) == ("pro", 8192)
    await billing.stub.ReserveAllocation(_reserve(org, new_id(), 4096, 500, 5), metadata=PROJECT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing.stub.ChangePlan(
            billing_pb2.ChangePlanRequest(organization_id=org, plan_id="hobby"),
            metadata=user(owner),
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ram_mb: 4096 allocated, hobby allows 1024" in (caught.value.details() or "")
    sub = await billing.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=user(owner)
    )
    assert sub.plan_id == "pro"


async def test_change_plan_needs_admin(billing: Billing) -> None:
    owner, viewer = new_id(), new_id()
    org = await billing.create_org(owner)
    billing.members.roles[(org, viewer)] = "viewer"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing.stub.ChangePlan(
            billing_pb2.ChangePlanRequest(organization_id=org, plan_id="pro"),
            metadata=user(viewer),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_internal_rpcs_refuse_user_tokens_and_other_services(billing: Billing) -> None:
    owner = new_id()
    org = await billing.create_org(owner)
    for metadata in (user(owner), service("runtime")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await billing.stub.ReserveAllocation(_reserve(org, new_id(), 1), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing.stub.ReserveAllocation(_reserve(org, new_id(), 1))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_organization_deleted_cancels_and_frees_the_pool(billing: Billing) -> None:
    owner = new_id()
    org = await billing.create_org(owner)
    await billing.stub.ReserveAllocation(_reserve(org, new_id(), 100, 100, 1), metadata=PROJECT)
    await billing.delete_org(org)
    await billing.delete_org(org)
    sub = await billing.stub.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=org), metadata=user(owner)
    )
    assert sub.status == billing_pb2.SUBSCRIPTION_STATUS_CANCELED
    assert (sub.allocated.ram_mb, sub.allocated.cpu_millis) == (0, 0)
    listed = await billing.stub.ListAllocations(
        billing_pb2.ListAllocationsRequest(organization_id=org), metadata=PROJECT
    )
    assert list(listed.allocations) == []


async def test_organization_created_twice_makes_one_subscription(billing: Billing) -> None:
    owner = new_id()
    org = await billing.create_org(owner)
    from hangar.events.v1 import events_pb2

    event = events_pb2.Event(id=new_id(), type="organization.created", organization_id=org)
    async with billing.app.db.transaction() as tx:
        await billing.app.on_identity_event(tx, event)
    async with billing.app.db.session() as s:
        count = await s.fetchval(
            "SELECT count(*) FROM billing.subscriptions WHERE organization_id = $1", org
        )
    assert count == 1
