"""The fault suite: the platform survives its own crashes and a PostgreSQL restart.

Every service and the agent is its own process (tests/support/stack.py) on a PostgreSQL of
this module's own (embedded, so it can be stopped and started again). With apps running,
usage flowing and a deployment in flight, each process in turn is killed with SIGKILL and
started again; afterwards, on every round:

- no deployment is stuck (none left queued, scheduling or starting);
- every running deployment has a running container, and the apps that ran still answer;
- each server's reserved counters equal the sum over its deployments holding capacity;
- no usage is lost or doubled: every usage report runtime made reaches billing exactly once,
  with the same quantity, and runtime's usage windows leave no gap.

PostgreSQL stopped mid-flow: the API answers 503 (never 500) while it is down, and 200 again
within seconds once it is back.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from shared.migrate import migrate
from shared.pg import Postgres, create_database, start_embedded, with_database
from tests.support.stack import Account, Stack, sign_up, start_stack, wait_for

pytestmark = pytest.mark.slow

RUNNING = "DEPLOYMENT_STATUS_RUNNING"
APP = 'echo "release {release}"; exec python3 -m http.server "$PORT"'
STUCK = ("queued", "scheduling", "starting")
LANDED = {RUNNING, "DEPLOYMENT_STATUS_FAILED", "DEPLOYMENT_STATUS_CANCELLED"}


@dataclass
class Platform:
    stack: Stack
    data_dir: Path
    admin_url: str  # the PostgreSQL superuser, on this module's database
    pg: Postgres
    owner: Account
    org_id: str = ""
    projects: list[str] = field(default_factory=list)
    running: dict[str, str] = field(default_factory=dict)  # project id -> deployment id

    def http(self) -> httpx.Client:
        return self.stack.client(self.owner.token)

    def query(self, sql: str) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.admin_url, timeout=10)
            try:
                return list(await conn.fetch(sql))
            finally:
                await conn.close()

        return asyncio.run(run())


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.request.url}: {response.status_code} " + (
        response.text
    )
    body: dict[str, Any] = response.json()
    return body


def _deploy(p: Platform, project_id: str, release: int) -> str:
    with p.http() as http:
        created = _ok(
            http.post(
                f"/v1/projects/{project_id}/deployments",
                json={"command": APP.format(release=release)},
            )
        )
    return str(created["id"])


def _status(p: Platform, deployment_id: str) -> str:
    with p.http() as http:
        response = http.get(f"/v1/deployments/{deployment_id}")
    return str(response.json().get("status", "")) if response.status_code == 200 else ""


def _running_container(p: Platform, project_id: str, deployment_id: str) -> dict[str, Any] | None:
    with p.http() as http:
        response = http.get(f"/v1/projects/{project_id}/containers")
    if response.status_code != 200:
        return None
    for container in response.json().get("containers", []):
        if (
            container["deploymentId"] == deployment_id
            and container["status"] == "CONTAINER_STATUS_RUNNING"
        ):
            return dict(container)
    return None


def _answers(address: str) -> bool:
    try:
        return httpx.get(f"http://{address}/", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def platform(db_passwords: dict[str, str]) -> Iterator[Platform]:
    root = Path(tempfile.mkdtemp(prefix="hangar-faults-"))
    data_dir = root / "pg"
    pg = start_embedded(data_dir, delete_on_stop=False)  # its own: this module restarts it
    stack: Stack | None = None
    p: Platform | None = None
    try:
        url = asyncio.run(create_database(pg.url, "hangar_faults"))
        migrate(url, db_passwords)
        stack = start_stack(url, db_passwords, root / "stack")
        with stack.client() as http:
            owner = sign_up(http, "faults")
        p = Platform(stack, data_dir, with_database(pg.url, "hangar_faults"), pg, owner)
        with p.http() as http:
            org = _ok(
                http.post(
                    "/v1/organizations",
                    json={"name": "Faults", "slug": f"faults-{secrets.token_hex(3)}"},
                )
            )
            p.org_id = org["id"]
            for name in ("alpha", "beta"):
                resources = {"ramMb": 128, "cpuMillis": 100, "bandwidthGb": 1}
                spec = {"name": name, "slug": f"{name}-{secrets.token_hex(3)}"}
                spec["resources"] = resources
                project = _ok(http.post(f"/v1/organizations/{p.org_id}/projects", json=spec))
                p.projects.append(project["id"])
        for release, project_id in enumerate(p.projects, start=1):
            deployment_id = _deploy(p, project_id, release)
            wait_for(lambda d=deployment_id: _status(p, d) == RUNNING, "first deployments", 60)
            p.running[project_id] = deployment_id
        yield p
    finally:
        if stack is not None:
            stack.stop(grace=5)
        (p.pg if p is not None else pg).stop()  # the PostgreSQL test starts a new one
        shutil.rmtree(root, ignore_errors=True)


# -------------------------------------------------------------------------- invariants


def _check_settled(p: Platform) -> None:
    """What must hold after any fault, once the platform has had time to catch up."""

    def nothing_stuck() -> bool:
        rows = p.query(
            "SELECT id, status FROM runtime.deployments WHERE status = ANY('{"
            + ",".join(STUCK)
            + "}')"
        )
        return not rows

    wait_for(nothing_stuck, "no deployment queued, scheduling or starting", 90, every=0.5)

    for project_id, deployment_id in p.running.items():
        assert _status(p, deployment_id) == RUNNING, (project_id, deployment_id)
        container = wait_for(
            lambda pid=project_id, did=deployment_id: _running_container(p, pid, did),
            f"a running container of {deployment_id}",
            60,
        )
        assert wait_for(lambda a=container["address"]: _answers(a), "the app to answer", 60)

    running = p.query(
        """SELECT d.id FROM runtime.deployments d
            WHERE d.status = 'running'
              AND NOT EXISTS (SELECT 1 FROM runtime.containers c
                               WHERE c.deployment_id = d.id AND c.status = 'running')"""
    )
    assert not running, f"running deployments without a running container: {running}"

    drift = p.query(
        """SELECT s.id, s.ram_mb_reserved, s.cpu_millis_reserved,
                  coalesce(sum(d.ram_mb) FILTER (WHERE d.capacity_reserved), 0) AS ram,
                  coalesce(sum(d.cpu_millis) FILTER (WHERE d.capacity_reserved), 0) AS cpu
             FROM runtime.servers s LEFT JOIN runtime.deployments d ON d.server_id = s.id
            GROUP BY s.id
           HAVING s.ram_mb_reserved <> coalesce(sum(d.ram_mb) FILTER (WHERE d.capacity_reserved), 0)
               OR s.cpu_millis_reserved
                  <> coalesce(sum(d.cpu_millis) FILTER (WHERE d.capacity_reserved), 0)"""
    )
    assert not drift, f"server counters differ from their deployments: {drift}"

    _check_usage(p)


def _check_usage(p: Platform) -> None:
    def all_sent() -> bool:
        return not p.query("SELECT 1 FROM runtime.usage_reports WHERE sent_at IS NULL LIMIT 1")

    wait_for(all_sent, "every usage report accepted by billing", 90, every=0.5)
    org = p.org_id
    reports = {
        r["idempotency_key"]: r["quantity"]
        for r in p.query(
            "SELECT idempotency_key, quantity FROM runtime.usage_reports"
            f" WHERE organization_id = '{org}'"
        )
    }
    records = p.query(
        "SELECT idempotency_key, quantity FROM billing.usage_records"
        f" WHERE organization_id = '{org}'"
    )
    keys = [r["idempotency_key"] for r in records]
    assert len(keys) == len(set(keys)), "a usage record doubled"
    billed = {r["idempotency_key"]: r["quantity"] for r in records}
    missing = [k for k in reports if k not in billed]
    assert not missing, f"usage reports billing never recorded: {missing[:5]}"
    unknown = [k for k in billed if k not in reports]
    assert not unknown, f"usage billing recorded that runtime never reported: {unknown[:5]}"
    assert all(billed[k] == reports[k] for k in billed), "a usage quantity changed on the way"
    windows = p.query("SELECT window_start, window_end FROM runtime.usage_windows ORDER BY 1")
    for before, after in itertools.pairwise(windows):
        assert after["window_start"] == before["window_end"], "a gap between usage windows"


# ------------------------------------------------------------------------------ faults


@pytest.mark.parametrize("name", ["identity", "billing", "project", "runtime", "gateway", "agent"])
def test_a_killed_process_restarts_and_loses_nothing(platform: Platform, name: str) -> None:
    p = platform
    # A deployment in flight while the process dies: it must end somewhere, not stay stuck.
    in_flight = _deploy(p, p.projects[1], release=len(name))
    p.stack.restart(name)
    p.stack.check_alive()

    def landed() -> str:
        status = _status(p, in_flight)
        return status if status in LANDED else ""

    final = wait_for(landed, f"the deployment made while {name} died to land", 90, every=0.5)
    if final == RUNNING:  # it superseded the project's running one
        p.running[p.projects[1]] = in_flight
    _check_settled(p)


def test_postgresql_restart_answers_503_then_200(platform: Platform) -> None:
    p = platform
    project_id = p.projects[0]
    routes = [
        f"/v1/projects/{project_id}",
        f"/v1/organizations/{p.org_id}/subscription",
        f"/v1/deployments/{p.running[project_id]}",
        "/v1/users/me",
    ]
    statuses: list[tuple[str, int]] = []
    stop = threading.Event()

    def poll() -> None:
        with p.http() as http:
            while not stop.is_set():
                for route in routes:
                    try:
                        statuses.append((route, http.get(route).status_code))
                    except httpx.HTTPError:
                        statuses.append((route, -1))
                stop.wait(0.05)

    p.pg.stop()
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        wait_for(
            lambda: sum(1 for _, s in statuses if s == 503) >= len(routes),
            "503 answers while PostgreSQL is down",
            60,
        )
    finally:
        p.pg = start_embedded(p.data_dir, delete_on_stop=False)
    try:

        def all_ok() -> bool:
            with p.http() as http:
                return all(http.get(route).status_code == 200 for route in routes)

        wait_for(all_ok, "200 answers once PostgreSQL is back", 60, every=0.5)
    finally:
        stop.set()
        poller.join()
    bad = sorted({(route, s) for route, s in statuses if s not in (200, 503)})
    logs = {name: p.stack.processes[name].stderr(3000) for name in ("identity", "gateway")}
    assert not bad, f"answers other than 200 or 503 around the restart: {bad}; {logs}"
    _check_settled(p)
