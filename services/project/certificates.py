"""Uploaded certificates of custom domains: checked, stored with the key sealed, handed to
the edge.

A verified domain may get a certificate its owner bought or made (SetDomainCertificate);
the edge then serves it for that name instead of obtaining one on demand. What is checked
(`check_certificate`, INVALID_ARGUMENT naming the field): PEM that parses, CERTIFICATE
blocks only in the chain (a key pasted there would be stored in clear), the leaf first and
each certificate issued (and signed) by the next, an unencrypted key of an accepted kind
(RSA >= 2048 bits, EC P-256/P-384, Ed25519) matching the leaf, the leaf's DNS names
covering the hostname (RFC 6125: a `*` only as the whole left-most label), valid now, and
sizes. The chain is not checked against any trust store (a private CA is the owner's
choice).

The key is sealed like a secret: AES-256-GCM under the project's data key, its AAD binding
project and hostname (crypto.seal_certificate_key), so a row copied elsewhere does not open.
A change writes project.domains_changed (runtime turns it into route.changed, after which
the edge reads the certificates again with the routes) and an audit entry, in the write's
transaction, under the project's lock: a set racing a delete ends in one or the other.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from services.project import certificate_store, store
from services.project.certificate_store import StoredCertificate
from services.project.crypto import (
    DATA_KEY_VERSION,
    DecryptionFailed,
    Sealed,
    open_certificate_key,
    seal_certificate_key,
)
from services.project.custom_domains import check_hostname, domains_changed
from services.project.domain import Project
from services.project.service import Projects
from shared.audit import record_audit
from shared.auth import require_service
from shared.certificates import covers
from shared.db import Database, Session
from shared.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

CHAIN_FIELD = "certificate_chain_pem"
KEY_FIELD = "private_key_pem"
MAX_CHAIN_BYTES = 64 * 1024
MAX_KEY_BYTES = 16 * 1024
MAX_CHAIN_CERTIFICATES = 8
EDGE = "edge"  # the only caller of ListDomainCertificates
_PEM_LABEL = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")
_KEY_LABELS = frozenset({"PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"})
_CURVES = (ec.SECP256R1, ec.SECP384R1)


@dataclass(frozen=True)
class CheckedCertificate:
    """What is stored: the chain re-encoded (nothing but its certificates), the key as
    PKCS#8 PEM, and the leaf's facts."""

    chain_pem: str
    key_pem: bytes
    not_before: datetime
    not_after: datetime
    issuer: str
    subject: str
    dns_names: list[str]
    sha256_fingerprint: str

    def __repr__(self) -> str:  # never the key
        return f"CheckedCertificate({self.sha256_fingerprint}, {self.dns_names})"


def _labels(pem: str) -> list[str]:
    return _PEM_LABEL.findall(pem)


def _parse_chain(chain_pem: str) -> list[x509.Certificate]:
    if not chain_pem.strip():
        raise InvalidArgument.field(CHAIN_FIELD, "required: the PEM chain, leaf first")
    if len(chain_pem.encode()) > MAX_CHAIN_BYTES:
        raise InvalidArgument.field(CHAIN_FIELD, f"at most {MAX_CHAIN_BYTES // 1024} KiB")
    labels = _labels(chain_pem)
    if any(label != "CERTIFICATE" for label in labels):
        raise InvalidArgument.field(
            CHAIN_FIELD, f"CERTIFICATE blocks only (the key goes in {KEY_FIELD})"
        )
    try:
        chain = x509.load_pem_x509_certificates(chain_pem.encode())
    except ValueError:
        raise InvalidArgument.field(CHAIN_FIELD, "not PEM certificates that parse") from None
    if len(chain) > MAX_CHAIN_CERTIFICATES:
        raise InvalidArgument.field(
            CHAIN_FIELD, f"at most {MAX_CHAIN_CERTIFICATES} certificates (leaf, intermediates)"
        )
    return chain


