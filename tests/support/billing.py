"""Billing in this process on a loopback port, with the real identity service beside it.

Identity (tests/support/identity.py) runs in this process once per test module, on its own
loopback port. Users sign up through SignUp and carry identity's Ed25519 access tokens;
organizations and memberships are made with CreateOrganization and AddMember; service tokens
come from IssueServiceToken. Billing is wired as in production: its TokenVerifier fetches
identity's GetJwks, its RemoteAuthorizer asks identity.Authorize (with billing's own service
token), its event consumer follows identity's WatchEvents (organization.created gives the
organization a hobby subscription, organization.deleted cancels it) and its audit relay
hands entries to identity.AppendAuditEvents.

What is not ours stays a stand-in: Stripe is the SDK pointed at localstripe, or the
RecordingGateway below for what localstripe cannot do (see test_billing_stripe), and billing's
clock is one the test moves. Tokens live 10 to 15 minutes; a module runs for seconds.
"""

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
import jwt
import pytest
import stripe
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hangar.billing.v1 import billing_pb2_grpc
from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2 as ipb
from services.billing.domain import InvoiceStatus, Plan
from services.billing.server import BillingApp
from services.billing.stripe_gateway import InvoiceToSend, PriceRef, SentInvoice
from shared.db import Database
from shared.ids import new_id
from shared.outbox import START
from shared.server import RunningServer, start_server
from shared.settings import Settings
from tests.support.identity import RunningIdentity, bearer, running_identity

WEBHOOK_SECRET = "whsec_test_hangar"
SERVICES_WITH_TOKENS = ("project", "runtime", "agent", "billing")
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class User:
    """A signed-up user and the access token identity issued at SignUp."""

    id: str
    email: str
    token: str

    @property
    def md(self) -> Metadata:
        return bearer(self.token)


@dataclass
class Identity:
    """The module's identity server, a user who owns the organizations a test does not give
    an owner, and a token per service (IssueServiceToken, minted once)."""

    running: RunningIdentity
    owner: User
    tokens: dict[str, str]
    owners: dict[str, User] = field(default_factory=dict)  # organization id -> its owner

    @property
    def address(self) -> str:
        return self.running.address

    async def user(self) -> User:
        auth = await self.running.sign_up()
        return User(auth.user.id, auth.user.email, auth.access_token)

    def service(self, name: str) -> Metadata:
        """A service's real token as call metadata."""
        return bearer(self.tokens[name])

    async def create_org(self, owner: User) -> str:
        org = await self.running.create_org(owner.token)
        self.owners[org.id] = owner
        return str(org.id)

    async def add_member(self, org: str, role: str, by: User | None = None) -> User:
        """A new user, added to `org` with `role` ("viewer", "developer", "admin", "owner")."""
        member = await self.user()
        await self.running.add_member(
            (by or self.owners[org]).token,
            org,
            member.email,
            ipb.Role.Value(f"ROLE_{role.upper()}"),
        )
        return member

    async def delete_org(self, org: str) -> None:
        await self.running.stub.DeleteOrganization(
            ipb.DeleteOrganizationRequest(id=org), metadata=self.owners[org].md
        )


@pytest.fixture(scope="module")
async def identity(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Identity]:
    """Identity in this process on a loopback port, once per test module."""
    async with running_identity(database_url, db_passwords) as running:
        tokens = {name: await running.service_token(name) for name in SERVICES_WITH_TOKENS}
        auth = await running.sign_up(name="Billing Owner")
        yield Identity(running, User(auth.user.id, auth.user.email, auth.access_token), tokens)


