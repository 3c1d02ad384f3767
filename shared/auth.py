"""Who is calling, and may they: what every service uses to authenticate and authorize.

- `TokenVerifier` (the interceptor's `Authenticator`): verifies identity's Ed25519 JWTs
  locally. Algorithm pinned to EdDSA, `kid` header, issuer and audience checked, `exp`
  required. Keys come from a JWKS source (identity's GetJwks), fetched on first use and
  again, rate-limited, when a token names a key not seen yet (key rotation). A user token's
  session (`sid` claim) is checked on every call: a signed-out session is refused.
- `require_user` / `require_service` / `require_platform_admin` / `require_caller`: guards a
  handler calls first.
- `Authorizer` / `RemoteAuthorizer`: "may the caller do PERMISSION in ORG?", answered by
  identity.Authorize with a cache; non-members get PERMISSION_DENIED whether or not the
  organization exists (AIP-193).
- `AccessWatch`: what makes those caches safe. Identity is the source of truth, and a change
  of access (a member added, demoted or removed, an organization deleted, a sign-out) must
  hold on every service from the moment the change's response returns. Each service process
  holds one identity.WatchAccess stream: it starts from a snapshot of the revoked sessions,
  then receives every change as an invalidation, drops what it names, and acknowledges;
  identity answers the change only once every watcher acknowledged, or was cut off and its
  lease ran out (services/identity/access.py has identity's side and the argument). Caches
  are used only under a live lease (the watcher heard back, within `lease`, from a ping it
  sent); otherwise every decision goes to identity.Authorize and every session to
  identity.CheckSession. An Authorize answer fetched before an invalidation and arriving
  after it is used for its own call but never cached (the watch's `generation`). Allow and
  deny are cached alike, and for `ttl_seconds` at most as a backstop for changes made outside
  identity's use cases (an operator's SQL).
- `ServiceTokenSource`: a service's own token for calls to other services (the
  `token_provider` of `shared.clients.Clients`), renewed before it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from shared.cache import TtlCache
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
from shared.metrics import Metrics
from shared.settings import Settings, SigningKey

log = logging.getLogger(__name__)

ALGORITHM = "EdDSA"
IDENTITY_SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]

# Claims identity puts in every token it signs.
CLAIM_KIND = "kind"  # "user" | "service"
CLAIM_ADMIN = "adm"  # platform admin flag (users only)
CLAIM_SESSION = "sid"  # the sign-in session (users only): signing out revokes its tokens
# An access token exchanged for an API token: its scope caps the user's role, and the one
# organization it may act in (empty: any of the user's).
CLAIM_SCOPE = "scp"
CLAIM_TOKEN_ORG = "torg"
CLAIM_TOKEN_PROJECT = "tprj"  # ...and the one project it may act on
# Its session (`sid`): "tok_<API token id>", so that revoking the token ends it.
API_TOKEN_SESSION = "tok_"


def require_token_project(project_id: str) -> None:
    """Refuse a caller whose API token is limited to another project (services call it
    wherever they act on a project; Authorize already refused non-project permissions)."""
    limited = current_principal().claims.get(CLAIM_TOKEN_PROJECT)
    if limited and limited != project_id:
        raise PermissionDenied("this API token is limited to another project")


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


class SessionCheck(Protocol):
    """Raises Unauthenticated when a session was signed out or revoked (Unavailable when
    that cannot be known now)."""

    async def require_session(self, session_id: str) -> None: ...


def session_ended() -> Unauthenticated:
    return Unauthenticated(
        "this session has ended (signed out or revoked); sign in again", reason="SESSION_REVOKED"
    )


class TokenVerifier:
    """Verifies access and service tokens against a JWKS; caches verified tokens until exp.

    With `sessions`, a user token's session is checked on every call, cached or not (the
    agent, which takes service tokens only, has none)."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks: JwksSource,
        refetch_interval: float = 10.0,
        leeway: float = 5.0,
        cache_size: int = 10_000,
        sessions: SessionCheck | None = None,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._jwks = jwks
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._fetch_lock = asyncio.Lock()
        self.refetch_interval = refetch_interval
        self.leeway = leeway
        # token -> (principal, session) until the token's own expiry (`exp`, wall clock)
        self._verified: TtlCache[str, tuple[Principal, str]] = TtlCache(
            0.0, cache_size, clock=time.time
        )
        self.sessions = sessions

    @classmethod
    def for_settings(
        cls, settings: Settings, jwks: JwksSource, *, sessions: SessionCheck | None = None
    ) -> TokenVerifier:
        return cls(
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            jwks=jwks,
            sessions=sessions,
        )

    async def authenticate(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None:
            principal, session = cached
        else:
            principal, session = await self._verify(token)
        if session and self.sessions is not None:
            await self.sessions.require_session(session)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, str]:
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
        session = str(claims.get(CLAIM_SESSION) or "") if principal.is_user else ""
        self._verified.put(token, (principal, session), expires_at=float(claims["exp"]))
        return principal, session

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


