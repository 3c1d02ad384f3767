"""deploy/: the Kubernetes base (deploy/k8s, kustomize), the example Secrets, the Dockerfile and
the compose file, checked offline against the code they deploy.

Every document of the base validates against the pinned Kubernetes version's schemas (strict:
an unknown field is an error); the ServiceMonitor, a CRD the schemas lack, is checked by
structure. Then the cross-checks that catch the mistakes a schema cannot: an env var name no
code reads (computed from the source: the `_env(...)` / `os.environ...` reads of shared/,
services/ and hangar_cli/, f-string templates expanded over the process names), a Service
selecting no pod, a probe or Service on a port no container declares, an HPA or PDB aimed at
nothing, a reference to a Secret or ConfigMap (or a key of one) that nobody provides, a
listen address whose port is not the container's, a metrics port Prometheus does not
scrape. Nothing here needs a cluster or a Docker engine (the one build test skips without one).
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from hangar_cli.cli import PROCESSES
from shared.settings import DEFAULT_PORTS, SERVICES

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
EXAMPLE_SECRETS = DEPLOY / "secrets.example.yaml"
OPERATIONS_DOC = REPO / "docs" / "operations.md"
CODE_PACKAGES = ("shared", "services", "hangar_cli")

# The Kubernetes version the manifests are validated against (kubernetes-validate's bundled
# schemas, offline). Raise it deliberately, with the cluster versions supported.
KUBERNETES_VERSION = "1.34.0"

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
SCALABLE_KINDS = ("Deployment", "StatefulSet")
CRD_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "Certificate": "cert-manager.io/v1",  # checked in test_manifests_tls.py
    "Issuer": "cert-manager.io/v1",
}
# An env var whose name says it holds a secret must come from a Secret, never a literal.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEYS?(_|$)|TOKEN|DATABASE_URL")
REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Doc = dict[str, Any]


# --- loading ------------------------------------------------------------------------------


def _load_all(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@functools.cache
def kustomization() -> Doc:
    doc = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


@functools.cache
def base_documents() -> tuple[tuple[str, Doc], ...]:
    """(file name, document) of every resource the kustomization lists, in its order."""
    found: list[tuple[str, Doc]] = []
    for name in kustomization()["resources"]:
        path = K8S / name
        if path.is_file():
            found += [(name, doc) for doc in _load_all(path)]
    return tuple(found)


def docs_of(kind: str) -> list[Doc]:
    return [doc for _, doc in base_documents() if doc["kind"] == kind]


def name_of(doc: Doc) -> str:
    return str(doc["metadata"]["name"])


@functools.cache
def example_secrets() -> tuple[Doc, ...]:
    return tuple(_load_all(EXAMPLE_SECRETS))


def workloads() -> list[Doc]:
    return [doc for _, doc in base_documents() if doc["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Doc) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def all_containers() -> Iterator[tuple[Doc, Doc]]:
    for workload in workloads():
        for container in containers(workload):
            yield workload, container


def where(workload: Doc, container: Doc | None = None) -> str:
    at = f"{workload['kind']}/{name_of(workload)}"
    return f"{at} container {container['name']}" if container is not None else at


def env_value(container: Doc, name: str) -> str | None:
    for entry in container.get("env", []):
        if entry["name"] == name and "value" in entry:
            return str(entry["value"])
    return None


def expand(container: Doc, value: str) -> str:
    """$(NAME) references to the container's own literal env values, as the kubelet does;
    downward-API values (a node's IP) stay as they are."""
    return REFERENCE.sub(lambda m: env_value(container, m.group(1)) or m.group(0), value)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(container: Doc) -> dict[str, int]:
    ports = container.get("ports", [])
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in ports}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# --- what the code reads ------------------------------------------------------------------


def _python_sources() -> Iterator[tuple[Path, ast.Module]]:
    for package in CODE_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path, ast.parse(path.read_text(), str(path))


def _is_environ(node: ast.expr) -> bool:
    return "environ" in ast.unparse(node)


def _env_name_argument(node: ast.AST) -> ast.expr | None:
    """The name argument of an environment read: `_env(NAME, ...)`, `os.environ.get(NAME)`,
    `environ.get(NAME)` (a mapping standing for it), `os.getenv(NAME)`, `os.environ[NAME]`."""
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        if isinstance(func, ast.Name) and func.id == "_env":
            return node.args[0]
        if isinstance(func, ast.Attribute) and (
            func.attr == "getenv" or (func.attr == "get" and _is_environ(func.value))
        ):
            return node.args[0]
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.ctx, ast.Load)
        and _is_environ(node.value)
    ):
        return node.slice
    return None


