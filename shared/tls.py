"""Mutual TLS between Hangar's processes: a platform CA, one certificate per process, and the
gRPC credentials servers and clients build from them (docs/tls.md).

Each process has a name (identity, project, runtime, billing, agent, gateway, edge); its
certificate names it as the DNS name `<name>.hangar.internal` (what clients check, whatever
address they dial) plus the hosts it listens on, and may serve and call (server and client
auth). Without HANGAR_TLS_* settings every process speaks plaintext, as before.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.files import write_private
from shared.settings import TlsFiles

log = logging.getLogger("hangar.tls")

PEER_DOMAIN = "hangar.internal"
CA_DAYS = 3650
LEAF_DAYS = 90
RENEW_WITHIN_DAYS = 30
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
# The file names of a Kubernetes Secret of type kubernetes.io/tls (what cert-manager writes).
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
AGENT_CA_DIR = "agent-ca"  # beside the processes' directories in `hangar up`'s PKI


def key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA's (signing certificates and CRLs) or a leaf's (signatures only: ECDSA)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def peer_name(process: str) -> str:
    """The DNS name a process's certificate carries and its clients check."""
    return f"{process}.{PEER_DOMAIN}"


def process_of(service_full_name: str) -> str:
    """The process that serves a gRPC service: "hangar.identity.v1.IdentityService" -> identity."""
    parts = service_full_name.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "hangar" else ""


@dataclass(frozen=True)
class TlsCredentials:
    """One process's side of mutual TLS: the CA it trusts, its chain and its key (PEM).

    Read from files (`from_files`, `from_directory`), it follows them: a server built with
    `server_credentials` serves the files' current certificate to each new connection (a
    renewed one without restart), and `channel_credentials` reads the current files, so a
    channel made after a renewal presents the new certificate."""

    ca_pem: bytes
    cert_chain_pem: bytes
    key_pem: bytes
    files: TlsFiles | None = field(default=None, compare=False)

    @classmethod
    def from_files(cls, files: TlsFiles) -> TlsCredentials | None:
        """None when no file is set (plaintext); all three or an error naming what is missing."""
        if not files.enabled:
            return None
        named = {
            "HANGAR_TLS_CA_FILE": files.ca_file,
            "HANGAR_TLS_CERT_FILE": files.cert_file,
            "HANGAR_TLS_KEY_FILE": files.key_file,
        }
        missing = [name for name, path in named.items() if not path]
        if missing:
            raise ValueError(f"TLS needs all three files; {', '.join(missing)} not set")
        return cls(
            Path(files.ca_file).read_bytes(),
            Path(files.cert_file).read_bytes(),
            Path(files.key_file).read_bytes(),
            files,
        )

    @classmethod
    def from_directory(cls, directory: Path) -> TlsCredentials:
        """The files of one process in the kubernetes.io/tls layout (ca.crt, tls.crt, tls.key)."""
        found = cls.from_files(
            TlsFiles(
                str(directory / CA_FILE), str(directory / CERT_FILE), str(directory / KEY_FILE)
            )
        )
        assert found is not None
        return found

    def stamp(self) -> tuple[tuple[int, int], ...]:
        """What changes when any of the files is replaced (modification time and size)."""
        if self.files is None:
            return ()
        stamps = []
        for path in (self.files.ca_file, self.files.cert_file, self.files.key_file):
            try:
                stat = os.stat(path)
            except OSError:
                stamps.append((0, 0))
            else:
                stamps.append((stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)

    def current(self) -> TlsCredentials:
        """The files as they are now, if they make a usable pair (a certificate whose key is
        the key file's: a renewal half written keeps the last good pair); else these."""
        if self.files is None:
            return self
        try:
            found = TlsCredentials.from_files(self.files)
        except (OSError, ValueError):
            return self
        return found if found is not None and found.pair_matches() else self

    def pair_matches(self) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(self.cert_chain_pem)
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError):
            return False
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with this chain; refuse, at the handshake, a client without a certificate
        the CA signed. From files: each handshake after they change uses the new ones."""
        if self.files is None:
            return grpc.ssl_server_credentials(
                [(self.key_pem, self.cert_chain_pem)],
                root_certificates=self.ca_pem,
                require_client_auth=True,
            )
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self), _ServedFiles(self), require_client_authentication=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        now = self.current()
        return grpc.ssl_channel_credentials(
            root_certificates=now.ca_pem,
            private_key=now.key_pem,
            certificate_chain=now.cert_chain_pem,
        )

    @staticmethod
    def channel_options(process: str) -> list[tuple[str, Any]]:
        """Check the server's certificate against `process`'s name, not the dialled address
        (loopback IPs and replica lists say nothing about who answers)."""
        return [("grpc.ssl_target_name_override", peer_name(process))]


def _serial(tls: TlsCredentials) -> str:
    return format(x509.load_pem_x509_certificate(tls.cert_chain_pem).serial_number, "x")


def _configuration(tls: TlsCredentials) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(tls.key_pem, tls.cert_chain_pem)], root_certificates=tls.ca_pem
    )


class _ServedFiles:
    """grpc's certificate-configuration fetcher: called before each handshake; a new
    configuration once the files changed (and make a usable pair), else None (keep)."""

    def __init__(self, tls: TlsCredentials) -> None:
        self.tls = tls
        self.served = tls.stamp()

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self.tls.stamp()
        if stamp == self.served:
            return None
        fresh = self.tls.current()
        if fresh is self.tls:
            return None  # unreadable or half written: try again at the next handshake
        self.served = stamp
        log.info(
            "serving a renewed certificate",
            extra={"file": self.tls.files and self.tls.files.cert_file},
        )
        return _configuration(fresh)


def certified_process(context: grpc.aio.ServicerContext) -> str:
    """The process the caller's certificate names (its common name); "" without TLS."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else ""


