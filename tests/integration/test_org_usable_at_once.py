"""An organization is usable the moment CreateOrganization returns (issue #14, item 2).

Real identity, billing and project in this process (tests/support/project.py). Billing's
consumer of identity's feed is not running, so organization.created has not reached billing
when the next call comes: the gap is there every time, not by timing. The test hands the
real event to billing's consumer (`identity_events.apply`, the step its loop runs per event)
when it wants it to arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hangar.billing.v1 import billing_pb2
from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2 as ipb
from hangar.type.v1 import resources_pb2
from services.billing.provisioning import Organizations
from shared.ids import new_id
from shared.migrate import migrate
from shared.outbox import START
from tests.support.identity import bearer
from tests.support.project import Stack, Tenant, running_stack

Code = grpc.StatusCode
WITHIN = 30.0  # generous bound on any wait; never reached when things work


@pytest.fixture(scope="module")
def usable_db(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    url = create_database("hangar_org_usable")
    migrate(url, db_passwords)
    return url


@pytest.fixture(scope="module")
async def stack(usable_db: str, db_passwords: dict[str, str]) -> AsyncIterator[Stack]:
    async with running_stack(usable_db, db_passwords) as running:
        yield running


# ------------------------------------------------------------------------------ helpers


async def _new_org(stack: Stack) -> Tenant:
    """identity.CreateOrganization, and nothing else: billing has not heard of it."""
    owner = await stack.user()
    org = await stack.identity.create_org(owner.token)
    return Tenant(org.id, owner)


async def _delete_org(stack: Stack, tenant: Tenant) -> None:
    await stack.identity.stub.DeleteOrganization(
        ipb.DeleteOrganizationRequest(id=tenant.org_id), metadata=tenant.owner.md
    )


async def _event(stack: Stack, org: str, event_type: str) -> events_pb2.Event:
    """The event identity published about `org`, read from its WatchEvents as billing would."""
    token = await stack.identity.service_token("billing")
    call = stack.identity.stub.WatchEvents(
        events_pb2.WatchEventsRequest(after_cursor=START, types=[event_type]),
        metadata=bearer(token),
        timeout=WITHIN,
    )
    try:
        async for event in call:
            if event.organization_id == org:
                return event
    finally:
        call.cancel()
    raise AssertionError(f"identity published no {event_type} for {org}")


async def _deliver(stack: Stack, org: str, *event_types: str) -> None:
    """Let identity's events about `org` reach billing now, in this order."""
    for event_type in event_types:
        await stack.billing_app.identity_events.apply(await _event(stack, org, event_type))


async def _subscriptions(stack: Stack, org: str) -> list[tuple[str, str, str]]:
    """(id, plan, status) of every subscription billing holds for `org`."""
    async with stack.billing_app.db.session() as s:
        rows = await s.fetch(
            "SELECT id, plan_id, status FROM billing.subscriptions WHERE organization_id = $1",
            org,
        )
    return [(r["id"], r["plan_id"], r["status"]) for r in rows]


async def _announced(stack: Stack, org: str) -> tuple[int, int]:
    """How many subscription.created events and audit entries billing wrote for `org`."""
    async with stack.billing_app.db.session() as s:
        row = await s.fetchrow(
            "SELECT count(*) FILTER (WHERE type = 'subscription.created') AS events,"
            " count(*) FILTER (WHERE type = 'audit.billing.subscription_created') AS audits"
            " FROM billing.outbox WHERE organization_id = $1",
            org,
        )
    assert row is not None
    return int(row["events"]), int(row["audits"])


async def _subscription(stack: Stack, tenant: Tenant) -> billing_pb2.Subscription:
    return await stack.billing.GetSubscription(
        billing_pb2.GetSubscriptionRequest(organization_id=tenant.org_id),
        metadata=tenant.owner.md,
    )


async def _reserve(stack: Stack, org: str) -> billing_pb2.Allocation:
    """billing.ReserveAllocation as project calls it, with project's service token."""
    token = await stack.identity.service_token("project")
    return await stack.billing.ReserveAllocation(
        billing_pb2.ReserveAllocationRequest(
            organization_id=org,
            project_id=new_id(),
            resources=resources_pb2.Resources(ram_mb=128, cpu_millis=100, bandwidth_gb=1),
        ),
        metadata=bearer(token),
    )