@functools.cache
def process_names() -> tuple[str, ...]:
    """Every process a `HANGAR_<PROCESS>_...` template can name: the ports' and services'
    names, `hangar serve`'s choices, and each `Settings.from_env("...")` of the code."""
    names = {*DEFAULT_PORTS, *SERVICES, *PROCESSES}
    for _, tree in _python_sources():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_env"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names.add(node.args[0].value)
    return tuple(sorted(names))


@functools.cache
def env_reads() -> tuple[frozenset[str], tuple[re.Pattern[str], ...]]:
    """Names the code reads from its environment, and the f-string templates it reads
    (`HANGAR_{name.upper()}_ADDR`) as patterns whose placeholders are process names. Plus
    what boto3 reads (credentials, region) when the code uses boto3 (the S3 artifact store)."""
    names: set[str] = set()
    patterns: list[re.Pattern[str]] = []
    uses_boto3 = False
    placeholder = "(?:" + "|".join(re.escape(p.upper()) for p in process_names()) + ")"
    for _, tree in _python_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom):
                    modules.append(node.module or "")
                uses_boto3 |= any(m.split(".")[0] == "boto3" for m in modules)
            arg = _env_name_argument(node)
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.add(arg.value)
            elif isinstance(arg, ast.JoinedStr):
                parts = [
                    re.escape(str(v.value)) if isinstance(v, ast.Constant) else placeholder
                    for v in arg.values
                ]
                patterns.append(re.compile("".join(parts)))
    if uses_boto3:
        from botocore.configprovider import BOTOCORE_DEFAUT_SESSION_VARIABLES
        from botocore.credentials import EnvProvider

        names |= {EnvProvider.ACCESS_KEY, EnvProvider.SECRET_KEY, *EnvProvider.TOKENS}
        names |= {
            spec[1]
            for spec in BOTOCORE_DEFAUT_SESSION_VARIABLES.values()
            if isinstance(spec[1], str)
        }
    return frozenset(names), tuple(patterns)


def code_reads(name: str) -> bool:
    names, patterns = env_reads()
    return name in names or any(p.fullmatch(name) for p in patterns)


def test_the_env_scan_finds_what_the_code_reads() -> None:
    """The scanner itself: literal reads, templates, a read outside settings.py, boto3's."""
    for name in (
        "DATABASE_URL",
        "STRIPE_API_KEY",
        "HANGAR_IDENTITY_ADDR",
        "HANGAR_AGENT_SERVICE_SECRET",
        "HANGAR_BILLING_DB_PASSWORD",
        "HANGAR_GATEWAY_METRICS_ADDR",
        "HANGAR_EDGE_STATE_DIR",
        "HANGAR_GATEWAY_STREAM_TIMEOUT_SECONDS",
        "AWS_ACCESS_KEY_ID",
    ):
        assert code_reads(name), name
    for name in ("HANGAR_IDENTITY_DB_PASS", "HANGAR_AGENT_STATE", "HANGAR_FOO_ADDR", "PORT"):
        assert not code_reads(name), name


# --- the kustomization and the schemas ----------------------------------------------------


def test_kustomization_lists_every_file_and_only_files_that_exist() -> None:
    listed = list(kustomization()["resources"])
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    missing = [name for name in listed if not (K8S / name).is_file()]
    assert not missing, f"listed in kustomization.yaml but absent: {missing}"
    on_disk = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()} - {
        "kustomization.yaml"
    }
    assert on_disk - set(listed) == set(), "files of deploy/k8s not in kustomization.yaml"


def test_kustomization_images_name_every_image_used() -> None:
    images = {i["name"] for i in kustomization().get("images", [])}
    for workload, container in all_containers():
        assert container["image"] in images, f"{where(workload, container)}: image not pinned"


def test_the_pinned_kubernetes_version_has_schemas() -> None:
    assert KUBERNETES_VERSION in kv_utils.all_versions()


@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in base_documents()] + list(example_secrets()),
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_document_validates(doc: Doc) -> None:
    if doc["kind"] in CRD_KINDS:
        assert doc["apiVersion"] == CRD_KINDS[doc["kind"]]
        return  # no schema bundled: test_service_monitor checks its structure
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{name_of(doc)}: {path}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(exc.message)


