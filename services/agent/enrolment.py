"""The agent's side of enrolment (docs/tls.md, "Agent enrolment"): `join` spends a one-time
join token for a certificate bound to this server, `CertificateRenewer` renews it before it
expires. The private key is made here and never leaves this machine: runtime gets CSRs."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hangar.runtime.v1 import enrolment_pb2, enrolment_pb2_grpc, runtime_pb2, runtime_pb2_grpc
from shared.agent_certs import (
    CertificateRefused,
    JoinToken,
    bound_server,
    ca_hash,
    check_issued,
    make_csr,
    new_agent_key,
    serial_text,
)
from shared.clients import Clients
from shared.files import write_private
from shared.loops import run_every
from shared.settings import Settings, TlsFiles
from shared.tls import CA_FILE, CERT_FILE, KEY_FILE, RENEW_WITHIN_DAYS

log = logging.getLogger("hangar.agent.enrolment")

RUNTIME_SERVICE = runtime_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
RENEW_CHECK_SECONDS = 3600.0


@dataclass(frozen=True)
class Joined:
    server_id: str
    serial: str
    not_after: datetime.datetime
    directory: Path


def _write(files: TlsFiles, key_pem: bytes, chain_pem: bytes, ca_pem: bytes) -> None:
    """Key, then chain, then CA bundle, each atomically; a reader between two of them sees
    a key that is not its certificate's and keeps the pair it had (shared.tls)."""
    write_private(Path(files.key_file), key_pem)
    write_private(Path(files.cert_file), chain_pem)
    write_private(Path(files.ca_file), ca_pem)


async def join(
    token_text: str, enrolment_address: str, directory: Path, *, call_timeout: float
) -> Joined:
    """Spend `token_text` at runtime's enrolment address: the agent's key, certificate and CA
    bundle in `directory` (kubernetes.io/tls layout). The answer is believed only if its CA
    bundle is the one the token pins and the certificate chains to it for this key."""
    token = JoinToken.parse(token_text)
    key, key_pem = new_agent_key()
    csr = make_csr(key)
    async with grpc.aio.insecure_channel(enrolment_address) as channel:
        stub = enrolment_pb2_grpc.AgentEnrolmentServiceStub(channel)
        issued: runtime_pb2.AgentCertificate = await stub.JoinAgent(
            enrolment_pb2.JoinAgentRequest(
                token_id=token.token_id, csr=csr, proof=token.prove(csr)
            ),
            timeout=call_timeout,
        )
    ca_pem = issued.ca_bundle.encode()
    if ca_hash(ca_pem) != token.ca_hash:
        raise CertificateRefused("the CA runtime sent is not the one the join token pins")
    return _keep_joined(directory, key, key_pem, issued.certificate_chain.encode(), ca_pem)


def _keep_joined(
    directory: Path, key: ec.EllipticCurvePrivateKey, key_pem: bytes, chain: bytes, ca: bytes
) -> Joined:
    server_id = check_issued(chain, ca, key)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(
        TlsFiles(str(directory / CA_FILE), str(directory / CERT_FILE), str(directory / KEY_FILE)),
        key_pem,
        chain,
        ca,
    )
    leaf = x509.load_pem_x509_certificate(chain)
    return Joined(server_id, serial_text(leaf), leaf.not_valid_after_utc, directory)


def bound_server_of(files: TlsFiles) -> str:
    """The server id this agent's certificate is bound to ("" without one)."""
    if not files.cert_file:
        return ""
    try:
        return bound_server(x509.load_pem_x509_certificate(Path(files.cert_file).read_bytes()))
    except (OSError, ValueError):
        return ""


class CertificateRenewer:
    """Renews an enrolled agent's certificate once it expires within `renew_within_days`:
    a new key, its CSR sent over mutual TLS with the current certificate, the answer
    checked and written. Servers and new channels of this process pick the files up
    (shared.tls). One agent per server: nothing to share with a second replica, and a
    second agent of the same server renewing too only replaces the first's serial."""

    def __init__(
        self,
        files: TlsFiles,
        clients: Clients,
        *,
        renew_within_days: float = RENEW_WITHIN_DAYS,
        timeout: float = 10.0,
        on_renewed: Callable[[], None] | None = None,
    ) -> None:
        self.files = files
        self.clients = clients
        self.on_renewed = on_renewed  # what else calls with the files (the log shippers)
        self.renew_within = datetime.timedelta(days=renew_within_days)
        self.timeout = timeout

    def _due(self) -> x509.Certificate | None:
        cert = x509.load_pem_x509_certificate(Path(self.files.cert_file).read_bytes())
        if not bound_server(cert):
            return None  # a platform certificate: the operator (or cert-manager) renews it
        left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        return cert if left < self.renew_within else None

    async def renew_if_due(self) -> bool:
        current = self._due()
        if current is None:
            return False
        key, key_pem = new_agent_key()
        stub = self.clients.stub("runtime", runtime_pb2_grpc.RuntimeServiceStub, RUNTIME_SERVICE)
        issued: runtime_pb2.AgentCertificate = await stub.RenewAgentCertificate(
            runtime_pb2.RenewAgentCertificateRequest(csr=make_csr(key)), timeout=self.timeout
        )
        server_id = self._keep(current, key, key_pem, issued.certificate_chain.encode())
        log.info("agent certificate renewed", extra={"server": server_id, "serial": issued.serial})
        return True

    def _keep(
        self,
        current: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        key_pem: bytes,
        chain: bytes,
    ) -> str:
        ca_pem = Path(self.files.ca_file).read_bytes()
        server_id = check_issued(chain, ca_pem, key)
        if server_id != bound_server(current):
            raise CertificateRefused(f"runtime renewed for server {server_id}, not this one")
        _write(self.files, key_pem, chain, ca_pem)
        self.clients.files_changed()  # the next calls go on a channel with the new files
        if self.on_renewed is not None:
            self.on_renewed()
        return server_id

    async def run(self) -> None:
        await run_every(RENEW_CHECK_SECONDS, self.renew_if_due, "agent_certificate_renewal")


def with_bound_server(settings: Settings) -> Settings:
    """An enrolled agent acts as the server its certificate names unless HANGAR_AGENT_SERVER
    says otherwise (runtime refuses any other, so the setting may be left out)."""
    import dataclasses

    if settings.agent_server:
        return settings
    bound = bound_server_of(settings.tls)
    return dataclasses.replace(settings, agent_server=bound) if bound else settings
