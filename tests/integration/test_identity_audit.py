"""The audit trail: identity's own entries, appends from other services (and the shared relay),
filters and pages, and the hash chain that shows a tampered entry."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from hangar.identity.v1 import identity_pb2 as pb
from shared.audit import AuditRelay, record_audit
from shared.auth import ServiceTokenSource
from shared.clients import Clients
from shared.db import Database
from tests.support.identity import PASSWORD, RunningIdentity, bearer, running_identity
from tests.support.procs import free_port


@pytest.fixture(scope="module")
async def identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    async with running_identity(database_url, db_passwords) as running:
        yield running


def _event(org_id: str, action: str = "project.created", **kw: object) -> pb.AuditEvent:
    metadata = struct_pb2.Struct()
    metadata.update({"name": "web", "ram_mb": 512})
    occurred = timestamp_pb2.Timestamp()
    occurred.FromDatetime(datetime.now(UTC))
    return pb.AuditEvent(
        id=f"ev-{secrets.token_hex(6)}",
        organization_id=org_id,
        actor_id="u-1",
        action=action,
        target_type="project",
        target_id="p-1",
        metadata=metadata,
        occurred_at=occurred,
        **kw,  # type: ignore[arg-type]
    )


async def _org_with_admin(identity: RunningIdentity) -> tuple[pb.AuthResponse, pb.Organization]:
    owner = await identity.sign_up()
    return owner, await identity.create_org(owner.access_token)


async def test_identity_audits_its_own_member_changes(identity: RunningIdentity) -> None:
    owner, org = await _org_with_admin(identity)
    viewer = await identity.sign_up()
    await identity.add_member(owner.access_token, org.id, viewer.user.email)
    logs = await identity.stub.ListAuditLogs(
        pb.ListAuditLogsRequest(organization_id=org.id), metadata=bearer(owner.access_token)
    )
    assert [e.action for e in logs.audit_logs] == ["member.added", "organization.created"]
    added = logs.audit_logs[0]
    assert added.actor_id == owner.user.id and added.target_id == viewer.user.id
    assert added.prev_hash == logs.audit_logs[1].hash and logs.audit_logs[1].prev_hash == ""
    # Viewers may not read the trail.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.ListAuditLogs(
            pb.ListAuditLogsRequest(organization_id=org.id), metadata=bearer(viewer.access_token)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_replayed_append_stores_one_entry(identity: RunningIdentity) -> None:
    owner, org = await _org_with_admin(identity)
    meta = bearer(await identity.service_token("project"))
    event = _event(org.id)
    first = await identity.stub.AppendAuditEvents(
        pb.AppendAuditEventsRequest(events=[event, event]), metadata=meta
    )
    again = await identity.stub.AppendAuditEvents(
        pb.AppendAuditEventsRequest(events=[event]), metadata=meta
    )
    assert (first.accepted, first.duplicates) == (1, 1)
    assert (again.accepted, again.duplicates) == (0, 1)
    logs = await identity.stub.ListAuditLogs(
        pb.ListAuditLogsRequest(organization_id=org.id, action="project.created"),
        metadata=bearer(owner.access_token),
    )
    assert [e.id for e in logs.audit_logs] == [event.id]
    assert dict(logs.audit_logs[0].metadata) == {"name": "web", "ram_mb": 512}


async def test_bad_audit_events_name_the_field(identity: RunningIdentity) -> None:
    meta = bearer(await identity.service_token("project"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.AppendAuditEvents(
            pb.AppendAuditEventsRequest(events=[_event("o"), pb.AuditEvent(action="x")]),
            metadata=meta,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[1].id" in (caught.value.details() or "")


async def test_audit_logs_filter_and_page(identity: RunningIdentity) -> None:
    owner, org = await _org_with_admin(identity)
    meta = bearer(await identity.service_token("runtime"))
    events = [_event(org.id, "deployment.created") for _ in range(5)]
    await identity.stub.AppendAuditEvents(pb.AppendAuditEventsRequest(events=events), metadata=meta)
    seen, token = [], ""
    while True:
        page = await identity.stub.ListAuditLogs(
            pb.ListAuditLogsRequest(
                organization_id=org.id, action="deployment.created", page_size=2, page_token=token
            ),
            metadata=bearer(owner.access_token),
        )
        seen += [e.id for e in page.audit_logs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [e.id for e in reversed(events)]  # newest first
    by_actor = await identity.stub.ListAuditLogs(
        pb.ListAuditLogsRequest(organization_id=org.id, actor_id=owner.user.id),
        metadata=bearer(owner.access_token),
    )
    assert [e.action for e in by_actor.audit_logs] == ["organization.created"]
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    none = await identity.stub.ListAuditLogs(
        pb.ListAuditLogsRequest(organization_id=org.id, start_time=future),
        metadata=bearer(owner.access_token),
    )
    assert list(none.audit_logs) == []


async def test_verify_audit_chain_names_an_entry_edited_in_the_database(
    identity: RunningIdentity, database_url: str
) -> None:
    owner, org = await _org_with_admin(identity)
    meta = bearer(await identity.service_token("project"))
    events = [_event(org.id) for _ in range(4)]
    await identity.stub.AppendAuditEvents(pb.AppendAuditEventsRequest(events=events), metadata=meta)
    verify = pb.VerifyAuditChainRequest(organization_id=org.id)
    report = await identity.stub.VerifyAuditChain(verify, metadata=bearer(owner.access_token))
    assert report.ok and report.checked == 5 and report.first_broken_entry_id == ""
    conn = await asyncpg.connect(database_url)  # a superuser, past the append-only trigger
    try:
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute(
                "UPDATE identity.audit_logs SET action = 'x' WHERE event_id = $1", events[2].id
            )
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "UPDATE identity.audit_logs SET metadata = $2 WHERE event_id = $1",
                events[2].id,
                '{"name": "evil"}',
            )
    finally:
        await conn.close()
    report = await identity.stub.VerifyAuditChain(verify, metadata=bearer(owner.access_token))
    assert not report.ok and report.first_broken_entry_id == events[2].id


async def test_sign_in_attempts_are_audited_without_secrets(
    identity: RunningIdentity, database_url: str
) -> None:
    reply = await identity.sign_up()
    with pytest.raises(grpc.aio.AioRpcError):
        await identity.stub.Login(pb.LoginRequest(email=reply.user.email, password="wrong one!!"))
    await identity.stub.Login(
        pb.LoginRequest(email=reply.user.email, password="correct horse battery staple")
    )
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT action, metadata FROM identity.audit_logs WHERE target_id = $1 ORDER BY seq",
            reply.user.id,
        )
    finally:
        await conn.close()
    actions = [r["action"] for r in rows]
    assert actions == ["user.signed_up", "user.login_failed", "user.login_succeeded"]
    assert "wrong one" not in str(rows)


async def test_relay_delivers_a_services_audit_outbox_until_accepted(
    identity: RunningIdentity, db_passwords: dict[str, str]
) -> None:
    """The shared relay over a service schema (identity's own outbox stands in for one)."""
    owner, org = await _org_with_admin(identity)
    db = await Database.connect(identity.settings.service_database_url("identity"))
    dead = replace(
        identity.settings,
        service="project",
        addresses={**identity.settings.addresses, "identity": f"127.0.0.1:{free_port()}"},
    )
    live = replace(identity.settings, service="project")
    try:
        async with db.transaction() as tx:
            event_id = await record_audit(
                tx,
                "identity",
                organization_id=org.id,
                action="secret.revealed",
                target_type="secret",
                target_id="DB_URL",
                actor_id="u-42",
                metadata={"version": 3},
            )
        # Identity unreachable: the batch stays put.
        down = Clients(dead.addresses, default_timeout=1, token_provider=None)
        with pytest.raises(grpc.aio.AioRpcError):
            await AuditRelay(db, "identity", down).relay_once()
        await down.close()
        source = ServiceTokenSource(live)
        up = Clients(live.addresses, default_timeout=5, token_provider=source)
        relay = AuditRelay(db, "identity", up)
        while await relay.relay_once():
            pass
        assert await relay.relay_once() == 0
        await up.close()
        await source.close()
    finally:
        await db.close()
    logs = await identity.stub.ListAuditLogs(
        pb.ListAuditLogsRequest(organization_id=org.id, action="secret.revealed"),
        metadata=bearer(owner.access_token),
    )
    assert [(e.id, e.actor_id, e.target_id) for e in logs.audit_logs] == [
        (event_id, "u-42", "DB_URL")
    ]


async def test_a_deleted_organizations_trail_stays_readable_to_platform_admins_only(
    identity: RunningIdentity,
) -> None:
    owner, org = await _org_with_admin(identity)
    outsider = await identity.sign_up()
    await identity.stub.DeleteOrganization(
        pb.DeleteOrganizationRequest(id=org.id), metadata=bearer(owner.access_token)
    )
    admin = await identity.sign_up()
    assert identity.app is not None
    assert await identity.app.accounts.promote(admin.user.email)
    relogged = await identity.stub.Login(pb.LoginRequest(email=admin.user.email, password=PASSWORD))
    # Its owner is no member any more, and no one else ever was.
    for token in (owner.access_token, outsider.access_token):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.ListAuditLogs(
                pb.ListAuditLogsRequest(organization_id=org.id), metadata=bearer(token)
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reply = await identity.stub.ListAuditLogs(
        pb.ListAuditLogsRequest(organization_id=org.id), metadata=bearer(relogged.access_token)
    )
    actions = [entry.action for entry in reply.audit_logs]
    assert actions[0] == "organization.deleted" and "organization.created" in actions
    chain = await identity.stub.VerifyAuditChain(
        pb.VerifyAuditChainRequest(organization_id=org.id), metadata=bearer(relogged.access_token)
    )
    assert chain.ok and chain.checked == len(actions)
