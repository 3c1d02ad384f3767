"""The domain_certificates table and its queries (the certificate half of store.py, kept
apart so neither grows past what a reader holds in mind)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from services.project.store import domains, metadata
from shared.db import Session, from_row

domain_certificates = sa.Table(
    "domain_certificates",
    metadata,
    sa.Column("hostname", sa.Text, primary_key=True),
    sa.Column("project_id", sa.Text, nullable=False),
    sa.Column("certificate_chain_pem", sa.Text, nullable=False),
    sa.Column("key_ciphertext", sa.LargeBinary, nullable=False),
    sa.Column("key_nonce", sa.LargeBinary, nullable=False),
    sa.Column("key_version", sa.Integer, nullable=False),
    sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
    sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
    sa.Column("issuer", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("dns_names", pg.ARRAY(sa.Text), nullable=False),
    sa.Column("sha256_fingerprint", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

_T = domain_certificates.c
_FACTS = (
    _T.hostname,
    _T.project_id,
    _T.not_before,
    _T.not_after,
    _T.issuer,
    _T.subject,
    _T.dns_names,
    _T.sha256_fingerprint,
    _T.updated_at,
)


@dataclass(frozen=True)
class StoredCertificate:
    """A row; the chain and the sealed key only when the query read them."""

    hostname: str
    project_id: str
    not_before: datetime
    not_after: datetime
    issuer: str
    subject: str
    dns_names: list[str]
    sha256_fingerprint: str
    updated_at: datetime
    certificate_chain_pem: str = ""
    key_ciphertext: bytes = b""
    key_nonce: bytes = b""
    key_version: int = 0


async def upsert_certificate(tx: Session, row: StoredCertificate) -> StoredCertificate:
    """One statement: the row is whole or unchanged (the caller holds the project's lock)."""
    values = {
        "hostname": row.hostname,
        "project_id": row.project_id,
        "certificate_chain_pem": row.certificate_chain_pem,
        "key_ciphertext": row.key_ciphertext,
        "key_nonce": row.key_nonce,
        "key_version": row.key_version,
        "not_before": row.not_before,
        "not_after": row.not_after,
        "issuer": row.issuer,
        "subject": row.subject,
        "dns_names": row.dns_names,
        "sha256_fingerprint": row.sha256_fingerprint,
    }
    insert = pg.insert(domain_certificates).values(
        **values, created_at=sa.func.now(), updated_at=sa.func.now()
    )
    replaced = {k: insert.excluded[k] for k in values if k not in ("hostname", "project_id")}
    statement = insert.on_conflict_do_update(
        index_elements=[_T.hostname], set_={**replaced, "updated_at": sa.func.now()}
    ).returning(*_FACTS)
    stored = await tx.fetchrow(statement)
    assert stored is not None
    return from_row(StoredCertificate, stored)


async def project_certificates(s: Session, project_id: str) -> list[StoredCertificate]:
    """The project's certificates' facts (no chain, no key)."""
    statement = sa.select(*_FACTS).where(_T.project_id == project_id).order_by(_T.hostname)
    return [from_row(StoredCertificate, r) for r in await s.fetch(statement)]


async def delete_certificate(tx: Session, project_id: str, hostname: str) -> bool:
    statement = (
        sa.delete(domain_certificates)
        .where(_T.project_id == project_id, _T.hostname == hostname)
        .returning(_T.hostname)
    )
    return await tx.fetchrow(statement) is not None


async def verified_certificates(s: Session) -> list[StoredCertificate]:
    """Every verified domain's certificate, whole (sealed key included), by project."""
    statement = (
        sa.select(domain_certificates)
        .join(domains, domains.c.hostname == _T.hostname)
        .where(domains.c.verified_at.is_not(None), domains.c.project_id == _T.project_id)
        .order_by(_T.project_id, _T.hostname)
    )
    return [from_row(StoredCertificate, r) for r in await s.fetch(statement)]
