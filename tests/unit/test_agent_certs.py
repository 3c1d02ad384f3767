"""shared.agent_certs: the agent CA, certificates bound to a server id from a CSR, join
tokens (the secret proves a CSR without travelling; the CA pin), and what a joining agent
checks of runtime's answer."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.agent_certs import (
    AgentCa,
    CertificateRefused,
    JoinToken,
    bound_server,
    ca_hash,
    check_issued,
    make_csr,
    new_agent_key,
    proof_holds,
)
from shared.tls import (
    Issued,
    create_agent_ca,
    create_ca,
    ensure_platform_certificates,
    issue_certificate,
)


def _agent_ca() -> tuple[Issued, AgentCa]:
    root = create_ca()
    made = create_agent_ca(root)
    return root, AgentCa(made.cert_pem, made.key_pem, root.cert_pem)


def test_the_agent_ca_is_a_constrained_intermediate_of_the_platform_ca() -> None:
    root, agent_ca = _agent_ca()
    cert = x509.load_pem_x509_certificate(agent_ca.cert_pem)
    cert.verify_directly_issued_by(root.certificate)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert x509.DNSName("agent.hangar.internal") in (constraints.value.permitted_subtrees or [])


def test_a_signed_csr_is_bound_to_the_server_and_keeps_the_agents_key() -> None:
    root, agent_ca = _agent_ca()
    key, _ = new_agent_key()
    chain = agent_ca.sign(make_csr(key), "s1abc")
    leaf = x509.load_pem_x509_certificate(chain)
    assert bound_server(leaf) == "s1abc"
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "agent"
    assert check_issued(chain, root.cert_pem, key) == "s1abc"
    other, _ = new_agent_key()
    with pytest.raises(CertificateRefused, match="key"):
        check_issued(chain, root.cert_pem, other)
    with pytest.raises(CertificateRefused, match="chain"):
        check_issued(chain, create_ca().cert_pem, key)
    # A process certificate names no server.
    assert bound_server(issue_certificate(root, "agent").certificate) == ""


def test_a_csr_that_is_not_one_or_not_p256_is_refused() -> None:
    _, agent_ca = _agent_ca()
    with pytest.raises(CertificateRefused):
        agent_ca.sign(b"garbage", "s1")
    p384 = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")]))
        .sign(p384, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    with pytest.raises(CertificateRefused, match="P-256"):
        agent_ca.sign(csr, "s1")


def test_a_join_token_round_trips_and_its_proof_holds_for_its_csr_only() -> None:
    root, agent_ca = _agent_ca()
    token = JoinToken.new("tok1", agent_ca.ca_hash)
    parsed = JoinToken.parse(str(token))
    assert parsed == token and parsed.ca_hash == ca_hash(root.cert_pem)
    csr = make_csr(new_agent_key()[0])
    proof = token.prove(csr)
    assert proof_holds(token.public_key, "tok1", csr, proof)
    assert not proof_holds(token.public_key, "tok2", csr, proof)
    assert not proof_holds(token.public_key, "tok1", make_csr(new_agent_key()[0]), proof)
    assert not proof_holds(JoinToken.new("tok1", "").public_key, "tok1", csr, proof)
    for bad in ("", "hjt1.a.b", "xyz.a.b.c", f"hjt1.tok1.short.{'0' * 64}"):
        with pytest.raises(CertificateRefused):
            JoinToken.parse(bad)


def test_a_ca_made_before_enrolment_is_replaced_with_one_that_can_sign_the_agent_ca(
    tmp_path: Path,
) -> None:
    """A CA of path length 0 (hangar up before agent enrolment) cannot have the agent CA
    under it: hangar up makes a new one and issues every leaf again."""
    directory = tmp_path / "tls"
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = datetime.datetime.now(datetime.UTC)
    old = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir()
    (directory / "ca.crt").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert ensure_platform_certificates(directory, {"runtime": []}) == ["runtime", "agent-ca"]
    new_ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    assert new_ca.subject != name
    agent_ca = AgentCa.from_directory(directory / "agent-ca")
    x509.load_pem_x509_certificate(agent_ca.cert_pem).verify_directly_issued_by(new_ca)
