"""IdentityService servicer: proto in -> use case (accounts.py, orgs.py, service_auth.py,
audit.py) -> proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc
from google.protobuf import duration_pb2, empty_pb2, json_format, struct_pb2, timestamp_pb2

from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2 as pb
from hangar.identity.v1 import identity_pb2_grpc
from services.identity import audit_store, store
from services.identity.access import (
    Heartbeat,
    Invalidation,
    Outgoing,
    RevokedSession,
    Snapshot,
    WatcherMessage,
)
from services.identity.accounts import Accounts, SignedIn
from services.identity.api_tokens import ApiToken, ApiTokens
from services.identity.audit import AuditEventIn, AuditTrail
from services.identity.orgs import Organizations
from services.identity.service_auth import ServiceAuth
from shared.auth import require_service
from shared.outbox import OutboxFeed
from shared.proto import timestamp

Context: TypeAlias = grpc.aio.ServicerContext


def _ts(moment: datetime | int) -> timestamp_pb2.Timestamp:
    """Timestamps from the store, or Unix seconds from token claims."""
    if isinstance(moment, int):
        return timestamp_pb2.Timestamp(seconds=moment)
    return timestamp(moment)


def _user(user: store.User) -> pb.User:
    return pb.User(
        id=user.id,
        email=user.email,
        name=user.name,
        is_platform_admin=user.is_platform_admin,
        created_at=_ts(user.created_at),
    )


def _org(org: store.Organization) -> pb.Organization:
    return pb.Organization(
        id=org.id,
        name=org.name,
        slug=org.slug,
        owner_id=org.owner_id,
        created_at=_ts(org.created_at),
    )


def _member(member: store.Member) -> pb.Member:
    return pb.Member(
        user_id=member.user_id, email=member.email, role=pb.Role.ValueType(member.role)
    )


def _api_token(token: ApiToken) -> pb.ApiToken:
    out = pb.ApiToken(
        id=token.id,
        name=token.name,
        scope=token.scope,
        organization_id=token.organization_id,
        create_time=_ts(token.created_at),
        prefix=token.prefix,
        project_id=token.project_id,
    )
    for name, moment in (
        ("expire_time", token.expires_at),
        ("last_used_time", token.last_used_at),
        ("revoke_time", token.revoked_at),
    ):
        if moment is not None:
            getattr(out, name).CopyFrom(_ts(moment))
    return out


def _auth(signed_in: SignedIn) -> pb.AuthResponse:
    return pb.AuthResponse(
        user=_user(signed_in.user),
        access_token=signed_in.access.token,
        refresh_token=signed_in.refresh_token,
        access_token_expires_at=_ts(signed_in.access.expires_at),
    )


def _audit_log(stored: audit_store.StoredAudit) -> pb.AuditLog:
    entry = stored.entry
    metadata = struct_pb2.Struct()
    metadata.update(entry.metadata)
    return pb.AuditLog(
        id=entry.event_id,
        organization_id=entry.organization_id or "",
        actor_id=entry.actor_id or "",
        action=entry.action,
        target_type=entry.target_type or "",
        target_id=entry.target_id or "",
        metadata=metadata,
        occurred_at=_ts(entry.occurred_at),
        prev_hash=entry.prev_hash or "",
        hash=stored.hash,
    )


def _event_in(event: pb.AuditEvent) -> AuditEventIn:
    metadata: dict[str, Any] = json_format.MessageToDict(event.metadata)
    return AuditEventIn(
        id=event.id,
        organization_id=event.organization_id,
        actor_id=event.actor_id,
        action=event.action,
        target_type=event.target_type,
        target_id=event.target_id,
        metadata=metadata,
        occurred_at=event.occurred_at.ToDatetime(tzinfo=UTC)
        if event.HasField("occurred_at")
        else None,
    )


def _revoked(sessions: tuple[RevokedSession, ...]) -> list[pb.RevokedSession]:
    return [pb.RevokedSession(id=r.id, forget_after=_ts(r.forget_after)) for r in sessions]


def _access_message(message: Outgoing) -> pb.WatchAccessResponse:
    if isinstance(message, Snapshot):
        lease = duration_pb2.Duration()
        lease.FromNanoseconds(int(message.lease_seconds * 1e9))
        snapshot = pb.AccessSnapshot(
            revoked_sessions=_revoked(message.revoked_sessions), lease=lease
        )
        return pb.WatchAccessResponse(snapshot=snapshot)
    if isinstance(message, Invalidation):
        change = message.change
        invalidation = pb.AccessInvalidation(
            sequence=message.sequence,
            scopes=[
                pb.AccessScope(user_id=s.user_id, organization_id=s.organization_id)
                for s in change.scopes
            ],
            revoked_sessions=_revoked(change.revoked_sessions),
        )
        return pb.WatchAccessResponse(invalidation=invalidation)
    assert isinstance(message, Heartbeat)
    return pb.WatchAccessResponse(heartbeat=pb.AccessHeartbeat(ping=message.ping))


async def _watcher_messages(
    requests: AsyncIterator[pb.WatchAccessRequest],
) -> AsyncIterator[WatcherMessage]:
    async for request in requests:
        yield WatcherMessage(request.acked_sequence, request.ping, request.goodbye)


class IdentityApi(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(
        self,
        accounts: Accounts,
        orgs: Organizations,
        service_auth: ServiceAuth,
        audit: AuditTrail,
        feed: OutboxFeed,
        api_tokens: ApiTokens,
    ) -> None:
        self.api_tokens = api_tokens
        self.accounts = accounts
        self.orgs = orgs
        self.service_auth = service_auth
        self.audit = audit
        self.feed = feed

    # accounts and sessions

    async def SignUp(self, request: pb.SignUpRequest, context: Context) -> pb.AuthResponse:
        signed_in = await self.accounts.sign_up(
            request.email, request.password, request.name, request.request_id
        )
        return _auth(signed_in)

    async def Login(self, request: pb.LoginRequest, context: Context) -> pb.AuthResponse:
        return _auth(await self.accounts.login(request.email, request.password))

    async def Refresh(self, request: pb.RefreshRequest, context: Context) -> pb.AuthResponse:
        return _auth(await self.accounts.refresh(request.refresh_token))

    async def CreateApiToken(
        self, request: pb.CreateApiTokenRequest, context: Context
    ) -> pb.CreateApiTokenResponse:
        spec = request.token
        expires = spec.expire_time.ToDatetime(UTC) if spec.HasField("expire_time") else None
        token, secret = await self.api_tokens.create(
            spec.name, spec.scope, spec.organization_id, expires, spec.project_id
        )
        return pb.CreateApiTokenResponse(token=_api_token(token), secret=secret)

    async def ListApiTokens(
        self, request: pb.ListApiTokensRequest, context: Context
    ) -> pb.ListApiTokensResponse:
        return pb.ListApiTokensResponse(
            tokens=[_api_token(t) for t in await self.api_tokens.list()]
        )

    async def RevokeApiToken(
        self, request: pb.RevokeApiTokenRequest, context: Context
    ) -> empty_pb2.Empty:
        await self.api_tokens.revoke(request.id)
        return empty_pb2.Empty()

    async def ExchangeApiToken(
        self, request: pb.ExchangeApiTokenRequest, context: Context
    ) -> pb.ExchangeApiTokenResponse:
        issued = await self.api_tokens.exchange(request.secret)
        return pb.ExchangeApiTokenResponse(
            access_token=issued.token, expire_time=_ts(issued.expires_at)
        )

    async def Logout(self, request: pb.LogoutRequest, context: Context) -> empty_pb2.Empty:
        await self.accounts.logout(request.refresh_token)
        return empty_pb2.Empty()

    async def GetCurrentUser(self, request: pb.GetCurrentUserRequest, context: Context) -> pb.User:
        return _user(await self.accounts.current_user())

    async def LoginWithOAuth(
        self, request: pb.LoginWithOAuthRequest, context: Context
    ) -> pb.AuthResponse:
        signed_in = await self.accounts.login_with_oauth(
            request.provider, request.id_token, request.nonce
        )
        return _auth(signed_in)

    async def ListOAuthProviders(
        self, request: pb.ListOAuthProvidersRequest, context: Context
    ) -> pb.ListOAuthProvidersResponse:
        providers = [
            pb.OAuthProvider(
                name=name,
                label=provider.label or name,
                authorization_endpoint=provider.authorization_endpoint,
                client_id=provider.client_id,
                scopes=provider.scopes,
            )
            for name, provider in self.accounts.oidc.sign_in_options()
        ]
        return pb.ListOAuthProvidersResponse(providers=providers)

    async def LinkOAuthAccount(
        self, request: pb.LinkOAuthAccountRequest, context: Context
    ) -> pb.User:
        return _user(await self.accounts.link_oauth(request.provider, request.id_token))

    async def GetJwks(self, request: pb.GetJwksRequest, context: Context) -> pb.GetJwksResponse:
        keys = [
            pb.Jwk(kty=k["kty"], crv=k["crv"], x=k["x"], kid=k["kid"], use=k["use"], alg=k["alg"])
            for k in self.service_auth.keys.jwks()
        ]
        return pb.GetJwksResponse(keys=keys)

    async def IssueServiceToken(
        self, request: pb.IssueServiceTokenRequest, context: Context
    ) -> pb.IssueServiceTokenResponse:
        issued = self.service_auth.issue_service_token(request.service, request.secret)
        return pb.IssueServiceTokenResponse(token=issued.token, expires_at=_ts(issued.expires_at))

    async def Authorize(
        self, request: pb.AuthorizeRequest, context: Context
    ) -> pb.AuthorizeResponse:
        allowed, role = await self.service_auth.authorize(
            user_id=request.user_id,
            service=request.service,
            organization_id=request.organization_id,
            permission=request.permission,
            token_scope=request.token_scope,
            token_organization_id=request.token_organization_id,
            token_project_id=request.token_project_id,
        )
        return pb.AuthorizeResponse(
            allowed=allowed, role=pb.Role.ValueType(role) if role else pb.ROLE_UNSPECIFIED
        )

    async def CheckSession(
        self, request: pb.CheckSessionRequest, context: Context
    ) -> pb.CheckSessionResponse:
        return pb.CheckSessionResponse(
            active=await self.service_auth.check_session(request.session_id)
        )

    async def WatchAccess(
        self, request_iterator: AsyncIterator[pb.WatchAccessRequest], context: Context
    ) -> AsyncIterator[pb.WatchAccessResponse]:
        async for message in self.service_auth.watch_access(_watcher_messages(request_iterator)):
            yield _access_message(message)

    # organizations

    async def CreateOrganization(
        self, request: pb.CreateOrganizationRequest, context: Context
    ) -> pb.Organization:
        org = request.organization
        return _org(await self.orgs.create_organization(org.name, org.slug))

    async def GetOrganization(
        self, request: pb.GetOrganizationRequest, context: Context
    ) -> pb.Organization:
        return _org(await self.orgs.get_organization(request.id))

    async def ListOrganizations(
        self, request: pb.ListOrganizationsRequest, context: Context
    ) -> pb.ListOrganizationsResponse:
        page = await self.orgs.list_organizations(request.page_size, request.page_token)
        return pb.ListOrganizationsResponse(
            organizations=[_org(o) for o in page.items], next_page_token=page.next_page_token
        )

    async def UpdateOrganization(
        self, request: pb.UpdateOrganizationRequest, context: Context
    ) -> pb.Organization:
        org = request.organization
        updated = await self.orgs.update_organization(
            org.id, org.name, org.slug, list(request.update_mask.paths)
        )
        return _org(updated)

    async def DeleteOrganization(
        self, request: pb.DeleteOrganizationRequest, context: Context
    ) -> empty_pb2.Empty:
        await self.orgs.delete_organization(request.id)
        return empty_pb2.Empty()

    # members

    async def AddMember(self, request: pb.AddMemberRequest, context: Context) -> pb.Member:
        member = await self.orgs.add_member(request.organization_id, request.email, request.role)
        return _member(member)

    async def ListMembers(
        self, request: pb.ListMembersRequest, context: Context
    ) -> pb.ListMembersResponse:
        page = await self.orgs.list_members(
            request.organization_id, request.page_size, request.page_token
        )
        return pb.ListMembersResponse(
            members=[_member(m) for m in page.items], next_page_token=page.next_page_token
        )

    async def UpdateMember(self, request: pb.UpdateMemberRequest, context: Context) -> pb.Member:
        member = await self.orgs.update_member(
            request.organization_id, request.user_id, request.role
        )
        return _member(member)

    async def RemoveMember(
        self, request: pb.RemoveMemberRequest, context: Context
    ) -> empty_pb2.Empty:
        await self.orgs.remove_member(request.organization_id, request.user_id)
        return empty_pb2.Empty()

    # audit

    async def AppendAuditEvents(
        self, request: pb.AppendAuditEventsRequest, context: Context
    ) -> pb.AppendAuditEventsResponse:
        accepted, duplicates = await self.audit.append_audit_events(
            [_event_in(e) for e in request.events]
        )
        return pb.AppendAuditEventsResponse(accepted=accepted, duplicates=duplicates)

    async def ListAuditLogs(
        self, request: pb.ListAuditLogsRequest, context: Context
    ) -> pb.ListAuditLogsResponse:
        page = await self.audit.list_audit_logs(
            request.organization_id,
            request.page_size,
            request.page_token,
            actor_id=request.actor_id,
            action=request.action,
            start=request.start_time.ToDatetime(tzinfo=UTC)
            if request.HasField("start_time")
            else None,
            end=request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else None,
        )
        return pb.ListAuditLogsResponse(
            audit_logs=[_audit_log(a) for a in page.items], next_page_token=page.next_page_token
        )

    async def VerifyAuditChain(
        self, request: pb.VerifyAuditChainRequest, context: Context
    ) -> pb.VerifyAuditChainResponse:
        report = await self.audit.verify_audit_chain(request.organization_id)
        return pb.VerifyAuditChainResponse(
            ok=report.ok, checked=report.checked, first_broken_entry_id=report.first_broken_entry_id
        )

    # events

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[events_pb2.Event]:
        require_service()
        async for event in self.feed.watch(request, context):
            yield event
