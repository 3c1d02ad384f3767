"""shared.auth.TokenVerifier against identity's KeySet: what verifies and what does not."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.identity.tokens import KeySet
from shared.auth import TokenVerifier, generate_signing_key
from shared.context import PrincipalKind
from shared.errors import Unauthenticated

ISSUER, AUDIENCE = "hangar-identity", "hangar"


def _keys(*kids: str) -> tuple[Any, ...]:
    return tuple(generate_signing_key(k) for k in kids)


class CountingJwks:
    def __init__(self, keyset: KeySet) -> None:
        self.keyset = keyset
        self.calls = 0

    async def __call__(self) -> list[dict[str, Any]]:
        self.calls += 1
        return self.keyset.jwks()


def _verifier(source: Any, **kwargs: Any) -> TokenVerifier:
    return TokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=source, **kwargs)


async def test_user_and_service_tokens_verify_into_principals() -> None:
    keyset = KeySet(_keys("a"), issuer=ISSUER, audience=AUDIENCE)
    verifier = _verifier(keyset.jwks_source)
    user = await verifier.authenticate(
        keyset.access_token("u1", is_platform_admin=True, ttl=60, session_id="s1").token
    )
    assert (user.kind, user.subject, user.is_platform_admin) == (PrincipalKind.USER, "u1", True)
    service = await verifier.authenticate(keyset.service_token("runtime", ttl=60).token)
    assert (service.kind, service.subject) == (PrincipalKind.SERVICE, "runtime")


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u1", "iat": now, "exp": now + 60}
    claims["kind"] = "user"
    claims.update(changes)
    return claims


@pytest.mark.parametrize(
    "forge",
    ["alg_none", "wrong_key", "expired", "wrong_audience", "wrong_issuer", "hs256", "no_kid"],
)
async def test_tampered_tokens_are_unauthenticated(forge: str) -> None:
    keys = _keys("a")
    keyset = KeySet(keys, issuer=ISSUER, audience=AUDIENCE)
    verifier = _verifier(keyset.jwks_source)
    own = keyset._private["a"]
    if forge == "alg_none":
        token = jwt.encode(_claims(), None, algorithm="none", headers={"kid": "a"})
    elif forge == "wrong_key":
        token = jwt.encode(
            _claims(), Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": "a"}
        )
    elif forge == "expired":
        token = jwt.encode(
            _claims(exp=int(time.time()) - 120), own, algorithm="EdDSA", headers={"kid": "a"}
        )
    elif forge == "wrong_audience":
        token = jwt.encode(_claims(aud="other"), own, algorithm="EdDSA", headers={"kid": "a"})
    elif forge == "wrong_issuer":
        token = jwt.encode(_claims(iss="evil"), own, algorithm="EdDSA", headers={"kid": "a"})
    elif forge == "hs256":
        token = jwt.encode(_claims(), "a" * 32, algorithm="HS256", headers={"kid": "a"})
    else:
        token = jwt.encode(_claims(), own, algorithm="EdDSA")
    with pytest.raises(Unauthenticated):
        await verifier.authenticate(token)


async def test_payload_edited_after_signing_is_refused() -> None:
    keyset = KeySet(_keys("a"), issuer=ISSUER, audience=AUDIENCE)
    verifier = _verifier(keyset.jwks_source)
    token = keyset.access_token("u1", is_platform_admin=False, ttl=60, session_id="s1").token
    header, payload, signature = token.split(".")
    forged_payload = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(b'"adm":false', b'"adm":true ')
    ).decode()
    with pytest.raises(Unauthenticated):
        await verifier.authenticate(f"{header}.{forged_payload}.{signature}")


async def test_rotation_keeps_old_tokens_valid_and_unknown_kids_refetch_rate_limited() -> None:
    old = _keys("old")
    before = KeySet(old, issuer=ISSUER, audience=AUDIENCE)
    source = CountingJwks(before)
    verifier = _verifier(source, refetch_interval=0.2)
    old_token = before.access_token("u1", is_platform_admin=False, ttl=60, session_id="s1").token
    await verifier.authenticate(old_token)
    assert source.calls == 1

    # Rotate: a new key signs, the old one still verifies.
    after = KeySet((*_keys("new"), *old), issuer=ISSUER, audience=AUDIENCE)
    source.keyset = after
    new_token = after.access_token("u2", is_platform_admin=False, ttl=60, session_id="s1").token
    await asyncio_sleep(0.25)
    assert (await verifier.authenticate(new_token)).subject == "u2"
    assert (await verifier.authenticate(old_token)).subject == "u1"
    assert source.calls == 2

    # A flood of unknown kids costs at most one fetch per interval.
    stranger = KeySet(_keys("stranger"), issuer=ISSUER, audience=AUDIENCE)
    for _ in range(20):
        with pytest.raises(Unauthenticated):
            await verifier.authenticate(
                stranger.access_token("x", is_platform_admin=False, ttl=60, session_id="s1").token
            )
    assert source.calls <= 3


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