def test_service_monitor() -> None:
    monitors = docs_of("ServiceMonitor")
    assert len(monitors) == 1
    spec = monitors[0]["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    selector = spec["selector"]["matchLabels"]
    assert selector and all(isinstance(v, str) for v in selector.values())
    assert spec["endpoints"], "no endpoints"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert isinstance(endpoint["port"], str), "endpoints name a Service port"
        assert endpoint.get("path", "/metrics") == "/metrics"
    selected = [s for s in docs_of("Service") if selects(selector, s["metadata"]["labels"])]
    assert selected, "the ServiceMonitor selects no Service"
    for service in selected:
        names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in names, f"Service/{name_of(service)}: no port {endpoint}"


def test_every_metrics_address_is_scraped() -> None:
    """A container that serves /metrics (HANGAR_<PROCESS>_METRICS_ADDR) declares the port as
    `metrics`, and a Service the ServiceMonitor selects targets it; every process
    docs/metrics.md lists is on."""
    monitor = docs_of("ServiceMonitor")[0]["spec"]
    scraped_ports = {e["port"] for e in monitor["endpoints"]}
    scraped = [
        s
        for s in docs_of("Service")
        if selects(monitor["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    turned_on = set()
    for workload, container in all_containers():
        for entry in container.get("env", []):
            if not entry["name"].endswith("_METRICS_ADDR"):
                continue
            turned_on.add(entry["name"])
            port = port_of(entry["value"])
            assert container_ports(container).get("metrics") == port, where(workload, container)
            services = [s for s in scraped if selects(s["spec"]["selector"], pod_labels(workload))]
            assert services, f"{where(workload)}: no scraped Service selects its pods"
            assert any(
                p["name"] in scraped_ports and p["targetPort"] in ("metrics", port)
                for s in services
                for p in s["spec"]["ports"]
            ), f"{where(workload)}: the scraped Service does not target its metrics port"
    documented = set(
        re.findall(r"`(HANGAR_\w+_METRICS_ADDR)`", (REPO / "docs/metrics.md").read_text())
    )
    assert documented <= turned_on, f"metrics not turned on: {sorted(documented - turned_on)}"


# --- env vars, Secrets and ConfigMaps -----------------------------------------------------


def _configmaps() -> dict[str, dict[str, str]]:
    return {name_of(c): dict(c.get("data", {})) for c in docs_of("ConfigMap")}


def _operator_secrets() -> dict[str, set[str]]:
    """Secrets the operator creates (never committed): the example file's names and keys."""
    return {name_of(s): set(s.get("stringData", {})) for s in example_secrets()}


def _env_names(workload: Doc, container: Doc) -> list[str]:
    """Every variable the container gets: its env, and the keys of what envFrom brings."""
    names = [e["name"] for e in container.get("env", [])]
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names += list(_configmaps().get(source["configMapRef"]["name"], {}))
        if "secretRef" in source:
            names += list(_operator_secrets().get(source["secretRef"]["name"], set()))
    return names


def test_every_env_var_is_one_the_code_reads() -> None:
    """A misspelt name is a silent bug: the process runs on its default."""
    wrong = []
    for workload, container in all_containers():
        # Helpers the container's other values refer to, $(NODE_IP): expanded by the kubelet.
        helpers = {
            m for e in container.get("env", []) for m in REFERENCE.findall(e.get("value", ""))
        }
        for name in _env_names(workload, container):
            if name not in helpers and not code_reads(name):
                wrong.append(f"{where(workload, container)}: {name}")
    for name in {k for keys in _operator_secrets().values() for k in keys}:
        if not code_reads(name):
            wrong.append(f"{EXAMPLE_SECRETS.name}: {name}")
    assert not wrong, "env vars no code reads:\n" + "\n".join(wrong)


def test_secret_and_configmap_references_resolve() -> None:
    """Each secretRef / secretKeyRef names a Secret the operator provides (the example file,
    documented in docs/operations.md) and a key it has; each configMapRef / configMapKeyRef a
    ConfigMap of the base and a key it has. No Secret is part of the base."""
    assert not docs_of("Secret"), "secret values are never committed in the base"
    configmaps, secrets = _configmaps(), _operator_secrets()
    operations = OPERATIONS_DOC.read_text()
    for name in secrets:
        assert f"`{name}`" in operations, f"Secret {name} is not documented in operations.md"
    problems = []
    for workload, container in all_containers():
        at = where(workload, container)
        for source in container.get("envFrom", []):
            if "configMapRef" in source and source["configMapRef"]["name"] not in configmaps:
                problems.append(f"{at}: no ConfigMap {source['configMapRef']['name']}")
            if "secretRef" in source and source["secretRef"]["name"] not in secrets:
                problems.append(f"{at}: no Secret {source['secretRef']['name']}")
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {})
            if "secretKeyRef" in ref:
                name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
                if key not in secrets.get(name, set()):
                    problems.append(f"{at}: {entry['name']} from Secret {name} key {key}: none")
            if "configMapKeyRef" in ref:
                name, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
                if key not in configmaps.get(name, {}):
                    problems.append(f"{at}: {entry['name']} from ConfigMap {name} key {key}: none")
    assert not problems, "\n".join(problems)


def test_no_secret_value_is_written_in_a_manifest() -> None:
    for workload, container in all_containers():
        for entry in container.get("env", []):
            if SECRET_NAME.search(entry["name"]):
                assert "valueFrom" in entry, f"{where(workload, container)}: {entry['name']}"
    for name, data in _configmaps().items():
        for key, value in data.items():
            if SECRET_NAME.search(key):
                # DATABASE_URL in a ConfigMap: host and database only, no password.
                assert "@" not in value, f"ConfigMap {name}: {key} carries credentials"


def test_example_secrets_hold_only_placeholders() -> None:
    text = EXAMPLE_SECRETS.read_text()
    assert text.startswith("# EXAMPLE ONLY")
    for secret in example_secrets():
        assert secret["kind"] == "Secret"
        for key, value in secret["stringData"].items():
            assert "CHANGE-ME" in value or key.endswith("_REGION"), f"{name_of(secret)}.{key}"


# --- Services, probes, ports --------------------------------------------------------------


def _pods_selected(selector: dict[str, str]) -> list[Doc]:
    return [w for w in workloads() if selects(selector, pod_labels(w))]


def test_every_service_selects_a_workload_and_targets_its_ports() -> None:
    for service in docs_of("Service"):
        selected = _pods_selected(service["spec"]["selector"])
        assert selected, f"Service/{name_of(service)} selects no pod"
        for workload in selected:
            declared = {k: v for c in containers(workload) for k, v in container_ports(c).items()}
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in declared or target in declared.values(), (
                    f"Service/{name_of(service)} port {port['name']}: {target} is not a port"
                    f" of {where(workload)}"
                )


def test_every_probe_port_is_a_container_port() -> None:
    for workload, container in all_containers():
        ports = container_ports(container)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            handler = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
            assert handler is not None, f"{where(workload, container)} {kind}: no handler"
            port = handler["port"]
            assert port in ports.values() or port in ports, (
                f"{where(workload, container)} {kind}: port {port} is not a container port"
            )


@functools.cache
def proto_services() -> frozenset[str]:
    found = set()
    for path in (REPO / "protos").rglob("*.proto"):
        text = path.read_text()
        package = re.search(r"^package ([\w.]+);", text, re.M)
        if package:
            found |= {f"{package[1]}.{s}" for s in re.findall(r"^service (\w+)", text, re.M)}
    return frozenset(found)


def test_grpc_workloads_have_grpc_health_probes_and_resources() -> None:
    """Each container with a gRPC port is checked by grpc.health.v1 on it (readiness on its
    service's status, liveness on the server's), and asks for CPU and memory with a memory
    limit (every container does)."""
    grpc_workloads = 0
    for workload, container in all_containers():
        at = where(workload, container)
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), at
        assert "memory" in resources.get("limits", {}), at
        grpc_port = container_ports(container).get("grpc")
        if grpc_port is None:
            continue
        grpc_workloads += 1
        readiness, liveness = container.get("readinessProbe"), container.get("livenessProbe")
        assert readiness and "grpc" in readiness, f"{at}: no grpc readinessProbe"
        assert liveness and "grpc" in liveness, f"{at}: no grpc livenessProbe"
        # On the plaintext health port with mutual TLS on (kubelet shows no certificate).
        probed = container_ports(container).get("health", grpc_port)
        assert readiness["grpc"]["port"] == liveness["grpc"]["port"] == probed, at
        # Its own service: the health server answers NOT_FOUND for any other (never ready).
        service = readiness["grpc"].get("service")
        assert service in proto_services(), f"{at}: {service} is no service of protos/"
        process = container["args"][1]
        assert service.startswith(f"hangar.{process}.v1."), f"{at}: {service} is not {process}'s"
    assert grpc_workloads == len(SERVICES) + 1  # the four services and the agent


def test_listen_addresses_are_the_container_ports() -> None:
    """HANGAR_<PROCESS>_ADDR of a process's own container is its grpc (or http) port; the
    addresses ConfigMap points at Services that exist, on ports they expose."""
    for workload, container in all_containers():
        args = container.get("args", [])
        if args[:1] != ["serve"]:
            continue
        process = args[1]
        assert process in PROCESSES, where(workload, container)
        address = env_value(container, f"HANGAR_{process.upper()}_ADDR")
        assert address is not None, f"{where(workload, container)}: listens on loopback"
        ports = container_ports(container)
        assert port_of(expand(container, address)) in (ports.get("grpc"), ports.get("http"))
        if process == "edge":
            assert env_value(container, "HANGAR_EDGE_HTTPS_PORT") == str(ports["https"])
    services = {name_of(s): s for s in docs_of("Service")}
    targets = 0
    for key, value in _configmaps()["hangar-addresses"].items():
        host, _, port = value.removeprefix("dns:///").rpartition(":")
        assert host in services, f"{key}: no Service {host}"
        service = services[host]
        assert int(port) in [p["port"] for p in service["spec"]["ports"]], key
        if key.endswith("_TARGETS"):
            # A headless Service of the same pods: gRPC resolves it to each of them.
            targets += 1
            process = key.removeprefix("HANGAR_").removesuffix("_TARGETS").lower()
            assert value.startswith("dns:///") and host == f"{process}-pods", key
            assert service["spec"].get("clusterIP") == "None", f"{host} is not headless"
            assert service["spec"]["selector"] == services[process]["spec"]["selector"], key
        else:
            assert key == f"HANGAR_{host.upper()}_ADDR", f"{key} points at Service {host}"
    assert targets == len(SERVICES)  # every service's clients balance over its replicas


# --- scaling: HPAs, PDBs, replicas --------------------------------------------------------


def _workload(kind: str, name: str) -> Doc | None:
    return next((w for w in docs_of(kind) if name_of(w) == name), None)


def test_every_hpa_targets_a_workload_it_owns() -> None:
    for hpa in docs_of("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = _workload(ref["kind"], ref["name"])
        assert target is not None, f"HPA/{name_of(hpa)}: no {ref['kind']}/{ref['name']}"
        assert target["apiVersion"] == ref["apiVersion"], name_of(hpa)
        assert ref["kind"] in SCALABLE_KINDS, name_of(hpa)
        assert 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]
        # With replicas set, every apply would reset what the HPA chose.
        assert "replicas" not in target["spec"], f"{where(target)}: replicas and an HPA"


def test_every_pdb_targets_one_workload_and_every_grpc_workload_has_one() -> None:
    covered = set()
    for pdb in docs_of("PodDisruptionBudget"):
        spec = pdb["spec"]
        matched = _pods_selected(spec["selector"]["matchLabels"])
        assert len(matched) == 1, f"PDB/{name_of(pdb)} selects {len(matched)} workloads"
        target = matched[0]
        covered.add(name_of(target))
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec), name_of(pdb)
        if target["kind"] not in SCALABLE_KINDS:
            # Without a scale subresource the disruption controller takes an integer
            # minAvailable only.
            assert isinstance(spec.get("minAvailable"), int), name_of(pdb)
        replicas = target["spec"].get("replicas")
        if isinstance(replicas, int) and isinstance(spec.get("minAvailable"), int):
            assert spec["minAvailable"] < replicas, f"PDB/{name_of(pdb)} blocks every drain"
    for workload, container in all_containers():
        if "grpc" in container_ports(container):
            assert name_of(workload) in covered, f"{where(workload)}: no PodDisruptionBudget"


def _serving(process: str) -> Doc:
    for workload, container in all_containers():
        if container.get("args", [])[:2] == ["serve", process]:
            return workload
    raise AssertionError(f"nothing runs `hangar serve {process}`")


def test_every_process_runs_and_the_stateless_ones_scale() -> None:
    """Each process of `hangar up` has a workload; the stateless ones an HPA (identity too:
    its access changes reach every replica's watchers, services/identity/access_relay.py)."""
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in docs_of("HorizontalPodAutoscaler")}
    for process in PROCESSES:
        workload = _serving(process)
        if process == "agent":
            assert workload["kind"] == "DaemonSet"
        elif process in (*SERVICES, "gateway"):
            assert name_of(workload) in hpa_targets, f"{where(workload)}: no HPA"
    job = _workload("Job", "hangar-migrate")
    assert job is not None and containers(job)[0]["args"] == ["migrate"]


