"""Organizations, members, roles and Authorize on a real identity server and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2 as pb
from tests.support.identity import RunningIdentity, bearer, running_identity

Code = grpc.StatusCode


@pytest.fixture(scope="module")
async def identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    async with running_identity(database_url, db_passwords) as running:
        yield running


async def _code(call: Awaitable[Any]) -> Code:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return Code.OK


async def test_creator_becomes_owner_and_slug_rules_hold(identity: RunningIdentity) -> None:
    owner = await identity.sign_up()
    org = await identity.create_org(owner.access_token, "acme-inc")
    assert org.owner_id == owner.user.id and org.slug == "acme-inc"
    members = await identity.stub.ListMembers(
        pb.ListMembersRequest(organization_id=org.id), metadata=bearer(owner.access_token)
    )
    assert [(m.user_id, m.role) for m in members.members] == [(owner.user.id, pb.ROLE_OWNER)]
    assert await _code(identity.create_org(owner.access_token, "acme-inc")) == Code.ALREADY_EXISTS
    for bad in ("Acme", "-acme", "acme--inc", "a" * 41):
        assert await _code(identity.create_org(owner.access_token, bad)) == Code.INVALID_ARGUMENT


async def test_list_organizations_pages_with_opaque_tokens(identity: RunningIdentity) -> None:
    user = await identity.sign_up()
    made = [await identity.create_org(user.access_token) for _ in range(5)]
    seen, token = [], ""
    while True:
        page = await identity.stub.ListOrganizations(
            pb.ListOrganizationsRequest(page_size=2, page_token=token),
            metadata=bearer(user.access_token),
        )
        seen += [o.id for o in page.organizations]
        token = page.next_page_token
        if not token:
            break
    assert seen == [o.id for o in made]
    assert (
        await _code(
            identity.stub.ListOrganizations(
                pb.ListOrganizationsRequest(page_token="garbage!"),
                metadata=bearer(user.access_token),
            )
        )
        == Code.INVALID_ARGUMENT
    )


async def test_update_organization_follows_the_field_mask(identity: RunningIdentity) -> None:
    owner = await identity.sign_up()
    org = await identity.create_org(owner.access_token)
    new_slug = f"renamed-{secrets.token_hex(3)}"
    updated = await identity.stub.UpdateOrganization(
        pb.UpdateOrganizationRequest(
            organization=pb.Organization(id=org.id, name="New name", slug=new_slug),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        metadata=bearer(owner.access_token),
    )
    assert updated.name == "New name" and updated.slug == org.slug
    bad_mask = pb.UpdateOrganizationRequest(
        organization=pb.Organization(id=org.id, name="x"),
        update_mask=field_mask_pb2.FieldMask(paths=["owner_id"]),
    )
    assert (
        await _code(identity.stub.UpdateOrganization(bad_mask, metadata=bearer(owner.access_token)))
        == Code.INVALID_ARGUMENT
    )


async def test_member_roles_and_owner_protection(identity: RunningIdentity) -> None:
    owner = await identity.sign_up()
    admin = await identity.sign_up()
    dev = await identity.sign_up()
    org = await identity.create_org(owner.access_token)
    await identity.add_member(owner.access_token, org.id, admin.user.email, pb.ROLE_ADMIN)
    admin_meta = bearer(admin.access_token)
    # An admin adds a developer, but cannot create, demote or remove an owner.
    await identity.add_member(admin.access_token, org.id, dev.user.email, pb.ROLE_DEVELOPER)
    stranger = await identity.sign_up()
    assert (
        await _code(
            identity.add_member(admin.access_token, org.id, stranger.user.email, pb.ROLE_OWNER)
        )
        == Code.PERMISSION_DENIED
    )
    demote = pb.UpdateMemberRequest(
        organization_id=org.id, user_id=owner.user.id, role=pb.ROLE_VIEWER
    )
    assert (
        await _code(identity.stub.UpdateMember(demote, metadata=admin_meta))
        == Code.PERMISSION_DENIED
    )
    remove = pb.RemoveMemberRequest(organization_id=org.id, user_id=owner.user.id)
    assert (
        await _code(identity.stub.RemoveMember(remove, metadata=admin_meta))
        == Code.PERMISSION_DENIED
    )
    # A developer manages nobody; an admin may delete nothing at the org level.
    dev_meta = bearer(dev.access_token)
    assert (
        await _code(identity.add_member(dev.access_token, org.id, stranger.user.email))
        == Code.PERMISSION_DENIED
    )
    assert (
        await _code(
            identity.stub.DeleteOrganization(
                pb.DeleteOrganizationRequest(id=org.id), metadata=admin_meta
            )
        )
        == Code.PERMISSION_DENIED
    )
    # Unknown email, duplicate member, missing role: the right codes.
    assert (
        await _code(identity.add_member(owner.access_token, org.id, "nobody@example.com"))
        == Code.NOT_FOUND
    )
    assert (
        await _code(identity.add_member(owner.access_token, org.id, dev.user.email))
        == Code.ALREADY_EXISTS
    )
    assert (
        await _code(identity.add_member(owner.access_token, org.id, stranger.user.email, 0))
        == Code.INVALID_ARGUMENT
    )
    # The last owner cannot leave or be demoted, even by themselves.
    own_meta = bearer(owner.access_token)
    self_demote = pb.UpdateMemberRequest(
        organization_id=org.id, user_id=owner.user.id, role=pb.ROLE_ADMIN
    )
    assert (
        await _code(identity.stub.UpdateMember(self_demote, metadata=own_meta))
        == Code.FAILED_PRECONDITION
    )
    assert (
        await _code(identity.stub.RemoveMember(remove, metadata=own_meta))
        == Code.FAILED_PRECONDITION
    )
    # A member may leave; the developer does.
    leave = pb.RemoveMemberRequest(organization_id=org.id, user_id=dev.user.id)
    assert await _code(identity.stub.RemoveMember(leave, metadata=dev_meta)) == Code.OK


async def test_concurrent_removal_of_the_last_two_owners_keeps_one(
    identity: RunningIdentity,
) -> None:
    for _ in range(5):
        a, b = await identity.sign_up(), await identity.sign_up()
        org = await identity.create_org(a.access_token)
        await identity.add_member(a.access_token, org.id, b.user.email, pb.ROLE_OWNER)
        # Each owner removes the other, and each tries to leave, all at once.
        calls = [
            identity.stub.RemoveMember(
                pb.RemoveMemberRequest(organization_id=org.id, user_id=target.user.id),
                metadata=bearer(actor.access_token),
            )
            for actor, target in ((a, b), (b, a), (a, a), (b, b))
        ]
        await asyncio.gather(*calls, return_exceptions=True)
        # Whoever is still a member reads the list (a removed one is refused).
        listings = await asyncio.gather(
            *(
                identity.stub.ListMembers(
                    pb.ListMembersRequest(organization_id=org.id),
                    metadata=bearer(actor.access_token),
                )
                for actor in (a, b)
            ),
            return_exceptions=True,
        )
        readable = [r for r in listings if not isinstance(r, BaseException)]
        assert len(readable) == 1
        assert [m.role for m in readable[0].members] == [pb.ROLE_OWNER]


async def test_authorize_maps_permissions_to_roles(identity: RunningIdentity) -> None:
    owner, viewer, stranger = (
        await identity.sign_up(),
        await identity.sign_up(),
        await identity.sign_up(),
    )
    org = await identity.create_org(owner.access_token)
    await identity.add_member(owner.access_token, org.id, viewer.user.email, pb.ROLE_VIEWER)
    meta = bearer(await identity.service_token("runtime"))

    async def ask(user_id: str, permission: str, org_id: str = org.id) -> pb.AuthorizeResponse:
        return await identity.stub.Authorize(
            pb.AuthorizeRequest(user_id=user_id, organization_id=org_id, permission=permission),
            metadata=meta,
        )

    reply = await ask(viewer.user.id, "projects.get")
    assert reply.allowed and reply.role == pb.ROLE_VIEWER
    reply = await ask(viewer.user.id, "projects.delete")
    assert not reply.allowed and reply.role == pb.ROLE_VIEWER
    reply = await ask(stranger.user.id, "projects.get")
    assert not reply.allowed and reply.role == pb.ROLE_UNSPECIFIED
    reply = await ask(owner.user.id, "projects.get", org_id="no-such-org")
    assert not reply.allowed
    assert await _code(ask(owner.user.id, "rockets.launch")) == Code.INVALID_ARGUMENT
    # A service may do only the reads it is granted (billing reads organizations), never more.
    granted = await identity.stub.Authorize(
        pb.AuthorizeRequest(
            service="billing", organization_id=org.id, permission="organizations.get"
        ),
        metadata=meta,
    )
    assert granted.allowed and granted.role == pb.ROLE_UNSPECIFIED
    for service, permission in (("billing", "billing.manage"), ("agent", "projects.get")):
        refused = await identity.stub.Authorize(
            pb.AuthorizeRequest(service=service, organization_id=org.id, permission=permission),
            metadata=meta,
        )
        assert not refused.allowed, (service, permission)


async def test_org_events_reach_the_watch_feed(identity: RunningIdentity) -> None:
    owner, other = await identity.sign_up(), await identity.sign_up()
    org = await identity.create_org(owner.access_token)
    await identity.add_member(owner.access_token, org.id, other.user.email)
    await identity.stub.RemoveMember(
        pb.RemoveMemberRequest(organization_id=org.id, user_id=other.user.id),
        metadata=bearer(owner.access_token),
    )
    await identity.stub.DeleteOrganization(
        pb.DeleteOrganizationRequest(id=org.id), metadata=bearer(owner.access_token)
    )
    stream = identity.stub.WatchEvents(
        events_pb2.WatchEventsRequest(
            types=["organization.created", "organization.deleted", "member.added", "member.removed"]
        ),
        metadata=bearer(await identity.service_token("billing")),
    )
    seen: list[str] = []

    async def collect() -> None:
        async for event in stream:
            if event.organization_id == org.id:
                seen.append(event.type)
                if event.type == "organization.deleted":
                    return

    await asyncio.wait_for(collect(), 10)
    stream.cancel()
    assert seen == [
        "organization.created",
        "member.added",
        "member.removed",
        "organization.deleted",
    ]
    assert (
        await _code(
            identity.stub.GetOrganization(
                pb.GetOrganizationRequest(id=org.id), metadata=bearer(owner.access_token)
            )
        )
        == Code.PERMISSION_DENIED
    )


def _org_scoped_calls(
    identity: RunningIdentity, org_id: str, victim_id: str
) -> dict[str, Callable[[tuple[tuple[str, str], ...]], Awaitable[Any]]]:
    s = identity.stub
    return {
        "GetOrganization": lambda m: s.GetOrganization(
            pb.GetOrganizationRequest(id=org_id), metadata=m
        ),
        "UpdateOrganization": lambda m: s.UpdateOrganization(
            pb.UpdateOrganizationRequest(
                organization=pb.Organization(id=org_id, name="pwned"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            metadata=m,
        ),
        "DeleteOrganization": lambda m: s.DeleteOrganization(
            pb.DeleteOrganizationRequest(id=org_id), metadata=m
        ),
        "AddMember": lambda m: s.AddMember(
            pb.AddMemberRequest(organization_id=org_id, email="x@example.com", role=pb.ROLE_OWNER),
            metadata=m,
        ),
        "ListMembers": lambda m: s.ListMembers(
            pb.ListMembersRequest(organization_id=org_id), metadata=m
        ),
        "UpdateMember": lambda m: s.UpdateMember(
            pb.UpdateMemberRequest(organization_id=org_id, user_id=victim_id, role=pb.ROLE_VIEWER),
            metadata=m,
        ),
        "RemoveMember": lambda m: s.RemoveMember(
            pb.RemoveMemberRequest(organization_id=org_id, user_id=victim_id), metadata=m
        ),
        "ListAuditLogs": lambda m: s.ListAuditLogs(
            pb.ListAuditLogsRequest(organization_id=org_id), metadata=m
        ),
        "VerifyAuditChain": lambda m: s.VerifyAuditChain(
            pb.VerifyAuditChainRequest(organization_id=org_id), metadata=m
        ),
    }


ORG_SCOPED_RPCS = [
    "GetOrganization",
    "UpdateOrganization",
    "DeleteOrganization",
    "AddMember",
    "ListMembers",
    "UpdateMember",
    "RemoveMember",
    "ListAuditLogs",
    "VerifyAuditChain",
]


def test_cross_tenant_matrix_covers_every_org_scoped_rpc() -> None:
    from hangar.identity.v1 import identity_pb2

    service = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]
    scoped = {
        m.name
        for m in service.methods
        if any(f.name in ("organization_id", "organization") for f in m.input_type.fields)
        or m.name in ("GetOrganization", "DeleteOrganization")
    } - {"Authorize", "CreateOrganization"}  # Create names no existing org
    assert scoped == set(ORG_SCOPED_RPCS)


@pytest.mark.parametrize("rpc", ORG_SCOPED_RPCS)
async def test_cross_tenant_calls_are_permission_denied(
    identity: RunningIdentity, rpc: str
) -> None:
    alice, bob = await identity.sign_up(), await identity.sign_up()
    await identity.create_org(alice.access_token)  # alice is an owner, just elsewhere
    org_b = await identity.create_org(bob.access_token)
    call = _org_scoped_calls(identity, org_b.id, bob.user.id)[rpc]
    assert await _code(call(bearer(alice.access_token))) == Code.PERMISSION_DENIED
    # The same answer for an organization that does not exist (AIP-193).
    ghost = _org_scoped_calls(identity, "org-that-does-not-exist", bob.user.id)[rpc]
    assert await _code(ghost(bearer(alice.access_token))) == Code.PERMISSION_DENIED
    # And bob's org is untouched.
    got = await identity.stub.GetOrganization(
        pb.GetOrganizationRequest(id=org_b.id), metadata=bearer(bob.access_token)
    )
    assert got.name == org_b.name