async def _refusal(call: Awaitable[object]) -> tuple[Code, str, str]:
    """(code, ErrorInfo reason, message) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    reason = ""
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            reason = info.reason
    return error.code(), reason, error.details() or ""


NO_ACTIVE_SUBSCRIPTION = (
    Code.FAILED_PRECONDITION,
    "NO_ACTIVE_SUBSCRIPTION",
    "this organization has no active subscription",
)


class CheckedThen:
    """billing's Organizations, running `then(org, answer)` after each real answer and
    before billing acts on it: a seam to line callers up or to change the world there."""

    def __init__(self, real: Organizations, then: Callable[[str, bool], Awaitable[None]]) -> None:
        self.real = real
        self.then = then
        self.asked: list[str] = []

    async def exists(self, organization_id: str) -> bool:
        self.asked.append(organization_id)
        answer = await self.real.exists(organization_id)
        await self.then(organization_id, answer)
        return answer


@pytest.fixture
def checked_then(stack: Stack) -> Iterator[Callable[..., CheckedThen]]:
    subscriptions = stack.billing_app.subscriptions
    real = subscriptions.organizations

    def install(then: Callable[[str, bool], Awaitable[None]]) -> CheckedThen:
        hook = CheckedThen(real, then)
        subscriptions.organizations = hook
        return hook

    yield install
    subscriptions.organizations = real


# -------------------------------------------------------------------------------- tests


async def test_project_created_right_after_its_organization_draws_on_the_free_pool(
    stack: Stack,
) -> None:
    tenant = await _new_org(stack)
    assert await _subscriptions(stack, tenant.org_id) == []  # organization.created held back

    project = await stack.create(tenant, ram_mb=256, cpu_millis=250, bandwidth_gb=2)

    assert project.organization_id == tenant.org_id
    hobby = await stack.billing.GetPlan(
        billing_pb2.GetPlanRequest(id="hobby"), metadata=tenant.owner.md
    )
    sub = await _subscription(stack, tenant)
    assert sub.plan_id == "hobby"
    assert sub.status == billing_pb2.SUBSCRIPTION_STATUS_ACTIVE
    assert sub.pool == hobby.included
    assert (sub.allocated.ram_mb, sub.allocated.cpu_millis, sub.allocated.bandwidth_gb) == (
        256,
        250,
        2,
    )
    [(sub_id, plan, status)] = await _subscriptions(stack, tenant.org_id)
    assert (plan, status) == ("hobby", "active")

    # The event arrives after all (and again, at least once): nothing more is opened.
    await _deliver(stack, tenant.org_id, "organization.created", "organization.created")
    assert await _subscriptions(stack, tenant.org_id) == [(sub_id, "hobby", "active")]
    assert await _announced(stack, tenant.org_id) == (1, 1)
    assert (await _subscription(stack, tenant)).allocated.ram_mb == 256


async def test_every_call_that_needs_the_subscription_finds_it_at_once(stack: Stack) -> None:
    owner = await stack.user()
    calls: dict[str, Callable[[Tenant], Awaitable[object]]] = {
        "GetSubscription": lambda t: _subscription(stack, t),
        "GetUsageSummary": lambda t: stack.billing.GetUsageSummary(
            billing_pb2.GetUsageSummaryRequest(organization_id=t.org_id), metadata=t.owner.md
        ),
        "ChangePlan": lambda t: stack.billing.ChangePlan(
            billing_pb2.ChangePlanRequest(organization_id=t.org_id, plan_id="pro"),
            metadata=t.owner.md,
        ),
        "ReserveAllocation": lambda t: _reserve(stack, t.org_id),
    }
    for name, call in calls.items():
        org = await stack.identity.create_org(owner.token)
        tenant = Tenant(org.id, owner)
        await call(tenant)  # would fail (NOT_FOUND / FAILED_PRECONDITION) without the fix
        assert len(await _subscriptions(stack, org.id)) == 1, name
        await _deliver(stack, org.id, "organization.created")
        assert len(await _subscriptions(stack, org.id)) == 1, name


async def test_concurrent_first_callers_open_exactly_one_subscription(
    stack: Stack, checked_then: Callable[..., CheckedThen]
) -> None:
    """Every caller is held after identity's answer until all have found no subscription:
    they then all try to open one at the same time."""
    tenant = await _new_org(stack)
    creators, readers = 6, 4
    lined_up = asyncio.Barrier(creators + readers)

    async def line_up(org: str, answer: bool) -> None:
        async with asyncio.timeout(WITHIN):
            await lined_up.wait()

    hook = checked_then(line_up)
    results = await asyncio.gather(
        *(stack.create(tenant, ram_mb=64, cpu_millis=50, bandwidth_gb=1) for _ in range(creators)),
        *(_subscription(stack, tenant) for _ in range(readers)),
    )

    assert hook.asked == [tenant.org_id] * (creators + readers)  # all came through the gap
    [(sub_id, plan, status)] = await _subscriptions(stack, tenant.org_id)
    assert (plan, status) == ("hobby", "active")
    assert await _announced(stack, tenant.org_id) == (1, 1)
    sub = await _subscription(stack, tenant)
    assert (sub.allocated.ram_mb, sub.allocated.cpu_millis) == (64 * creators, 50 * creators)
    assert {r.plan_id for r in results if isinstance(r, billing_pb2.Subscription)} == {"hobby"}

    await _deliver(stack, tenant.org_id, "organization.created")
    assert await _subscriptions(stack, tenant.org_id) == [(sub_id, "hobby", "active")]


async def test_unknown_organization_gets_todays_error_and_no_subscription(stack: Stack) -> None:
    org = new_id()
    assert await _refusal(_reserve(stack, org)) == NO_ACTIVE_SUBSCRIPTION
    assert await _subscriptions(stack, org) == []


async def test_deleted_organization_gets_todays_error_and_no_subscription(stack: Stack) -> None:
    tenant = await _new_org(stack)
    await _delete_org(stack, tenant)  # both of its events still held back

    assert await _refusal(_reserve(stack, tenant.org_id)) == NO_ACTIVE_SUBSCRIPTION
    code, _, _ = await _refusal(stack.create(tenant))  # its owner is no member any more
    assert code == Code.PERMISSION_DENIED
    code, _, _ = await _refusal(_subscription(stack, tenant))
    assert code == Code.PERMISSION_DENIED
    assert await _subscriptions(stack, tenant.org_id) == []

    # The events arrive: what they always did (opened, then canceled), once.
    await _deliver(stack, tenant.org_id, "organization.created", "organization.deleted")
    assert [s[1:] for s in await _subscriptions(stack, tenant.org_id)] == [("hobby", "canceled")]


async def test_organization_deleted_while_billing_opens_its_subscription_stays_closed(
    stack: Stack, checked_then: Callable[..., CheckedThen]
) -> None:
    """identity says the organization exists; before billing opens the subscription, the
    organization is deleted and both its events are applied. The late opening must not
    bring a subscription back for an organization that is gone."""
    tenant = await _new_org(stack)

    async def delete_meanwhile(org: str, answer: bool) -> None:
        assert answer
        await _delete_org(stack, tenant)
        await _deliver(stack, org, "organization.created", "organization.deleted")

    checked_then(delete_meanwhile)
    assert await _refusal(_reserve(stack, tenant.org_id)) == NO_ACTIVE_SUBSCRIPTION
    assert [s[1:] for s in await _subscriptions(stack, tenant.org_id)] == [("hobby", "canceled")]
    assert await _announced(stack, tenant.org_id) == (1, 1)


async def test_event_first_then_calls_use_the_events_subscription(stack: Stack) -> None:
    """The ordinary order still works the same: the event opens it, calls find it."""
    tenant = await _new_org(stack)
    await _deliver(stack, tenant.org_id, "organization.created")
    [(sub_id, _, _)] = await _subscriptions(stack, tenant.org_id)
    await stack.create(tenant)
    assert (await _subscription(stack, tenant)).allocated.ram_mb == 128
    assert [s[0] for s in await _subscriptions(stack, tenant.org_id)] == [sub_id]