def test_only_the_agent_is_privileged() -> None:
    for workload, container in all_containers():
        privileged = container.get("securityContext", {}).get("privileged", False)
        spec = pod_spec(workload)
        host = spec.get("hostNetwork", False) or spec.get("hostPID", False)
        if container.get("args", [])[:2] == ["serve", "agent"]:
            assert privileged and spec["hostPID"] and spec["hostNetwork"]
            assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"  # to find identity, runtime
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            state = env_value(container, "HANGAR_AGENT_STATE_DIR")
            assert state in mounts and "/run/netns" in mounts
            assert env_value(container, "HANGAR_AGENT_DRIVER") == "container"
        else:
            assert not privileged and not host, where(workload, container)
            assert pod_spec(workload)["securityContext"]["runAsNonRoot"] is True


# --- Dockerfile and compose ---------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_dockerfile_copies_only_what_exists() -> None:
    copies = [rest for keyword, rest in _dockerfile_instructions() if keyword in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        words = [w for w in rest.split() if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_dockerfile_agent_stage_installs_the_system_packages() -> None:
    """What scripts/system-packages.sh installs for the container driver is in the agent
    target (the script's other packages are for the tests)."""
    script = (REPO / "scripts" / "system-packages.sh").read_text()
    listed = set(re.findall(r"[\w-]+:([\w-]+)", script.split("needed=(", 1)[1].split(")", 1)[0]))
    driver = {"runc", "slirp4netns", "tini", "iproute2", "skopeo", "umoci"}
    assert driver <= listed, "scripts/system-packages.sh changed: update this test"
    stage = ""  # ARGs before the first FROM
    stages: dict[str, str] = {stage: ""}
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            stage = rest.split()[-1] if " AS " in rest.upper() else rest
            stages[stage] = ""
        else:
            stages[stage] += f"{keyword} {rest}\n"
    assert {"agent", "server"} <= set(stages)
    installed = set(re.findall(r"[\w.+-]+", stages["agent"]))
    assert driver <= installed, f"agent target lacks {sorted(driver - installed)}"


def _docker_answers() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no docker command"
    try:
        result = subprocess.run([docker, "info"], capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer"
    return None if result.returncode == 0 else "`docker info` failed: no Docker engine answers"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["server", "agent"])
def test_dockerfile_builds(target: str) -> None:
    why_not = _docker_answers()
    if why_not is not None:
        pytest.skip(why_not)
    result = subprocess.run(
        ["docker", "build", "-f", "deploy/Dockerfile", "--target", target, "-q", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_every_process() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    stages = {rest.split()[-1] for keyword, rest in _dockerfile_instructions() if keyword == "FROM"}
    serving = {}
    for name, service in services.items():
        command = service.get("command", [])
        if command[:1] == ["serve"]:
            serving[command[1]] = name
        build = service.get("build")
        if build is not None:
            assert build["target"] in stages, f"{name}: no stage {build['target']}"
    assert set(serving) == set(PROCESSES), f"compose lacks {set(PROCESSES) - set(serving)}"
    assert services[serving["agent"]]["privileged"] is True
    assert services["migrate"]["command"] == ["migrate"]
    wrong = [
        f"{name}: {var}"
        for name, service in services.items()
        if str(service.get("image", "")).startswith("hangar")
        for var in service.get("environment", {})
        if not code_reads(var)
    ]
    example = (DEPLOY / "hangar.env.example").read_text().splitlines()
    wrong += [
        f"hangar.env.example: {line.split('=')[0]}"
        for line in example
        if line and not line.startswith("#") and not code_reads(line.split("=")[0])
    ]
    assert not wrong, "env vars no code reads:\n" + "\n".join(wrong)


def test_kustomize_builds_when_a_tool_is_installed() -> None:
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    if kubectl is None and kustomize is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    command = [kubectl, "kustomize", str(K8S)] if kubectl else [str(kustomize), "build", str(K8S)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == len(base_documents())
    assert all(d["metadata"].get("namespace") == kustomization()["namespace"] for d in built)
    for doc in built:  # what kustomize added (namespace, labels, image tags) is valid too
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
