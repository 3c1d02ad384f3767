"""Shipping code, as a user does it over HTTP through the gateway, every service its own
process (tests/support/stack.py) and the agent's container driver: upload a source archive,
deploy it, watch it build in the sandbox and answer; a bad archive and an oversized one are
refused with nothing stored; a failing build leaves the running release serving; a rollback
runs the earlier slug again without building; a failing release command stops a rollout.

The Python app installs its one dependency from a wheel shipped inside the upload (no
network). The tests run in file order and share one `Ship` (what the steps made so far).
"""

from __future__ import annotations

import hashlib
import io
import secrets
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.agent.containers import unavailable_reason
from tests.support.stack import (
    Account,
    Stack,
    module_stack,
    sign_up,
    wait_for,
)
from tests.support.wheels import python_app_source

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        unavailable_reason() is not None,
        reason=f"builds run only in the container sandbox: {unavailable_reason()}",
    ),
]

MAX_SOURCE_BYTES = 4 * 1024 * 1024
APPS = Path(__file__).parents[1] / "data" / "apps"
RUNNING = "DEPLOYMENT_STATUS_RUNNING"
FAILED = "DEPLOYMENT_STATUS_FAILED"
GZIP = {"Content-Type": "application/gzip"}
GREETING = "hello from hangar_greeting"
BUILD_WITHIN = 240.0  # a first build makes a virtualenv under the project's CPU quota


