"""Billing with the real identity service: organization.created arrives over identity's
WatchEvents, tokens are identity's Ed25519 JWTs, and access is identity.Authorize."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import pytest

from hangar.billing.v1 import billing_pb2, billing_pb2_grpc
from services.billing.server import BillingApp
from shared.db import Database
from shared.ids import new_id
from shared.server import start_server
from tests.support.identity import bearer, running_identity


async def test_cross_tenant_reads_and_writes_are_denied_with_real_identity(
    database_url: str, db_passwords: dict[str, str]
) -> None:
    async with running_identity(database_url, db_passwords) as identity:
        settings = replace(identity.settings, service="billing", jwt_signing_keys=())
        db = await Database.connect(settings.service_database_url("billing"))
        app = BillingApp(settings, db, run_cycle=False)
        server = await start_server(app, "127.0.0.1:0", grace=0.5)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        try:
            alice, bob = await identity.sign_up(), await identity.sign_up()
            org = await identity.create_org(alice.access_token)
            request = billing_pb2.GetSubscriptionRequest(organization_id=org.id)
            for _ in range(100):  # the subscription comes from identity's event feed
                try:
                    sub = await stub.GetSubscription(request, metadata=bearer(alice.access_token))
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                    await asyncio.sleep(0.1)
            assert sub.plan_id == "hobby"
            calls = [
                stub.GetSubscription(request, metadata=bearer(bob.access_token)),
                stub.GetSubscription(
                    billing_pb2.GetSubscriptionRequest(organization_id=new_id()),
                    metadata=bearer(bob.access_token),
                ),
                stub.GetUsageSummary(
                    billing_pb2.GetUsageSummaryRequest(organization_id=org.id),
                    metadata=bearer(bob.access_token),
                ),
                stub.ListInvoices(
                    billing_pb2.ListInvoicesRequest(organization_id=org.id),
                    metadata=bearer(bob.access_token),
                ),
                stub.ChangePlan(
                    billing_pb2.ChangePlanRequest(organization_id=org.id, plan_id="pro"),
                    metadata=bearer(bob.access_token),
                ),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            changed = await stub.ChangePlan(
                billing_pb2.ChangePlanRequest(organization_id=org.id, plan_id="pro"),
                metadata=bearer(alice.access_token),
            )
            assert changed.plan_id == "pro"
        finally:
            await channel.close()
            await server.stop()
