"""Uploaded certificates at the edge: read from project, loaded into Caddy.

A custom domain's owner may upload its certificate (project's SetDomainCertificate). The
edge reads every one with its key from project's `ListDomainCertificates` (the edge's
service token only), whenever it reads the route table (project writes
project.domains_changed on a certificate change, which runtime turns into route.changed),
and puts them in Caddy's config: `apps.tls.certificates.load_pem`, each tagged with its
hostname, and one TLS connection policy per name (`match.sni`) that selects only the
certificate of that tag. Caddy looks in its certificate cache before it would issue one on
demand, so that name gets the uploaded certificate. A certificate is served for its own
name only: another name of the table its SANs cover (another project's domain, say) gets a
policy selecting nothing from the cache, so Caddy obtains that name's own on demand. A
certificate is left out once expired (the name falls back to on-demand issuance), and for a
name not in the table; a warning is logged from 14 days before its expiry. Keys are never
logged (no repr, no log line carries one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from hangar.project.v1 import project_pb2, project_pb2_grpc
from shared.certificates import covers
from shared.clients import Clients

log = logging.getLogger("hangar.edge")

PROJECT_SERVICE = project_pb2.DESCRIPTOR.services_by_name["ProjectService"]
TAG_PREFIX = "hangar-domain:"
EXPIRY_WARNING = timedelta(days=14)
WARN_EVERY_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class UploadedCertificate:
    hostname: str
    chain_pem: str
    key_pem: str = field(repr=False)
    not_after: datetime
    sha256_fingerprint: str = ""
    project_id: str = ""
    dns_names: tuple[str, ...] = ()  # the leaf's; the edge serves it for `hostname` only

    @property
    def tag(self) -> str:
        return TAG_PREFIX + self.hostname


class CertificateSource(Protocol):
    async def fetch(self) -> list[UploadedCertificate]:
        """Every uploaded certificate, with its key."""
        ...


class StaticCertificates:
    """A CertificateSource held in this process (tests)."""

    def __init__(self, certificates: Sequence[UploadedCertificate] = ()) -> None:
        self.certificates = list(certificates)

    async def fetch(self) -> list[UploadedCertificate]:
        return list(self.certificates)


class ProjectCertificates:
    """project's ListDomainCertificates, over the edge's clients (its service token)."""

    def __init__(self, clients: Clients, timeout: float) -> None:
        self.clients = clients
        self.timeout = timeout

    async def fetch(self) -> list[UploadedCertificate]:
        stub = self.clients.stub("project", project_pb2_grpc.ProjectServiceStub, PROJECT_SERVICE)
        reply = await stub.ListDomainCertificates(
            project_pb2.ListDomainCertificatesRequest(), timeout=self.timeout
        )
        return [
            UploadedCertificate(
                hostname=c.hostname,
                chain_pem=c.certificate_chain_pem,
                key_pem=c.private_key_pem,
                not_after=c.not_after.ToDatetime(tzinfo=UTC),
                sha256_fingerprint=c.sha256_fingerprint,
                project_id=c.project_id,
                dns_names=tuple(c.dns_names),
            )
            for c in reply.certificates
        ]


class ExpiryWarnings:
    """Filters what Caddy gets and says when an uploaded certificate nears its end (once a
    day per certificate, not at every read)."""

    def __init__(self) -> None:
        self._warned: dict[str, float] = {}

    def usable(
        self, certificates: Iterable[UploadedCertificate], hostnames: frozenset[str], now: datetime
    ) -> list[UploadedCertificate]:
        out: dict[str, UploadedCertificate] = {}
        for cert in certificates:
            if cert.hostname not in hostnames:
                continue  # not (or no longer) a routed name
            left = cert.not_after - now
            if left <= timedelta(0):
                self._warn(cert, "uploaded certificate expired; the name gets one on demand")
                continue
            if left <= EXPIRY_WARNING:
                self._warn(cert, "uploaded certificate expires soon; upload a renewed one")
            out[cert.hostname] = cert
        return [out[name] for name in sorted(out)]

    def _warn(self, cert: UploadedCertificate, message: str) -> None:
        key = f"{cert.sha256_fingerprint}/{cert.hostname}/{message}"
        if time.monotonic() - self._warned.get(key, -WARN_EVERY_SECONDS) < WARN_EVERY_SECONDS:
            return
        self._warned[key] = time.monotonic()
        log.warning(
            message,
            extra={
                "hostname": cert.hostname,
                "project_id": cert.project_id,
                "not_after": cert.not_after.isoformat(),
                "sha256_fingerprint": cert.sha256_fingerprint,
            },
        )


def load_pem(certificates: Sequence[UploadedCertificate]) -> list[dict[str, Any]]:
    """Caddy's `tls.certificates.load_pem`: each certificate tagged with its name."""
    return [{"certificate": c.chain_pem, "key": c.key_pem, "tags": [c.tag]} for c in certificates]


def connection_policies(
    certificates: Sequence[UploadedCertificate], hostnames: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """One policy per uploaded name, selecting its certificate only; one per other name of
    the table that an upload's SANs cover, selecting nothing (so Caddy issues that name's
    own on demand instead of serving someone else's upload); then the default."""
    own = {c.hostname for c in certificates}
    covered = sorted(
        name
        for name in set(hostnames) - own
        if any(covers(pattern, name) for c in certificates for pattern in c.dns_names)
    )
    policies: list[dict[str, Any]] = [
        {"match": {"sni": [name]}, "certificate_selection": {"any_tag": [TAG_PREFIX + name]}}
        for name in sorted(own | set(covered))
    ]
    return [*policies, {}]