@pytest.fixture(scope="module")
def stack(
    create_database: Callable[[str], str],
    db_passwords: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    with module_stack(
        create_database,
        db_passwords,
        tmp_path_factory.mktemp("stack"),
        extra_env={
            "HANGAR_MAX_SOURCE_BYTES": str(MAX_SOURCE_BYTES),
            "HANGAR_AGENT_START_TIMEOUT_SECONDS": "60",
        },
    ) as running:
        yield running


@dataclass
class Ship:
    stack: Stack
    http: httpx.Client
    workdir: Path
    owner: Account | None = None
    org: dict[str, Any] = field(default_factory=dict)
    project: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # name -> sha256
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        assert self.owner is not None, "an earlier step did not sign up"
        return self.owner.auth

    @property
    def project_url(self) -> str:
        if not self.project:
            pytest.fail("an earlier step did not make the project")
        return f"/v1/projects/{self.project['id']}"


@pytest.fixture(scope="module")
def ship(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ship]:
    with stack.client(timeout=60) as http:
        yield Ship(stack, http, tmp_path_factory.mktemp("apps"))
    stack.check_alive()


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.request.url}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def _targz(directory: Path) -> bytes:
    """The directory as a user's `tar -czf - -C directory .` would send it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(directory, arcname=".")
    return buffer.getvalue()


def _app(ship: Ship, name: str, change: Callable[[Path], None] | None = None) -> bytes:
    """The Python test app (its dependency's wheel inside), changed as a step needs."""
    base = ship.workdir / name
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    app = python_app_source(base)
    if change is not None:
        change(app)
    return _targz(app)


def _upload(ship: Ship, archive: bytes, project_url: str = "") -> httpx.Response:
    return ship.http.post(
        f"{project_url or ship.project_url}/sources",
        headers={**ship.auth, **GZIP},
        content=archive,
    )


def _deploy(ship: Ship, project_url: str = "", **deployment: Any) -> dict[str, Any]:
    return _ok(
        ship.http.post(
            f"{project_url or ship.project_url}/deployments", headers=ship.auth, json=deployment
        )
    )


def _project(ship: Ship, ram_mb: int, cpu_millis: int) -> str:
    """Another project of the organization; its URL."""
    resources = {"ramMb": ram_mb, "cpuMillis": cpu_millis, "bandwidthGb": 1}
    spec = {"name": "Other", "slug": f"p-{secrets.token_hex(3)}", "resources": resources}
    org_id = ship.org["id"]
    project = _ok(
        ship.http.post(f"/v1/organizations/{org_id}/projects", headers=ship.auth, json=spec)
    )
    return f"/v1/projects/{project['id']}"


def _wait(ship: Ship, deployment_id: str, status: str, within: float = BUILD_WITHIN) -> dict:
    def probe() -> dict[str, Any] | None:
        current = _ok(ship.http.get(f"/v1/deployments/{deployment_id}", headers=ship.auth))
        if current["status"] == status:
            return current
        if current["status"] in (FAILED, "DEPLOYMENT_STATUS_CANCELLED"):
            pytest.fail(f"deployment ended {current['status']}: {current.get('statusReason')}")
        return None

    result: dict[str, Any] = wait_for(probe, f"deployment {deployment_id} {status}", within, 0.5)
    return result


def _answer(ship: Ship, deployment_id: str, project_url: str = "") -> str:
    def probe() -> str | None:
        url = f"{project_url or ship.project_url}/containers"
        containers = _ok(ship.http.get(url, headers=ship.auth))
        for container in containers["containers"]:
            if (
                container["deploymentId"] == deployment_id
                and container["status"].endswith("RUNNING")
                and container["processType"] == "web"  # the one that takes traffic
            ):
                try:
                    reply = httpx.get(f"http://{container['address']}/", timeout=5)
                except httpx.HTTPError:
                    return None
                return reply.text if reply.status_code == 200 else None
        return None

    text: str = wait_for(probe, f"deployment {deployment_id} to answer HTTP", 60)
    return text


def _logs(ship: Ship, deployment_id: str, stream: str, project_url: str = "") -> list[str]:
    url = f"{project_url or ship.project_url}/logs"
    entries = _ok(ship.http.get(url, headers=ship.auth, params={"pageSize": 1000}))["entries"]
    return [
        e["line"]
        for e in entries
        if e["deploymentId"] == deployment_id and e["stream"] == f"LOG_STREAM_{stream}"
    ]


def _wait_logs(
    ship: Ship, deployment_id: str, stream: str, wanted: str, project_url: str = ""
) -> list[str]:
    lines: list[str] = wait_for(
        lambda: (
            (found := _logs(ship, deployment_id, stream, project_url))
            and any(wanted in line for line in found)
            and found
        ),
        f"{stream} log line {wanted!r} of {deployment_id}",
        30,
        0.5,
    )
    return lines


# ------------------------------------------------------------------------------ steps


def test_a_project_to_ship_to(ship: Ship) -> None:
    ship.owner = sign_up(ship.http, "shipper")
    slug = f"ship-{secrets.token_hex(3)}"
    org = ship.org = _ok(
        ship.http.post("/v1/organizations", headers=ship.auth, json={"name": "S", "slug": slug})
    )
    resources = {"ramMb": 512, "cpuMillis": 500, "bandwidthGb": 1}
    spec = {"name": "Web", "slug": slug, "resources": resources}

    def create() -> dict[str, Any] | None:
        response = ship.http.post(
            f"/v1/organizations/{org['id']}/projects", headers=ship.auth, json=spec
        )
        return response.json() if response.status_code == 200 else None

    ship.project = wait_for(create, "the project (once the organization's pool exists)")

    # The agent says its driver with each heartbeat; the first may come after registration.
    admin = {"Authorization": f"Bearer {ship.stack.admin_token}"}
    wait_for(
        lambda: (
            ship.http.get(f"/v1/servers/{ship.stack.server_id}", headers=admin).json()["isolation"]
            == "SERVER_ISOLATION_CONTAINER"
        ),
        "the agent's first heartbeat (its container sandbox)",
    )


def test_upload_a_source_archive(ship: Ship) -> None:
    archive = _app(ship, "v1")
    source = _ok(_upload(ship, archive))
    assert source["sha256"] == hashlib.sha256(archive).hexdigest()
    assert source["sizeBytes"] == str(len(archive))
    assert source["createdBy"] == ship.owner.user_id  # type: ignore[union-attr]
    again = _ok(_upload(ship, archive))  # the same bytes: the same source
    assert again["sha256"] == source["sha256"]
    listed = _ok(ship.http.get(f"{ship.project_url}/sources", headers=ship.auth))["sources"]
    assert [s["sha256"] for s in listed] == [source["sha256"]]
    ship.sources["v1"] = source["sha256"]


def test_a_bad_archive_is_refused_and_nothing_is_stored(ship: Ship) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        member = tarfile.TarInfo("../escape.txt")
        member.size = 2
        tar.addfile(member, io.BytesIO(b"hi"))
    refused = _upload(ship, buffer.getvalue())
    assert refused.status_code == 400, refused.text
    assert refused.json()["details"][-1]["fieldViolations"][0]["field"] == "archive"
    assert "escape.txt" in refused.text

    not_gzip = _upload(ship, b"this is not an archive")
    assert not_gzip.status_code == 400, not_gzip.text

    too_large = _upload(ship, secrets.token_bytes(MAX_SOURCE_BYTES + 1))
    assert too_large.status_code == 413, too_large.text

    listed = _ok(ship.http.get(f"{ship.project_url}/sources", headers=ship.auth))["sources"]
    assert [s["sha256"] for s in listed] == [ship.sources["v1"]]


def test_deploy_the_latest_upload_builds_it_in_the_sandbox_and_runs_it(ship: Ship) -> None:
    created = _deploy(ship, sourceSha256="latest")
    assert created["sourceSha256"] == ship.sources["v1"]  # recorded as the digest
    assert created["releaseReason"] == "RELEASE_REASON_DEPLOY"
    assert created["createdBy"] == ship.owner.user_id  # type: ignore[union-attr]
    running = _wait(ship, created["id"], RUNNING)
    assert len(running["slugSha256"]) == 64
    assert _answer(ship, created["id"]).strip() == GREETING
    build = _wait_logs(ship, created["id"], "BUILD", "Build succeeded")
    assert any("Python app detected" in line for line in build), build
    assert any("release phase ran" in line for line in build), build
    ship.deployments["v1"] = running


def test_a_failing_build_fails_its_deployment_and_the_release_keeps_serving(ship: Ship) -> None:
    def break_requirements(app: Path) -> None:
        (app / "requirements.txt").write_text("--no-index\nno-such-package==9.9\n")

    sha = _ok(_upload(ship, _app(ship, "broken", break_requirements)))["sha256"]
    created = _deploy(ship, sourceSha256=sha)
    failed = _wait(ship, created["id"], FAILED)
    assert failed["statusReason"].startswith("BUILD_FAILED"), failed["statusReason"]
    assert "no-such-package" in failed["statusReason"]
    assert not failed["capacityReserved"]
    first = _ok(ship.http.get(f"/v1/deployments/{ship.deployments['v1']['id']}", headers=ship.auth))
    assert first["status"] == RUNNING
    assert _answer(ship, first["id"]).strip() == GREETING


def test_a_new_release_then_a_rollback_runs_the_old_slug_without_building(ship: Ship) -> None:
    def greet_louder(app: Path) -> None:
        code = (
            (app / "app.py")
            .read_text()
            .replace("hangar_greeting.greet()", "'v2: ' + hangar_greeting.greet()")
        )
        (app / "app.py").write_text(code)

    sha = _ok(_upload(ship, _app(ship, "v2", greet_louder)))["sha256"]
    second = _wait(ship, _deploy(ship, sourceSha256=sha)["id"], RUNNING)
    assert _answer(ship, second["id"]).strip() == f"v2: {GREETING}"
    assert second["slugSha256"] != ship.deployments["v1"]["slugSha256"]

    rollback = _ok(ship.http.post(f"/v1/deployments/{second['id']}:rollback", headers=ship.auth))
    assert rollback["releaseReason"] == "RELEASE_REASON_ROLLBACK"
    assert rollback["slugSha256"] == ship.deployments["v1"]["slugSha256"]
    running = _wait(ship, rollback["id"], RUNNING, within=90)
    assert _answer(ship, rollback["id"]).strip() == GREETING
    build = _wait_logs(ship, rollback["id"], "BUILD", "release phase ran")
    assert not any("Fetching source" in line or "pip" in line for line in build), build
    assert running["slugSha256"] == ship.deployments["v1"]["slugSha256"]


def test_a_failing_release_command_stops_the_rollout(ship: Ship) -> None:
    def failing_release(app: Path) -> None:
        (app / "Procfile").write_text("web: python app.py\nrelease: exit 3\n")

    sha = _ok(_upload(ship, _app(ship, "bad-release", failing_release)))["sha256"]
    failed = _wait(ship, _deploy(ship, sourceSha256=sha)["id"], FAILED)
    assert failed["statusReason"].startswith("RELEASE_FAILED"), failed["statusReason"]
    serving = _ok(ship.http.get(f"{ship.project_url}/deployments", headers=ship.auth))
    assert any(d["status"] == RUNNING for d in serving["deployments"])


def _releases(ship: Ship) -> list[dict[str, Any]]:
    url = f"{ship.project_url}/deployments"
    listed: list[dict[str, Any]] = _ok(ship.http.get(url, headers=ship.auth))["deployments"]
    return listed


def test_a_secret_change_restarts_the_release_with_the_new_config(ship: Ship) -> None:
    serving = next(d for d in _releases(ship) if d["status"] == RUNNING)
    secret_url = f"{ship.project_url}/secrets/GREETING_SUFFIX"
    _ok(ship.http.put(secret_url, headers=ship.auth, json={"value": "!"}))

    def config_release() -> dict[str, Any] | None:
        newest = _releases(ship)[0]
        return newest if newest["releaseReason"] == "RELEASE_REASON_CONFIG_CHANGE" else None

    release = wait_for(config_release, "a release for the config change", 30, 0.5)
    assert release["slugSha256"] == serving["slugSha256"]  # the same build, new config
    assert release["createdBy"] == ship.owner.user_id  # type: ignore[union-attr]
    running = _wait(ship, release["id"], RUNNING, within=90)
    assert running["secretsVersion"] != serving["secretsVersion"]
    assert _answer(ship, release["id"]).strip() == f"{GREETING}!"
    _wait(ship, serving["id"], "DEPLOYMENT_STATUS_SUPERSEDED", within=30)

    # restart: false changes the config for the next release only
    count = len(_releases(ship))
    _ok(ship.http.put(secret_url, headers=ship.auth, json={"value": "?", "restart": False}))
    deleted = ship.http.delete(secret_url, headers=ship.auth, params={"restart": "false"})
    assert deleted.status_code == 200, deleted.text
    # A later config change that does restart proves the two above were seen and skipped.
    _ok(ship.http.put(f"{ship.project_url}/secrets/OTHER", headers=ship.auth, json={"value": "1"}))
    wait_for(lambda: len(_releases(ship)) == count + 1, "the one restarting change's release")
    assert _releases(ship)[0]["releaseReason"] == "RELEASE_REASON_CONFIG_CHANGE"


WORKER = """worker: python -c "import time; print('worker up', flush=True); time.sleep(10**9)"\n"""


def test_one_build_runs_a_web_and_a_worker_process_with_their_shares(ship: Ship) -> None:
    def with_worker(app: Path) -> None:
        procfile = app / "Procfile"
        procfile.write_text(procfile.read_text() + WORKER)

    sha = _ok(_upload(ship, _app(ship, "with-worker", with_worker)))["sha256"]
    processes = [{"type": "web", "percent": 75}, {"type": "worker", "percent": 25}]
    created = _deploy(ship, sourceSha256=sha, processes=processes)
    shares = [
        (p["type"], p["resources"]["ramMb"], p["resources"]["cpuMillis"])
        for p in created["processes"]
    ]
    assert shares == [("web", 384, 375), ("worker", 128, 125)]  # of 512 MB and 500 mCPU
    _wait(ship, created["id"], RUNNING)
    assert _answer(ship, created["id"]).strip() == GREETING  # the suffix's secret was deleted

    containers = _ok(ship.http.get(f"{ship.project_url}/containers", headers=ship.auth))
    mine = {
        c["processType"]: c for c in containers["containers"] if c["deploymentId"] == created["id"]
    }
    assert set(mine) == {"web", "worker"}
    assert all(c["status"] == "CONTAINER_STATUS_RUNNING" for c in mine.values())

    def worker_line() -> bool:
        entries = _ok(ship.http.get(f"{ship.project_url}/logs", headers=ship.auth))["entries"]
        return any(
            e["containerId"] == mine["worker"]["id"] and "worker up" in e["line"] for e in entries
        )

    wait_for(worker_line, "the worker's own log line")
    fetched = [line for line in _logs(ship, created["id"], "BUILD") if "Fetching source" in line]
    assert len(fetched) == 1, fetched  # built once, by one container

    bad = ship.http.post(
        f"{ship.project_url}/deployments",
        headers=ship.auth,
        json={
            "sourceSha256": sha,
            "processes": [{"type": "web", "percent": 60}, {"type": "worker", "percent": 30}],
        },
    )
    assert bad.status_code == 400 and "deployment.processes" in bad.text, bad.text


def test_an_unknown_source_is_refused_naming_the_field(ship: Ship) -> None:
    response = ship.http.post(
        f"{ship.project_url}/deployments", headers=ship.auth, json={"sourceSha256": "0" * 64}
    )
    assert response.status_code == 400, response.text
    assert "deployment.source_sha256" in response.text


def test_a_worker_runs_without_a_port_or_health_check(ship: Ship) -> None:
    url = _project(ship, ram_mb=128, cpu_millis=250)
    sha = _ok(_upload(ship, _targz(APPS / "procfile-only"), url))["sha256"]
    created = _deploy(ship, url, sourceSha256=sha, processType="worker")
    assert created["processType"] == "worker"
    running = _wait(ship, created["id"], RUNNING)
    assert running["processType"] == "worker"
    build = _logs(ship, created["id"], "BUILD", url)
    assert any("No language detected" in line for line in build), build
    _wait_logs(ship, created["id"], "STDOUT", "tick", url)


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed: no Node build")
def test_a_node_app_is_built_with_npm_and_answers(ship: Ship) -> None:
    url = _project(ship, ram_mb=256, cpu_millis=250)
    sha = _ok(_upload(ship, _targz(APPS / "node-app"), url))["sha256"]
    created = _deploy(ship, url, sourceSha256=sha)
    _wait(ship, created["id"], RUNNING)
    assert _answer(ship, created["id"], url).strip() == "hello from node"
    build = _logs(ship, created["id"], "BUILD", url)
    assert any("Node.js app detected" in line for line in build), build
