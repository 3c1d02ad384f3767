"""Rollouts under load, through the edge, on the whole platform (real processes, the app in
the container sandbox): what a request costs through the edge next to the app's own address
(the agent's proxy in front of its container, how apps were reached before the edge), how
long after a release is `running` the edge serves it, and how many requests a rollout
loses (must be 0).

1. Steady state: N keep-alive clients for S seconds against the project's name through the
   edge, then against the running container's own address; req/s, p50, p99.
2. Rollouts: the same clients run while R releases are deployed one after another (each
   alternate one a rollback); every answer is counted; a request that fails or answers
   other than 200 is lost. For each release: ms from the API reporting `running` to the
   first answer of that release through the edge.
3. Rolling rollouts of replicas: the same, R releases of 2 replicas rolled out one replica
   at a time (maxSurge 1, maxUnavailable 0); requests lost, and ms from the first replica
   running (when the new release starts taking traffic) to its first answer.

The app is tests/support/edge_app.py (Python's ThreadingHTTPServer: a small real app).
Needs root and the container driver's tools (as `make test` installs them).

Run: .venv/bin/python bench/bench_rollout.py [--clients 8] [--seconds 5] [--releases 4]
(the project has 256 MB / 1000 mCPU: two replicas get half each)
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


class Load:
    """`clients` threads, each a keep-alive httpx client looping GET / until stopped."""

    def __init__(self, base: str, host: str, clients: int) -> None:
        self.base, self.host, self.clients = base, host, clients
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.answers: dict[str, int] = {}
        self.first_seen: dict[str, float] = {}
        self.lost: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _loop(self) -> None:
        headers = {"Host": self.host} if self.host else {}
        with httpx.Client(base_url=self.base, timeout=30, trust_env=False) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    reply = client.get("/", headers=headers)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.lost.append(repr(exc))
                    continue
                took = (time.perf_counter() - started) * 1000
                with self._lock:
                    if reply.status_code != 200:
                        self.lost.append(f"{reply.status_code} {reply.text[:80]}")
                        continue
                    self.latencies.append(took)
                    self.answers[reply.text] = self.answers.get(reply.text, 0) + 1
                    self.first_seen.setdefault(reply.text, time.monotonic())


def steady(base: str, host: str, clients: int, seconds: float) -> tuple[float, float, float]:
    with Load(base, host, clients) as load:
        time.sleep(seconds)
    if load.lost:
        raise RuntimeError(f"steady load lost {len(load.lost)}: {load.lost[:3]}")
    return len(load.latencies) / seconds, pct(load.latencies, 50), pct(load.latencies, 99)


def set_up(tmp: Path, pg: Any) -> tuple[Any, httpx.Client, dict[str, str], dict[str, Any]]:
    from shared.migrate import migrate
    from shared.pg import create_database
    from tests.support import edge_app
    from tests.support.stack import sign_up, start_stack, wait_for

    url = asyncio.run(create_database(pg.url, f"bench_{secrets.token_hex(4)}"))
    passwords = {
        s: secrets.token_urlsafe(12) for s in ("identity", "project", "runtime", "billing")
    }
    migrate(url, passwords)
    stack = start_stack(
        url,
        passwords,
        tmp / "stack",
        edge=True,
        extra_env={"HANGAR_RUNTIME_DRAIN_SECONDS": "5", "HANGAR_LOG_LEVEL": "WARNING"},
    )
    http = stack.client(timeout=60)
    owner = sign_up(http, "bench")
    org = http.post("/v1/organizations", headers=owner.auth, json={"name": "B", "slug": "bench"})
    org.raise_for_status()
    spec = {
        "name": "Web",
        "slug": "web",
        "resources": {"ramMb": 256, "cpuMillis": 1000, "bandwidthGb": 10},
    }

    def create() -> dict[str, Any] | None:
        reply = http.post(
            f"/v1/organizations/{org.json()['id']}/projects", headers=owner.auth, json=spec
        )
        return reply.json() if reply.status_code == 200 else None

    project: dict[str, Any] = wait_for(create, "the project")
    http.put(
        f"/v1/projects/{project['id']}/secrets/APP_SOURCE",
        headers=owner.auth,
        json={"value": edge_app.APP_SOURCE, "restart": False},
    ).raise_for_status()
    return stack, http, owner.auth, project


def deploy(
    http: httpx.Client,
    auth: dict[str, str],
    project: dict[str, Any],
    marker: str,
    **rollout: int,
) -> str:
    from tests.support import edge_app

    created = http.post(
        f"/v1/projects/{project['id']}/deployments",
        headers=auth,
        json={"command": edge_app.command(marker), **rollout},
    )
    created.raise_for_status()
    return str(created.json()["id"])


def running(http: httpx.Client, auth: dict[str, str], deployment_id: str) -> float:
    """Polls until the deployment is running; the monotonic time the API first said so."""
    from tests.support.stack import wait_for

    def probe() -> bool:
        status = http.get(f"/v1/deployments/{deployment_id}", headers=auth).json()["status"]
        if status in ("DEPLOYMENT_STATUS_FAILED", "DEPLOYMENT_STATUS_CANCELLED"):
            raise RuntimeError(f"deployment {deployment_id} ended {status}")
        return status == "DEPLOYMENT_STATUS_RUNNING"

    wait_for(probe, f"deployment {deployment_id} running", 180, 0.02)
    return time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--releases", type=int, default=4)
    args = parser.parse_args()

    from services.agent.containers import unavailable_reason
    from shared.pg import provision

    if (why := unavailable_reason()) is not None:
        sys.exit(f"bench_rollout needs the container sandbox: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="hangar-bench-rollout-"))
    pg = provision(tmp / "pgdata", ephemeral=True)
    stack = None
    try:
        stack, http, auth, project = set_up(tmp, pg)
        edge = f"http://{stack.addresses['edge']}"
        host = project["hostname"]
        first = deploy(http, auth, project, "r0")
        running(http, auth, first)
        from tests.support.stack import wait_for

        def address() -> str | None:
            listed = http.get(f"/v1/projects/{project['id']}/containers", headers=auth).json()
            live = [c for c in listed["containers"] if c["status"].endswith("RUNNING")]
            return str(live[0]["address"]) if live else None

        direct = wait_for(address, "the container's address")
        wait_for(lambda: httpx.get(edge, headers={"Host": host}).text == "r0", "the edge", 60)
        through = steady(edge, host, args.clients, args.seconds)
        straight = steady(f"http://{direct}", "", args.clients, args.seconds)

        switches: list[float] = []
        with Load(edge, host, args.clients) as load:
            time.sleep(1)
            for i in range(1, args.releases + 1):
                marker = f"r{i}"
                at = running(http, auth, deploy(http, auth, project, marker))
                wait_for(lambda m=marker: m in load.first_seen, f"{marker} through the edge", 60)
                switches.append((load.first_seen[marker] - at) * 1000)
            time.sleep(1)
        rolling: list[float] = []
        with Load(edge, host, args.clients) as rolled:
            time.sleep(1)
            for i in range(1, args.releases + 1):
                marker = f"rolling{i}"
                release = deploy(
                    http, auth, project, marker, replicas=2, maxSurge=1, maxUnavailable=0
                )
                at = running(http, auth, release)
                wait_for(lambda m=marker: m in rolled.first_seen, f"{marker} through the edge", 60)
                rolling.append((rolled.first_seen[marker] - at) * 1000)
            time.sleep(1)
        stack.check_alive()
    finally:
        if stack is not None:
            stack.stop()
        pg.stop()

    print(
        f"rollouts through the edge: the app in the sandbox (ThreadingHTTPServer), "
        f"{args.clients} keep-alive clients, {args.seconds:g} s each"
    )
    print(f"{'':32}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for name, (rate, p50, p99) in (
        ("through the edge (its name)", through),
        ("its own address (agent proxy)", straight),
    ):
        print(f"{name:32}{rate:8.0f}{p50:9.2f}{p99:9.2f}")
    print(
        f"edge / own address req/s = {through[0] / straight[0]:.2f}; "
        f"added p99 = {through[2] - straight[2]:.2f} ms"
    )
    served = sum(load.answers.values())
    print(
        f"{args.releases} rollouts under load: {served} requests answered, "
        f"{len(load.lost)} lost" + (f" ({load.lost[:3]})" if load.lost else "")
    )
    print(
        "release running -> first answer through the edge: "
        f"p50 {statistics.median(switches):.0f} ms, max {max(switches):.0f} ms "
        f"(over {len(switches)} releases)"
    )
    print(
        f"{args.releases} rolling rollouts of 2 replicas (maxSurge 1) under load: "
        f"{sum(rolled.answers.values())} requests answered, {len(rolled.lost)} lost"
        + (f" ({rolled.lost[:3]})" if rolled.lost else "")
        + f"; first replica running -> first answer p50 {statistics.median(rolling):.0f} ms"
    )
    if load.lost or rolled.lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
