"""Accounts, sessions and service identities on a real identity server and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2 as pb
from shared.auth import generate_signing_key
from tests.support.identity import PASSWORD, RunningIdentity, bearer, running_identity


@pytest.fixture(scope="module")
async def identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    async with running_identity(database_url, db_passwords) as running:
        yield running


def _email() -> str:
    return f"acct-{secrets.token_hex(5)}@example.com"


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def _count_users(database_url: str, email: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM identity.users WHERE email = $1", email)
    finally:
        await conn.close()


async def test_sign_up_normalizes_email_and_signs_in(identity: RunningIdentity) -> None:
    email = _email()
    reply = await identity.sign_up(f"  {email.upper()} ")
    assert reply.user.email == email
    assert reply.access_token and reply.refresh_token
    assert reply.access_token_expires_at.seconds > time.time() + 800
    header = jwt.get_unverified_header(reply.access_token)
    assert header["alg"] == "EdDSA" and header["kid"]
    me = await identity.stub.GetCurrentUser(
        pb.GetCurrentUserRequest(), metadata=bearer(reply.access_token)
    )
    assert me.id == reply.user.id and me.email == email


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [
        ("", PASSWORD, "email"),
        ("not-an-email", PASSWORD, "email"),
        ("x@example.com", "short", "password"),
        ("x@example.com", "password123", "password"),
    ],
)
async def test_bad_sign_up_names_the_field_and_writes_nothing(
    identity: RunningIdentity, database_url: str, email: str, password: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.SignUp(pb.SignUpRequest(email=email, password=password))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(caught.value)
    if email:
        assert await _count_users(database_url, email.lower()) == 0


async def test_twenty_concurrent_sign_ups_with_one_email_make_one_account(
    identity: RunningIdentity, database_url: str
) -> None:
    email = _email()

    async def sign_up() -> pb.AuthResponse:
        # As a client would: a refusal of the saturated hashing pool (RESOURCE_EXHAUSTED,
        # which writes nothing) is tried again; on a loaded machine some are refused.
        for _ in range(600):
            try:
                return await identity.sign_up(email)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
            await asyncio.sleep(0.1)
        raise AssertionError("still refused as overloaded after 600 tries")

    results = await asyncio.gather(*(sign_up() for _ in range(20)), return_exceptions=True)
    ok = [r for r in results if isinstance(r, pb.AuthResponse)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1
    assert len(failed) == 19
    assert {e.code() for e in failed} == {grpc.StatusCode.ALREADY_EXISTS}
    assert await _count_users(database_url, email) == 1


async def test_wrong_password_and_unknown_email_look_the_same(identity: RunningIdentity) -> None:
    email = _email()
    await identity.sign_up(email)
    timings = {}
    for who in (email, _email()):
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.Login(pb.LoginRequest(email=who, password="wrong password!!"))
        timings[who] = time.perf_counter() - started
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details() == "wrong email or password"
    fast, slow = sorted(timings.values())
    assert slow < fast * 3 + 0.05  # both paths run argon2 once


async def test_repeated_failures_back_off_then_let_the_owner_back_in(
    identity: RunningIdentity,
) -> None:
    email = _email()
    await identity.sign_up(email)
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.Login(pb.LoginRequest(email=email, password="wrong password!!"))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.Login(pb.LoginRequest(email=email, password=PASSWORD))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await asyncio.sleep(1.2)  # the first block lasts a second
    reply = await identity.stub.Login(pb.LoginRequest(email=email, password=PASSWORD))
    assert reply.user.email == email


async def test_weaker_hash_is_rehashed_at_next_login(
    identity: RunningIdentity, database_url: str
) -> None:
    from argon2 import PasswordHasher

    email = _email()
    await identity.sign_up(email)
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE identity.users SET password_hash = $1 WHERE email = $2", weak, email
        )
        await identity.stub.Login(pb.LoginRequest(email=email, password=PASSWORD))
        stored = await conn.fetchval(
            "SELECT password_hash FROM identity.users WHERE email = $1", email
        )
    finally:
        await conn.close()
    assert stored.startswith("$argon2id$") and "m=19456,t=2,p=1" in stored


async def test_refresh_rotates_and_a_replay_revokes_the_family(identity: RunningIdentity) -> None:
    first = await identity.sign_up()
    second = await identity.stub.Refresh(pb.RefreshRequest(refresh_token=first.refresh_token))
    assert second.refresh_token != first.refresh_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.Refresh(pb.RefreshRequest(refresh_token=first.refresh_token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # the whole family is gone
        await identity.stub.Refresh(pb.RefreshRequest(refresh_token=second.refresh_token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_two_concurrent_refreshes_with_one_token_at_most_one_wins(
    identity: RunningIdentity,
) -> None:
    for _ in range(5):
        start = await identity.sign_up()
        results = await asyncio.gather(
            *(
                identity.stub.Refresh(pb.RefreshRequest(refresh_token=start.refresh_token))
                for _ in range(2)
            ),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, pb.AuthResponse)]
        assert len(winners) <= 1
        # A second use is a replay: the family, winner's new token included, is revoked.
        for winner in winners:
            with pytest.raises(grpc.aio.AioRpcError):
                await identity.stub.Refresh(pb.RefreshRequest(refresh_token=winner.refresh_token))


async def test_logout_revokes_the_family(identity: RunningIdentity) -> None:
    first = await identity.sign_up()
    second = await identity.stub.Refresh(pb.RefreshRequest(refresh_token=first.refresh_token))
    await identity.stub.Logout(pb.LogoutRequest(refresh_token=second.refresh_token))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.Refresh(pb.RefreshRequest(refresh_token=second.refresh_token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_current_user_needs_a_valid_token(identity: RunningIdentity) -> None:
    for metadata in ((), bearer("not.a.jwt"), (("authorization", "Basic abc"),)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("forge", ["alg_none", "wrong_key", "expired", "wrong_audience"])
async def test_tampered_jwts_are_unauthenticated_over_grpc(
    identity: RunningIdentity, forge: str
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    real = await identity.sign_up()
    claims = jwt.decode(real.access_token, options={"verify_signature": False})
    kid = jwt.get_unverified_header(real.access_token)["kid"]
    private = identity.app.keys._private[kid]  # type: ignore[union-attr]
    if forge == "alg_none":
        token = jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
    elif forge == "wrong_key":
        token = jwt.encode(
            claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": kid}
        )
    elif forge == "expired":
        old = {**claims, "exp": int(time.time()) - 60, "iat": int(time.time()) - 1000}
        token = jwt.encode(old, private, algorithm="EdDSA", headers={"kid": kid})
    else:
        token = jwt.encode(
            {**claims, "aud": "elsewhere"}, private, algorithm="EdDSA", headers={"kid": kid}
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=bearer(token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_jwks_lists_every_signing_key(
    database_url: str, db_passwords: dict[str, str]
) -> None:
    old, new = generate_signing_key("old"), generate_signing_key("new")
    async with running_identity(database_url, db_passwords, signing_keys=(old,)) as before:
        token = (await before.sign_up()).access_token
    async with running_identity(database_url, db_passwords, signing_keys=(new, old)) as after:
        jwks = await after.stub.GetJwks(pb.GetJwksRequest())
        assert [k.kid for k in jwks.keys] == ["new", "old"]
        assert {(k.kty, k.crv, k.alg, k.use) for k in jwks.keys} == {
            ("OKP", "Ed25519", "EdDSA", "sig")
        }
        # Rotation logs nobody out: a token from the old key still works ...
        me = await after.stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=bearer(token))
        assert me.id
        # ... and new tokens are signed by the new key.
        fresh = await after.sign_up()
        assert jwt.get_unverified_header(fresh.access_token)["kid"] == "new"


async def test_service_tokens_need_the_right_secret(identity: RunningIdentity) -> None:
    token = await identity.service_token("runtime")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "runtime" and claims["kind"] == "service"
    for service, secret in (("runtime", "wrong"), ("nobody", "secret-runtime")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.IssueServiceToken(
                pb.IssueServiceTokenRequest(service=service, secret=secret)
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_internal_rpcs_refuse_user_tokens(identity: RunningIdentity) -> None:
    user = await identity.sign_up()
    meta = bearer(user.access_token)
    calls = [
        identity.stub.Authorize(
            pb.AuthorizeRequest(
                user_id=user.user.id, organization_id="o", permission="projects.get"
            ),
            metadata=meta,
        ),
        identity.stub.AppendAuditEvents(pb.AppendAuditEventsRequest(), metadata=meta),
        identity.stub.IssueServiceToken(
            pb.IssueServiceTokenRequest(service="runtime", secret="secret-runtime"), metadata=meta
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stream = identity.stub.WatchEvents(events_pb2.WatchEventsRequest(), metadata=meta)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # and anonymous callers
        await identity.stub.AppendAuditEvents(pb.AppendAuditEventsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_no_password_or_token_reaches_logs_or_audit(
    identity: RunningIdentity, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret_password = f"unique secret {secrets.token_hex(8)}"
    email = _email()
    with caplog.at_level(logging.DEBUG):
        reply = await identity.sign_up(email, password=secret_password)
        with pytest.raises(grpc.aio.AioRpcError):
            await identity.stub.Login(pb.LoginRequest(email=email, password=secret_password + "x"))
        await identity.stub.Refresh(pb.RefreshRequest(refresh_token=reply.refresh_token))
    logged = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    conn = await asyncpg.connect(database_url)
    try:
        audit = str(await conn.fetch("SELECT * FROM identity.audit_logs"))
        tokens = str(await conn.fetch("SELECT * FROM identity.refresh_tokens"))
        users = str(await conn.fetch("SELECT * FROM identity.users WHERE email = $1", email))
    finally:
        await conn.close()
    for text in (logged, audit, tokens, users):
        assert secret_password not in text
        assert reply.refresh_token not in text
        assert reply.access_token not in text


async def test_clean_up_deletes_dead_families_and_stale_throttle_rows_once(
    identity: RunningIdentity, database_url: str
) -> None:
    """Families whose newest token expired and throttle rows that count nothing go; a live
    family (even with an expired, rotated first token) and throttle rows in force stay. Two
    replicas cleaning at once delete each row once."""
    assert identity.app is not None
    live = await identity.sign_up()
    rotated = await identity.sign_up()
    newest = await identity.stub.Refresh(pb.RefreshRequest(refresh_token=rotated.refresh_token))
    dead = await identity.sign_up()
    dead_next = await identity.stub.Refresh(pb.RefreshRequest(refresh_token=dead.refresh_token))
    stale, blocked, recent = _email(), _email(), _email()
    conn = await asyncpg.connect(database_url)
    try:
        family = """SELECT family_id FROM identity.refresh_tokens
                     WHERE user_id = $1 LIMIT 1"""
        dead_family = await conn.fetchval(family, dead.user.id)
        rotated_family = await conn.fetchval(family, rotated.user.id)
        await conn.execute(
            "UPDATE identity.refresh_tokens SET expires_at = now() - interval '1 second'"
            " WHERE family_id = $1",
            dead_family,
        )
        await conn.execute(  # the used first token only: the family lives on in `newest`
            "UPDATE identity.refresh_tokens SET expires_at = now() - interval '1 day'"
            " WHERE family_id = $1 AND used_at IS NOT NULL",
            rotated_family,
        )
        await conn.executemany(
            "INSERT INTO identity.login_throttle (email, failures, last_failure_at, blocked_until)"
            " VALUES ($1, 3, now() - $2::interval, now() + $3::interval)",
            [
                (stale, timedelta(hours=2), timedelta(hours=-1)),
                (blocked, timedelta(hours=2), timedelta(minutes=5)),
                (recent, timedelta(minutes=5), timedelta(minutes=-1)),
            ],
        )
        cleaned = await asyncio.gather(identity.app.cleanup.clean(), identity.app.cleanup.clean())
        assert sum(c.refresh_tokens for c in cleaned) >= 2  # (others' dead families too)
        left = await conn.fetchval(
            "SELECT count(*) FROM identity.refresh_tokens WHERE family_id = $1", dead_family
        )
        throttled = await conn.fetch(
            "SELECT email FROM identity.login_throttle WHERE email = ANY($1::text[])",
            [stale, blocked, recent],
        )
    finally:
        await conn.close()
    assert left == 0
    assert {r["email"] for r in throttled} == {blocked, recent}
    # What stayed still works; what went is refused as any unknown token is.
    await identity.stub.Refresh(pb.RefreshRequest(refresh_token=live.refresh_token))
    await identity.stub.Refresh(pb.RefreshRequest(refresh_token=newest.refresh_token))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.Refresh(pb.RefreshRequest(refresh_token=dead_next.refresh_token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