def _parse_key(key_pem: str) -> PrivateKeyTypes:
    if not key_pem.strip():
        raise InvalidArgument.field(KEY_FIELD, "required: the leaf's private key, PEM")
    if len(key_pem.encode()) > MAX_KEY_BYTES:
        raise InvalidArgument.field(KEY_FIELD, f"at most {MAX_KEY_BYTES // 1024} KiB")
    labels = _labels(key_pem)
    if labels == ["ENCRYPTED PRIVATE KEY"]:
        raise InvalidArgument.field(KEY_FIELD, "an unencrypted key (no passphrase)")
    if len(labels) != 1 or labels[0] not in _KEY_LABELS:
        raise InvalidArgument.field(KEY_FIELD, "one PEM private key block")
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidArgument.field(KEY_FIELD, "not a PEM private key that parses") from None
    if isinstance(key, rsa.RSAPrivateKey) and 2048 <= key.key_size <= 8192:
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, _CURVES):
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise InvalidArgument.field(
        KEY_FIELD, "RSA of 2048 to 8192 bits, EC P-256 or P-384, or Ed25519"
    )


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_order(chain: list[x509.Certificate], key_spki: bytes) -> None:
    if _spki(chain[0].public_key()) != key_spki:
        if any(_spki(c.public_key()) == key_spki for c in chain[1:]):
            raise InvalidArgument.field(CHAIN_FIELD, "the leaf (the key's certificate) first")
        raise InvalidArgument.field(KEY_FIELD, "does not match the leaf certificate's key")
    for n, (child, parent) in enumerate(itertools.pairwise(chain), start=1):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise InvalidArgument.field(
                CHAIN_FIELD,
                f"in order, leaf first: certificate {n} is not issued by certificate {n + 1}",
            ) from None


def _dns_names(leaf: x509.Certificate) -> list[str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(n).lower() for n in san.value.get_values_for_type(x509.DNSName)]


def check_certificate(
    hostname: str, chain_pem: str, key_pem: str, now: datetime
) -> CheckedCertificate:
    """The certificate as stored, or INVALID_ARGUMENT naming the field (module docstring)."""
    chain = _parse_chain(chain_pem)
    key = _parse_key(key_pem)
    _check_order(chain, _spki(key.public_key()))
    leaf = chain[0]
    names = _dns_names(leaf)
    if not any(covers(name, hostname) for name in names):
        raise InvalidArgument.field(
            CHAIN_FIELD, f"the leaf's DNS names (subjectAltName) do not cover {hostname}"
        )
    not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < not_before:
        raise InvalidArgument.field(CHAIN_FIELD, f"the leaf is not valid before {not_before}")
    if now >= not_after:
        raise InvalidArgument.field(CHAIN_FIELD, f"the leaf expired at {not_after}")
    pem = serialization.Encoding.PEM
    return CheckedCertificate(
        chain_pem="".join(c.public_bytes(pem).decode() for c in chain),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        not_before=not_before,
        not_after=not_after,
        issuer=leaf.issuer.rfc4514_string(),
        subject=leaf.subject.rfc4514_string(),
        dns_names=names,
        sha256_fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
    )


@dataclass(frozen=True)
class EdgeCertificate:
    project_id: str
    hostname: str
    chain_pem: str
    key_pem: str
    not_after: datetime
    sha256_fingerprint: str
    dns_names: list[str]

    def __repr__(self) -> str:  # never the key
        return f"EdgeCertificate({self.hostname}, {self.sha256_fingerprint})"


