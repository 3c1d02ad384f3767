"""OpenID Connect id_token verification for the providers named in settings."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from shared.cache import TtlCache
from shared.errors import FieldViolation, InvalidArgument, Unauthenticated
from shared.settings import OAuthProvider

JWKS_MAX_AGE = 3600.0
JWKS_REFETCH_INTERVAL = 30.0


@dataclass(frozen=True)
class OidcIdentity:
    provider: str
    subject: str
    email: str  # lower-cased; "" when the provider gave none
    email_verified: bool


class OidcVerifier:
    def __init__(self, providers: dict[str, OAuthProvider]) -> None:
        self.providers = providers
        # provider -> (fetched at, its JWKS), for JWKS_MAX_AGE
        self._keys: TtlCache[str, tuple[float, dict[str, Any]]] = TtlCache(JWKS_MAX_AGE)
        self._locks: dict[str, asyncio.Lock] = {}

    def sign_in_options(self) -> list[tuple[str, OAuthProvider]]:
        """The providers a browser can be sent to (an authorization endpoint set), by name."""
        listed = [(n, p) for n, p in self.providers.items() if p.authorization_endpoint]
        return sorted(listed, key=lambda option: option[0])

    async def verify(self, provider_name: str, id_token: str, nonce: str = "") -> OidcIdentity:
        """The identity an id_token proves; with a nonce, only a token issued for it."""
        provider = self.providers.get(provider_name)
        if provider is None:
            raise InvalidArgument.field("provider", "not a configured OAuth provider")
        if not id_token:
            raise InvalidArgument.field("id_token", "required")
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise Unauthenticated("id_token is malformed", reason="ID_TOKEN_INVALID") from None
        if header.get("alg") not in provider.algorithms:
            raise Unauthenticated("id_token algorithm not accepted", reason="ID_TOKEN_INVALID")
        key = await self._key(provider_name, provider, header.get("kid"))
        try:
            claims = jwt.decode(
                id_token,
                key,
                algorithms=list(provider.algorithms),
                issuer=provider.issuer,
                audience=provider.client_id,
                leeway=30,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError:
            raise Unauthenticated("id_token did not verify", reason="ID_TOKEN_INVALID") from None
        if nonce and not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
            raise InvalidArgument(
                FieldViolation("nonce", "does not match the id_token's nonce claim"),
                "the id_token was issued for another sign-in (its nonce differs)",
                reason="NONCE_MISMATCH",
            )
        verified = claims.get("email_verified") in (True, "true")
        return OidcIdentity(
            provider=provider_name,
            subject=str(claims["sub"]),
            email=str(claims.get("email") or "").strip().lower(),
            email_verified=verified,
        )

    async def _key(self, name: str, provider: OAuthProvider, kid: Any) -> Any:
        jwks = await self._jwks(name, provider, refresh=False)
        key = _find(jwks, kid)
        if key is None and provider.jwks is None:
            cached = self._keys.get(name)
            fetched_at = cached[0] if cached else 0.0
            if time.monotonic() - fetched_at > JWKS_REFETCH_INTERVAL:
                key = _find(await self._jwks(name, provider, refresh=True), kid)
        if key is None:
            raise Unauthenticated("id_token signed by an unknown key", reason="ID_TOKEN_INVALID")
        return key

    async def _jwks(self, name: str, provider: OAuthProvider, *, refresh: bool) -> dict[str, Any]:
        if provider.jwks is not None:
            return provider.jwks
        cached = self._keys.get(name)
        if cached and not refresh:
            return cached[1]
        async with self._locks.setdefault(name, asyncio.Lock()):
            try:
                async with httpx.AsyncClient(timeout=5) as client:
                    response = await client.get(provider.jwks_url)
                    response.raise_for_status()
                    jwks: dict[str, Any] = response.json()
                if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
                    raise ValueError("not a JWK set")  # never cached: the next call asks again
                if not all(isinstance(jwk, dict) for jwk in jwks["keys"]):
                    raise ValueError("a key of the set is not a JWK")
            except (httpx.HTTPError, ValueError):
                raise Unauthenticated(
                    "cannot fetch the provider's keys now", reason="PROVIDER_UNAVAILABLE"
                ) from None
            fetched_at = time.monotonic()
            self._keys.put(name, (fetched_at, jwks), expires_at=fetched_at + JWKS_MAX_AGE)
            return jwks


def _find(jwks: dict[str, Any], kid: Any) -> Any:
    keys = jwks.get("keys", [])
    for jwk in keys:
        if (kid is None and len(keys) == 1) or jwk.get("kid") == kid:
            try:
                return jwt.PyJWK(jwk).key
            except jwt.PyJWTError:
                return None
    return None
