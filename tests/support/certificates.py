"""Certificates made in tests: a throw-away CA and leaves it signs (cryptography only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

PrivateKey = Any  # rsa / ec / ed25519 private keys


def new_key(kind: str = "ec256") -> PrivateKey:
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ec521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind.startswith("rsa"):
        return rsa.generate_private_key(65537, int(kind[3:]))
    raise ValueError(kind)


def key_pem(key: PrivateKey, *, password: bytes = b"") -> str:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    ).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _sign_algorithm(key: PrivateKey) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


@dataclass
class Leaf:
    cert: x509.Certificate
    key: PrivateKey
    chain: list[x509.Certificate]  # the leaf, then the intermediates (no root)

    @property
    def chain_pem(self) -> str:
        return "".join(cert_pem(c) for c in self.chain)

    @property
    def key_pem(self) -> str:
        return key_pem(self.key)

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()


@dataclass
class TestCA:
    """A root (and one intermediate) that sign leaves for any name."""

    name: str = "Hangar Test Root"
    key: PrivateKey = field(default_factory=new_key)
    cert: x509.Certificate = field(init=False)
    intermediate_key: PrivateKey = field(default_factory=new_key)
    intermediate: x509.Certificate = field(init=False)

    __test__ = False  # not a pytest test class

    def __post_init__(self) -> None:
        now = datetime.now(UTC)
        self.cert = self._ca(self.name, self.key.public_key(), self.key, None, now)
        self.intermediate = self._ca(
            f"{self.name} Intermediate",
            self.intermediate_key.public_key(),
            self.key,
            self.cert,
            now,
        )

    @staticmethod
    def _ca(
        name: str,
        public_key: Any,
        signer: PrivateKey,
        issuer: x509.Certificate | None,
        now: datetime,
    ) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(signer, _sign_algorithm(signer))
        )

    @property
    def root_pem(self) -> str:
        return cert_pem(self.cert)

    def leaf(
        self,
        *names: str,
        key: PrivateKey | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        common_name: str = "",
    ) -> Leaf:
        now = datetime.now(UTC)
        key = key if key is not None else new_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or names[0])])
            )
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(hours=1))
            .not_valid_after(not_after or now + timedelta(days=90))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
        cert = builder.sign(self.intermediate_key, _sign_algorithm(self.intermediate_key))
        return Leaf(cert, key, [cert, self.intermediate])
