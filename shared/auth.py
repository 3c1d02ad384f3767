"""Who is calling, and may they: what every service uses to authenticate and authorize.

- `TokenVerifier` (the interceptor's `Authenticator`): verifies identity's Ed25519 JWTs
  locally. Algorithm pinned to EdDSA, `kid` header, issuer and audience checked, `exp`
  required. Keys come from a JWKS source (identity's GetJwks), fetched on first use and
  again, rate-limited, when a token names a key not seen yet (key rotation).
- `require_user` / `require_service` / `require_platform_admin` / `require_caller`: guards a
  handler calls first.
- `Authorizer` / `RemoteAuthorizer`: "may the caller do PERMISSION in ORG?", answered by
  identity.Authorize with a short cache; non-members get PERMISSION_DENIED whether or not
  the organization exists (AIP-193).
- `ServiceTokenSource`: a service's own token for calls to other services (the
  `token_provider` of `shared.clients.Clients`), renewed before it expires.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from shared.clients import Clients, open_channel
from shared.context import Principal, PrincipalKind, current_principal
from shared.errors import (
    DomainError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from shared.interceptors import auth_error_for_call
from shared.settings import Settings, SigningKey

ALGORITHM = "EdDSA"
IDENTITY_SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]

# Claims identity puts in every token it signs.
CLAIM_KIND = "kind"  # "user" | "service"
CLAIM_ADMIN = "adm"  # platform admin flag (users only)

JwksSource = Callable[[], Awaitable[Sequence[dict[str, Any]]]]

Role = int  # hangar.identity.v1.Role


def generate_signing_key(kid: str | None = None) -> SigningKey:
    """A fresh Ed25519 signing key as PKCS#8 PEM (settings, local credentials, tests)."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SigningKey(kid or f"k-{secrets.token_hex(6)}", pem.decode())


class TokenVerifier:
    """Verifies access and service tokens against a JWKS; caches verified tokens until exp."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks: JwksSource,
        refetch_interval: float = 10.0,
        leeway: float = 5.0,
        cache_size: int = 10_000,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._jwks = jwks
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._fetch_lock = asyncio.Lock()
        self.refetch_interval = refetch_interval
        self.leeway = leeway
        self._verified: dict[str, tuple[float, Principal]] = {}
        self._cache_size = cache_size

    @classmethod
    def for_settings(cls, settings: Settings, jwks: JwksSource) -> TokenVerifier:
        return cls(issuer=settings.jwt_issuer, audience=settings.jwt_audience, jwks=jwks)

    async def authenticate(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None and cached[0] > time.time():
            return cached[1]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token", reason="TOKEN_INVALID") from None
        kid = header.get("kid")
        if header.get("alg") != ALGORITHM or not isinstance(kid, str) or not kid:
            raise Unauthenticated("token must be EdDSA-signed with a kid", reason="TOKEN_INVALID")
        key = await self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
        except jwt.PyJWTError:
            raise Unauthenticated("token did not verify", reason="TOKEN_INVALID") from None
        principal = principal_from_claims(claims)
        if len(self._verified) >= self._cache_size:
            self._verified.clear()
        self._verified[token] = (float(claims["exp"]), principal)
        return principal

    async def _key(self, kid: str) -> Any:
        if kid in self._keys:
            return self._keys[kid]
        async with self._fetch_lock:
            if kid in self._keys:
                return self._keys[kid]
            now = time.monotonic()
            if self._fetched_at is None or now - self._fetched_at >= self.refetch_interval:
                try:
                    keys = await self._jwks()
                except Exception as exc:
                    # Identity is down or slow: the token may well be good, so not a 401
                    # (clients would drop it) but a 503 to retry.
                    raise Unavailable(
                        "cannot fetch the token signing keys now; retry shortly",
                        reason="KEYS_UNAVAILABLE",
                    ) from exc
                self._fetched_at = now
                self._keys = _public_keys(keys)
                self._verified.clear()  # a key may have been withdrawn
        if kid not in self._keys:
            raise Unauthenticated("token signed by an unknown key", reason="TOKEN_INVALID")
        return self._keys[kid]


def _public_keys(jwks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    keys = {}
    for jwk in jwks:
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or not jwk.get("kid"):
            continue
        keys[jwk["kid"]] = jwt.PyJWK({"kty": "OKP", "crv": "Ed25519", "x": jwk["x"]}).key
    return keys


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    kind = claims.get(CLAIM_KIND)
    if kind == "user":
        return Principal(
            kind=PrincipalKind.USER,
            subject=str(claims["sub"]),
            is_platform_admin=bool(claims.get(CLAIM_ADMIN, False)),
            claims=claims,
        )
    if kind == "service":
        return Principal(kind=PrincipalKind.SERVICE, subject=str(claims["sub"]), claims=claims)
    raise Unauthenticated("token names no known principal kind", reason="TOKEN_INVALID")


class IdentityJwks:
    """A JwksSource that asks identity's GetJwks (anonymous; its own channel, no token)."""

    def __init__(self, settings: Settings) -> None:
        self.address = settings.addresses["identity"]
        self.timeout = settings.call_timeout_seconds
        self._channel: grpc.aio.Channel | None = None

    async def __call__(self) -> Sequence[dict[str, Any]]:
        if self._channel is None:
            self._channel = open_channel(
                self.address, services=[IDENTITY_SERVICE], default_timeout=self.timeout
            )
        stub = identity_pb2_grpc.IdentityServiceStub(self._channel)
        reply = await stub.GetJwks(identity_pb2.GetJwksRequest())
        return [{"kty": k.kty, "crv": k.crv, "x": k.x, "kid": k.kid} for k in reply.keys]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


