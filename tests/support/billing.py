"""An in-process billing server on a loopback port, with test stand-ins for identity:
bearer tokens "user:<id>" / "service:<name>", memberships set by the test, and a clock the
test moves. Stripe is the SDK gateway pointed at localstripe, a recording fake, or none."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import stripe

from hangar.billing.v1 import billing_pb2_grpc
from hangar.events.v1 import events_pb2
from services.billing.domain import InvoiceStatus, Plan
from services.billing.server import BillingApp
from services.billing.stripe_gateway import InvoiceToSend, PriceRef, SentInvoice
from shared.auth import require_caller
from shared.context import Principal, PrincipalKind
from shared.db import Database
from shared.errors import PermissionDenied, Unauthenticated
from shared.ids import new_id
from shared.server import RunningServer, start_server
from shared.settings import Settings

WEBHOOK_SECRET = "whsec_test_hangar"
ROLES = {"viewer": 1, "developer": 2, "admin": 3, "owner": 4}
NEEDED = {"billing.read": 1, "billing.manage": 3}


class TokenNames:
    """Authenticator: the token names the principal (tests only)."""

    async def authenticate(self, token: str) -> Principal:
        kind, _, subject = token.partition(":")
        if kind == "user" and subject:
            return Principal(kind=PrincipalKind.USER, subject=subject)
        if kind == "service" and subject:
            return Principal(kind=PrincipalKind.SERVICE, subject=subject)
        raise Unauthenticated("bad test token")


@dataclass
class Memberships:
    """Authorizer: roles the test grants; anyone else gets PERMISSION_DENIED."""

    roles: dict[tuple[str, str], str] = field(default_factory=dict)

    async def require(self, organization_id: str, permission: str) -> int:
        principal = require_caller()
        role = ROLES.get(self.roles.get((organization_id, principal.subject), ""), 0)
        if not principal.is_user or role < NEEDED[permission]:
            raise PermissionDenied(f"missing permission {permission} in this organization")
        return role


@dataclass
class MovableClock:
    current: datetime = field(default_factory=lambda: datetime(2026, 1, 15, 12, tzinfo=UTC))

    def now(self) -> datetime:
        return self.current

    def advance(self, **kwargs: float) -> None:
        self.current += timedelta(**kwargs)


@dataclass
class RecordingGateway:
    """A StripeGateway that remembers calls and the idempotency keys they would carry.
    `fail_for` names organizations whose invoice sends fail (a Stripe error each time)."""

    customers: list[tuple[str, str]] = field(default_factory=list)
    invoices: list[InvoiceToSend] = field(default_factory=list)
    subscriptions: list[tuple[str, str, str]] = field(default_factory=list)
    updates: list[tuple[str, str, int]] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    fail_for: set[str] = field(default_factory=set)
    attempts: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0

    async def ensure_plan(self, plan: Plan) -> PriceRef:
        return PriceRef(f"plan_{plan.id}", legacy_plan=True)

    async def create_customer(self, organization_id: str, subscription_id: str) -> str:
        self.customers.append((organization_id, subscription_id))
        return f"cus_{subscription_id}"

    async def create_subscription(
        self, customer_id: str, subscription_id: str, plan_id: str, price: PriceRef
    ) -> str:
        self.subscriptions.append((subscription_id, plan_id, price.id))
        return f"sub_{subscription_id}"

    async def update_subscription_plan(
        self,
        stripe_subscription_id: str,
        subscription_id: str,
        plan_id: str,
        price: PriceRef,
        plan_version: int,
    ) -> None:
        self.updates.append((subscription_id, plan_id, plan_version))

    async def cancel_subscription(self, stripe_subscription_id: str, subscription_id: str) -> None:
        self.cancels.append(subscription_id)

    async def send_invoice(self, invoice: InvoiceToSend) -> SentInvoice:
        self.attempts[invoice.id] = self.attempts.get(invoice.id, 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if invoice.organization_id in self.fail_for:
            raise stripe.APIConnectionError("Stripe is unreachable (test)")
        self.invoices.append(invoice)
        return SentInvoice(stripe_invoice_id=f"in_{invoice.id}", status=InvoiceStatus.OPEN)


def user(user_id: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer user:{user_id}"),)


def service(name: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer service:{name}"),)


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """Stripe's scheme: t=<unix>,v1=hex(HMAC-SHA256(secret, "<t>.<payload>"))."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def stripe_event(event_type: str, obj: dict[str, Any], created: int | None = None) -> bytes:
    """A Stripe event envelope shaped like the ones Stripe sends (API version 2026-10-28)."""
    return json.dumps(
        {
            "id": f"evt_{new_id()}",
            "object": "event",
            "api_version": "2026-10-28.endive",
            "created": created or int(time.time()),
            "type": event_type,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "data": {"object": obj},
        }
    ).encode()


@dataclass
class Billing:
    app: BillingApp
    server: RunningServer
    channel: grpc.aio.Channel
    clock: MovableClock
    members: Memberships

    @property
    def stub(self) -> billing_pb2_grpc.BillingServiceStub:
        return billing_pb2_grpc.BillingServiceStub(self.channel)

    async def create_org(self, owner: str = "") -> str:
        """What identity's organization.created does to billing: a hobby subscription."""
        org = new_id()
        event = events_pb2.Event(
            id=new_id(), type="organization.created", organization_id=org, aggregate_id=org
        )
        async with self.app.db.transaction() as tx:
            await self.app.on_identity_event(tx, event)
        if owner:
            self.members.roles[(org, owner)] = "owner"
        return org

    async def delete_org(self, org: str) -> None:
        event = events_pb2.Event(
            id=new_id(), type="organization.deleted", organization_id=org, aggregate_id=org
        )
        async with self.app.db.transaction() as tx:
            await self.app.on_identity_event(tx, event)


BillingFactory = Callable[..., Any]


@pytest.fixture
async def start_billing(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[BillingFactory]:
    """Start billing servers (several may share the database); all stop at teardown."""
    started: list[Billing] = []

    async def start(
        *, gateway: Any = None, stripe_api_base: str = "", stripe_api_key: str = ""
    ) -> Billing:
        settings = Settings(
            service="billing",
            database_url=database_url,
            addresses={name: "127.0.0.1:1" for name in ("identity", "billing")},
            db_passwords=db_passwords,
            stripe_api_key=stripe_api_key,
            stripe_api_base=stripe_api_base,
            stripe_webhook_secret=WEBHOOK_SECRET,
        )
        db = await Database.connect(settings.service_database_url(), max_size=20)
        clock, members = MovableClock(), Memberships()
        app = BillingApp(
            settings,
            db,
            clock=clock,
            gateway=gateway,
            authorizer=members,
            consume_identity=False,
            run_cycle=False,
        )
        server = await start_server(app, "127.0.0.1:0", authenticator=TokenNames(), grace=0.5)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        billing = Billing(app, server, channel, clock, members)
        started.append(billing)
        return billing

    yield start
    for billing in started:
        await billing.channel.close()
        await billing.server.stop()


@pytest.fixture
async def billing(start_billing: BillingFactory) -> Billing:
    return await start_billing()  # type: ignore[no-any-return]