@functools.cache
def process_tls() -> TlsCredentials | None:
    """This process's credentials from HANGAR_TLS_* (read once): what start_server and
    open_channel use unless given others. Channels are opened where no settings object is at
    hand (token sources), and a process has one identity, hence one cached value."""
    return TlsCredentials.from_files(TlsFiles.from_env())


def tls_environment(directory: Path) -> dict[str, str]:
    """The HANGAR_TLS_* settings of a process whose files are in `directory`."""
    return {
        "HANGAR_TLS_CA_FILE": str(directory / CA_FILE),
        "HANGAR_TLS_CERT_FILE": str(directory / CERT_FILE),
        "HANGAR_TLS_KEY_FILE": str(directory / KEY_FILE),
    }


# ----------------------------------------------------------------------------- issuing


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_ca(name: str = "Hangar platform CA", *, days: int = CA_DAYS) -> Issued:
    """A self-signed ECDSA P-256 CA: it signs leaves and one level of intermediates (path
    length 1: the agent CA runtime holds, shared.agent_certs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def issue_certificate(
    ca: Issued,
    process: str,
    hosts: Iterable[str] = (),
    *,
    days: int = LEAF_DAYS,
    usages: Sequence[x509.ObjectIdentifier] = (SERVER_AUTH, CLIENT_AUTH),
    not_before: datetime.datetime | None = None,
) -> Issued:
    """A leaf for `process`: SANs its peer name and `hosts` (IPs or names it listens on)."""
    ca_cert = ca.certificate
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - datetime.timedelta(minutes=5)
    names = [peer_name(process), *dict.fromkeys(h for h in hosts if h)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, process)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def subject_alternative_names(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [
        *sans.get_values_for_type(x509.DNSName),
        *map(str, sans.get_values_for_type(x509.IPAddress)),
    ]


def write_issued(directory: Path, ca_cert_pem: bytes, issued: Issued) -> None:
    """A process's files in the kubernetes.io/tls layout: tls.key (0600), tls.crt, ca.crt."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(directory / KEY_FILE, issued.key_pem)
    write_private(directory / CERT_FILE, issued.cert_pem)
    write_private(directory / CA_FILE, ca_cert_pem)


