"""Access changes reach the watchers of every identity replica before their response returns
(issue #21, part 3: services/identity/access_relay.py).

Two real identity servers (gRPC on loopback ports) on one PostgreSQL; a watcher as another
service holds it (shared.auth AccessWatch, RemoteAuthorizer, TokenVerifier) connected to
replica B; changes made through replica A. Every wait is on a condition with a generous bound
that is never reached when things work; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace

import asyncpg
import grpc
import jwt
import pytest

from hangar.identity.v1 import identity_pb2 as ipb
from services.identity.access import AccessChange
from shared.auth import (
    AccessWatch,
    RemoteAuthorizer,
    ServiceTokenSource,
    TokenVerifier,
    generate_signing_key,
)
from shared.clients import Clients
from shared.context import principal_var
from shared.errors import PermissionDenied, Unauthenticated
from shared.loops import cancel_and_wait
from shared.settings import SigningKey
from tests.support.identity import RunningIdentity, bearer, running_identity
from tests.support.project import eventually

WITHIN = 30.0  # generous bound on any wait; never reached when things work


class PartitionedWatch(AccessWatch):
    """The worst watcher the protocol allows: it does not notice its stream ending (as behind
    a network partition) and keeps using its caches until its lease runs out."""

    def _set_lease(self, until: float) -> None:
        if until > 0:
            super()._set_lease(until)


class Watching:
    """What a service process holds against one identity replica: an AccessWatch, the
    RemoteAuthorizer it keeps true and the TokenVerifier whose sessions it checks."""

    def __init__(
        self, identity: RunningIdentity, watch_class: type[AccessWatch] = AccessWatch
    ) -> None:
        settings = replace(identity.settings, service="project")
        self.source = ServiceTokenSource(settings)
        self.clients = Clients(settings.addresses, token_provider=self.source)
        self.watch = watch_class(self.clients)
        self.authorizer = RemoteAuthorizer(self.clients, watch=self.watch)
        assert identity.app is not None
        self.verifier = TokenVerifier.for_settings(
            settings, identity.app.keys.jwks_source, sessions=self.watch
        )
        self.task = asyncio.create_task(self.watch.run())

    async def as_user(self, token: str) -> None:
        principal_var.set(await self.verifier.authenticate(token))

    def holds_decision_about(self, user_id: str) -> bool:
        return any(key[1] == user_id for key in self.authorizer._cache)

    async def close(self) -> None:
        await cancel_and_wait([self.task])
        await self.clients.close()
        await self.source.close()


Replicas = tuple[RunningIdentity, RunningIdentity]


@pytest.fixture
async def replicas(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Replicas]:
    """Two identity replicas on the same database, with the same keys, both listening."""
    keys: tuple[SigningKey, ...] = (generate_signing_key(),)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            running_identity(database_url, db_passwords, signing_keys=keys)
        )
        b = await stack.enter_async_context(
            running_identity(database_url, db_passwords, signing_keys=keys)
        )
        for replica in (a, b):
            assert replica.app is not None
            async with asyncio.timeout(WITHIN):
                await replica.app.relay.wait_listening()
        yield a, b


async def _member_of_a_new_org(
    a: RunningIdentity,
) -> tuple[ipb.AuthResponse, str, ipb.AuthResponse]:
    owner, viewer = await a.sign_up(), await a.sign_up()
    org = await a.create_org(owner.access_token)
    await a.add_member(owner.access_token, org.id, viewer.user.email, ipb.ROLE_VIEWER)
    return owner, org.id, viewer


async def _cached_allow(watching: Watching, token: str, org_id: str, user_id: str) -> None:
    """The watcher's lease is live and the decision is in its cache: what a change must reach."""
    async with asyncio.timeout(WITHIN):
        await watching.watch.wait_live()
    await watching.as_user(token)
    assert await watching.authorizer.require(org_id, "projects.get") == ipb.ROLE_VIEWER
    assert watching.holds_decision_about(user_id)


async def test_a_removal_through_one_replica_reaches_the_other_replicas_watcher_before_it_returns(
    replicas: Replicas,
) -> None:
    a, b = replicas
    assert a.app is not None and b.app is not None
    owner, org_id, viewer = await _member_of_a_new_org(a)
    watching = Watching(b)
    try:
        await _cached_allow(watching, viewer.access_token, org_id, viewer.user.id)
        streams = watching.watch.streams

        await a.stub.RemoveMember(
            ipb.RemoveMemberRequest(organization_id=org_id, user_id=viewer.user.id),
            metadata=bearer(owner.access_token),
            timeout=WITHIN,
        )
        # Dropped by the invalidation B relayed, on the same stream (not by a reconnection).
        assert not watching.holds_decision_about(viewer.user.id)
        assert watching.watch.streams == streams
        with pytest.raises(PermissionDenied):
            await watching.authorizer.require(org_id, "projects.get")
        assert b.app.relay.relayed >= 1
        assert a.app.relay.laggards == 0
    finally:
        await watching.close()


