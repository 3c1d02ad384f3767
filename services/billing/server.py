"""The billing service process: the servicer, the billing cycle, and identity's events."""

from __future__ import annotations

import grpc

from hangar.billing.v1 import billing_pb2, billing_pb2_grpc
from hangar.events.v1 import events_pb2
from services.billing.api import BillingApi
from services.billing.cycle import BillingCycle
from services.billing.domain import Clock, SystemClock
from services.billing.provisioning import IdentityOrganizations, Organizations, Subscriptions
from services.billing.service import Billing
from services.billing.stripe_gateway import SdkStripeGateway, StripeGateway
from shared.app import ServiceApp
from shared.audit import AuditRelay
from shared.auth import Authorizer, RemoteAuthorizer
from shared.db import Database, Session
from shared.outbox import EventConsumer
from shared.server import run_service
from shared.settings import Settings

ORGANIZATION_EVENTS = ("organization.created", "organization.deleted")


class BillingApp(ServiceApp):
    name = "billing"
    service_names = (billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,)

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        clock: Clock | None = None,
        gateway: StripeGateway | None = None,
        authorizer: Authorizer | None = None,
        organizations: Organizations | None = None,
        consume_identity: bool = True,
        run_cycle: bool = True,
    ) -> None:
        super().__init__(settings, db)
        self.clock = clock or SystemClock()
        self.gateway = gateway or SdkStripeGateway.from_settings(settings)
        self.authorizer: Authorizer = authorizer or RemoteAuthorizer(
            self.clients, watch=self.access_watch
        )
        self.subscriptions = Subscriptions(
            db, self.clock, organizations or IdentityOrganizations(self.clients)
        )
        self.cycle = BillingCycle(
            db,
            self.clock,
            self.gateway,
            interval_seconds=settings.billing_cycle_seconds,
            stripe_prices=settings.stripe_prices,
            retry_base_seconds=settings.billing_send_retry_base_seconds,
            retry_max_seconds=settings.billing_send_retry_max_seconds,
        )
        self.billing = Billing(
            db,
            self.clock,
            self.authorizer,
            self.subscriptions,
            self.cycle,
            stripe_webhook_secret=settings.stripe_webhook_secret,
        )
        self.identity_events = EventConsumer(
            db,
            "billing",
            consumer="billing",
            source="identity",
            watch=self.watch_events("identity"),
            handler=self.on_identity_event,
            types=ORGANIZATION_EVENTS,
        )
        if run_cycle:
            self.add_loop(self.cycle.run)
        if consume_identity:
            self.add_loop(self.identity_events.run)
            self.add_loop(AuditRelay(db, "billing", self.clients).run)

    def register(self, server: grpc.aio.Server) -> None:
        billing_pb2_grpc.add_BillingServiceServicer_to_server(
            BillingApi(self.billing, self.feed), server
        )

    async def on_identity_event(self, tx: Session, event: events_pb2.Event) -> None:
        """organization.created -> hobby subscription (unless a call opened it already);
        organization.deleted -> cancel, free.

        Stripe is not called here (this runs inside the cursor's transaction): the cycle's
        Stripe sync creates the customer and subscription, or cancels it, on its next pass."""
        org = event.organization_id or event.aggregate_id
        if not org:
            return
        if event.type == "organization.created":
            await self.subscriptions.open(tx, org)
        elif event.type == "organization.deleted":
            await self.billing.close_organization(tx, org)


def main() -> None:
    run_service(BillingApp.name, BillingApp.create)
