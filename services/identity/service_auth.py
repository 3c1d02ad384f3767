"""What identity answers other services: service tokens, Authorize, CheckSession and the
WatchAccess stream; and the same authorization and session checks for identity's own
handlers, read straight from its store."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

from services.identity import domain, store
from services.identity.access import AccessBroadcaster, Outgoing, RevokedSession, WatcherMessage
from services.identity.domain import Role
from services.identity.tokens import IssuedToken, KeySet
from shared.auth import (
    API_TOKEN_SESSION,
    CLAIM_SCOPE,
    CLAIM_TOKEN_ORG,
    CLAIM_TOKEN_PROJECT,
    require_caller,
    require_service,
    session_ended,
)
from shared.context import Principal, PrincipalKind, current_principal
from shared.db import Database
from shared.errors import InvalidArgument, PermissionDenied, Unauthenticated
from shared.settings import Settings
from shared.validation import require_id


class LocalAuthorizer:
    """shared.auth.Authorizer for identity itself: the same rules, straight from its store."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def require(self, organization_id: str, permission: str) -> Role | None:
        principal = require_caller()
        require_id(organization_id, "organization_id")
        allowed, role = await decide(self.db, principal, organization_id, permission)
        if not allowed:
            raise PermissionDenied(f"missing permission {permission} in this organization")
        return role


class LocalSessions:
    """shared.auth.SessionCheck for identity itself: the session's rows, read at once (the
    database has every revocation the moment it commits; other services learn of it through
    WatchAccess)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def require_session(self, session_id: str) -> None:
        if not await store.session_active(self.db, session_id):
            raise session_ended()


async def decide(
    db: Database, principal: Principal, organization_id: str, permission: str
) -> tuple[bool, Role | None]:
    """Authorize's answer: users by their role; services only for their granted reads."""
    domain.required_role(permission)  # unknown permission: INVALID_ARGUMENT
    if principal.is_service:
        return domain.service_allows(principal.subject, permission), None
    scope = str(principal.claims.get(CLAIM_SCOPE) or "")
    token_org = str(principal.claims.get(CLAIM_TOKEN_ORG) or "")
    if scope and token_org and token_org != organization_id:
        return False, None  # an API token limited to another organization
    if scope and principal.claims.get(CLAIM_TOKEN_PROJECT):
        if permission not in domain.PROJECT_PERMISSIONS:
            return False, None  # a project's token: nothing beyond its project
    role = await store.member_role_now(db, organization_id, principal.subject)
    return domain.token_allows(role, scope, permission), domain.capped(role, scope)


class ServiceAuth:
    def __init__(
        self, db: Database, settings: Settings, keys: KeySet, access: AccessBroadcaster
    ) -> None:
        self.db = db
        self.settings = settings
        self.keys = keys
        self.access = access

    def issue_service_token(self, service: str, secret: str) -> IssuedToken:
        if current_principal().is_user:
            raise PermissionDenied("service tokens are not for users")
        if not service:
            raise InvalidArgument.field("service", "required")
        if not secret:
            raise InvalidArgument.field("secret", "required")
        expected = self.settings.service_secrets.get(service) or ""
        # Compare even for unknown services, so timing says nothing about which exist.
        matches = hmac.compare_digest((expected or "\x00unknown").encode(), secret.encode())
        if not expected or not matches:
            raise Unauthenticated("wrong service credentials", reason="BAD_SERVICE_CREDENTIALS")
        return self.keys.service_token(service, ttl=self.settings.service_token_ttl_seconds)

    async def authorize(
        self,
        *,
        user_id: str,
        service: str,
        organization_id: str,
        permission: str,
        token_scope: str = "",
        token_organization_id: str = "",
        token_project_id: str = "",
    ) -> tuple[bool, Role | None]:
        require_service()
        require_id(organization_id, "organization_id")
        if not permission:
            raise InvalidArgument.field("permission", "required")
        if user_id:
            claims: dict[str, object] = (
                {
                    CLAIM_SCOPE: token_scope,
                    CLAIM_TOKEN_ORG: token_organization_id,
                    CLAIM_TOKEN_PROJECT: token_project_id,
                }
                if token_scope
                else {}
            )
            principal = Principal(kind=PrincipalKind.USER, subject=user_id, claims=claims)
        elif service:
            principal = Principal(kind=PrincipalKind.SERVICE, subject=service)
        else:
            raise InvalidArgument.field("user_id", "a user_id or a service is required")
        return await decide(self.db, principal, organization_id, permission)

    async def check_session(self, session_id: str) -> bool:
        require_service()
        require_id(session_id, "session_id")
        return await store.session_active(self.db, session_id)

    def watch_access(self, requests: AsyncIterator[WatcherMessage]) -> AsyncIterator[Outgoing]:
        caller = require_service()
        return self.access.watch(caller.subject, requests, self.revoked_sessions)

    async def revoked_sessions(self) -> list[RevokedSession]:
        """Sessions revoked while some of their access tokens may still be unexpired."""
        lifetime = domain.revoked_lifetime(self.settings.access_token_ttl_seconds)
        async with self.db.session() as s:
            found = await store.revoked_sessions(s, lifetime)
            # API tokens revoked lately: their exchanged access tokens may still be live.
            tokens = await s.fetch(
                """SELECT id, revoked_at FROM identity.api_tokens
                    WHERE revoked_at > now() - $1::interval""",
                lifetime,
            )
        return [RevokedSession(family, at + lifetime) for family, at in found] + [
            RevokedSession(API_TOKEN_SESSION + t["id"], t["revoked_at"] + lifetime) for t in tokens
        ]
