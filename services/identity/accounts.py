"""Accounts and sessions: sign-up, sign-in by password or OAuth, refresh-token rotation,
sign-out, linking a provider identity, and platform admins. Each use case runs one unit of
work with its audit entry; a revoked session is announced to the verifiers before it returns."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.identity import domain, store
from services.identity.access import AccessBroadcaster, AccessChange, RevokedSession
from services.identity.audit import AuditTrail
from services.identity.oauth import OidcVerifier
from services.identity.passwords import Passwords
from services.identity.tokens import (
    IssuedToken,
    KeySet,
    new_refresh_token,
    refresh_token_hash,
)
from shared.auth import require_user
from shared.db import Database, Session
from shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
)
from shared.ids import new_id
from shared.settings import Settings


@dataclass(frozen=True)
class SignedIn:
    user: store.User
    access: IssuedToken
    refresh_token: str


class Accounts:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        keys: KeySet,
        passwords: Passwords,
        audit: AuditTrail,
        access: AccessBroadcaster,
        oidc: OidcVerifier | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.keys = keys
        self.passwords = passwords
        self.audit = audit
        self.access = access
        self.oidc = oidc or OidcVerifier(settings.oauth_providers)

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
        forget_after = datetime.now(UTC) + domain.revoked_lifetime(
            self.settings.access_token_ttl_seconds
        )
        return AccessChange(revoked_sessions=(RevokedSession(family_id, forget_after),))

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
                await self.audit.record(tx, None, "user.signed_up", user.id, "user", user.id)
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
            await self.audit.record(
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
                await self.audit.record(
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
                await self.audit.record(
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

    async def login_with_oauth(self, provider: str, id_token: str, nonce: str = "") -> SignedIn:
        ident = await self.oidc.verify(provider, id_token, nonce)
        async with self.db.transaction() as tx:
            user = await store.user_by_oauth(tx, ident.provider, ident.subject)
            if user is None:
                user = await self._oauth_account(tx, ident)
            await self.audit.record(
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
            await self.audit.record(tx, None, "user.signed_up", user.id, "user", user.id)
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
        await self.audit.record(tx, None, "user.oauth_linked", existing.id, "user", existing.id)
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
            await self.audit.record(
                tx, None, "user.oauth_linked", me.id, "user", me.id, {"provider": provider}
            )
            user = await store.user_by_id(tx, me.id)
            assert user is not None
            return user

    async def promote(self, email: str) -> bool:
        """`hangar admin promote EMAIL`: make a user a platform admin."""
        email = domain.normalize_email(email)
        async with self.db.transaction() as tx:
            if not await store.set_platform_admin(tx, email):
                return False
            user = await store.user_by_email(tx, email)
            assert user is not None
            await self.audit.record(tx, None, "user.platform_admin_granted", "", "user", user.id)
            return True
