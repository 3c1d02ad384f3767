"""Uploaded certificates of custom domains, against real identity, billing and project
servers and PostgreSQL: set on a verified domain (admins only), shown as public facts,
refused naming the field, the key stored sealed (no PEM in the row; a sealed key copied to
another row does not open), handed with its key to the edge's token only, invisible and
untouchable to another organization, and consistent when sets and deletes race."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hangar.project.v1 import project_pb2 as pb
from services.edge.certificates import ProjectCertificates
from shared.clients import Clients
from shared.migrate import migrate
from tests.support.certificates import Leaf, TestCA, key_pem, new_key
from tests.support.identity import bearer
from tests.support.project import Stack, Tenant, running_stack

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def certificates_db(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    url = create_database("hangar_project_certificates")
    migrate(url, db_passwords)
    return url


class Answers:
    """A domain check that passes (the HTTP check itself: test_project_domains.py)."""

    async def answers(self, hostname: str, path: str, token: str) -> str:
        return ""


@pytest.fixture(scope="module")
async def stack(certificates_db: str, db_passwords: dict[str, str]) -> AsyncIterator[Stack]:
    async with running_stack(certificates_db, db_passwords) as running:
        running.project_app.domains.check = Answers()
        yield running


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


async def _code(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def verified_domain(stack: Stack, tenant: Tenant, *, verify: bool = True) -> tuple[str, str]:
    project = await stack.create(tenant)
    name = f"shop-{secrets.token_hex(4)}.example.org"
    md = tenant.owner.md
    await stack.project.AddDomain(
        pb.AddDomainRequest(project_id=project.id, domain=pb.Domain(hostname=name)), metadata=md
    )
    if verify:
        await stack.project.VerifyDomain(
            pb.VerifyDomainRequest(project_id=project.id, hostname=name), metadata=md
        )
    return project.id, name


def set_request(project_id: str, name: str, leaf: Leaf, key: str = "") -> Any:
    return pb.SetDomainCertificateRequest(
        project_id=project_id,
        hostname=name,
        certificate_chain_pem=leaf.chain_pem,
        private_key_pem=key or leaf.key_pem,
    )


async def edge_certificates(stack: Stack) -> dict[str, pb.EdgeCertificate]:
    token = await stack.identity.service_token("edge")
    reply = await stack.project.ListDomainCertificates(
        pb.ListDomainCertificatesRequest(), metadata=bearer(token)
    )
    return {c.hostname: c for c in reply.certificates}


def _spki(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def _row(stack: Stack, name: str) -> dict[str, Any] | None:
    async with stack.project_app.db.session() as s:
        row = await s.fetchrow(
            "SELECT * FROM project.domain_certificates WHERE hostname = $1", name
        )
    return dict(row) if row else None


async def test_a_certificate_is_set_shown_handed_to_the_edge_and_deleted(
    stack: Stack, ca: TestCA
) -> None:
    tenant = await stack.tenant("viewer")
    project_id, name = await verified_domain(stack, tenant)
    leaf = ca.leaf(name, f"www.{name}")

    domain = await stack.project.SetDomainCertificate(
        set_request(project_id, name, leaf), metadata=tenant.owner.md
    )
    facts = domain.certificate
    assert domain.hostname == name and domain.status == pb.DOMAIN_STATUS_VERIFIED
    assert facts.sha256_fingerprint == leaf.fingerprint
    assert list(facts.dns_names) == [name, f"www.{name}"]
    assert facts.issuer == ca.intermediate.subject.rfc4514_string()
    assert facts.not_after.ToDatetime() == leaf.cert.not_valid_after_utc.replace(tzinfo=None)
    assert "PRIVATE" not in str(domain)
    listed = await stack.project.ListDomains(
        pb.ListDomainsRequest(project_id=project_id), metadata=tenant.members["viewer"].md
    )
    assert [d.certificate.sha256_fingerprint for d in listed.domains] == [leaf.fingerprint]

    # At rest: the chain (public), never the key in clear.
    row = await _row(stack, name)
    assert row is not None
    text = repr(row)
    assert "PRIVATE KEY" not in text
    der = leaf.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert der not in row["key_ciphertext"] and der[-32:] not in row["key_ciphertext"]

    # The edge gets it whole, with a key that is the leaf's.
    handed = (await edge_certificates(stack))[name]
    assert handed.project_id == project_id and handed.sha256_fingerprint == leaf.fingerprint
    assert x509.load_pem_x509_certificates(handed.certificate_chain_pem.encode())[0] == leaf.cert
    opened = serialization.load_pem_private_key(handed.private_key_pem.encode(), None)
    assert _spki(opened) == _spki(leaf.key)

    deleted = await stack.project.DeleteDomainCertificate(
        pb.DeleteDomainCertificateRequest(project_id=project_id, hostname=name),
        metadata=tenant.owner.md,
    )
    assert not deleted.HasField("certificate")
    assert name not in await edge_certificates(stack)
    assert await _row(stack, name) is None
    again = await _code(
        stack.project.DeleteDomainCertificate(
            pb.DeleteDomainCertificateRequest(project_id=project_id, hostname=name),
            metadata=tenant.owner.md,
        )
    )
    assert again.code() == Code.NOT_FOUND
    async with stack.project_app.db.session() as s:
        events = await s.fetchval(
            "SELECT count(*) FROM project.outbox WHERE type = 'project.domains_changed'"
            " AND aggregate_id = $1",
            project_id,
        )
    assert events == 4  # added, verified, certificate set, certificate deleted


async def test_a_sealed_key_copied_to_another_row_does_not_open(stack: Stack, ca: TestCA) -> None:
    tenant = await stack.tenant()
    project_id, first = await verified_domain(stack, tenant)
    second = f"www.{first}"
    md = tenant.owner.md
    await stack.project.AddDomain(
        pb.AddDomainRequest(project_id=project_id, domain=pb.Domain(hostname=second)), metadata=md
    )
    await stack.project.VerifyDomain(
        pb.VerifyDomainRequest(project_id=project_id, hostname=second), metadata=md
    )
    for name in (first, second):
        await stack.project.SetDomainCertificate(
            set_request(project_id, name, ca.leaf(name)), metadata=md
        )
    async with stack.project_app.db.transaction() as tx:
        await tx.execute(
            "UPDATE project.domain_certificates AS b SET key_ciphertext = a.key_ciphertext,"
            " key_nonce = a.key_nonce FROM project.domain_certificates AS a"
            " WHERE a.hostname = $1 AND b.hostname = $2",
            first,
            second,
        )
    handed = await edge_certificates(stack)
    assert first in handed and second not in handed  # left out (and logged), not served


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("other_key", "private_key_pem"),
        ("other_name", "certificate_chain_pem"),
        ("expired", "certificate_chain_pem"),
        ("leaf_last", "certificate_chain_pem"),
        ("weak_key", "private_key_pem"),
        ("not_pem", "certificate_chain_pem"),
    ],
)
async def test_invalid_certificates_are_refused_naming_the_field(
    stack: Stack, ca: TestCA, case: str, field: str
) -> None:
    from datetime import UTC, datetime, timedelta

    tenant = await stack.tenant()
    project_id, name = await verified_domain(stack, tenant)
    leaf = ca.leaf(name)
    request = set_request(project_id, name, leaf)
    if case == "other_key":
        request.private_key_pem = key_pem(new_key())
    elif case == "other_name":
        other = ca.leaf("elsewhere.example.org")
        request = set_request(project_id, name, other)
    elif case == "expired":
        now = datetime.now(UTC)
        old = ca.leaf(name, not_before=now - timedelta(days=9), not_after=now - timedelta(days=1))
        request = set_request(project_id, name, old)
    elif case == "leaf_last":
        request.certificate_chain_pem = Leaf(leaf.cert, leaf.key, leaf.chain[::-1]).chain_pem
    elif case == "weak_key":
        request = set_request(project_id, name, ca.leaf(name, key=new_key("rsa1024")))
    else:
        request.certificate_chain_pem = "hello"
    refused = await _code(stack.project.SetDomainCertificate(request, metadata=tenant.owner.md))
    assert refused.code() == Code.INVALID_ARGUMENT
    assert field in (refused.details() or "")
    assert await _row(stack, name) is None  # nothing written


async def test_only_a_verified_domain_of_the_project_gets_a_certificate(
    stack: Stack, ca: TestCA
) -> None:
    tenant = await stack.tenant()
    project_id, pending = await verified_domain(stack, tenant, verify=False)
    refused = await _code(
        stack.project.SetDomainCertificate(
            set_request(project_id, pending, ca.leaf(pending)), metadata=tenant.owner.md
        )
    )
    assert refused.code() == Code.FAILED_PRECONDITION
    unknown = "nobody.example.org"
    refused = await _code(
        stack.project.SetDomainCertificate(
            set_request(project_id, unknown, ca.leaf(unknown)), metadata=tenant.owner.md
        )
    )
    assert refused.code() == Code.NOT_FOUND


async def test_the_edge_token_alone_lists_certificates_with_keys(stack: Stack) -> None:
    tenant = await stack.tenant()
    request = pb.ListDomainCertificatesRequest()
    for md in (
        tenant.owner.md,
        bearer(await stack.identity.service_token("runtime")),
        bearer(await stack.identity.service_token("project")),
    ):
        refused = await _code(stack.project.ListDomainCertificates(request, metadata=md))
        assert refused.code() == Code.PERMISSION_DENIED
    anonymous = await _code(stack.project.ListDomainCertificates(request))
    assert anonymous.code() == Code.UNAUTHENTICATED
    await edge_certificates(stack)  # the edge's token: served


async def test_another_organization_cannot_set_read_or_delete_a_certificate(
    stack: Stack, ca: TestCA
) -> None:
    tenant = await stack.tenant("developer")
    outsider = await stack.tenant()
    project_id, name = await verified_domain(stack, tenant)
    leaf = ca.leaf(name)
    await stack.project.SetDomainCertificate(
        set_request(project_id, name, leaf), metadata=tenant.owner.md
    )
    theirs = ca.leaf(name)
    delete = pb.DeleteDomainCertificateRequest(project_id=project_id, hostname=name)
    for md in (outsider.owner.md, tenant.members["developer"].md):
        set_refused = await _code(
            stack.project.SetDomainCertificate(set_request(project_id, name, theirs), metadata=md)
        )
        assert set_refused.code() == Code.PERMISSION_DENIED
        assert (
            await _code(stack.project.DeleteDomainCertificate(delete, metadata=md))
        ).code() == Code.PERMISSION_DENIED
    read = await _code(
        stack.project.ListDomains(
            pb.ListDomainsRequest(project_id=project_id), metadata=outsider.owner.md
        )
    )
    assert read.code() == Code.PERMISSION_DENIED
    # The outsider's own project cannot name it either: the name is not its domain.
    own = await stack.create(outsider)
    refused = await _code(
        stack.project.SetDomainCertificate(
            set_request(own.id, name, theirs), metadata=outsider.owner.md
        )
    )
    assert refused.code() == Code.NOT_FOUND
    assert (await edge_certificates(stack))[name].sha256_fingerprint == leaf.fingerprint


async def test_sets_and_deletes_racing_leave_a_consistent_certificate(
    stack: Stack, ca: TestCA
) -> None:
    tenant = await stack.tenant()
    project_id, name = await verified_domain(stack, tenant)
    md = tenant.owner.md
    leaves = [ca.leaf(name) for _ in range(3)]
    by_fingerprint = {leaf.fingerprint: leaf for leaf in leaves}
    delete = pb.DeleteDomainCertificateRequest(project_id=project_id, hostname=name)
    for _ in range(6):
        calls = [
            stack.project.SetDomainCertificate(set_request(project_id, name, leaf), metadata=md)
            for leaf in leaves
        ]
        calls += [stack.project.DeleteDomainCertificate(delete, metadata=md) for _ in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, grpc.aio.AioRpcError):
                assert result.code() == Code.NOT_FOUND  # a delete finding nothing to delete
            else:
                assert isinstance(result, pb.Domain)
        listed = await stack.project.ListDomains(
            pb.ListDomainsRequest(project_id=project_id), metadata=md
        )
        shown = listed.domains[0].certificate.sha256_fingerprint
        handed = (await edge_certificates(stack)).get(name)
        row = await _row(stack, name)
        if not shown:
            assert handed is None and row is None
            continue
        assert handed is not None and row is not None
        assert handed.sha256_fingerprint == shown == row["sha256_fingerprint"]
        leaf = by_fingerprint[shown]  # whole: chain, facts and key of the same upload
        assert (
            x509.load_pem_x509_certificates(handed.certificate_chain_pem.encode())[0] == leaf.cert
        )
        opened = serialization.load_pem_private_key(handed.private_key_pem.encode(), None)
        assert _spki(opened) == _spki(leaf.key)


async def test_removing_a_domain_removes_its_certificate(stack: Stack, ca: TestCA) -> None:
    tenant = await stack.tenant()
    project_id, name = await verified_domain(stack, tenant)
    await stack.project.SetDomainCertificate(
        set_request(project_id, name, ca.leaf(name)), metadata=tenant.owner.md
    )
    await stack.project.RemoveDomain(
        pb.RemoveDomainRequest(project_id=project_id, hostname=name), metadata=tenant.owner.md
    )
    assert await _row(stack, name) is None
    assert name not in await edge_certificates(stack)


async def test_the_edge_s_client_reads_them_with_its_token(stack: Stack, ca: TestCA) -> None:
    tenant = await stack.tenant()
    project_id, name = await verified_domain(stack, tenant)
    leaf = ca.leaf(name, f"*.{name}")
    await stack.project.SetDomainCertificate(
        set_request(project_id, name, leaf), metadata=tenant.owner.md
    )

    async def edge_token() -> str:
        return await stack.identity.service_token("edge")

    clients = Clients(
        {"project": stack.project_address}, default_timeout=30, token_provider=edge_token
    )
    try:
        read = {c.hostname: c for c in await ProjectCertificates(clients, 30).fetch()}
    finally:
        await clients.close()
    got = read[name]
    assert got.project_id == project_id and got.sha256_fingerprint == leaf.fingerprint
    assert got.dns_names == (name, f"*.{name}")
    assert got.not_after == leaf.cert.not_valid_after_utc
    assert _spki(serialization.load_pem_private_key(got.key_pem.encode(), None)) == _spki(leaf.key)
    assert "PRIVATE" not in repr(got)
