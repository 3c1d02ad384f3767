"""Personal API tokens: how scripts and CI act as their user without a password.

A token's secret ("hgr_" and 256 random bits; the prefix lets secret scanners find it) is
shown once, at creation; identity keeps its SHA-256 only. A client sends it as `Authorization:
Bearer`; the gateway exchanges it (ExchangeApiToken) for a short-lived access token that
carries, besides the user:

- `sid` "tok_<id>": the token is its session, so revoking it ends every access token
  exchanged for it on every service before RevokeApiToken returns (AccessWatch), as a
  logout does;
- `scp`, its scope: "read" caps the user's role at viewer, "deploy" at developer, "admin"
  at owner; Authorize applies the cap, so a token never does more than its owner can at the
  moment of use, nor more than its scope;
- `torg`, the one organization it may act in, when it names one.

Tokens cannot make or revoke tokens (that takes a signed-in user), and never carry the
platform admin claim. Created and revoked tokens are audit entries.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from services.identity import domain
from services.identity.access import AccessBroadcaster, AccessChange, RevokedSession
from services.identity.audit import AuditTrail
from services.identity.tokens import IssuedToken, KeySet
from shared.auth import (
    API_TOKEN_SESSION,
    CLAIM_SCOPE,
    CLAIM_SESSION,
    CLAIM_TOKEN_ORG,
    CLAIM_TOKEN_PROJECT,
    require_user,
)
from shared.db import Database, from_row
from shared.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from shared.ids import new_id
from shared.settings import Settings

SECRET_PREFIX = "hgr_"
DEFAULT_SCOPE = "deploy"
EXCHANGED_TTL_SECONDS = 300  # an exchanged access token's life, at most


@dataclass(frozen=True)
class ApiToken:
    id: str
    user_id: str
    name: str
    scope: str
    organization_id: str
    prefix: str
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    project_id: str = ""


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class ApiTokens:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        keys: KeySet,
        audit: AuditTrail,
        access: AccessBroadcaster,
    ) -> None:
        self.db = db
        self.settings = settings
        self.keys = keys
        self.audit = audit
        self.access = access

    @staticmethod
    def _signed_in_user() -> str:
        principal = require_user()
        if principal.claims.get(CLAIM_SCOPE):
            raise PermissionDenied(
                "API tokens are made and revoked by a signed-in user, not by another token"
            )
        return principal.subject

    async def create(
        self,
        name: str,
        scope: str,
        organization_id: str,
        expires_at: datetime | None,
        project_id: str = "",
    ) -> tuple[ApiToken, str]:
        user_id = self._signed_in_user()
        name = name.strip()
        if not 1 <= len(name) <= 100:
            raise InvalidArgument.field("token.name", "1 to 100 characters")
        scope = domain.check_token_scope(scope.strip() or DEFAULT_SCOPE)
        if project_id and not organization_id:
            raise InvalidArgument.field(
                "token.organization_id", "required with a project: the project's organization"
            )
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise InvalidArgument.field("token.expire_time", "must be in the future")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        async with self.db.transaction() as tx:
            if organization_id:
                role = await tx.fetchval(
                    """SELECT role FROM identity.organization_members
                        WHERE organization_id = $1 AND user_id = $2""",
                    organization_id,
                    user_id,
                )
                if role is None:
                    raise PermissionDenied("you are not a member of this organization")
            row = await tx.fetchrow(
                """INSERT INTO identity.api_tokens
                       (id, user_id, name, scope, organization_id, prefix, secret_hash,
                        expires_at, project_id)
                   VALUES ($1, $2, $3, $4, NULLIF($5, ''), $6, $7, $8, NULLIF($9, ''))
                RETURNING *""",
                new_id(),
                user_id,
                name,
                scope,
                organization_id,
                secret[: len(SECRET_PREFIX) + 4],
                secret_hash(secret),
                expires_at,
                project_id,
            )
            assert row is not None
            token = from_row(ApiToken, row)
            await self.audit.record(
                tx,
                organization_id or None,
                "api_token.created",
                user_id,
                "api_token",
                token.id,
                {"name": name, "scope": scope, "project_id": project_id},
            )
        return token, secret

    async def list(self) -> list[ApiToken]:
        user_id = self._signed_in_user()
        async with self.db.session() as s:
            rows = await s.fetch(
                """SELECT * FROM identity.api_tokens WHERE user_id = $1
                    ORDER BY created_at DESC, id DESC""",
                user_id,
            )
        return [from_row(ApiToken, r) for r in rows]

    async def revoke(self, token_id: str) -> None:
        user_id = self._signed_in_user()
        if not token_id:
            raise InvalidArgument.field("id", "required")
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                """UPDATE identity.api_tokens SET revoked_at = COALESCE(revoked_at, now())
                    WHERE id = $1 AND user_id = $2 RETURNING organization_id""",
                token_id,
                user_id,
            )
            if row is None:
                raise NotFound("you have no such API token", reason="API_TOKEN_NOT_FOUND")
            await self.audit.record(
                tx, row["organization_id"], "api_token.revoked", user_id, "api_token", token_id
            )
        forget_after = datetime.now(UTC) + domain.revoked_lifetime(EXCHANGED_TTL_SECONDS)
        await self.access.announce(
            AccessChange(
                revoked_sessions=(RevokedSession(API_TOKEN_SESSION + token_id, forget_after),)
            )
        )

    async def exchange(self, secret: str) -> IssuedToken:
        """A short-lived access token for a live token's secret (its last use noted)."""
        if not secret.startswith(SECRET_PREFIX):
            raise Unauthenticated("not an API token", reason="API_TOKEN_INVALID")
        async with self.db.transaction() as tx:
            row = await tx.fetchrow(
                """UPDATE identity.api_tokens SET last_used_at = now()
                    WHERE secret_hash = $1 AND revoked_at IS NULL
                      AND (expires_at IS NULL OR expires_at > now())
                RETURNING *""",
                secret_hash(secret),
            )
        if row is None:
            raise Unauthenticated(
                "this API token is unknown, revoked or expired", reason="API_TOKEN_INVALID"
            )
        token = from_row(ApiToken, row)
        ttl = min(EXCHANGED_TTL_SECONDS, self.settings.access_token_ttl_seconds)
        if token.expires_at is not None:
            left = int((token.expires_at - datetime.now(UTC)).total_seconds())
            ttl = max(1, min(ttl, left))
        return self.keys.user_token(
            token.user_id,
            ttl=ttl,
            claims={
                CLAIM_SESSION: API_TOKEN_SESSION + token.id,
                CLAIM_SCOPE: token.scope,
                CLAIM_TOKEN_ORG: token.organization_id,
                CLAIM_TOKEN_PROJECT: token.project_id,
            },
        )