def _needs_renewal(
    directory: Path, ca: Issued, process: str, hosts: Sequence[str], renew_within: float
) -> bool:
    try:
        cert = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
        (directory / KEY_FILE).stat()
        trusted = (directory / CA_FILE).read_bytes()
        cert.verify_directly_issued_by(ca.certificate)  # not another CA of the same name
    except (OSError, ValueError, TypeError, InvalidSignature):
        return True
    wanted = {peer_name(process), *(h.strip("[]") for h in hosts if h)}
    return (
        trusted != ca.cert_pem
        or cert.not_valid_after_utc - _now() < datetime.timedelta(days=renew_within)
        or set(subject_alternative_names(cert)) != wanted
    )


def ensure_platform_certificates(
    directory: Path,
    processes: Mapping[str, Sequence[str]],
    *,
    renew_within_days: float = RENEW_WITHIN_DAYS,
) -> list[str]:
    """The local platform's PKI under `directory`: the CA (ca.key 0600, ca.crt), created once,
    `<process>/` with each process's files (hosts: what it listens on), and `agent-ca/`, the
    agent CA runtime signs enrolled agents' certificates with (shared.agent_certs). A leaf
    missing, expiring within `renew_within_days`, of another CA or with other hosts is
    issued again.
    Returns the processes whose certificates were (re)issued."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca: Issued | None = None
    if (directory / "ca.key").exists() and (directory / "ca.crt").exists():
        ca = Issued((directory / "ca.crt").read_bytes(), (directory / "ca.key").read_bytes())
        if _path_length(ca.certificate) == 0:
            ca = None  # made before agent enrolment: it cannot sign the agent CA
    if ca is None:
        ca = create_ca()
        write_private(directory / "ca.key", ca.key_pem)
        write_private(directory / "ca.crt", ca.cert_pem)
    issued = []
    for process, hosts in processes.items():
        own = directory / process
        if _needs_renewal(own, ca, process, hosts, renew_within_days):
            write_issued(own, ca.cert_pem, issue_certificate(ca, process, hosts))
            issued.append(process)
    if ensure_agent_ca(directory / AGENT_CA_DIR, ca, renew_within_days):
        issued.append(AGENT_CA_DIR)
    return issued


def _path_length(cert: x509.Certificate) -> int | None:
    return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length


def host_of(address: str) -> str:
    """The host of "host:port" ("[::1]:50051" -> "::1")."""
    return address.rpartition(":")[0].strip("[]")


# ----------------------------------------------------------------------- the agent CA


def create_agent_ca(root: Issued, *, days: int = 5 * 365) -> Issued:
    """The agent CA, signed by the platform CA (whose key only `hangar up` or the operator
    holds): it may sign agent certificates only."""
    root_cert = root.certificate
    root_key = serialization.load_pem_private_key(root.key_pem, password=None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    agent_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Hangar agent CA")]))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), root_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[
                    x509.DNSName(peer_name("agent")),
                    x509.DirectoryName(agent_subject),
                ],
                excluded_subtrees=None,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def ensure_agent_ca(directory: Path, root: Issued, renew_within_days: float) -> bool:
    """`hangar up`'s agent CA in `directory` (tls.crt, tls.key, ca.crt): made when missing,
    of another root, or expiring within `renew_within_days`. True when (re)made."""
    try:
        cert = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
        (directory / KEY_FILE).stat()
        cert.verify_directly_issued_by(root.certificate)
        fresh = (directory / CA_FILE).read_bytes() == root.cert_pem and (
            cert.not_valid_after_utc - _now() > datetime.timedelta(days=renew_within_days)
        )
    except (OSError, ValueError, TypeError, InvalidSignature):
        fresh = False
    if not fresh:
        write_issued(directory, root.cert_pem, create_agent_ca(root))
    return not fresh
