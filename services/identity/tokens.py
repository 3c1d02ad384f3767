"""Identity's token minting: Ed25519-signed JWTs (access and service tokens), the JWKS that
verifies them, and opaque refresh tokens stored only as hashes."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from shared.auth import ALGORITHM, CLAIM_ADMIN, CLAIM_KIND, CLAIM_SESSION, generate_signing_key
from shared.ids import new_id
from shared.settings import Settings, SigningKey


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_at: int  # unix seconds


class KeySet:
    """The first key signs; every key verifies, so a retired key outlives its tokens."""

    def __init__(self, keys: Sequence[SigningKey], *, issuer: str, audience: str) -> None:
        if not keys:
            raise ValueError("identity needs at least one JWT signing key")
        self.issuer = issuer
        self.audience = audience
        self._private: dict[str, Ed25519PrivateKey] = {}
        for key in keys:
            loaded = serialization.load_pem_private_key(key.private_key_pem.encode(), None)
            if not isinstance(loaded, Ed25519PrivateKey):
                raise ValueError(f"signing key {key.kid} is not an Ed25519 key")
            self._private[key.kid] = loaded
        self.signing_kid = keys[0].kid
        self._jwks = [
            {
                **json.loads(OKPAlgorithm.to_jwk(k.public_key())),
                "kid": kid,
                "use": "sig",
                "alg": ALGORITHM,
            }
            for kid, k in self._private.items()
        ]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeySet:
        keys = settings.jwt_signing_keys
        if not keys:
            # No configured key: an ephemeral one (tokens die with the process). Fine for
            # tests and a single local process; `hangar up` always passes real keys.
            keys = (generate_signing_key("ephemeral"),)
        return cls(keys, issuer=settings.jwt_issuer, audience=settings.jwt_audience)

    def jwks(self) -> list[dict[str, Any]]:
        return [dict(k) for k in self._jwks]

    async def jwks_source(self) -> list[dict[str, Any]]:
        return self.jwks()

    def _sign(self, subject: str, kind: str, ttl: int, extra: dict[str, Any]) -> IssuedToken:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": new_id(),
            CLAIM_KIND: kind,
            **extra,
        }
        token = jwt.encode(
            claims,
            self._private[self.signing_kid],
            algorithm=ALGORITHM,
            headers={"kid": self.signing_kid},
        )
        return IssuedToken(token, now + ttl)

    def access_token(
        self, user_id: str, *, is_platform_admin: bool, ttl: int, session_id: str
    ) -> IssuedToken:
        """A user's token; `session_id` (the refresh-token family) revokes it with the session."""
        return self._sign(
            user_id, "user", ttl, {CLAIM_ADMIN: is_platform_admin, CLAIM_SESSION: session_id}
        )

    def user_token(self, user_id: str, *, ttl: int, claims: dict[str, Any]) -> IssuedToken:
        """A user's token with other claims (an API token's exchange): never platform admin."""
        return self._sign(user_id, "user", ttl, {CLAIM_ADMIN: False, **claims})

    def service_token(self, service: str, *, ttl: int) -> IssuedToken:
        return self._sign(service, "service", ttl, {})


def new_refresh_token() -> str:
    return secrets.token_urlsafe(32)


def refresh_token_hash(token: str) -> bytes:
    # 256 random bits: a fast hash is enough (nothing to brute-force), and lookups stay O(1).
    return hashlib.sha256(token.encode()).digest()
