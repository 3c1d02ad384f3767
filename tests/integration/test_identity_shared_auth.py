"""What other services get from shared.auth, against a real identity: local verification
with identity's JWKS, Authorize with a cache an AccessWatch keeps true, service tokens;
identity as a process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import grpc
import pytest

from hangar.identity.v1 import identity_pb2 as pb
from shared.auth import (
    AccessWatch,
    IdentityJwks,
    RemoteAuthorizer,
    ServiceTokenSource,
    TokenVerifier,
)
from shared.clients import Clients
from shared.context import principal_var
from shared.errors import PermissionDenied, Unauthenticated
from shared.loops import cancel_and_wait
from tests.support.identity import (
    RunningIdentity,
    bearer,
    running_identity,
    start_identity_process,
)


@pytest.fixture(scope="module")
async def identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    async with running_identity(database_url, db_passwords) as running:
        yield running


async def test_another_service_verifies_identity_tokens_locally(identity: RunningIdentity) -> None:
    settings = replace(identity.settings, service="project")
    jwks = IdentityJwks(settings)
    verifier = TokenVerifier.for_settings(settings, jwks)
    try:
        user = await identity.sign_up()
        principal = await verifier.authenticate(user.access_token)
        assert principal.is_user and principal.subject == user.user.id
        service = await verifier.authenticate(await identity.service_token("billing"))
        assert service.is_service and service.subject == "billing"
        with pytest.raises(Unauthenticated):
            await verifier.authenticate(user.access_token[:-4] + "AAAA")
    finally:
        await jwks.close()


class CountingAuthorizer(RemoteAuthorizer):
    """Counts the questions that reach identity (the others were answered from the cache)."""

    asked = 0

    async def _ask(self, request: pb.AuthorizeRequest) -> pb.AuthorizeResponse:
        self.asked += 1
        return await super()._ask(request)


async def test_authorizer_caches_under_a_live_watch_and_forgets_a_removed_member_at_once(
    identity: RunningIdentity,
) -> None:
    settings = replace(identity.settings, service="project")
    source = ServiceTokenSource(settings)
    clients = Clients(settings.addresses, token_provider=source)
    watch = AccessWatch(clients)
    authorizer = CountingAuthorizer(clients, watch=watch)
    verifier = TokenVerifier.for_settings(settings, identity.app.keys.jwks_source)  # type: ignore[union-attr]
    owner = await identity.sign_up()
    viewer = await identity.sign_up()
    stranger = await identity.sign_up()
    org = await identity.create_org(owner.access_token)
    await identity.add_member(owner.access_token, org.id, viewer.user.email, pb.ROLE_VIEWER)
    watching = asyncio.create_task(watch.run())
    try:
        async with asyncio.timeout(30):
            await watch.wait_live()
        principal_var.set(await verifier.authenticate(viewer.access_token))
        assert await authorizer.require(org.id, "projects.get") == pb.ROLE_VIEWER
        assert await authorizer.require(org.id, "projects.get") == pb.ROLE_VIEWER
        assert authorizer.asked == 1 or not watch.live()  # the second from the cache
        with pytest.raises(PermissionDenied):
            await authorizer.require(org.id, "projects.delete")
        principal_var.set(await verifier.authenticate(stranger.access_token))
        for org_id in (org.id, "no-such-org"):  # AIP-193: the same answer either way
            with pytest.raises(PermissionDenied):
                await authorizer.require(org_id, "projects.get")
        # Removing the viewer holds here from the moment RemoveMember returns.
        principal_var.set(await verifier.authenticate(viewer.access_token))
        await identity.stub.RemoveMember(
            pb.RemoveMemberRequest(organization_id=org.id, user_id=viewer.user.id),
            metadata=bearer(owner.access_token),
        )
        with pytest.raises(PermissionDenied):
            await authorizer.require(org.id, "projects.get")
    finally:
        await cancel_and_wait([watching])
        await clients.close()
        await source.close()


async def test_service_token_source_caches_its_token(identity: RunningIdentity) -> None:
    source = ServiceTokenSource(replace(identity.settings, service="runtime"))
    try:
        first, second = await source(), await source()
        assert first == second
    finally:
        await source.close()


def test_identity_runs_as_a_process_with_keys_from_the_environment(
    database_url: str, db_passwords: dict[str, str]
) -> None:
    running = start_identity_process(database_url, db_passwords)
    try:
        with grpc.insecure_channel(running.address) as channel:
            from hangar.identity.v1 import identity_pb2_grpc

            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            keys = stub.GetJwks(pb.GetJwksRequest(), timeout=5)
            assert [k.kid for k in keys.keys] == [running.settings.jwt_signing_keys[0].kid]
            signed = stub.SignUp(
                pb.SignUpRequest(email="proc-user@example.com", password="a long enough pass"),
                timeout=10,
            )
            me = stub.GetCurrentUser(
                pb.GetCurrentUserRequest(), metadata=bearer(signed.access_token), timeout=5
            )
            assert me.email == "proc-user@example.com"
    finally:
        assert running.process is not None
        assert running.process.stop() == 0


def test_hangar_admin_promote_sets_the_flag(
    database_url: str, db_passwords: dict[str, str], tmp_path: os.PathLike[str]
) -> None:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": database_url,
            "HANGAR_IDENTITY_DB_PASSWORD": db_passwords["identity"],
            "HANGAR_HOME": str(tmp_path),
        }
    )

    async def create_user() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "INSERT INTO identity.users (id, email, name) VALUES ('promote-me', $1, '')"
                " ON CONFLICT DO NOTHING",
                "to-promote@example.com",
            )
        finally:
            await conn.close()

    asyncio.run(create_user())
    done = subprocess.run(
        [sys.executable, "-m", "hangar_cli", "admin", "promote", " To-Promote@example.com"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "hangar_cli", "admin", "promote", "ghost@example.com"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "no user" in missing.stderr

    async def flag() -> bool:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetchval(
                "SELECT is_platform_admin FROM identity.users WHERE email = $1",
                "to-promote@example.com",
            )
        finally:
            await conn.close()

    assert asyncio.run(flag()) is True


def test_local_credentials_include_a_signing_key_passed_to_services(
    tmp_path: os.PathLike[str],
) -> None:
    from pathlib import Path

    from hangar_cli.cli import load_credentials, service_environment
    from shared.settings import Settings

    creds = load_credentials(Path(tmp_path))
    assert load_credentials(Path(tmp_path))["jwt_signing_keys"] == creds["jwt_signing_keys"]
    env = service_environment("postgresql://x/y", creds, {"identity": "127.0.0.1:1"})
    keys = json.loads(env["HANGAR_JWT_SIGNING_KEYS"])
    assert keys[0]["private_key_pem"].startswith("-----BEGIN PRIVATE KEY-----")
    assert env["HANGAR_RUNTIME_SERVICE_SECRET"]
    os.environ["HANGAR_JWT_SIGNING_KEYS"] = env["HANGAR_JWT_SIGNING_KEYS"]
    try:
        assert Settings.from_env("identity").jwt_signing_keys[0].kid == keys[0]["kid"]
    finally:
        del os.environ["HANGAR_JWT_SIGNING_KEYS"]
