"""Sign-up and login under saturation (issue #14, item 6): identity refuses what its password
pool cannot take in time (RESOURCE_EXHAUSTED with a retry hint, 429 at the gateway) before
writing anything, and a sign-up retried with its request id answers with the account it made.

Real identity in this process, with a deliberately small password pool (one thread, a short
queue, a short wait) so that a burst saturates it every time.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from hangar.identity.v1 import identity_pb2 as pb
from services.gateway.errors import GatewayError
from services.identity.passwords import Passwords
from tests.support.identity import PASSWORD, RunningIdentity, running_identity

Code = grpc.StatusCode
WITHIN = 60.0  # the clients' deadline: generous, never what ends a call here
BURST = 200


@pytest.fixture(scope="module")
async def identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    async with running_identity(database_url, db_passwords) as running:
        assert running.app is not None
        small = Passwords(2, 19 * 1024, 1, workers=1, queue=3, wait_seconds=0.5)
        running.app.accounts.passwords = small
        try:
            yield running
        finally:
            small.close()


def _email(prefix: str = "load") -> str:
    return f"{prefix}-{secrets.token_hex(6)}@example.com"


def _request_id() -> str:
    return secrets.token_hex(16)


async def _users(database_url: str, emails: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT email, count(*) AS n FROM identity.users WHERE email = ANY($1::text[])"
            " GROUP BY email",
            emails,
        )
    finally:
        await conn.close()
    return {r["email"]: r["n"] for r in rows}


async def _throttled(database_url: str, emails: list[str]) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM identity.login_throttle WHERE email = ANY($1::text[])",
                emails,
            )
        )
    finally:
        await conn.close()


def _status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no status details on {error}")


async def _outcome(call: object) -> pb.AuthResponse | grpc.aio.AioRpcError:
    try:
        return await call  # type: ignore[misc, no-any-return]
    except grpc.aio.AioRpcError as exc:
        return exc


async def test_a_burst_answers_ok_or_resource_exhausted_and_the_refused_wrote_nothing(
    identity: RunningIdentity, database_url: str
) -> None:
    existing = [_email("existing") for _ in range(10)]
    for email in existing:
        await identity.sign_up(email)
    signups = [(_email(), _request_id()) for _ in range(BURST // 2)]
    logins = [existing[i % len(existing)] for i in range(BURST // 2)]
    calls = [
        identity.stub.SignUp(
            pb.SignUpRequest(email=email, password=PASSWORD, request_id=rid), timeout=WITHIN
        )
        for email, rid in signups
    ] + [
        identity.stub.Login(pb.LoginRequest(email=email, password=PASSWORD), timeout=WITHIN)
        for email in logins
    ]
    outcomes = await asyncio.gather(*(_outcome(c) for c in calls))

    codes = [o.code() if isinstance(o, grpc.aio.AioRpcError) else Code.OK for o in outcomes]
    assert set(codes) <= {Code.OK, Code.RESOURCE_EXHAUSTED}, {c for c in codes}
    assert Code.RESOURCE_EXHAUSTED in codes and Code.OK in codes  # it was saturated
    for outcome in outcomes:
        if isinstance(outcome, grpc.aio.AioRpcError):
            status = _status(outcome)
            retry = error_details_pb2.RetryInfo()
            assert any(d.Unpack(retry) for d in status.details)
            assert retry.retry_delay.ToNanoseconds() > 0
            http = GatewayError.from_rpc_error(outcome)
            assert http.http == 429 and (b"retry-after", b"1") in http.headers

    refused_signups = [
        (email, rid)
        for (email, rid), o in zip(signups, outcomes[: len(signups)], strict=True)
        if isinstance(o, grpc.aio.AioRpcError)
    ]
    refused_logins = [
        email
        for email, o in zip(logins, outcomes[len(signups) :], strict=True)
        if isinstance(o, grpc.aio.AioRpcError)
    ]
    # Refused before any write: no account, no failed sign-in counted.
    assert await _users(database_url, [e for e, _ in refused_signups]) == {}
    assert await _throttled(database_url, refused_logins) == 0
    made = await _users(database_url, [e for e, _ in signups])
    assert len(made) == len(signups) - len(refused_signups)

    # So a retry is never told the email is taken: retried one at a time, each succeeds
    # (with or without its request id).
    for i, (email, rid) in enumerate(refused_signups):
        retried = await identity.stub.SignUp(
            pb.SignUpRequest(email=email, password=PASSWORD, request_id=rid if i % 2 else ""),
            timeout=WITHIN,
        )
        assert retried.user.email == email
    assert await _users(database_url, [e for e, _ in signups]) == {e: 1 for e, _ in signups}


async def test_a_sign_up_whose_answer_was_lost_is_retried_into_the_same_account(
    identity: RunningIdentity,
) -> None:
    assert identity.app is not None
    email, rid = _email("lost"), _request_id()
    # The first attempt reached identity and committed; its caller never heard back.
    first = await identity.app.accounts.sign_up(email, PASSWORD, "", rid)

    retried = await identity.stub.SignUp(
        pb.SignUpRequest(email=email, password=PASSWORD, request_id=rid), timeout=WITHIN
    )
    assert retried.user.id == first.user.id
    assert retried.access_token and retried.refresh_token
    me = await identity.stub.GetCurrentUser(
        pb.GetCurrentUserRequest(),
        metadata=(("authorization", f"Bearer {retried.access_token}"),),
        timeout=WITHIN,
    )
    assert me.id == first.user.id


async def test_a_sign_up_request_id_is_no_credential(identity: RunningIdentity) -> None:
    email, rid = _email("owned"), _request_id()
    await identity.stub.SignUp(
        pb.SignUpRequest(email=email, password=PASSWORD, request_id=rid), timeout=WITHIN
    )
    cases = [
        # Another password with the same id: as a fresh sign-up of a taken email.
        (
            pb.SignUpRequest(email=email, password="another long password", request_id=rid),
            Code.ALREADY_EXISTS,
        ),
        # The same id for another email: a client bug, said so.
        (
            pb.SignUpRequest(email=_email(), password=PASSWORD, request_id=rid),
            Code.INVALID_ARGUMENT,
        ),
        # No id: a taken email, as before.
        (pb.SignUpRequest(email=email, password=PASSWORD), Code.ALREADY_EXISTS),
        (
            pb.SignUpRequest(email=_email(), password=PASSWORD, request_id="x" * 101),
            Code.INVALID_ARGUMENT,
        ),
    ]
    for request, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await identity.stub.SignUp(request, timeout=WITHIN)
        assert caught.value.code() == code, request


async def test_concurrent_twins_of_one_sign_up_make_one_account_and_all_succeed(
    identity: RunningIdentity, database_url: str
) -> None:
    """A client that retried while its first attempt was still running: one account, and
    every attempt answers with it (none is told the email is taken)."""
    email, rid = _email("twin"), _request_id()
    outcomes = await asyncio.gather(
        *(
            _outcome(
                identity.stub.SignUp(
                    pb.SignUpRequest(email=email, password=PASSWORD, request_id=rid),
                    timeout=WITHIN,
                )
            )
            for _ in range(3)
        )
    )
    answered = [o for o in outcomes if isinstance(o, pb.AuthResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert {o.code() for o in refused} <= {Code.RESOURCE_EXHAUSTED}
    assert answered and {o.user.id for o in answered} == {answered[0].user.id}
    assert await _users(database_url, [email]) == {email: 1}