class _OwnIdentityChannel:
    """A channel of its own to identity, opened at first use, with no token on it (keys and
    tokens are how one is had); with `metrics`, counted (grpc_client_*) as `Clients`' are."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self._open = functools.partial(
            open_channel,
            settings.addresses["identity"],
            services=[IDENTITY_SERVICE],
            default_timeout=settings.call_timeout_seconds,
            metrics=metrics,
        )
        self._channel: grpc.aio.Channel | None = None

    def _identity(self) -> identity_pb2_grpc.IdentityServiceStub:
        if self._channel is None:
            self._channel = self._open()
        return identity_pb2_grpc.IdentityServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class IdentityJwks(_OwnIdentityChannel):
    """A JwksSource that asks identity's GetJwks (anonymous; its own channel, no token)."""

    async def __call__(self) -> Sequence[dict[str, Any]]:
        reply = await self._identity().GetJwks(identity_pb2.GetJwksRequest())
        return [{"kty": k.kty, "crv": k.crv, "x": k.x, "kid": k.kid} for k in reply.keys]


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


class _Lease(Protocol):
    lease_until: float


class _NoLease:
    lease_until = 0.0  # never live: without a watch, nothing cached is ever used


_NO_LEASE = _NoLease()


class RemoteAuthorizer:
    """identity.Authorize through a Clients channel, with a cache kept true by an
    AccessWatch (without one, nothing is cached)."""

    def __init__(
        self,
        clients: Clients,
        *,
        watch: AccessWatch | None = None,
        ttl_seconds: float = 5.0,
        max_entries: int = 50_000,
    ):
        self.clients = clients
        self.watch = watch
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        # (principal kind, subject, organization, permission) -> (expires, allowed, role),
        # and the keys of each organization, for invalidations.
        self._cache: dict[tuple[str, str, str, str], tuple[float, bool, Role]] = {}
        self._by_org: dict[str, set[tuple[str, str, str, str]]] = {}
        self._lease: _Lease = watch if watch is not None else _NO_LEASE
        if watch is not None:
            watch.attach(self)

    async def require(self, organization_id: str, permission: str) -> Role:
        principal = require_caller()
        if not organization_id:
            raise InvalidArgument.field("organization_id", "required")
        # The kind itself (a str enum), not .value: the hit path is this function. An API
        # token's scope and organization are part of who asks.
        claims = principal.claims
        scope = str(claims.get(CLAIM_SCOPE) or "")
        token_org = str(claims.get(CLAIM_TOKEN_ORG) or "")
        token_project = str(claims.get(CLAIM_TOKEN_PROJECT) or "")
        subject = (
            f"{principal.subject}\x00{scope}\x00{token_org}\x00{token_project}"
            if scope
            else principal.subject
        )
        key = (principal.kind, subject, organization_id, permission)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now < self._lease.lease_until:
            _, allowed, role = cached
        else:
            watch = self.watch
            generation = watch.generation if watch is not None else -1
            request = identity_pb2.AuthorizeRequest(
                organization_id=organization_id, permission=permission
            )
            if principal.is_user:
                request.user_id = principal.subject
                request.token_scope = scope
                request.token_organization_id = token_org
                request.token_project_id = token_project
            else:
                request.service = principal.subject
            reply = await self._ask(request)
            allowed, role = reply.allowed, reply.role
            # Not if an invalidation (or a new stream) came in while the answer was on its
            # way: it may be the answer the invalidation made stale.
            if watch is not None and watch.generation == generation:
                self._remember(key, (now + self.ttl, allowed, role))
        if not allowed:
            raise PermissionDenied(f"missing permission {permission} in this organization")
        return role

    async def _ask(self, request: identity_pb2.AuthorizeRequest) -> identity_pb2.AuthorizeResponse:
        stub = self.clients.stub(
            "identity", identity_pb2_grpc.IdentityServiceStub, IDENTITY_SERVICE
        )
        try:
            return await stub.Authorize(request)  # type: ignore[no-any-return]
        except grpc.aio.AioRpcError as exc:
            # Identity down or slow: a 503 to retry, not a 500. Any other failure of
            # Authorize is a bug, left to the interceptor (INTERNAL).
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    "cannot check permissions now: identity is unavailable; retry shortly",
                    reason="IDENTITY_UNAVAILABLE",
                ) from exc
            raise

    def _remember(self, key: tuple[str, str, str, str], entry: tuple[float, bool, Role]) -> None:
        if len(self._cache) >= self.max_entries:
            self.clear()
        self._cache[key] = entry
        self._by_org.setdefault(key[2], set()).add(key)

    def forget(self, user_id: str, organization_id: str) -> None:
        """Drop the user's decisions in the organization ("" for either: all of them)."""
        if not user_id and not organization_id:
            self.clear()
            return
        orgs = [organization_id] if organization_id else list(self._by_org)
        user = PrincipalKind.USER.value
        for org in orgs:
            keys = self._by_org.get(org)
            if not keys:
                continue
            gone = [k for k in keys if k[0] == user and (not user_id or k[1] == user_id)]
            for k in gone:
                keys.discard(k)
                self._cache.pop(k, None)
            if not keys:
                del self._by_org[org]

    def clear(self) -> None:
        self._cache.clear()
        self._by_org.clear()


