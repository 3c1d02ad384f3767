"""An organization has its hobby subscription (and so its pool) from the moment it exists.

identity's organization.created reaches billing a moment after CreateOrganization returns. A
call that needs the subscription sooner does not wait for it: finding an organization that
never had one, billing asks identity whether the organization exists, and if so opens the
subscription itself, through the same idempotent path as the event (store's
create_default_subscription). An unknown or deleted organization gets nothing, and the
caller the error it always got.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import grpc

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from services.billing import store
from services.billing.domain import Clock, add_months
from shared.audit import record_audit
from shared.clients import Clients
from shared.db import Database, Session
from shared.errors import DomainError, Unavailable
from shared.outbox import write_event

IDENTITY_SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]

T = TypeVar("T")

# The reasons a call gives when it finds no subscription (store.get_subscription,
# store.reserve_allocation): the signal to open one and try once more.
MISSING = frozenset({store.NO_SUBSCRIPTION, store.NO_ACTIVE_SUBSCRIPTION})


class Organizations(Protocol):
    """Does this organization exist now (created, not deleted)?"""

    async def exists(self, organization_id: str) -> bool: ...


class IdentityOrganizations:
    """identity.GetOrganization with billing's own service token (its `organizations.get`
    grant), under the channel's deadline."""

    def __init__(self, clients: Clients) -> None:
        self.clients = clients

    async def exists(self, organization_id: str) -> bool:
        stub = self.clients.stub(
            "identity", identity_pb2_grpc.IdentityServiceStub, IDENTITY_SERVICE
        )
        try:
            await stub.GetOrganization(identity_pb2.GetOrganizationRequest(id=organization_id))
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return False
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    "cannot confirm the organization now: identity is unavailable; retry shortly",
                    reason="IDENTITY_UNAVAILABLE",
                ) from exc
            raise  # anything else is a bug (a missing grant, say): INTERNAL
        return True


class Subscriptions:
    """Opens an organization's hobby subscription, whichever way billing learns of it first."""

    def __init__(self, db: Database, clock: Clock, organizations: Organizations) -> None:
        self.db = db
        self.clock = clock
        self.organizations = organizations

    async def opening(self, organization_id: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run `call`; if it finds no subscription, open the organization's (when it exists
        and never had one) and run it once more. The common case costs nothing extra: only a
        call that misses looks further."""
        try:
            return await call()
        except DomainError as exc:
            if exc.reason not in MISSING:
                raise
        await self.ensure(organization_id)
        return await call()

    async def ensure(self, organization_id: str) -> None:
        """Open the organization's subscription if the organization exists and never had
        one. Otherwise change nothing (a retried call then finds the subscription, or fails
        as it would have)."""
        async with self.db.session() as s:
            if await store.has_subscription(s, organization_id):
                return
        if not await self.organizations.exists(organization_id):
            return
        async with self.db.transaction() as tx:
            await self.open(tx, organization_id)

    async def open(self, tx: Session, organization_id: str) -> store.Subscription | None:
        """The hobby subscription with its outbox event and audit entry, in `tx`; None (and
        nothing written) if the organization already has or had one.

        Stripe is not called here: the cycle's Stripe sync creates the customer and the
        subscription on its next pass."""
        now = self.clock.now()
        sub = await store.create_default_subscription(tx, organization_id, now, add_months(now, 1))
        if sub is None:
            return None
        await write_event(
            tx,
            "billing",
            "subscription.created",
            organization_id=organization_id,
            aggregate_id=sub.id,
            payload={"plan_id": sub.plan_id},
        )
        await record_audit(
            tx,
            "billing",
            organization_id=organization_id,
            action="billing.subscription_created",
            target_type="subscription",
            target_id=sub.id,
            metadata={"plan_id": sub.plan_id},
        )
        return sub