class DomainCertificates:
    """The certificate use cases (authorization is the caller's: Projects.authorized)."""

    def __init__(self, db: Database, projects: Projects, apps_domain: str) -> None:
        self.db = db
        self.projects = projects
        self.apps_domain = apps_domain

    async def facts(self, project: Project) -> dict[str, StoredCertificate]:
        async with self.db.session() as s:
            rows = await certificate_store.project_certificates(s, project.id)
        return {row.hostname: row for row in rows}

    async def _verified_domain(self, project: Project, hostname: str) -> store.StoredDomain:
        async with self.db.session() as s:
            found = await store.get_domain(s, project.id, hostname)
        if found is None:
            raise NotFound(f"{hostname} is not a domain of this project")
        if found.verified_at is None:
            raise FailedPrecondition(
                f"{hostname} is not verified yet: verify it, then upload its certificate",
                reason="DOMAIN_NOT_VERIFIED",
            )
        return found

    async def set(
        self, project: Project, raw_hostname: str, chain_pem: str, key_pem: str
    ) -> tuple[store.StoredDomain, StoredCertificate]:
        hostname = check_hostname(raw_hostname, self.apps_domain, "hostname")
        await self._verified_domain(project, hostname)
        checked = check_certificate(hostname, chain_pem, key_pem, datetime.now(UTC))
        async with self.db.transaction() as tx:
            await store.lock_project(tx, project.id)
            domain = await store.get_domain(tx, project.id, hostname)
            if domain is None or domain.verified_at is None:  # removed meanwhile
                raise NotFound(f"{hostname} is not a verified domain of this project")
            sealed = seal_certificate_key(
                await self.projects.data_key(tx, project.id), project.id, hostname, checked.key_pem
            )
            stored = await certificate_store.upsert_certificate(
                tx,
                StoredCertificate(
                    hostname=hostname,
                    project_id=project.id,
                    not_before=checked.not_before,
                    not_after=checked.not_after,
                    issuer=checked.issuer,
                    subject=checked.subject,
                    dns_names=checked.dns_names,
                    sha256_fingerprint=checked.sha256_fingerprint,
                    updated_at=datetime.now(UTC),
                    certificate_chain_pem=checked.chain_pem,
                    key_ciphertext=sealed.ciphertext,
                    key_nonce=sealed.nonce,
                    key_version=DATA_KEY_VERSION,
                ),
            )
            await self._changed(tx, project, "domain.certificate_set", hostname, checked)
        return domain, stored

    async def delete(self, project: Project, raw_hostname: str) -> store.StoredDomain:
        hostname = check_hostname(raw_hostname, self.apps_domain, "hostname")
        async with self.db.transaction() as tx:
            await store.lock_project(tx, project.id)
            domain = await store.get_domain(tx, project.id, hostname)
            if domain is None:
                raise NotFound(f"{hostname} is not a domain of this project")
            if not await certificate_store.delete_certificate(tx, project.id, hostname):
                raise NotFound(f"{hostname} has no uploaded certificate")
            await self._changed(tx, project, "domain.certificate_deleted", hostname, None)
        return domain

    async def _changed(
        self,
        tx: Session,
        project: Project,
        action: str,
        hostname: str,
        checked: CheckedCertificate | None,
    ) -> None:
        await domains_changed(tx, project)
        facts = (
            {"sha256_fingerprint": checked.sha256_fingerprint, "not_after": str(checked.not_after)}
            if checked
            else {}
        )
        await record_audit(
            tx,
            store.SCHEMA,
            organization_id=project.organization_id,
            action=action,
            target_type="domain",
            target_id=hostname,
            metadata={"project_id": project.id, **facts},
        )

    async def for_edge(self) -> list[EdgeCertificate]:
        """Every verified domain's certificate with its key opened: the edge's call only."""
        require_service(EDGE)
        out: list[EdgeCertificate] = []
        async with self.db.transaction(isolation="repeatable_read") as tx:
            rows = await certificate_store.verified_certificates(tx)
            keys: dict[str, bytes | None] = {}
            for row in rows:
                if row.project_id not in keys:
                    try:
                        keys[row.project_id] = await self.projects.data_key(tx, row.project_id)
                    except DomainError:
                        keys[row.project_id] = None
                data_key = keys[row.project_id]
                if data_key is None or (key := self._open(data_key, row)) is None:
                    extra = {"project_id": row.project_id, "hostname": row.hostname}
                    log.error("certificate key did not open; left out", extra=extra)
                    continue
                out.append(
                    EdgeCertificate(
                        row.project_id,
                        row.hostname,
                        row.certificate_chain_pem,
                        key,
                        row.not_after,
                        row.sha256_fingerprint,
                        row.dns_names,
                    )
                )
        return out

    @staticmethod
    def _open(data_key: bytes, row: StoredCertificate) -> str | None:
        sealed = Sealed(row.key_ciphertext, row.key_nonce)
        try:
            return open_certificate_key(
                data_key, row.project_id, row.hostname, row.key_version, sealed
            ).decode()
        except DecryptionFailed:
            return None
