"""Custom domains in the project service, against real identity, billing and project servers:
added pending with a token (admin only), listed (viewers too), refused when invalid or
another project's (two projects racing for one name: one wins), verified only when the name
answers the token over HTTP (a real server on loopback stands for the edge), removed; each
change writes project.domains_changed with the verified names and pending challenges; an
outsider gets PERMISSION_DENIED."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from hangar.project.v1 import project_pb2 as pb
from services.project.custom_domains import CHALLENGE_PATH, HttpDomainCheck
from shared.migrate import migrate
from tests.support.project import Stack, running_stack

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def domains_db(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    url = create_database("hangar_project_domains")
    migrate(url, db_passwords)
    return url


@pytest.fixture(scope="module")
async def stack(domains_db: str, db_passwords: dict[str, str]) -> AsyncIterator[Stack]:
    async with running_stack(domains_db, db_passwords) as running:
        yield running


class Answerer:
    """A loopback HTTP server answering GET <path> with a body (what the edge does for a
    pending domain), 404 for anything else; it records the Host headers it saw."""

    def __init__(self) -> None:
        self.answers: dict[str, bytes] = {}
        self.hosts: list[str] = []
        self.server: asyncio.Server | None = None
        self.address = ""

    async def start(self) -> Answerer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        path = head[0].split()[1]
        self.hosts += [h.split(":", 1)[1].strip() for h in head if h.lower().startswith("host:")]
        body = self.answers.get(path)
        status = b"200 OK" if body is not None else b"404 Not Found"
        body = body or b"no"
        writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
        await writer.drain()
        writer.close()


@pytest.fixture
async def answerer(stack: Stack) -> AsyncIterator[Answerer]:
    served = await Answerer().start()
    stack.project_app.domains.check = HttpDomainCheck(connect_to=served.address, timeout=10)
    yield served
    assert served.server is not None
    served.server.close()


async def _code(call: Any) -> Code:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


def _name() -> str:
    return f"shop-{secrets.token_hex(4)}.example.org"


async def _events(stack: Stack, project_id: str) -> list[dict[str, Any]]:
    async with stack.project_app.db.session() as s:
        rows = await s.fetch(
            "SELECT payload FROM project.outbox WHERE type = 'project.domains_changed'"
            " AND aggregate_id = $1 ORDER BY txid, position",
            project_id,
        )
    return [dict(r["payload"]) for r in rows]


async def test_a_domain_is_added_pending_verified_by_its_answer_then_removed(
    stack: Stack, answerer: Answerer
) -> None:
    tenant = await stack.tenant("viewer")
    owner, viewer = tenant.owner.md, tenant.members["viewer"].md
    project = await stack.create(tenant)
    name = _name()
    added = await stack.project.AddDomain(
        pb.AddDomainRequest(project_id=project.id, domain=pb.Domain(hostname=f" {name.upper()}. ")),
        metadata=owner,
    )
    assert added.hostname == name and added.status == pb.DOMAIN_STATUS_PENDING
    assert added.verification_path == CHALLENGE_PATH + added.verification_token
    assert len(added.verification_token) == 32
    listed = await stack.project.ListDomains(
        pb.ListDomainsRequest(project_id=project.id), metadata=viewer
    )
    assert [d.hostname for d in listed.domains] == [name]

    # Nothing answers the token yet: still pending, and the reason says what happened.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.project.VerifyDomain(
            pb.VerifyDomainRequest(project_id=project.id, hostname=name), metadata=owner
        )
    assert refused.value.code() == Code.FAILED_PRECONDITION
    assert "answered 404" in (refused.value.details() or "")
    answerer.answers[added.verification_path] = b"not the token"
    assert (
        await _code(
            stack.project.VerifyDomain(
                pb.VerifyDomainRequest(project_id=project.id, hostname=name), metadata=owner
            )
        )
        == Code.FAILED_PRECONDITION
    )

    answerer.answers[added.verification_path] = added.verification_token.encode()
    verified = await stack.project.VerifyDomain(
        pb.VerifyDomainRequest(project_id=project.id, hostname=name), metadata=owner
    )
    assert verified.status == pb.DOMAIN_STATUS_VERIFIED and verified.HasField("verified_at")
    assert not verified.verification_token  # its check is over
    assert name in answerer.hosts  # asked with the domain as Host

    await stack.project.RemoveDomain(
        pb.RemoveDomainRequest(project_id=project.id, hostname=name), metadata=owner
    )
    assert not (
        await stack.project.ListDomains(
            pb.ListDomainsRequest(project_id=project.id), metadata=owner
        )
    ).domains
    events = await _events(stack, project.id)
    assert events == [
        {"domains": [], "challenges": [{"hostname": name, "token": added.verification_token}]},
        {"domains": [name], "challenges": []},
        {"domains": [], "challenges": []},
    ]


@pytest.mark.parametrize(
    "hostname",
    [
        "",
        "single",
        "127.0.0.1",
        "localhost",
        "app.localhost",
        "web-ada.localhost",  # the apps domain's: the platform's names
        "shop.test",
        "db.internal",
        "-bad.example.org",
        "under_score.example.org",
        f"{'a' * 64}.example.org",
    ],
)
async def test_invalid_names_are_refused_naming_the_field(stack: Stack, hostname: str) -> None:
    tenant = await stack.tenant()
    project = await stack.create(tenant)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.project.AddDomain(
            pb.AddDomainRequest(project_id=project.id, domain=pb.Domain(hostname=hostname)),
            metadata=tenant.owner.md,
        )
    assert refused.value.code() == Code.INVALID_ARGUMENT
    assert "domain.hostname" in (refused.value.details() or "")


async def test_a_name_is_one_project_s_even_when_two_race_for_it(stack: Stack) -> None:
    first, second = await stack.tenant(), await stack.tenant()
    projects = [await stack.create(first), await stack.create(second)]
    name = _name()
    results = await asyncio.gather(
        *(
            stack.project.AddDomain(
                pb.AddDomainRequest(project_id=p.id, domain=pb.Domain(hostname=name)),
                metadata=t.owner.md,
            )
            for p, t in zip(projects, (first, second), strict=True)
        ),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, pb.Domain)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 1
    assert lost[0].code() == Code.ALREADY_EXISTS


async def test_only_admins_manage_domains_and_outsiders_see_nothing(stack: Stack) -> None:
    tenant = await stack.tenant("developer", "viewer")
    project = await stack.create(tenant)
    outsider = await stack.tenant()
    add = pb.AddDomainRequest(project_id=project.id, domain=pb.Domain(hostname=_name()))
    for member in ("developer", "viewer"):
        md = tenant.members[member].md
        assert await _code(stack.project.AddDomain(add, metadata=md)) == Code.PERMISSION_DENIED
    listing = pb.ListDomainsRequest(project_id=project.id)
    assert (
        await _code(stack.project.ListDomains(listing, metadata=outsider.owner.md))
        == Code.PERMISSION_DENIED
    )
    assert (
        await _code(stack.project.AddDomain(add, metadata=outsider.owner.md))
        == Code.PERMISSION_DENIED
    )
    verify = pb.VerifyDomainRequest(project_id=project.id, hostname=add.domain.hostname)
    assert await _code(stack.project.VerifyDomain(verify, metadata=tenant.owner.md)) == (
        Code.NOT_FOUND  # the project's admin: no such domain (yet)
    )
