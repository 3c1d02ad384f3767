"""Projects' public hostnames (`<project>-<org>.<apps domain>`) over real gRPC and PostgreSQL,
with real identity (organizations, their events, GetOrganization) and real billing."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hangar.identity.v1 import identity_pb2 as ipb
from hangar.project.v1 import project_pb2 as pb
from services.project import domain
from services.project.hostnames import IdentityOrganizations
from shared.clients import Clients
from shared.loops import cancel_and_wait
from shared.migrate import migrate
from shared.resources import Resources
from tests.support.procs import free_port
from tests.support.project import Stack, Tenant, eventually, running_stack

Code = grpc.StatusCode
APPS_DOMAIN = "apps.example.test"
EDGE_PORT = 8123
WITHIN = 30.0  # generous: the consumer polls identity's feed every 0.5 s


@pytest.fixture(scope="module")
def hostnames_db(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    url = create_database("hangar_project_hostnames")
    migrate(url, db_passwords)
    return url


@pytest.fixture(scope="module")
async def stack(hostnames_db: str, db_passwords: dict[str, str]) -> AsyncIterator[Stack]:
    """tests.support.project.running_stack with an apps domain and an edge port of its own.
    The project's loops are off: tests start identity's event consumer when they want it."""
    async with running_stack(
        hostnames_db,
        db_passwords,
        apps_domain=APPS_DOMAIN,
        addresses={"edge": f"127.0.0.1:{EDGE_PORT}"},
    ) as running:
        yield running


@pytest.fixture
async def consumer(stack: Stack) -> AsyncIterator[None]:
    """Project's consumer of identity's organization events, running for one test."""
    task = asyncio.create_task(stack.project_app.organization_events.run())
    try:
        yield
    finally:
        await cancel_and_wait([task])


def _host(project_slug: str, org_slug: str) -> str:
    return f"{project_slug}-{org_slug}.{APPS_DOMAIN}"


def _url(project_slug: str, org_slug: str) -> str:
    return f"http://{_host(project_slug, org_slug)}:{EDGE_PORT}"


async def _tenant(stack: Stack, slug: str) -> Tenant:
    owner = await stack.user()
    org = await stack.identity.create_org(owner.token, slug)
    await stack.subscribe(org.id)
    return Tenant(org.id, owner)


def _org_slug(n: int = 10) -> str:
    return f"o{secrets.token_hex(n)}"[:n]


async def _rename_org(stack: Stack, tenant: Tenant, slug: str) -> None:
    await stack.identity.stub.UpdateOrganization(
        ipb.UpdateOrganizationRequest(
            organization=ipb.Organization(id=tenant.org_id, slug=slug),
            update_mask=field_mask_pb2.FieldMask(paths=["slug"]),
        ),
        metadata=tenant.owner.md,
    )


async def _get(stack: Stack, tenant: Tenant, project_id: str) -> pb.Project:
    return await stack.project.GetProject(
        pb.GetProjectRequest(id=project_id), metadata=tenant.owner.md
    )


async def _events(stack: Stack, project_id: str, event_type: str) -> list[dict[str, Any]]:
    async with stack.project_app.db.session() as s:
        rows = await s.fetch(
            "SELECT payload FROM project.outbox WHERE aggregate_id = $1 AND type = $2"
            " ORDER BY txid, position",
            project_id,
            event_type,
        )
    return [dict(r["payload"]) for r in rows]


async def _stored_slug(stack: Stack, org_id: str) -> Any:
    async with stack.project_app.db.session() as s:
        return await s.fetchrow(
            "SELECT slug, event_txid FROM project.organization_slugs WHERE organization_id = $1",
            org_id,
        )


def _violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)
    assert status is not None
    found = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
            found += [(v.field, v.description) for v in bad.field_violations]
    return found


# ------------------------------------------------------------------ rules, no I/O


def test_url_omits_port_80_and_keeps_any_other() -> None:
    project = domain.Project(
        "p1",
        "o1",
        domain.ProjectSpec("web", "web", Resources(1, 1), "local", False, 900),
        created_at=None,  # type: ignore[arg-type]
        updated_at=None,  # type: ignore[arg-type]
        organization_slug="ada",
    )
    at_80 = domain.PublicAddress.of("Apps.Example.", "0.0.0.0:80")
    assert at_80.hostname(project) == "web-ada.apps.example"
    assert at_80.url(project) == "http://web-ada.apps.example"
    assert domain.PublicAddress.of("localhost", "127.0.0.1:8000").url(project) == (
        "http://web-ada.localhost:8000"
    )
    unknown = replace(project, organization_slug="")
    assert at_80.hostname(unknown) == "" and at_80.url(unknown) == ""


def test_an_over_long_label_is_refused_or_shortened_within_63() -> None:
    org = "o" * 40
    assert domain.label_violation("p" * 22, org) is None  # 22 + 1 + 40 = 63
    bad = domain.label_violation("p" * 23, org)
    assert bad is not None and bad.field == "project.slug" and "63" in bad.description
    # Only an organization's rename can make it longer: then it is shortened, stably.
    label = domain.hostname_label("p" * 40, org)
    assert len(label) <= 63 and label == domain.hostname_label("p" * 40, org)
    assert label != domain.hostname_label("p" * 39 + "q", org)
    assert domain.hostname_label("web", "ada") == "web-ada"


# ------------------------------------------------------------------ over gRPC


async def test_hostname_and_url_on_create_get_and_list(stack: Stack) -> None:
    org_slug = _org_slug()
    tenant = await _tenant(stack, org_slug)
    created = await stack.create(tenant, slug="web")
    assert created.hostname == _host("web", org_slug)
    assert created.url == _url("web", org_slug)
    assert (await _get(stack, tenant, created.id)).hostname == _host("web", org_slug)
    listed = await stack.project.ListProjects(
        pb.ListProjectsRequest(organization_id=tenant.org_id), metadata=tenant.owner.md
    )
    assert [(p.hostname, p.url) for p in listed.projects] == [
        (_host("web", org_slug), _url("web", org_slug))
    ]
    (event,) = await _events(stack, created.id, "project.created")
    assert event["hostname"] == _host("web", org_slug)


async def test_project_rename_changes_hostname_and_emits_it(stack: Stack) -> None:
    org_slug = _org_slug()
    tenant = await _tenant(stack, org_slug)
    created = await stack.create(tenant, slug="old")
    updated = await stack.project.UpdateProject(
        pb.UpdateProjectRequest(
            project=pb.Project(id=created.id, slug="new"),
            update_mask=field_mask_pb2.FieldMask(paths=["slug"]),
        ),
        metadata=tenant.owner.md,
    )
    assert updated.hostname == _host("new", org_slug) and updated.url == _url("new", org_slug)
    assert (await _get(stack, tenant, created.id)).hostname == _host("new", org_slug)
    (event,) = await _events(stack, created.id, "project.updated")
    assert event["hostname"] == _host("new", org_slug)
    assert event["slug"] == "new" and event["changed"] == ["slug", "hostname"]

    # A change that leaves the name alone keeps it, and says so.
    await stack.project.UpdateProject(
        pb.UpdateProjectRequest(
            project=pb.Project(id=created.id, description="hello"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        ),
        metadata=tenant.owner.md,
    )
    latest = (await _events(stack, created.id, "project.updated"))[-1]
    assert latest["hostname"] == _host("new", org_slug) and latest["changed"] == ["description"]


async def test_slugs_that_make_a_label_over_63_are_refused_at_create_and_rename(
    stack: Stack,
) -> None:
    org_slug = _org_slug(40)
    tenant = await _tenant(stack, org_slug)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.create(tenant, slug="p" * 23)
    assert info.value.code() == Code.INVALID_ARGUMENT
    ((field, description),) = _violations(info.value)
    assert field == "project.slug" and "63" in description
    assert (await stack.allocated(tenant.org_id)).ram_mb == 0  # nothing reserved

    fits = await stack.create(tenant, slug="p" * 22)
    assert fits.hostname == _host("p" * 22, org_slug)
    assert len(fits.hostname.split(".")[0]) == 63
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.project.UpdateProject(
            pb.UpdateProjectRequest(
                project=pb.Project(id=fits.id, slug="q" * 23),
                update_mask=field_mask_pb2.FieldMask(paths=["slug"]),
            ),
            metadata=tenant.owner.md,
        )
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert [f for f, _ in _violations(info.value)] == ["project.slug"]
    assert (await _get(stack, tenant, fits.id)).slug == "p" * 22


async def test_creation_before_the_organization_events_arrive_asks_identity(
    stack: Stack,
) -> None:
    # The consumer is not running: identity's events have not reached project.
    tenant = await _tenant(stack, _org_slug())
    renamed = _org_slug()
    await _rename_org(stack, tenant, renamed)  # organization.created (old slug), .updated
    created = await stack.create(tenant, slug="web")
    assert created.hostname == _host("web", renamed)
    row = await _stored_slug(stack, tenant.org_id)
    assert row["slug"] == renamed and row["event_txid"] is None  # from GetOrganization

    # The feed catches up: the older organization.created never takes the slug back.
    task = asyncio.create_task(stack.project_app.organization_events.run())
    try:

        async def confirmed() -> bool:
            row = await _stored_slug(stack, tenant.org_id)
            return row is not None and row["event_txid"] is not None

        await eventually(confirmed, within=WITHIN)
    finally:
        await cancel_and_wait([task])
    assert (await _stored_slug(stack, tenant.org_id))["slug"] == renamed
    assert (await _get(stack, tenant, created.id)).hostname == _host("web", renamed)
    assert await _events(stack, created.id, "project.updated") == []


async def test_identity_unreachable_fails_the_create_unavailable_and_writes_nothing(
    stack: Stack,
) -> None:
    tenant = await _tenant(stack, _org_slug())
    slugs = stack.project_app.slugs
    real = slugs.identity
    dead = Clients({"identity": f"127.0.0.1:{free_port()}"}, default_timeout=2.0)
    slugs.identity = IdentityOrganizations(dead)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stack.create(tenant, slug="web")
    finally:
        slugs.identity = real
        await dead.close()
    assert info.value.code() == Code.UNAVAILABLE
    listed = await stack.project.ListProjects(
        pb.ListProjectsRequest(organization_id=tenant.org_id), metadata=tenant.owner.md
    )
    assert list(listed.projects) == []
    assert await stack.allocations(tenant.org_id) == {}
    assert await _stored_slug(stack, tenant.org_id) is None


async def test_organization_rename_renames_every_project_and_emits_events(
    stack: Stack, consumer: None
) -> None:
    tenant = await _tenant(stack, _org_slug())
    web = await stack.create(tenant, slug="web")
    api = await stack.create(tenant, slug="api")
    renamed = _org_slug()
    await _rename_org(stack, tenant, renamed)

    async def renamed_everywhere() -> bool:
        listed = await stack.project.ListProjects(
            pb.ListProjectsRequest(organization_id=tenant.org_id), metadata=tenant.owner.md
        )
        return {p.hostname for p in listed.projects} == {
            _host("web", renamed),
            _host("api", renamed),
        }

    await eventually(renamed_everywhere, within=WITHIN)
    for project in (web, api):
        got = await _get(stack, tenant, project.id)
        assert got.url == _url(project.slug, renamed)
        events = await _events(stack, project.id, "project.updated")
        assert [(e["hostname"], e["changed"]) for e in events] == [
            (_host(project.slug, renamed), ["hostname"])
        ]
        assert "sleep_enabled" not in events[0]  # runtime reads it only when present


async def test_an_organization_rename_past_63_shortens_the_label(
    stack: Stack, consumer: None
) -> None:
    tenant = await _tenant(stack, _org_slug(10))
    project = await stack.create(tenant, slug="p" * 40)
    longer = _org_slug(40)
    await _rename_org(stack, tenant, longer)

    async def shortened() -> str:
        got = await _get(stack, tenant, project.id)
        return got.hostname if got.hostname != project.hostname else ""

    hostname = await eventually(shortened, within=WITHIN)
    label = domain.hostname_label("p" * 40, longer)
    assert hostname == f"{label}.{APPS_DOMAIN}" and len(label) == 63


async def test_organization_deleted_forgets_its_slug(stack: Stack, consumer: None) -> None:
    tenant = await _tenant(stack, _org_slug())
    await stack.create(tenant, slug="web")

    async def stored() -> bool:
        row = await _stored_slug(stack, tenant.org_id)
        return row is not None and row["event_txid"] is not None

    await eventually(stored, within=WITHIN)
    await stack.identity.stub.DeleteOrganization(
        ipb.DeleteOrganizationRequest(id=tenant.org_id), metadata=tenant.owner.md
    )

    async def forgotten() -> bool:
        return await _stored_slug(stack, tenant.org_id) is None

    await eventually(forgotten, within=WITHIN)
