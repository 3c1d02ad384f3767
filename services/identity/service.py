"""Identity's use cases: each validates, runs one unit of work against the store (with its
outbox event and audit entry in the same transaction) and returns domain values.

api.py maps protos to these calls and back; store.py holds the SQL; domain.py the rules.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.identity import domain, store
from services.identity.access import (
    AccessBroadcaster,
    AccessChange,
    Outgoing,
    RevokedSession,
    Scope,
    WatcherMessage,
)
from services.identity.domain import Role
from services.identity.oauth import OidcVerifier
from services.identity.passwords import Passwords
from services.identity.tokens import (
    IssuedToken,
    KeySet,
    new_refresh_token,
    refresh_token_hash,
)
from shared import pagination
from shared.auth import require_caller, require_service, require_user, session_ended
from shared.context import Principal, PrincipalKind, current_principal
from shared.db import Database, Session
from shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
)
from shared.ids import new_id
from shared.outbox import write_event
from shared.settings import Settings
from shared.validation import require_id

log = logging.getLogger(__name__)

SCHEMA = "identity"
SERVICE = "identity"
MAX_AUDIT_BATCH = 1000
# Beyond an access token's own lifetime, how long a revoked session is still announced (the
# verifiers' clock leeway, and then some).
REVOKED_MARGIN = timedelta(seconds=60)


@dataclass(frozen=True)
class SignedIn:
    user: store.User
    access: IssuedToken
    refresh_token: str


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_page_token: str


@dataclass(frozen=True)
class AuditEventIn:
    """One event from AppendAuditEvents, already taken out of its proto."""

    id: str
    organization_id: str
    actor_id: str
    action: str
    target_type: str
    target_id: str
    metadata: dict[str, Any]
    occurred_at: datetime | None


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    checked: int
    first_broken_entry_id: str


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
    role = await store.member_role_now(db, organization_id, principal.subject)
    return domain.allows(role, permission), role


class Identity:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        keys: KeySet,
        passwords: Passwords,
        oidc: OidcVerifier | None = None,
        access: AccessBroadcaster | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.keys = keys
        self.passwords = passwords
        self.oidc = oidc or OidcVerifier(settings.oauth_providers)
        self.authorizer = LocalAuthorizer(db)
        self.sessions = LocalSessions(db)
        self.access = access or AccessBroadcaster()

    # ------------------------------------------------------------------ sessions

    async def _sign_in(
        self, tx: Session, user: store.User, family_id: str | None = None
    ) -> SignedIn:
        refresh = new_refresh_token()
        family_id = family_id or new_id()  # the session: access tokens carry it as `sid`
        await store.insert_refresh_token(
            tx,
            token_id=new_id(),
            user_id=user.id,
            family_id=family_id,
            token_hash=refresh_token_hash(refresh),
            expires_at=datetime.now(UTC)
            + timedelta(seconds=self.settings.refresh_token_ttl_seconds),
        )
        access = self.keys.access_token(
            user.id,
            is_platform_admin=user.is_platform_admin,
            ttl=self.settings.access_token_ttl_seconds,
            session_id=family_id,
        )
        return SignedIn(user, access, refresh)

    def _revoked(self, family_id: str) -> AccessChange:
        forget_after = (
            datetime.now(UTC)
            + timedelta(seconds=self.settings.access_token_ttl_seconds)
            + REVOKED_MARGIN
        )
        return AccessChange(revoked_sessions=(RevokedSession(family_id, forget_after),))

    async def revoked_sessions(self) -> list[RevokedSession]:
        """Sessions revoked while some of their access tokens may still be unexpired."""
        lifetime = timedelta(seconds=self.settings.access_token_ttl_seconds) + REVOKED_MARGIN
        async with self.db.session() as s:
            found = await store.revoked_sessions(s, lifetime)
        return [RevokedSession(family, at + lifetime) for family, at in found]

    async def sign_up(self, email: str, password: str, name: str, request_id: str = "") -> SignedIn:
        """A new account, signed in. Safe to retry with the same `request_id` (AIP-155): the
        retry of a sign-up that created the account answers with it (see _replay_sign_up).
        Saturated, the password pool refuses (RESOURCE_EXHAUSTED) before anything is written."""
        violations: list[FieldViolation] = []
        try:
            email = domain.normalize_email(email)
        except InvalidArgument as exc:
            violations += exc.violations
        if (bad := domain.password_violation(password, email)) is not None:
            violations.append(bad)
        try:
            name = domain.clean_name(name, "name", required=False)
        except InvalidArgument as exc:
            violations += exc.violations
        if (bad := domain.request_id_violation(request_id)) is not None:
            violations.append(bad)
        if violations:
            raise InvalidArgument(violations)
        if request_id:
            async with self.db.session() as s:
                earlier = await store.user_by_signup_request(s, request_id)
            if earlier is not None:
                return await self._replay_sign_up(earlier, email, password)
        password_hash = await self.passwords.hash(password)
        async with self.db.transaction() as tx:
            user = await store.insert_user(
                tx,
                user_id=new_id(),
                email=email,
                name=name,
                password_hash=password_hash,
                signup_request_id=request_id or None,
            )
            if user is not None:
                await self._audit(tx, None, "user.signed_up", user.id, "user", user.id)
                return await self._sign_in(tx, user)
        if request_id:  # a concurrent twin of this request may have won the insert
            async with self.db.session() as s:
                earlier = await store.user_by_signup_request(s, request_id)
            if earlier is not None:
                return await self._replay_sign_up(earlier, email, password)
        raise AlreadyExists("an account with this email exists", reason="EMAIL_TAKEN")

    async def _replay_sign_up(self, user: store.User, email: str, password: str) -> SignedIn:
        """The account an earlier SignUp with this request id created, signed in anew: only
        for the same email and password (the request id is no credential) and within a day.
        Anything else answers as a fresh sign-up of a taken email would."""
        if user.email != email:
            raise InvalidArgument.field("request_id", "already used by another sign-up")
        fresh = datetime.now(UTC) - user.created_at < domain.SIGNUP_REPLAY_WINDOW
        verdict = await self.passwords.verify(user.password_hash, password)
        if not fresh or not verdict.ok:
            raise AlreadyExists("an account with this email exists", reason="EMAIL_TAKEN")
        async with self.db.transaction() as tx:
            await self._audit(
                tx,
                None,
                "user.login_succeeded",
                user.id,
                "user",
                user.id,
                {"method": "signup_retry"},
            )
            return await self._sign_in(tx, user)

    async def login(self, email: str, password: str) -> SignedIn:
        email = domain.normalize_email(email)
        if not password:
            raise InvalidArgument.field("password", "required")
        async with self.db.session() as s:
            until = await store.blocked_until(s, email)
            if until is not None:
                wait = max(1, int((until - datetime.now(UTC)).total_seconds() + 0.999))
                raise ResourceExhausted(
                    f"too many failed sign-ins for this email; retry in {wait}s",
                    [QuotaViolation(f"login:{email}", "failed sign-ins")],
                    reason="LOGIN_THROTTLED",
                    metadata={"retry_after_seconds": str(wait)},
                )
            user = await store.user_by_email(s, email)
        verdict = await self.passwords.verify(user.password_hash if user else None, password)
        async with self.db.transaction() as tx:
            if not verdict.ok or user is None:
                failures = await store.record_login_failure(tx, email, domain.FAILURE_MEMORY)
                block = domain.block_after(failures)
                if block is not None:
                    await store.block_login(tx, email, block)
                await self._audit(
                    tx,
                    None,
                    "user.login_failed",
                    "",
                    "user",
                    user.id if user else "",
                    {"method": "password", "failures": failures},
                )
            else:
                await store.clear_login_failures(tx, email)
                if verdict.new_hash is not None:
                    await store.set_password_hash(tx, user.id, verdict.new_hash)
                await self._audit(
                    tx,
                    None,
                    "user.login_succeeded",
                    user.id,
                    "user",
                    user.id,
                    {"method": "password"},
                )
                return await self._sign_in(tx, user)
        raise Unauthenticated("wrong email or password", reason="BAD_CREDENTIALS")

    async def refresh(self, token: str) -> SignedIn:
        if not token:
            raise InvalidArgument.field("refresh_token", "required")
        digest = refresh_token_hash(token)
        family: str | None = None
        async with self.db.transaction() as tx:
            used = await store.use_refresh_token(tx, digest)
            if used is not None:
                user = await store.user_by_id(tx, used[0])
                if user is not None:
                    return await self._sign_in(tx, user, family_id=used[1])
            else:
                family = await store.refresh_token_family(tx, digest)
                if family is not None:
                    # Rotated, revoked or expired: whoever holds the family is suspect.
                    await store.revoke_family(tx, family)
        if family is not None:  # whatever the family issued stops working everywhere
            await self.access.announce(self._revoked(family))
        raise Unauthenticated(
            "refresh token is not valid; sign in again", reason="REFRESH_TOKEN_INVALID"
        )

    async def logout(self, token: str) -> None:
        if not token:
            raise InvalidArgument.field("refresh_token", "required")
        async with self.db.transaction() as tx:
            family = await store.refresh_token_family(tx, refresh_token_hash(token))
            if family is not None:
                await store.revoke_family(tx, family)
        if family is not None:  # its access tokens stop working everywhere before we answer
            await self.access.announce(self._revoked(family))

    async def current_user(self) -> store.User:
        principal = require_user()
        async with self.db.session() as s:
            user = await store.user_by_id(s, principal.subject)
        if user is None:
            raise Unauthenticated("this account no longer exists", reason="USER_GONE")
        return user

    # -------------------------------------------------------------------- OAuth

    async def login_with_oauth(self, provider: str, id_token: str) -> SignedIn:
        ident = await self.oidc.verify(provider, id_token)
        async with self.db.transaction() as tx:
            user = await store.user_by_oauth(tx, ident.provider, ident.subject)
            if user is None:
                user = await self._oauth_account(tx, ident)
            await self._audit(
                tx, None, "user.login_succeeded", user.id, "user", user.id, {"method": provider}
            )
            return await self._sign_in(tx, user)

    async def _oauth_account(self, tx: Session, ident: Any) -> store.User:
        """The account an unseen OAuth identity signs in to: linked by verified email, or new."""
        if not ident.email or not ident.email_verified:
            raise FailedPrecondition(
                "the provider did not vouch for an email; sign up and link this identity",
                reason="OAUTH_EMAIL_NOT_VERIFIED",
            )
        domain.normalize_email(ident.email, "id_token")
        existing = await store.user_by_email(tx, ident.email)
        if existing is None:
            user = await store.insert_user(
                tx,
                user_id=new_id(),
                email=ident.email,
                name="",
                password_hash=None,
                email_verified=True,
                oauth_provider=ident.provider,
                oauth_subject=ident.subject,
            )
            if user is None:
                raise AlreadyExists("the account was created concurrently; retry", reason="RACE")
            await self._audit(tx, None, "user.signed_up", user.id, "user", user.id)
            return user
        if not existing.email_verified:
            # Whoever registered that email never proved it: do not hand them this identity.
            raise FailedPrecondition(
                "an account with this email exists; sign in with its password and link",
                reason="ACCOUNT_EXISTS",
            )
        if existing.oauth_provider is not None:
            raise FailedPrecondition(
                "this account is linked to another sign-in identity", reason="ALREADY_LINKED"
            )
        if not await store.bind_oauth(
            tx, existing.id, ident.provider, ident.subject, email_verified=True
        ):
            raise AlreadyExists("this identity is linked elsewhere", reason="IDENTITY_TAKEN")
        await self._audit(tx, None, "user.oauth_linked", existing.id, "user", existing.id)
        user = await store.user_by_id(tx, existing.id)
        assert user is not None
        return user

    async def link_oauth(self, provider: str, id_token: str) -> store.User:
        principal = require_user()
        ident = await self.oidc.verify(provider, id_token)
        async with self.db.transaction() as tx:
            bound = await store.user_by_oauth(tx, ident.provider, ident.subject)
            if bound is not None:
                if bound.id == principal.subject:
                    return bound
                raise AlreadyExists(
                    "this identity is linked to another account", reason="IDENTITY_TAKEN"
                )
            me = await store.user_by_id(tx, principal.subject)
            if me is None:
                raise Unauthenticated("this account no longer exists", reason="USER_GONE")
            if me.oauth_provider is not None:
                raise FailedPrecondition(
                    "this account is linked to another sign-in identity", reason="ALREADY_LINKED"
                )
            proves_email = ident.email_verified and ident.email == me.email
            if not await store.bind_oauth(
                tx, me.id, ident.provider, ident.subject, email_verified=proves_email
            ):
                raise AlreadyExists("this identity is linked elsewhere", reason="IDENTITY_TAKEN")
            await self._audit(
                tx, None, "user.oauth_linked", me.id, "user", me.id, {"provider": provider}
            )
            user = await store.user_by_id(tx, me.id)
            assert user is not None
            return user

    # ---------------------------------------------------------------- services

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
        self, *, user_id: str, service: str, organization_id: str, permission: str
    ) -> tuple[bool, Role | None]:
        require_service()
        require_id(organization_id, "organization_id")
        if not permission:
            raise InvalidArgument.field("permission", "required")
        if user_id:
            principal = Principal(kind=PrincipalKind.USER, subject=user_id)
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

    # ------------------------------------------------------------ organizations

    async def create_organization(self, name: str, slug: str) -> store.Organization:
        principal = require_user()
        violations: list[FieldViolation] = []
        try:
            name = domain.clean_name(name, "organization.name", required=True)
        except InvalidArgument as exc:
            violations += exc.violations
        if (bad := domain.slug_violation(slug)) is not None:
            violations.append(bad)
        if violations:
            raise InvalidArgument(violations)
        async with self.db.transaction() as tx:
            org = await store.insert_organization(
                tx, org_id=new_id(), name=name, slug=slug, owner_id=principal.subject
            )
            if org is None:
                raise AlreadyExists(
                    "an organization with this slug exists",
                    reason="SLUG_TAKEN",
                    metadata={"field": "organization.slug"},
                )
            await store.insert_member(tx, org.id, principal.subject, Role.OWNER)
            await write_event(
                tx,
                SCHEMA,
                "organization.created",
                organization_id=org.id,
                aggregate_id=org.id,
                payload={
                    "id": org.id,
                    "name": org.name,
                    "slug": org.slug,
                    "owner_id": org.owner_id,
                },
            )
            await self._audit(
                tx,
                org.id,
                "organization.created",
                principal.subject,
                "organization",
                org.id,
                {"slug": org.slug},
            )
        # No announcement: the id is new, so no service can hold a decision about it.
        return org

    async def get_organization(self, org_id: str) -> store.Organization:
        require_id(org_id, "id")
        await self.authorizer.require(org_id, "organizations.get")
        async with self.db.session() as s:
            org = await store.organization(s, org_id)
        if org is None:
            raise NotFound("organization not found")
        return org

    async def list_organizations(self, size: int, token: str) -> Page:
        principal = require_user()
        limit = pagination.page_size(size)
        key = pagination.decode_page_token(token, (str, str))
        after = None
        if key is not None:
            try:
                after = (datetime.fromisoformat(key[0]), key[1])
            except ValueError:
                raise InvalidArgument.field(
                    "page_token", "not a page token from this list"
                ) from None
        async with self.db.session() as s:
            orgs = await store.organizations_of(s, principal.subject, after, limit + 1)
        return _page(orgs, limit, lambda o: [o.created_at.isoformat(), o.id])

    async def _actor_role(self, tx: Session, org_id: str, principal: Principal) -> Role:
        """Lock the organization (member changes take turns), then the caller's role.

        Membership is checked before existence: a stranger learns nothing (AIP-193).
        """
        org = await store.organization(tx, org_id, lock=True)
        role = await store.member_role(tx, org_id, principal.subject)
        if role is None or org is None:
            raise PermissionDenied("you are not a member of this organization")
        return role

    async def update_organization(
        self, org_id: str, name: str, slug: str, paths: Sequence[str]
    ) -> store.Organization:
        principal = require_user()
        require_id(org_id, "organization.id")
        fields = list(paths) or [f for f, v in (("name", name), ("slug", slug)) if v]
        unknown = [p for p in fields if p not in ("name", "slug")]
        if unknown or not fields:
            raise InvalidArgument.field(
                "update_mask",
                "updatable fields are name and slug" if unknown else "nothing to update",
            )
        changes: dict[str, str] = {}
        violations: list[FieldViolation] = []
        if "name" in fields:
            try:
                changes["name"] = domain.clean_name(name, "organization.name", required=True)
            except InvalidArgument as exc:
                violations += exc.violations
        if "slug" in fields:
            if (bad := domain.slug_violation(slug)) is not None:
                violations.append(bad)
            changes["slug"] = slug
        if violations:
            raise InvalidArgument(violations)
        async with self.db.transaction() as tx:
            role = await self._actor_role(tx, org_id, principal)
            if not domain.allows(role, "organizations.update"):
                raise PermissionDenied("only admins and owners update the organization")
            try:
                org = await store.update_organization(tx, org_id, changes)
            except store.SlugTaken:
                raise AlreadyExists(
                    "an organization with this slug exists",
                    reason="SLUG_TAKEN",
                    metadata={"field": "organization.slug"},
                ) from None
            assert org is not None
            await write_event(
                tx,
                SCHEMA,
                "organization.updated",
                organization_id=org.id,
                aggregate_id=org.id,
                payload={"id": org.id, "name": org.name, "slug": org.slug},
            )
            await self._audit(
                tx,
                org.id,
                "organization.updated",
                principal.subject,
                "organization",
                org.id,
                {"fields": sorted(changes)},
            )
            return org

    async def delete_organization(self, org_id: str) -> None:
        principal = require_user()
        require_id(org_id, "id")
        async with self.db.transaction() as tx:
            role = await self._actor_role(tx, org_id, principal)
            if not domain.allows(role, "organizations.delete"):
                raise PermissionDenied("only owners delete the organization")
            await self._audit(
                tx, org_id, "organization.deleted", principal.subject, "organization", org_id
            )
            await write_event(
                tx,
                SCHEMA,
                "organization.deleted",
                organization_id=org_id,
                aggregate_id=org_id,
                payload={"id": org_id},
            )
            await store.delete_organization(tx, org_id)
        await self.access.announce(AccessChange((Scope(organization_id=org_id),)))

    # ------------------------------------------------------------------ members

    async def add_member(self, org_id: str, email: str, role_value: int) -> store.Member:
        principal = require_user()
        violations = _missing(organization_id=org_id)
        try:
            email = domain.normalize_email(email)
        except InvalidArgument as exc:
            violations += exc.violations
        role = _role(role_value, violations)
        if violations or role is None:
            raise InvalidArgument(violations)
        async with self.db.transaction() as tx:
            actor = await self._actor_role(tx, org_id, principal)
            domain.check_member_change(actor, None, role)
            user = await store.user_by_email(tx, email)
            if user is None:
                raise NotFound("no account with this email", reason="USER_NOT_FOUND")
            if not await store.insert_member(tx, org_id, user.id, role):
                raise AlreadyExists("already a member", reason="ALREADY_MEMBER")
            await write_event(
                tx,
                SCHEMA,
                "member.added",
                organization_id=org_id,
                aggregate_id=user.id,
                payload={"organization_id": org_id, "user_id": user.id, "role": role.db_name},
            )
            await self._audit(
                tx,
                org_id,
                "member.added",
                principal.subject,
                "user",
                user.id,
                {"role": role.db_name},
            )
        await self.access.announce(AccessChange((Scope(user.id, org_id),)))
        return store.Member(user.id, user.email, role)

    async def list_members(self, org_id: str, size: int, token: str) -> Page:
        require_id(org_id, "organization_id")
        limit = pagination.page_size(size)
        key = pagination.decode_page_token(token, (str,))
        await self.authorizer.require(org_id, "members.list")
        async with self.db.session() as s:
            found = await store.list_members(s, org_id, key[0] if key else None, limit + 1)
        return _page(found, limit, lambda m: [m.user_id])

    async def update_member(self, org_id: str, user_id: str, role_value: int) -> store.Member:
        principal = require_user()
        violations = _missing(organization_id=org_id, user_id=user_id)
        role = _role(role_value, violations)
        if violations or role is None:
            raise InvalidArgument(violations)
        async with self.db.transaction() as tx:
            actor = await self._actor_role(tx, org_id, principal)
            if actor < Role.ADMIN:
                raise PermissionDenied("only admins and owners manage members")
            current = await store.member_role(tx, org_id, user_id)
            if current is None:
                raise NotFound("not a member of this organization", reason="MEMBER_NOT_FOUND")
            domain.check_member_change(actor, current, role)
            if current is Role.OWNER and role is not Role.OWNER:
                domain.check_keeps_an_owner(await store.count_owners(tx, org_id) - 1)
            if current is not role:
                await store.set_member_role(tx, org_id, user_id, role)
                await write_event(
                    tx,
                    SCHEMA,
                    "member.role_changed",
                    organization_id=org_id,
                    aggregate_id=user_id,
                    payload={
                        "organization_id": org_id,
                        "user_id": user_id,
                        "role": role.db_name,
                        "previous_role": current.db_name,
                    },
                )
                await self._audit(
                    tx,
                    org_id,
                    "member.role_changed",
                    principal.subject,
                    "user",
                    user_id,
                    {"from": current.db_name, "to": role.db_name},
                )
            updated = await store.member(tx, org_id, user_id)
            assert updated is not None
        if current is not role:
            await self.access.announce(AccessChange((Scope(user_id, org_id),)))
        return updated

    async def remove_member(self, org_id: str, user_id: str) -> None:
        principal = require_user()
        violations = _missing(organization_id=org_id, user_id=user_id)
        if violations:
            raise InvalidArgument(violations)
        leaving = user_id == principal.subject
        async with self.db.transaction() as tx:
            actor = await self._actor_role(tx, org_id, principal)
            if not leaving and actor < Role.ADMIN:
                raise PermissionDenied("only admins and owners manage members")
            current = await store.member_role(tx, org_id, user_id)
            if current is None:
                raise NotFound("not a member of this organization", reason="MEMBER_NOT_FOUND")
            domain.check_member_change(actor, current, None, is_self=leaving)
            if current is Role.OWNER:
                domain.check_keeps_an_owner(await store.count_owners(tx, org_id) - 1)
            await store.delete_member(tx, org_id, user_id)
            await write_event(
                tx,
                SCHEMA,
                "member.removed",
                organization_id=org_id,
                aggregate_id=user_id,
                payload={"organization_id": org_id, "user_id": user_id},
            )
            await self._audit(
                tx,
                org_id,
                "member.removed",
                principal.subject,
                "user",
                user_id,
                {"role": current.db_name},
            )
        await self.access.announce(AccessChange((Scope(user_id, org_id),)))

    # -------------------------------------------------------------------- audit

    async def _audit(
        self,
        tx: Session,
        org_id: str | None,
        action: str,
        actor_id: str,
        target_type: str,
        target_id: str,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Identity's own entry, appended to the chain in the caller's transaction."""
        await store.lock_audit_chain(tx, org_id)
        tail = await store.chain_tail(tx, org_id)
        await store.append_audit(
            tx,
            entry_id=new_id(),
            event_id=new_id(),
            organization_id=org_id,
            service=SERVICE,
            actor_id=actor_id,
            action=action,
            target_type=target_type,
            target_id=target_id,
            metadata=domain.canonical_metadata(metadata or {}),
            occurred_at=datetime.now(UTC),
            tail=tail,
        )

    async def append_audit_events(self, events: Sequence[AuditEventIn]) -> tuple[int, int]:
        caller = require_service()
        if len(events) > MAX_AUDIT_BATCH:
            raise InvalidArgument.field("events", f"at most {MAX_AUDIT_BATCH} per call")
        violations: list[FieldViolation] = []
        for i, event in enumerate(events):
            if not event.id:
                violations.append(FieldViolation(f"events[{i}].id", "required"))
            elif len(event.id) > 100:
                violations.append(FieldViolation(f"events[{i}].id", "too long"))
            if not event.action:
                violations.append(FieldViolation(f"events[{i}].action", "required"))
            try:
                domain.check_metadata(event.metadata, f"events[{i}].metadata")
            except InvalidArgument as exc:
                violations += exc.violations
        if violations:
            raise InvalidArgument(violations)
        unique: dict[str, AuditEventIn] = {}
        for event in events:
            unique.setdefault(event.id, event)
        chains: dict[str, list[AuditEventIn]] = {}
        for event in unique.values():
            chains.setdefault(event.organization_id, []).append(event)
        accepted = 0
        now = datetime.now(UTC)
        async with self.db.transaction() as tx:
            for org_id in sorted(chains):  # one lock order: concurrent batches cannot deadlock
                chain_id = org_id or None
                await store.lock_audit_chain(tx, chain_id)
                batch = chains[org_id]
                seen = await store.existing_event_ids(tx, [e.id for e in batch])
                tail = await store.chain_tail(tx, chain_id)
                for event in batch:
                    if event.id in seen:
                        continue
                    tail = await store.append_audit(
                        tx,
                        entry_id=new_id(),
                        event_id=event.id,
                        organization_id=chain_id,
                        service=caller.subject,
                        actor_id=event.actor_id,
                        action=event.action,
                        target_type=event.target_type,
                        target_id=event.target_id,
                        metadata=domain.canonical_metadata(event.metadata),
                        occurred_at=event.occurred_at or now,
                        tail=tail,
                    )
                    accepted += 1
        return accepted, len(events) - accepted

    async def list_audit_logs(
        self,
        org_id: str,
        size: int,
        token: str,
        *,
        actor_id: str = "",
        action: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> Page:
        require_id(org_id, "organization_id")
        limit = pagination.page_size(size)
        key = pagination.decode_page_token(token, (int,))
        await self._require_audit_read(org_id)
        async with self.db.session() as s:
            found = await store.list_audit(
                s,
                org_id,
                before_seq=key[0] if key else None,
                limit=limit + 1,
                actor_id=actor_id,
                action=action,
                start=start,
                end=end,
            )
        return _page(found, limit, lambda a: [a.entry.seq])

    async def _require_audit_read(self, org_id: str) -> None:
        """Members with audit.read, and platform admins for any organization: a deleted
        organization has no members left, and its trail stays readable to the operators."""
        if require_caller().is_platform_admin:
            return
        await self.authorizer.require(org_id, "audit.read")

    async def verify_audit_chain(self, org_id: str) -> ChainReport:
        require_id(org_id, "organization_id")
        await self._require_audit_read(org_id)
        checked, prev, after = 0, None, 0
        async with self.db.session() as s:
            while True:
                page = await store.audit_chain_page(s, org_id, after, 1000)
                if not page:
                    return ChainReport(True, checked, "")
                broken = domain.first_broken([(p.entry, p.hash) for p in page], prev)
                if broken is not None:
                    return ChainReport(False, checked + broken + 1, page[broken].entry.event_id)
                checked += len(page)
                prev, after = page[-1].hash, page[-1].entry.seq

    # -------------------------------------------------------------------- admin

    async def promote(self, email: str) -> bool:
        """`hangar admin promote EMAIL`: make a user a platform admin."""
        email = domain.normalize_email(email)
        async with self.db.transaction() as tx:
            if not await store.set_platform_admin(tx, email):
                return False
            user = await store.user_by_email(tx, email)
            assert user is not None
            await self._audit(tx, None, "user.platform_admin_granted", "", "user", user.id)
            return True


def _missing(**fields: str) -> list[FieldViolation]:
    """A "required" violation for each field given empty, in order."""
    return [FieldViolation(name, "required") for name, value in fields.items() if not value]


def _role(value: int, violations: list[FieldViolation]) -> Role | None:
    try:
        return Role(value)
    except ValueError:
        violations.append(FieldViolation("role", "one of viewer, developer, admin, owner"))
        return None


def _page(items: list[Any], limit: int, key: Any) -> Page:
    if len(items) > limit:
        items = items[:limit]
        return Page(items, pagination.encode_page_token(key(items[-1])))
    return Page(items, "")
