"""The protobuf contracts: generated code is current, buf lint is clean, and the HTTP surface
(google.api.http annotations) covers every public RPC and no internal one."""

from __future__ import annotations

import filecmp
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "protos"
GENERATED_DIR = REPO_ROOT / "hangar"

PUBLIC_SERVICES = ("identity", "project", "runtime", "billing")

# RPCs called only by other services or by the agent; they refuse user tokens and must not be
# reachable through the gateway. Must match the "// Internal:" comments in the protos.
INTERNAL_RPCS = {
    "identity": {
        "Authorize",
        "AppendAuditEvents",
        "IssueServiceToken",
        "WatchEvents",
        "WatchAccess",
        "CheckSession",
    },
    "project": {"ResolveSecrets", "ListDomainCertificates", "WatchEvents"},
    "runtime": {
        "Heartbeat",
        "ShipLogs",
        "ShipMetrics",
        "ReportContainerStatus",
        "FetchArtifact",
        "PutArtifact",
        "ListRoutes",
        "WatchEvents",
        "RenewAgentCertificate",
        "WakeRoute",
    },
    "billing": {
        "ReserveAllocation",
        "ReleaseAllocation",
        "ListAllocations",
        "RecordUsage",
        "WatchEvents",
    },
    "agent": {
        "StartContainer",
        "StopContainer",
        "SleepContainer",
        "GetContainer",
        "ListContainers",
        "WakeContainer",
    },
}

# The core HTTP surface (docs/architecture.md, "HTTP surface": the routes marked core; the
# gateway's own /openapi.json and /healthz excluded); path variables are compared as "{}".
DESIGN_HTTP_SURFACE = {
    ("POST", "/v1/auth/signup"),
    ("POST", "/v1/auth/login"),
    ("POST", "/v1/auth/refresh"),
    ("GET", "/v1/users/me"),
    ("GET", "/.well-known/jwks.json"),
    ("POST", "/v1/organizations"),
    ("GET", "/v1/organizations"),
    ("GET", "/v1/organizations/{}"),
    ("DELETE", "/v1/organizations/{}"),
    ("POST", "/v1/organizations/{}/members"),
    ("GET", "/v1/organizations/{}/members"),
    ("PATCH", "/v1/organizations/{}/members/{}"),
    ("DELETE", "/v1/organizations/{}/members/{}"),
    ("GET", "/v1/organizations/{}/audit-logs"),
    ("POST", "/v1/organizations/{}/projects"),
    ("GET", "/v1/organizations/{}/projects"),
    ("GET", "/v1/projects/{}"),
    ("PATCH", "/v1/projects/{}"),
    ("DELETE", "/v1/projects/{}"),
    ("PUT", "/v1/projects/{}/secrets/{}"),
    ("GET", "/v1/projects/{}/secrets"),
    ("DELETE", "/v1/projects/{}/secrets/{}"),
    ("POST", "/v1/projects/{}/deployments"),
    ("GET", "/v1/projects/{}/deployments"),
    ("GET", "/v1/deployments/{}"),
    ("POST", "/v1/deployments/{}:rollback"),
    ("POST", "/v1/deployments/{}:cancel"),
    ("GET", "/v1/projects/{}/containers"),
    ("GET", "/v1/projects/{}/logs"),
    ("GET", "/v1/projects/{}/metrics"),
    ("POST", "/v1/servers"),
    ("GET", "/v1/servers"),
    ("GET", "/v1/plans"),
    ("GET", "/v1/organizations/{}/subscription"),
    ("POST", "/v1/organizations/{}/subscription:change"),
    ("GET", "/v1/organizations/{}/usage"),
    ("GET", "/v1/organizations/{}/invoices"),
    ("POST", "/v1/webhooks/stripe"),
}

_RPC_LINE = re.compile(r"^\s*rpc\s+(\w+)\s*\(")


def _service(name: str) -> ServiceDescriptor:
    module = importlib.import_module(f"hangar.{name}.v1.{name}_pb2")
    (service,) = module.DESCRIPTOR.services_by_name.values()
    return service