def forged(token: str) -> str:
    """The same header and claims as `token`, signed by a key identity never published."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    key = Ed25519PrivateKey.generate()
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": header["kid"]})


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


async def _until(check: Callable[[], Any], what: str, within: float = 15.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.01)


@dataclass
class Billing:
    app: BillingApp
    server: RunningServer
    channel: grpc.aio.Channel
    clock: MovableClock
    identity: Identity

    @property
    def stub(self) -> billing_pb2_grpc.BillingServiceStub:
        return billing_pb2_grpc.BillingServiceStub(self.channel)

    @property
    def owner(self) -> User:
        """The module's default organization owner."""
        return self.identity.owner

    async def user(self) -> User:
        return await self.identity.user()

    def service(self, name: str) -> Metadata:
        return self.identity.service(name)

    async def _subscription_status(self, org: str) -> str | None:
        async with self.app.db.session() as s:
            status = await s.fetchval(
                "SELECT status FROM billing.subscriptions WHERE organization_id = $1"
                " ORDER BY created_at DESC LIMIT 1",
                org,
            )
        return None if status is None else str(status)

    async def create_org(self, owner: User | None = None) -> str:
        """identity.CreateOrganization; returns once billing has consumed organization.created
        from identity's feed (the organization then has its hobby subscription)."""
        org = await self.identity.create_org(owner or self.owner)
        await _until(lambda: self._subscription_status(org), f"a subscription for {org}")
        return org

    async def delete_org(self, org: str) -> None:
        """identity.DeleteOrganization by its owner; returns once billing has canceled."""
        await self.identity.delete_org(org)

        async def canceled() -> bool:
            return await self._subscription_status(org) == "canceled"

        await _until(canceled, f"the subscription of {org} canceled")

    async def identity_event(self, org: str, event_type: str) -> events_pb2.Event:
        """The event identity published about `org`, read back from its WatchEvents."""
        call = self.identity.running.stub.WatchEvents(
            events_pb2.WatchEventsRequest(after_cursor=START, types=[event_type]),
            metadata=self.service("billing"),
            timeout=15,
        )
        try:
            async for event in call:
                if event.organization_id == org:
                    return event
        finally:
            call.cancel()
        raise AssertionError(f"identity published no {event_type} for {org}")

    async def redeliver(self, event: events_pb2.Event) -> None:
        """Hand an event to billing's consumer again (at-least-once delivery: a replica that
        applied it and died before its cursor moved, or a cursor restored from a backup)."""
        async with self.app.db.transaction() as tx:
            await self.app.on_identity_event(tx, event)

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop()


async def launch_billing(
    identity: Identity,
    database_url: str,
    db_passwords: dict[str, str],
    *,
    gateway: Any = None,
    stripe_api_base: str = "",
    stripe_api_key: str = "",
) -> Billing:
    """A billing server on a free loopback port, wired to `identity` as in production."""
    identity_settings = identity.running.settings
    settings = Settings(
        service="billing",
        database_url=database_url,
        addresses={"identity": identity.address},
        db_passwords=db_passwords,
        service_secrets={"billing": identity_settings.service_secrets["billing"]},
        jwt_issuer=identity_settings.jwt_issuer,
        jwt_audience=identity_settings.jwt_audience,
        stripe_api_key=stripe_api_key,
        stripe_api_base=stripe_api_base,
        stripe_webhook_secret=WEBHOOK_SECRET,
    )
    db = await Database.connect(settings.service_database_url(), max_size=20)
    clock = MovableClock()
    app = BillingApp(settings, db, clock=clock, gateway=gateway, run_cycle=False)
    server = await start_server(app, "127.0.0.1:0", grace=0.5)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return Billing(app, server, channel, clock, identity)


BillingFactory = Callable[..., Any]


@pytest.fixture
async def start_billing(
    identity: Identity, database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[BillingFactory]:
    """Start billing servers (several may share the database); all stop at teardown."""
    started: list[Billing] = []

    async def start(**kwargs: Any) -> Billing:
        billing = await launch_billing(identity, database_url, db_passwords, **kwargs)
        started.append(billing)
        return billing

    yield start
    for billing in started:
        await billing.stop()


@pytest.fixture
async def billing(start_billing: BillingFactory) -> Billing:
    return await start_billing()  # type: ignore[no-any-return]
