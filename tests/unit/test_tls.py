"""The platform CA and process certificates (shared.tls), the files `hangar up` keeps, and the
settings that point a process at them."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from hangar_cli.cli import PROCESSES, SUPERVISOR, platform_tls, supervisor_tls
from shared.settings import TlsFiles
from shared.tls import (
    SERVER_AUTH,
    TlsCredentials,
    create_ca,
    ensure_platform_certificates,
    issue_certificate,
    process_of,
    subject_alternative_names,
)

DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def test_the_ca_is_a_ten_year_p256_ca_that_signs_leaves_and_the_agent_ca_only() -> None:
    cert = create_ca().certificate
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 1  # one level: the agent CA
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 3649 * DAY < lifetime < 3651 * DAY


def test_a_process_certificate_names_the_process_and_its_hosts() -> None:
    ca = create_ca()
    cert = issue_certificate(ca, "identity", ["127.0.0.1", "identity-0.identity", "[::1]"])
    leaf = cert.certificate
    assert subject_alternative_names(leaf) == [
        "identity.hangar.internal",
        "identity-0.identity",
        "127.0.0.1",
        "::1",
    ]
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.issuer == ca.certificate.subject
    leaf.verify_directly_issued_by(ca.certificate)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == 90 * DAY
    assert leaf.not_valid_before_utc <= _now() <= leaf.not_valid_after_utc
    server_only = issue_certificate(ca, "x", usages=(SERVER_AUTH,)).certificate
    assert list(server_only.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]


def test_the_platform_files_are_made_once_with_private_keys_0600(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    hosts = {"identity": ["127.0.0.1"], "agent": ["10.0.0.5"]}
    assert ensure_platform_certificates(directory, hosts) == ["identity", "agent", "agent-ca"]
    keys = ("ca.key", "identity/tls.key", "agent/tls.key", "agent-ca/tls.key")
    for key in (directory / k for k in keys):
        assert key.stat().st_mode & 0o777 == 0o600, key
    assert directory.stat().st_mode & 0o777 == 0o700
    before = (directory / "identity/tls.crt").read_bytes()
    assert ensure_platform_certificates(directory, hosts) == []  # reused
    assert (directory / "identity/tls.crt").read_bytes() == before
    # Another address: that process's certificate is issued again (the CA stays).
    ca = (directory / "ca.crt").read_bytes()
    assert ensure_platform_certificates(directory, {**hosts, "agent": ["10.0.0.6"]}) == ["agent"]
    assert (directory / "ca.crt").read_bytes() == ca


def test_a_certificate_expiring_within_thirty_days_is_renewed(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    ensure_platform_certificates(directory, {"runtime": ["127.0.0.1"]})
    assert ensure_platform_certificates(directory, {"runtime": ["127.0.0.1"]}) == []
    # 89 days from now the leaf (90 days) would be within 30 days of its end: renew then.
    assert ensure_platform_certificates(
        directory, {"runtime": ["127.0.0.1"]}, renew_within_days=91
    ) == ["runtime"]


def test_settings_read_the_kubernetes_tls_layout_or_single_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HANGAR_TLS_DIR", "HANGAR_TLS_CA_FILE", "HANGAR_TLS_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HANGAR_TLS_KEY_FILE", raising=False)
    assert not TlsFiles.from_env().enabled
    assert TlsCredentials.from_files(TlsFiles.from_env()) is None  # plaintext, as before
    ensure_platform_certificates(tmp_path, {"billing": []})
    monkeypatch.setenv("HANGAR_TLS_DIR", str(tmp_path / "billing"))  # a mounted Secret
    files = TlsFiles.from_env()
    assert files == TlsFiles(
        str(tmp_path / "billing/ca.crt"),
        str(tmp_path / "billing/tls.crt"),
        str(tmp_path / "billing/tls.key"),
    )
    assert TlsCredentials.from_files(files) is not None
    monkeypatch.delenv("HANGAR_TLS_DIR")
    monkeypatch.setenv("HANGAR_TLS_CERT_FILE", str(tmp_path / "billing/tls.crt"))
    with pytest.raises(ValueError, match="HANGAR_TLS_CA_FILE, HANGAR_TLS_KEY_FILE"):
        TlsCredentials.from_files(TlsFiles.from_env())


def test_hangar_up_gives_each_process_its_own_key_only(tmp_path: Path) -> None:
    addresses = {name: f"127.0.0.{i + 1}:5000{i}" for i, name in enumerate(PROCESSES)}
    envs = platform_tls(tmp_path, addresses)
    assert set(envs) == {*PROCESSES, SUPERVISOR}
    keys = {env["HANGAR_TLS_KEY_FILE"] for env in envs.values()}
    assert len(keys) == len(envs)  # nobody shares a key
    for name, env in envs.items():
        assert env["HANGAR_TLS_KEY_FILE"] == str(tmp_path / "tls" / name / "tls.key")
        assert "ca.key" not in "".join(env.values())
    runtime = x509.load_pem_x509_certificate(
        Path(envs["runtime"]["HANGAR_TLS_CERT_FILE"]).read_bytes()
    )
    assert "127.0.0.4" in subject_alternative_names(runtime)
    assert supervisor_tls(tmp_path) is not None
    assert supervisor_tls(tmp_path / "elsewhere") is None


def test_the_process_a_service_is_served_by() -> None:
    assert process_of("hangar.identity.v1.IdentityService") == "identity"
    assert process_of("hangar.agent.v1.AgentService") == "agent"
    assert process_of("grpc.health.v1.Health") == ""


def test_a_new_ca_means_new_certificates_for_everyone(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    ensure_platform_certificates(directory, {"identity": [], "project": []})
    (directory / "ca.key").unlink()  # start over: a new CA of the same name
    assert ensure_platform_certificates(directory, {"identity": [], "project": []}) == [
        "identity",
        "project",
        "agent-ca",
    ]
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    for process in ("identity", "project"):
        leaf = x509.load_pem_x509_certificate((directory / process / "tls.crt").read_bytes())
        leaf.verify_directly_issued_by(ca)
        assert (directory / process / "ca.crt").read_bytes() == (directory / "ca.crt").read_bytes()