def _http_rule(method: MethodDescriptor) -> http_pb2.HttpRule | None:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return None
    return options.Extensions[annotations_pb2.http]


def _verb_and_path(method: MethodDescriptor) -> tuple[str, str] | None:
    rule = _http_rule(method)
    if rule is None:
        return None
    verb = rule.WhichOneof("pattern")
    return verb.upper(), getattr(rule, verb)


def _rpcs_marked_internal(name: str) -> set[str]:
    """RPCs whose leading comment block contains "Internal:" in the .proto source."""
    marked: set[str] = set()
    comment: list[str] = []
    for line in (PROTO_DIR / "hangar" / name / "v1" / f"{name}.proto").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            comment.append(stripped)
            continue
        match = _RPC_LINE.match(line)
        if match and any("Internal:" in c for c in comment):
            marked.add(match.group(1))
        comment = []
    return marked


def _tree(root: Path) -> dict[str, Path]:
    return {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
    )
    fresh, committed = _tree(tmp_path / "hangar"), _tree(GENERATED_DIR)
    drifted = sorted(
        set(fresh) ^ set(committed)
        | {
            name
            for name in set(fresh) & set(committed)
            if not filecmp.cmp(fresh[name], committed[name], shallow=False)
        }
    )
    assert not drifted, f"hangar/ is stale, run `make protos`; drifted files: {drifted}"


def test_buf_lint_is_clean() -> None:
    buf = Path(sys.executable).parent / "buf"
    assert buf.exists(), f"buf not found next to {sys.executable} (package buf-bin)"
    result = subprocess.run(
        [str(buf), "lint"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"buf lint failed:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("name", [*PUBLIC_SERVICES, "agent"])
def test_internal_comments_match_the_internal_rpc_list(name: str) -> None:
    assert _rpcs_marked_internal(name) == INTERNAL_RPCS[name]


@pytest.mark.parametrize("name", PUBLIC_SERVICES)
def test_public_rpcs_have_http_rules_and_internal_ones_none(name: str) -> None:
    methods = _service(name).methods_by_name
    assert INTERNAL_RPCS[name] <= set(methods), "an internal RPC is missing from the service"
    missing = [m for m in methods if m not in INTERNAL_RPCS[name] and not _http_rule(methods[m])]
    exposed = [m for m in INTERNAL_RPCS[name] if _http_rule(methods[m])]
    assert not missing, f"public RPCs without google.api.http: {missing}"
    assert not exposed, f"internal RPCs reachable over HTTP: {exposed}"


def test_agent_rpcs_are_all_internal() -> None:
    methods = _service("agent").methods_by_name
    assert set(methods) == INTERNAL_RPCS["agent"]
    assert not [m for m in methods.values() if _http_rule(m)]


@pytest.mark.parametrize("name", PUBLIC_SERVICES)
def test_every_service_serves_watch_events(name: str) -> None:
    method = _service(name).methods_by_name["WatchEvents"]
    assert method.input_type.full_name == "hangar.events.v1.WatchEventsRequest"
    assert method.output_type.full_name == "hangar.events.v1.Event"
    assert method.server_streaming and not method.client_streaming


def test_http_surface_covers_design_and_has_no_duplicate_routes() -> None:
    routes: dict[tuple[str, str], str] = {}
    for name in PUBLIC_SERVICES:
        for method in _service(name).methods:
            verb_path = _verb_and_path(method)
            if verb_path is None:
                continue
            verb, path = verb_path
            route = (verb, re.sub(r"\{[^}]*\}", "{}", path))
            assert route not in routes, f"{method.full_name} and {routes[route]} share {route}"
            routes[route] = method.full_name
    missing = sorted(DESIGN_HTTP_SURFACE - set(routes))
    assert not missing, f"core routes (docs/architecture.md) without an RPC: {missing}"


def test_all_generated_modules_import() -> None:
    hangar = importlib.import_module("hangar")
    names = [m.name for m in pkgutil.walk_packages(hangar.__path__, prefix="hangar.")]
    assert any(n.endswith("_pb2_grpc") for n in names)
    for module_name in names:
        importlib.import_module(module_name)
