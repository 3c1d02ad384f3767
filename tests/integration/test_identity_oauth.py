"""OpenID Connect sign-in and linking against a local test issuer."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hangar.identity.v1 import identity_pb2 as pb
from shared.settings import OAuthProvider
from tests.support.identity import RunningIdentity, TestIssuer, bearer, running_identity

ISSUER = TestIssuer()
# Configured without an authorization endpoint: verifies id_tokens, is not offered to browsers.
SECRET_URL = "https://hidden.test/jwks?token=do-not-list"


@pytest.fixture(scope="module")
async def identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    oauth = {
        "test": replace(
            ISSUER.provider(),
            authorization_endpoint="https://accounts.test/authorize",
            label="Test IdP",
            scopes=("openid", "email", "profile"),
        ),
        "hidden": OAuthProvider(issuer="https://hidden.test", client_id="c", jwks_url=SECRET_URL),
    }
    async with running_identity(database_url, db_passwords, oauth=oauth) as running:
        yield running


def _email() -> str:
    return f"oidc-{secrets.token_hex(5)}@example.com"


async def _oauth(identity: RunningIdentity, token: str) -> pb.AuthResponse:
    return await identity.stub.LoginWithOAuth(
        pb.LoginWithOAuthRequest(provider="test", id_token=token)
    )


async def test_verified_email_creates_an_account_and_signs_in_again(
    identity: RunningIdentity,
) -> None:
    email, subject = _email(), secrets.token_hex(8)
    first = await _oauth(identity, ISSUER.id_token(subject, email))
    again = await _oauth(identity, ISSUER.id_token(subject, email))
    assert first.user.id == again.user.id and first.user.email == email
    me = await identity.stub.GetCurrentUser(
        pb.GetCurrentUserRequest(), metadata=bearer(again.access_token)
    )
    assert me.id == first.user.id


async def test_never_merges_into_an_unverified_local_account(identity: RunningIdentity) -> None:
    email = _email()
    local = await identity.sign_up(email)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _oauth(identity, ISSUER.id_token(secrets.token_hex(8), email))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The local owner can still link explicitly, proving both.
    subject = secrets.token_hex(8)
    linked = await identity.stub.LinkOAuthAccount(
        pb.LinkOAuthAccountRequest(provider="test", id_token=ISSUER.id_token(subject, email)),
        metadata=bearer(local.access_token),
    )
    assert linked.id == local.user.id
    assert (await _oauth(identity, ISSUER.id_token(subject, email))).user.id == local.user.id


async def test_unverified_provider_email_creates_nothing(identity: RunningIdentity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _oauth(
            identity, ISSUER.id_token(secrets.token_hex(8), _email(), email_verified=False)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_one_identity_links_to_one_account(identity: RunningIdentity) -> None:
    a, b = await identity.sign_up(), await identity.sign_up()
    token = ISSUER.id_token(secrets.token_hex(8), _email())
    await identity.stub.LinkOAuthAccount(
        pb.LinkOAuthAccountRequest(provider="test", id_token=token), metadata=bearer(a.access_token)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.LinkOAuthAccount(
            pb.LinkOAuthAccountRequest(provider="test", id_token=token),
            metadata=bearer(b.access_token),
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("forge", ["audience", "issuer", "expired", "key"])
async def test_bad_id_tokens_are_unauthenticated(identity: RunningIdentity, forge: str) -> None:
    subject, email = secrets.token_hex(8), _email()
    token = {
        "audience": lambda: ISSUER.id_token(subject, email, audience="someone-else"),
        "issuer": lambda: ISSUER.id_token(subject, email, issuer="https://evil.test"),
        "expired": lambda: ISSUER.id_token(subject, email, expires_in=-120),
        "key": lambda: ISSUER.id_token(subject, email, key=Ed25519PrivateKey.generate()),
    }[forge]()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _oauth(identity, token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_unknown_provider_is_invalid_argument(identity: RunningIdentity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.LoginWithOAuth(pb.LoginWithOAuthRequest(provider="nope", id_token="x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_links_by_email_only_to_a_verified_account(
    identity: RunningIdentity, database_url: str
) -> None:
    import asyncpg

    email = _email()
    local = await identity.sign_up(email)
    conn = await asyncpg.connect(database_url)  # as if the owner had confirmed the email
    try:
        await conn.execute(
            "UPDATE identity.users SET email_verified = true WHERE id = $1", local.user.id
        )
    finally:
        await conn.close()
    signed_in = await _oauth(identity, ISSUER.id_token(secrets.token_hex(8), email))
    assert signed_in.user.id == local.user.id


async def test_lists_providers_a_browser_can_start_with_and_nothing_secret(
    identity: RunningIdentity,
) -> None:
    reply = await identity.stub.ListOAuthProviders(pb.ListOAuthProvidersRequest())
    assert [json_format.MessageToDict(p) for p in reply.providers] == [
        {
            "name": "test",
            "label": "Test IdP",
            "authorizationEndpoint": "https://accounts.test/authorize",
            "clientId": ISSUER.client_id,
            "scopes": ["openid", "email", "profile"],
        }
    ]
    # The verification keys and the unlisted provider's settings stay in identity.
    text = json.dumps(json_format.MessageToDict(reply))
    assert "hidden" not in text and SECRET_URL not in text
    assert ISSUER.kid not in text and ISSUER.jwks()["keys"][0]["x"] not in text


async def test_a_matching_nonce_signs_in(identity: RunningIdentity) -> None:
    email, nonce = _email(), secrets.token_urlsafe(16)
    token = ISSUER.id_token(secrets.token_hex(8), email, nonce=nonce)
    signed_in = await identity.stub.LoginWithOAuth(
        pb.LoginWithOAuthRequest(provider="test", id_token=token, nonce=nonce)
    )
    assert signed_in.user.email == email and signed_in.access_token


@pytest.mark.parametrize("claim", ["another sign-in's", "none"])
async def test_a_nonce_the_id_token_does_not_carry_is_refused_naming_the_field(
    identity: RunningIdentity, claim: str
) -> None:
    other = secrets.token_urlsafe(16) if claim != "none" else ""
    token = ISSUER.id_token(secrets.token_hex(8), _email(), nonce=other)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.LoginWithOAuth(
            pb.LoginWithOAuthRequest(provider="test", id_token=token, nonce="this-sign-in")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nonce" in (caught.value.details() or "")
    status = rpc_status.from_call(caught.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    assert [v.field for v in bad.field_violations] == ["nonce"]


async def test_without_a_nonce_a_token_carrying_one_still_signs_in(
    identity: RunningIdentity,
) -> None:
    """Callers that predate the nonce field (the CLI, scripts) keep working."""
    token = ISSUER.id_token(secrets.token_hex(8), _email(), nonce=secrets.token_urlsafe(16))
    assert (await _oauth(identity, token)).access_token