# ----------------------------------------------------------------------------- guards


def _anonymous_error(what: str) -> DomainError:
    return auth_error_for_call() or Unauthenticated(f"{what}: send 'authorization: Bearer ...'")


def require_user() -> Principal:
    """The signed-in user; UNAUTHENTICATED without a valid user token."""
    principal = current_principal()
    error = auth_error_for_call()
    if error is not None:
        raise error
    if principal.is_user:
        return principal
    if principal.is_service:
        raise PermissionDenied("this call needs a user token, not a service token")
    raise _anonymous_error("sign in first")


def require_service(*names: str) -> Principal:
    """A service caller (one of `names` if given); user tokens get PERMISSION_DENIED."""
    principal = current_principal()
    error = auth_error_for_call()
    if error is not None:
        raise error
    if principal.is_service and (not names or principal.subject in names):
        return principal
    if principal.kind is PrincipalKind.ANONYMOUS:
        raise _anonymous_error("this internal call needs a service token")
    raise PermissionDenied("internal call: refused for this caller")


def require_caller() -> Principal:
    """A user or a service; anonymous callers get UNAUTHENTICATED."""
    principal = current_principal()
    error = auth_error_for_call()
    if error is not None:
        raise error
    if principal.kind is PrincipalKind.ANONYMOUS:
        raise _anonymous_error("sign in first")
    return principal


def require_platform_admin() -> Principal:
    principal = require_user()
    if not principal.is_platform_admin:
        raise PermissionDenied("platform admins only")
    return principal


# ------------------------------------------------------------------------ authorization


class Authorizer(Protocol):
    """May the current caller use `permission` in `organization_id`? Returns the role."""

    async def require(self, organization_id: str, permission: str) -> Role: ...


class RemoteAuthorizer:
    """identity.Authorize through a Clients channel, with a short TTL cache."""

    def __init__(self, clients: Clients, *, ttl_seconds: float = 5.0, max_entries: int = 50_000):
        self.clients = clients
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._cache: dict[tuple[str, str, str, str], tuple[float, bool, Role]] = {}

    async def require(self, organization_id: str, permission: str) -> Role:
        principal = require_caller()
        if not organization_id:
            raise InvalidArgument.field("organization_id", "required")
        key = (principal.kind.value, principal.subject, organization_id, permission)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            _, allowed, role = cached
        else:
            request = identity_pb2.AuthorizeRequest(
                organization_id=organization_id, permission=permission
            )
            if principal.is_user:
                request.user_id = principal.subject
            else:
                request.service = principal.subject
            stub = self.clients.stub(
                "identity", identity_pb2_grpc.IdentityServiceStub, IDENTITY_SERVICE
            )
            try:
                reply = await stub.Authorize(request)
            except grpc.aio.AioRpcError as exc:
                # Identity down or slow: a 503 to retry, not a 500. Any other failure of
                # Authorize is a bug, left to the interceptor (INTERNAL).
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise Unavailable(
                        "cannot check permissions now: identity is unavailable; retry shortly",
                        reason="IDENTITY_UNAVAILABLE",
                    ) from exc
                raise
            allowed, role = reply.allowed, reply.role
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            self._cache[key] = (now + self.ttl, allowed, role)
        if not allowed:
            raise PermissionDenied(f"missing permission {permission} in this organization")
        return role


# ------------------------------------------------------------------------ service tokens


class ServiceTokenSource:
    """This service's token from identity.IssueServiceToken, cached and renewed early.

    It keeps its own channel to identity (no token on it: it is how tokens are obtained),
    so it can be the `token_provider` of the `Clients` every other call goes through.
    """

    def __init__(self, settings: Settings, *, renew_before_seconds: float = 60.0) -> None:
        self.service = settings.service
        self.secret = settings.service_secrets.get(settings.service, "")
        self.address = settings.addresses["identity"]
        self.timeout = settings.call_timeout_seconds
        self.renew_before = renew_before_seconds
        self._token = ""
        self._renew_at = 0.0
        self._lock = asyncio.Lock()
        self._channel: grpc.aio.Channel | None = None

    async def __call__(self) -> str:
        if self._token and time.time() < self._renew_at:
            return self._token
        async with self._lock:
            if self._token and time.time() < self._renew_at:
                return self._token
            if self._channel is None:
                self._channel = open_channel(
                    self.address, services=[IDENTITY_SERVICE], default_timeout=self.timeout
                )
            stub = identity_pb2_grpc.IdentityServiceStub(self._channel)
            reply = await stub.IssueServiceToken(
                identity_pb2.IssueServiceTokenRequest(service=self.service, secret=self.secret)
            )
            now = time.time()
            lifetime = max(0.0, reply.expires_at.seconds - now)
            self._token = reply.token
            # Renew early, but never so early that a short TTL means one issue per call.
            self._renew_at = now + lifetime - min(self.renew_before, lifetime / 2)
            return self._token

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
