"""Agents' certificates (docs/tls.md, "Agent enrolment"): the agent CA that runtime holds,
certificates bound to one server id, one-time join tokens, and the checks both sides make.

- **The agent CA** is an intermediate of the platform CA: path length 0 and name
  constraints (subject CN=agent, DNS names under agent.hangar.internal), so the key runtime
  holds can issue agent certificates and nothing else: a certificate it signed for
  `identity.hangar.internal` or CN=identity fails every handshake.
- **An agent's certificate**: CN "agent" (the process, as every process's), SANs
  `agent.hangar.internal` and `<server id>.agent.hangar.internal` (the server it may act as),
  client and server authentication, signed by the agent CA from a CSR: the agent's private
  key never leaves its machine.
- **A join token** (`hjt1.<token id>.<secret>.<CA hash>`): the secret is an Ed25519 seed
  whose public key is all runtime stores; the joiner signs its CSR with it, so the secret
  never travels and a database reader cannot forge a join; the CA hash (SHA-256 of the
  platform CA's public key, kubeadm's `--discovery-token-ca-cert-hash`) pins what the joiner
  trusts before it has any certificate.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from shared.tls import (
    CA_FILE,
    CERT_FILE,
    CLIENT_AUTH,
    KEY_FILE,
    LEAF_DAYS,
    SERVER_AUTH,
    key_usage,
    peer_name,
)

AGENT = "agent"
AGENT_DOMAIN = peer_name(AGENT)  # agent.hangar.internal
TOKEN_PREFIX = "hjt1"
_JOIN_CONTEXT = b"hangar agent join v1\x00"


class CertificateRefused(ValueError):
    """A CSR, a certificate or a token that does not hold what it must."""


def server_dns_name(server_id: str) -> str:
    return f"{server_id}.{AGENT_DOMAIN}"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_agent_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and its PEM (written 0600 by whoever keeps it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _private_pem(key)


def make_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The CSR an agent sends (DER): its public key, signed by it. Runtime decides the names."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AGENT)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class AgentCa:
    """The agent CA as runtime holds it: its certificate and key, and the platform CA
    bundle above it (what an enrolled agent is told to trust)."""

    cert_pem: bytes
    key_pem: bytes
    root_pem: bytes

    @classmethod
    def from_directory(cls, directory: Path) -> AgentCa:
        """kubernetes.io/tls layout: tls.crt (the agent CA), tls.key, ca.crt (the root)."""
        return cls(
            (directory / CERT_FILE).read_bytes(),
            (directory / KEY_FILE).read_bytes(),
            (directory / CA_FILE).read_bytes(),
        )

    @property
    def ca_hash(self) -> str:
        return ca_hash(self.root_pem)

    def sign(self, csr_der: bytes, server_id: str, *, days: int = LEAF_DAYS) -> bytes:
        """An agent certificate for `server_id` from a CSR (DER); the chain (leaf, agent CA)
        as PEM. Refuses a CSR whose signature does not verify or whose key is not P-256."""
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError:
            raise CertificateRefused("not a DER certificate signing request") from None
        if not csr.is_signature_valid:
            raise CertificateRefused("the request's signature does not verify")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
            raise CertificateRefused("the key must be ECDSA P-256")
        ca_cert = x509.load_pem_x509_certificate(self.cert_pem)
        ca_key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        start = _now() - datetime.timedelta(minutes=5)
        end = min(start + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, AGENT)]))
            .issuer_name(ca_cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([SERVER_AUTH, CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(AGENT_DOMAIN), x509.DNSName(server_dns_name(server_id))]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return _pem(cert) + self.cert_pem


def ca_hash(bundle_pem: bytes) -> str:
    """sha256 of the first certificate's SubjectPublicKeyInfo, hex (kubeadm's CA pin)."""
    cert = x509.load_pem_x509_certificate(bundle_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def serial_text(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def bound_server(cert: x509.Certificate) -> str:
    """The server id an agent certificate names ("" for a process certificate)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    suffix = "." + AGENT_DOMAIN
    for name in sans.get_values_for_type(x509.DNSName):
        if name.endswith(suffix) and name.count(".") == AGENT_DOMAIN.count(".") + 1:
            return name[: -len(suffix)]
    return ""


def check_issued(chain_pem: bytes, root_pem: bytes, key: ec.EllipticCurvePrivateKey) -> str:
    """What a joining or renewing agent checks of what runtime sent: the leaf holds its own
    key and chains (through the agent CA in the chain) to the pinned root; the server id it
    is bound to."""
    certs = x509.load_pem_x509_certificates(chain_pem)
    root = x509.load_pem_x509_certificate(root_pem)
    if len(certs) < 2:
        raise CertificateRefused("expected the agent certificate and the agent CA")
    leaf, agent_ca = certs[:2]
    same = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*same) != key.public_key().public_bytes(*same):
        raise CertificateRefused("the certificate is not for this agent's key")
    try:
        leaf.verify_directly_issued_by(agent_ca)
        agent_ca.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateRefused("the certificate does not chain to the pinned CA") from None
    server_id = bound_server(leaf)
    if not server_id:
        raise CertificateRefused("the certificate names no server")
    return server_id


# ------------------------------------------------------------------------- join tokens


@dataclass(frozen=True)
class JoinToken:
    """A join token's parts: its id (public, the row), its secret (an Ed25519 seed) and the
    pinned CA hash."""

    token_id: str
    secret: bytes
    ca_hash: str

    @classmethod
    def new(cls, token_id: str, ca_hash: str) -> JoinToken:
        import secrets

        return cls(token_id, secrets.token_bytes(32), ca_hash)

    def __str__(self) -> str:
        seed = base64.urlsafe_b64encode(self.secret).rstrip(b"=").decode()
        return f"{TOKEN_PREFIX}.{self.token_id}.{seed}.{self.ca_hash}"

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        parts = text.strip().split(".")
        if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
            raise CertificateRefused(f"a join token reads {TOKEN_PREFIX}.<id>.<secret>.<ca hash>")
        try:
            secret = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
        except ValueError:
            raise CertificateRefused("the token's secret is not base64") from None
        if len(secret) != 32 or len(parts[3]) != 64:
            raise CertificateRefused("the token is truncated")
        return cls(parts[1], secret, parts[3].lower())

    @property
    def _key(self) -> ed25519.Ed25519PrivateKey:
        return ed25519.Ed25519PrivateKey.from_private_bytes(self.secret)

    @property
    def public_key(self) -> bytes:
        """What runtime stores instead of the secret."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def prove(self, csr_der: bytes) -> bytes:
        """The joiner's proof that it holds the secret, bound to this one CSR."""
        return self._key.sign(_join_message(self.token_id, csr_der))


def _join_message(token_id: str, csr_der: bytes) -> bytes:
    return _JOIN_CONTEXT + token_id.encode() + b"\x00" + csr_der


def proof_holds(public_key: bytes, token_id: str, csr_der: bytes, proof: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(
            proof, _join_message(token_id, csr_der)
        )
    except (InvalidSignature, ValueError):
        return False
    return True