async def test_a_logout_through_one_replica_ends_the_session_on_the_other_replicas_watcher(
    replicas: Replicas,
) -> None:
    a, b = replicas
    user = await a.sign_up()
    session = jwt.decode(user.access_token, options={"verify_signature": False})["sid"]
    watching = Watching(b)
    try:
        async with asyncio.timeout(WITHIN):
            await watching.watch.wait_live()
        await watching.verifier.authenticate(user.access_token)  # verified and cached
        streams = watching.watch.streams

        await a.stub.Logout(ipb.LogoutRequest(refresh_token=user.refresh_token), timeout=WITHIN)
        assert session in watching.watch._revoked  # learnt from B, before Logout returned
        assert watching.watch.streams == streams
        with pytest.raises(Unauthenticated):
            await watching.verifier.authenticate(user.access_token)
    finally:
        await watching.close()


def _short_leases(*replicas: RunningIdentity) -> None:
    """1 s leases and a 0.5 s acknowledgement timeout: laggards are waited out fast."""
    for replica in replicas:
        assert replica.app is not None
        replica.app.access.set_lease(1.0)
        replica.app.access.ack_timeout = 0.5


async def test_a_replica_that_loses_its_listener_fences_itself_and_the_change_still_returns(
    replicas: Replicas, database_url: str
) -> None:
    a, b = replicas
    assert a.app is not None and b.app is not None
    _short_leases(a, b)
    owner, org_id, viewer = await _member_of_a_new_org(a)
    watching = Watching(b, PartitionedWatch)
    try:
        await _cached_allow(watching, viewer.access_token, org_id, viewer.user.id)
        relay = b.app.relay
        incarnations, streams = relay.incarnations, watching.watch.streams

        # B stops hearing changes: its LISTEN backend is gone (as on a network cut).
        admin = await asyncpg.connect(database_url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", relay.listener_pid)
        finally:
            await admin.close()
        # Bounded: A does not wait forever for B (its deadline would fail the call).
        await a.stub.RemoveMember(
            ipb.RemoveMemberRequest(organization_id=org_id, user_id=viewer.user.id),
            metadata=bearer(owner.access_token),
            timeout=WITHIN,
        )
        # Whatever B heard, its watcher (even one that missed being cut) no longer answers
        # from the stale decision: A waited out the leases of B's incarnation.
        with pytest.raises(PermissionDenied):
            await watching.authorizer.require(org_id, "projects.get")

        # B listens again, under a new incarnation, and its watcher (cut) reconnected ...
        async def recovered() -> bool:
            return relay.incarnations > incarnations and watching.watch.streams > streams

        await eventually(recovered, WITHIN, 0.02)
        # ... and changes through A reach it before they return again.
        await a.add_member(owner.access_token, org_id, viewer.user.email, ipb.ROLE_VIEWER)
        await _cached_allow(watching, viewer.access_token, org_id, viewer.user.id)
        await a.stub.RemoveMember(
            ipb.RemoveMemberRequest(organization_id=org_id, user_id=viewer.user.id),
            metadata=bearer(owner.access_token),
            timeout=WITHIN,
        )
        assert not watching.holds_decision_about(viewer.user.id)
    finally:
        await watching.close()


class StuckDelivery:
    """Holds every change a replica hears from its peers (a replica too slow to relay)."""

    def __init__(self) -> None:
        self.stuck = asyncio.Event()
        self.unstick = asyncio.Event()

    async def __call__(self, change: AccessChange) -> float:
        self.stuck.set()
        await self.unstick.wait()
        return 0.0


async def test_a_replica_that_does_not_acknowledge_is_revoked_and_waited_out(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = replicas
    assert a.app is not None and b.app is not None
    _short_leases(a, b)
    owner, org_id, viewer = await _member_of_a_new_org(a)
    watching = Watching(b, PartitionedWatch)
    stuck = StuckDelivery()
    try:
        await _cached_allow(watching, viewer.access_token, org_id, viewer.user.id)
        incarnations = b.app.relay.incarnations
        monkeypatch.setattr(b.app.access, "deliver", stuck)

        await a.stub.RemoveMember(
            ipb.RemoveMemberRequest(organization_id=org_id, user_id=viewer.user.id),
            metadata=bearer(owner.access_token),
            timeout=WITHIN,
        )
        assert stuck.stuck.is_set()  # B heard it but never relayed it
        assert a.app.relay.laggards == 1
        with pytest.raises(PermissionDenied):  # its lease ran out before A answered
            await watching.authorizer.require(org_id, "projects.get")

        async def fenced() -> bool:  # B found its lease revoked and listens anew
            return b.app is not None and b.app.relay.incarnations > incarnations

        await eventually(fenced, WITHIN, 0.02)
    finally:
        stuck.unstick.set()
        await watching.close()


async def test_a_replica_that_is_not_listening_refuses_watchers_until_it_listens_again(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, b = replicas
    assert b.app is not None
    access = b.app.access
    # As between losing its listener and listening again: fenced, not reopened meanwhile.
    monkeypatch.setattr(access, "serve_until", lambda deadline: None)
    access.fence()
    call = b.stub.WatchAccess(metadata=bearer(await b.service_token()), timeout=WITHIN)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # so it reconnects

    monkeypatch.undo()  # the relay's next renewal opens it again
    watching = Watching(b)
    try:
        async with asyncio.timeout(WITHIN):
            await watching.watch.wait_live()
    finally:
        await watching.close()