class AccessCache(Protocol):
    """A cache of identity's decisions that an AccessWatch keeps true."""

    def forget(self, user_id: str, organization_id: str) -> None: ...

    def clear(self) -> None: ...


class AccessWatch:
    """This process's identity.WatchAccess stream: the lease, the generation and the revoked
    sessions under which its caches (RemoteAuthorizer) may answer. Also the SessionCheck of
    its TokenVerifier. `run` it as a background loop; it reconnects by itself."""

    def __init__(
        self,
        clients: Clients,
        *,
        retry_seconds: float = 0.1,
        max_retry_seconds: float = 2.0,
        goodbye_seconds: float = 0.1,
    ) -> None:
        self.clients = clients
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.goodbye_seconds = goodbye_seconds
        # Caches may answer while time.monotonic() < lease_until.
        self.lease_until = 0.0
        # Bumped by every invalidation and every new stream.
        self.generation = 0
        self._lease_seconds = 0.0
        self._revoked: dict[str, float] = {}  # session id -> unix time it can be forgotten
        self._caches: list[AccessCache] = []
        self._pruned = 0.0
        self.streams = 0  # streams that delivered their snapshot (reconnections + 1)
        self._lease_changed = asyncio.Event()

    def attach(self, cache: AccessCache) -> None:
        self._caches.append(cache)

    def live(self) -> bool:
        return time.monotonic() < self.lease_until

    async def wait_live(self, live: bool = True) -> None:
        """Until the lease is (or, with live=False, is no longer) live. Callers bound it
        (asyncio.timeout)."""
        while self.live() is not live:
            self._lease_changed.clear()
            remaining = self.lease_until - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._lease_changed.wait(), remaining if remaining > 0 else None
                )

    def _set_lease(self, until: float) -> None:
        self.lease_until = until
        self._lease_changed.set()

    # --------------------------------------------------------------- sessions

    async def require_session(self, session_id: str) -> None:
        if session_id in self._revoked:
            raise session_ended()
        if time.monotonic() < self.lease_until:
            return
        stub = self.clients.stub(
            "identity", identity_pb2_grpc.IdentityServiceStub, IDENTITY_SERVICE
        )
        try:
            reply = await stub.CheckSession(identity_pb2.CheckSessionRequest(session_id=session_id))
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                "cannot check the session now: identity is unavailable; retry shortly",
                reason="IDENTITY_UNAVAILABLE",
            ) from exc
        if not reply.active:
            raise session_ended()

    # ----------------------------------------------------------------- stream

    async def run(self) -> None:
        """Follow identity's WatchAccess until cancelled, reconnecting after failures."""
        delay, warned = self.retry_seconds, False
        while True:
            streams = self.streams
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.streams > streams or not warned:  # once per outage
                    log.warning("access watch interrupted; retrying", extra={"error": repr(exc)})
                    warned = True
            if self.streams > streams:  # it was up: retry at once
                delay = self.retry_seconds
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_retry_seconds)

    async def _follow(self) -> None:
        outgoing: asyncio.Queue[identity_pb2.WatchAccessRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[identity_pb2.WatchAccessRequest]:
            while (message := await outgoing.get()) is not None:
                yield message

        stub = self.clients.stub(
            "identity", identity_pb2_grpc.IdentityServiceStub, IDENTITY_SERVICE
        )
        opened = time.monotonic()
        call = stub.WatchAccess(requests())
        # Read in a task of its own: cancelling the task that reads a call cancels the call,
        # and a shutdown still has a goodbye to send on it.
        reader = asyncio.create_task(self._read(call, outgoing, opened))
        try:
            await asyncio.wait({reader})
        except asyncio.CancelledError:
            self._set_lease(0.0)
            await self._goodbye(outgoing, reader)
            raise
        finally:
            self._set_lease(0.0)
            reader.cancel()
            call.cancel()
        if reader.cancelled():  # the call was cancelled under it: a stall
            raise ConnectionError("access watch stalled")
        reader.result()

    async def _read(
        self,
        call: Any,
        outgoing: asyncio.Queue[identity_pb2.WatchAccessRequest | None],
        opened: float,
    ) -> None:
        pings: dict[int, float] = {}
        heard = time.monotonic()
        pinger: asyncio.Task[None] | None = None

        async def ping() -> None:
            number = 0
            while True:
                await asyncio.sleep(self._lease_seconds / 3)
                if time.monotonic() - heard > 3 * self._lease_seconds:
                    call.cancel()  # nothing heard for three leases: a fresh connection
                    return
                number += 1
                pings[number] = time.monotonic()
                outgoing.put_nowait(identity_pb2.WatchAccessRequest(ping=number))

        try:
            async for reply in call:
                heard = time.monotonic()
                which = reply.WhichOneof("message")
                if which == "snapshot":
                    self._start(reply.snapshot, opened)
                    if pinger is None:
                        pinger = asyncio.create_task(ping())
                elif which == "invalidation":
                    await self.apply(reply.invalidation)
                    outgoing.put_nowait(
                        identity_pb2.WatchAccessRequest(acked_sequence=reply.invalidation.sequence)
                    )
                elif which == "heartbeat":
                    sent = pings.pop(reply.heartbeat.ping, None)
                    for older in [n for n in pings if n < reply.heartbeat.ping]:
                        del pings[older]
                    if sent is not None:
                        self._set_lease(max(self.lease_until, sent + self._lease_seconds))
        finally:
            self._set_lease(0.0)
            if pinger is not None:
                pinger.cancel()

    async def _goodbye(
        self,
        outgoing: asyncio.Queue[identity_pb2.WatchAccessRequest | None],
        reader: asyncio.Task[None],
    ) -> None:
        """Tell identity this process no longer uses its caches (so no change waits out its
        lease), and let identity end the stream; briefly: a shutdown must not wait on it."""
        outgoing.put_nowait(identity_pb2.WatchAccessRequest(goodbye=True))
        await asyncio.wait({reader}, timeout=self.goodbye_seconds)

    def _start(self, snapshot: identity_pb2.AccessSnapshot, opened: float) -> None:
        """A new stream: whatever was cached may have missed changes; start from nothing."""
        self.generation += 1
        for cache in self._caches:
            cache.clear()
        self._revoked = {r.id: r.forget_after.seconds for r in snapshot.revoked_sessions if r.id}
        self._lease_seconds = snapshot.lease.ToNanoseconds() / 1e9
        self.streams += 1
        # The snapshot answers the stream's opening, as a heartbeat answers a ping.
        self._set_lease(opened + self._lease_seconds)

    async def apply(self, invalidation: identity_pb2.AccessInvalidation) -> None:
        """Drop what the invalidation names; it is acknowledged once this returns."""
        self.generation += 1
        for session in invalidation.revoked_sessions:
            self._revoked[session.id] = session.forget_after.seconds
        now = time.time()
        if now - self._pruned > 60:  # sessions whose tokens have all expired
            self._revoked = {k: v for k, v in self._revoked.items() if v > now}
            self._pruned = now
        for scope in invalidation.scopes:
            for cache in self._caches:
                cache.forget(scope.user_id, scope.organization_id)


# ------------------------------------------------------------------------ service tokens


class ServiceTokenSource(_OwnIdentityChannel):
    """This service's token from identity.IssueServiceToken, cached and renewed early.

    It keeps its own channel to identity (no token on it: it is how tokens are obtained),
    so it can be the `token_provider` of the `Clients` every other call goes through.
    """

    renew_before = 60.0  # seconds before its expiry

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        super().__init__(settings, metrics=metrics)
        self.service = settings.service
        self.secret = settings.service_secrets.get(settings.service, "")
        self._token = ""
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    async def __call__(self) -> str:
        if self._token and time.time() < self._renew_at:
            return self._token
        async with self._lock:
            if self._token and time.time() < self._renew_at:
                return self._token
            reply = await self._identity().IssueServiceToken(
                identity_pb2.IssueServiceTokenRequest(service=self.service, secret=self.secret)
            )
            now = time.time()
            lifetime = max(0.0, reply.expires_at.seconds - now)
            self._token = reply.token
            # Renew early, but never so early that a short TTL means one issue per call.
            self._renew_at = now + lifetime - min(self.renew_before, lifetime / 2)
            return self._token
