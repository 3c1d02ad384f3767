"""deploy/k8s and mutual TLS (docs/tls.md): cert-manager's objects (CRDs the offline schemas
lack, checked by structure as the ServiceMonitor is) and the cross-checks that tie them to
the workloads: every process mounts the kubernetes.io/tls Secret of a Certificate that names
it and points HANGAR_TLS_DIR there; the Certificates chain to the platform CA Issuer; runtime
mounts the agent CA and serves enrolment on a port its Service exposes; kubelet's gRPC
probes reach the plaintext health port (they cannot present a certificate)."""

from __future__ import annotations

from pathlib import Path

from shared.tls import peer_name
from tests.unit.test_manifests import (
    Doc,
    container_ports,
    containers,
    docs_of,
    env_value,
    expand,
    name_of,
    pod_spec,
    port_of,
    where,
    workloads,
)

TLS_DOC = Path(__file__).resolve().parents[2] / "docs" / "tls.md"
CERTIFICATE_KEYS = {
    "secretName",
    "commonName",
    "dnsNames",
    "usages",
    "duration",
    "renewBefore",
    "privateKey",
    "issuerRef",
    "isCA",
    "nameConstraints",
}


def _certificates() -> dict[str, Doc]:
    """secretName -> the Certificate's spec."""
    return {c["spec"]["secretName"]: c["spec"] for c in docs_of("Certificate")}


def _issuers() -> dict[str, Doc]:
    return {name_of(i): i["spec"] for i in docs_of("Issuer")}


def _process_containers() -> list[tuple[Doc, Doc, str]]:
    """(workload, container, process) of every `serve <process>` container."""
    found = []
    for workload in workloads():
        for container in containers(workload):
            args = container.get("args", [])
            if args[:1] == ["serve"]:
                found.append((workload, container, args[1]))
    return found


def _secret_mounted_at(workload: Doc, container: Doc, path: str) -> str | None:
    """The Secret whose volume the container mounts at `path`."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] == path:
            secret = volumes[mount["name"]].get("secret")
            if secret is None:
                return None
            assert mount.get("readOnly"), f"{where(workload, container)}: {path} is writable"
            return str(secret["secretName"])
    return None


def test_certificates_and_issuers_are_well_formed() -> None:
    certificates, issuers = _certificates(), _issuers()
    assert certificates, "no Certificate in the base"
    for secret, spec in certificates.items():
        assert set(spec) <= CERTIFICATE_KEYS, f"{secret}: {set(spec) - CERTIFICATE_KEYS}"
        assert spec["issuerRef"]["kind"] == "Issuer" and spec["issuerRef"]["name"] in issuers
        assert spec["privateKey"] == {**spec["privateKey"], "algorithm": "ECDSA", "size": 256}
        if not spec.get("isCA"):
            assert {"server auth", "client auth"} <= set(spec["usages"]), secret
            assert spec["issuerRef"]["name"] == "hangar-ca", f"{secret}: not the platform CA's"
    for name, spec in issuers.items():
        assert set(spec) <= {"selfSigned", "ca"} and len(spec) == 1, name
        if "ca" in spec:  # signs with a CA Certificate's Secret
            assert certificates[spec["ca"]["secretName"]].get("isCA"), name
    agent_ca = certificates["hangar-agent-ca"]
    assert agent_ca["isCA"] and agent_ca["issuerRef"]["name"] == "hangar-ca"
    assert agent_ca["nameConstraints"]["permitted"]["dnsDomains"] == [peer_name("agent")]


def test_every_process_mounts_a_certificate_naming_it_as_its_tls_dir() -> None:
    certificates = _certificates()
    processes = set()
    for workload, container, process in _process_containers():
        at = where(workload, container)
        directory = env_value(container, "HANGAR_TLS_DIR")
        assert directory, f"{at}: no HANGAR_TLS_DIR (plaintext gRPC)"
        secret = _secret_mounted_at(workload, container, directory)
        assert secret == f"hangar-{process}-tls", f"{at}: {directory} holds {secret}"
        spec = certificates.get(secret)
        assert spec is not None, f"{at}: no Certificate writes Secret {secret}"
        assert spec["commonName"] == process, secret
        assert peer_name(process) in spec["dnsNames"], f"{secret}: clients check that name"
        processes.add(process)
    assert processes == {"identity", "project", "runtime", "billing", "gateway", "edge", "agent"}
    documented = TLS_DOC.read_text()
    for secret in certificates:
        assert f"`{secret}`" in documented, f"Secret {secret} is not named in docs/tls.md"


def test_runtime_holds_the_agent_ca_and_serves_enrolment_on_its_service() -> None:
    (runtime,) = [(w, c) for w, c, p in _process_containers() if p == "runtime"]
    workload, container = runtime
    directory = env_value(container, "HANGAR_RUNTIME_AGENT_CA_DIR")
    assert directory and _secret_mounted_at(workload, container, directory) == "hangar-agent-ca"
    address = env_value(container, "HANGAR_RUNTIME_ENROLMENT_ADDR")
    assert address and port_of(address) == container_ports(container)["enrolment"]
    service = next(s for s in docs_of("Service") if name_of(s) == "runtime")
    assert "enrolment" in {p.get("targetPort") for p in service["spec"]["ports"]}
    # Nobody else holds a CA key.
    for w, c, process in _process_containers():
        if process != "runtime":
            mounted = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert all(_secret_mounted_at(w, c, m) != "hangar-agent-ca" for m in mounted)


def test_grpc_probes_reach_the_plaintext_health_port() -> None:
    for workload, container, process in _process_containers():
        ports = container_ports(container)
        if "grpc" not in ports:
            continue
        at = where(workload, container)
        address = env_value(container, f"HANGAR_{process.upper()}_HEALTH_ADDR")
        assert address, f"{at}: with TLS on, kubelet's gRPC probes need the health port"
        assert port_of(expand(container, address)) == ports["health"] != ports["grpc"], at
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["grpc"]["port"] == ports["health"], f"{at} {probe}"
