"""Apps at their public names, through the edge (Caddy, driven by `hangar serve edge` from
runtime's routes), every service its own process (tests/support/stack.py), apps in the
container sandbox, and a second agent on this machine as a second server:

a project's app answers at <project>-<org>.localhost on the edge's port, with the
X-Forwarded-* headers the edge sets (never a client's); WebSockets pass; an unknown name
gets the 404 page, a project with nothing running the 503 page; a load loop through a
redeploy and a rollback loses no request (the new release is healthy before the edge
switches, the old one drains); a custom domain's uploaded certificate is what a TLS client
asking for that name gets; a server whose agent is killed: its app comes back on the
other server, reached at the same name, and the stale container is stopped when the agent
returns; a release of two replicas runs one on each server, both take requests, and
when one replica's process is killed the other answers every request.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from services.agent.containers import unavailable_reason
from tests.support import edge_app
from tests.support.certificates import TestCA
from tests.support.stack import (
    Account,
    Stack,
    add_agent,
    migrated_database,
    sign_up,
    start_stack,
    wait_for,
)

_why_not = unavailable_reason()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        _why_not is not None, reason=f"the edge's tests need the sandbox: {_why_not}"
    ),
]

RUNNING = "DEPLOYMENT_STATUS_RUNNING"
SECOND_AGENT = "e2e-agent-2"


@dataclass
class World:
    stack: Stack
    http: httpx.Client  # the gateway
    edge: httpx.Client  # the edge's HTTP port
    owner: Account | None = None
    project: dict[str, Any] = field(default_factory=dict)
    deployments: dict[str, str] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        assert self.owner is not None
        return self.owner.auth

    @property
    def edge_port(self) -> int:
        return int(self.stack.addresses["edge"].rpartition(":")[2])

    def at(self, hostname: str, path: str = "/") -> httpx.Response:
        return self.edge.get(path, headers={"Host": hostname})


@pytest.fixture(scope="module")
def world(
    create_database: Callable[[str], str],
    db_passwords: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    url = migrated_database(create_database, db_passwords)
    stack = start_stack(
        url,
        db_passwords,
        tmp_path_factory.mktemp("edge") / "stack",
        edge=True,
        extra_env={
            "HANGAR_RUNTIME_DRAIN_SECONDS": "5",  # the old release answers what is in flight
            "HANGAR_RUNTIME_HEARTBEAT_TIMEOUT_SECONDS": "3",
            "HANGAR_AGENT_START_TIMEOUT_SECONDS": "60",
        },
    )
    try:
        add_agent(stack, SECOND_AGENT)
        edge = httpx.Client(base_url=f"http://{stack.addresses['edge']}", timeout=30)
        with stack.client(timeout=60) as http, edge:
            yield World(stack, http, edge)
    finally:
        stack.stop()


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.request.url}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def _deploy(w: World, marker: str) -> dict[str, Any]:
    url = f"/v1/projects/{w.project['id']}/deployments"
    created = _ok(w.http.post(url, headers=w.auth, json={"command": edge_app.command(marker)}))
    return _wait(w, created["id"], RUNNING)


def _wait(w: World, deployment_id: str, status: str, within: float = 120) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        current = _ok(w.http.get(f"/v1/deployments/{deployment_id}", headers=w.auth))
        if current["status"] == status:
            return current
        assert current["status"] not in ("DEPLOYMENT_STATUS_CANCELLED",), current
        return None

    found: dict[str, Any] = wait_for(probe, f"deployment {deployment_id} {status}", within, 0.3)
    return found


def _serves(w: World, marker: str, within: float = 60) -> None:
    """Wait until the project's name answers with `marker` through the edge."""

    def probe() -> bool:
        reply = w.at(w.project["hostname"])
        return reply.status_code == 200 and reply.text == marker

    wait_for(probe, f"the edge to serve {marker}", within, 0.1)


def test_a_project_has_a_public_name_and_url(world: World) -> None:
    w = world
    w.owner = sign_up(w.http, "edger")
    slug = f"ed{secrets.token_hex(3)}"
    org = _ok(w.http.post("/v1/organizations", headers=w.auth, json={"name": "E", "slug": slug}))
    spec = {
        "name": "Web",
        "slug": "web",
        "resources": {"ramMb": 128, "cpuMillis": 100, "bandwidthGb": 1},
    }

    def create() -> dict[str, Any] | None:
        reply = w.http.post(f"/v1/organizations/{org['id']}/projects", headers=w.auth, json=spec)
        return reply.json() if reply.status_code == 200 else None

    w.project = wait_for(create, "the project (once the organization's pool exists)")
    assert w.project["hostname"] == f"web-{slug}.localhost"
    assert w.project["url"] == f"http://web-{slug}.localhost:{w.edge_port}"
    _ok(
        w.http.put(
            f"/v1/projects/{w.project['id']}/secrets/APP_SOURCE",
            headers=w.auth,
            json={"value": edge_app.APP_SOURCE, "restart": False},
        )
    )

    # Nothing deployed yet: the edge knows the name and says nothing runs there.
    def unavailable() -> httpx.Response | None:
        reply = w.at(w.project["hostname"])
        return reply if reply.status_code == 503 else None

    page = wait_for(unavailable, "the 503 page for a project with nothing running", 90)
    assert page.headers["content-type"].startswith("text/html")
    assert "Hangar" in page.text


def test_an_unknown_name_gets_the_404_page(world: World) -> None:
    reply = world.at(f"nobody-{secrets.token_hex(4)}.localhost")
    assert reply.status_code == 404
    assert reply.headers["content-type"].startswith("text/html") and "Hangar" in reply.text


def test_the_app_answers_at_its_name_with_forwarded_headers(world: World) -> None:
    w = world
    w.deployments["v1"] = _deploy(w, "v1")["id"]
    _serves(w, "v1")
    reply = w.edge.get(
        "/headers",
        headers={"Host": w.project["hostname"], "X-Forwarded-For": "6.6.6.6"},
    )
    seen = {k.lower(): v for k, v in json.loads(reply.text).items()}
    assert seen["x-forwarded-host"] == w.project["hostname"]
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-for"].split(",")[-1].strip() == "127.0.0.1"
    assert "6.6.6.6" not in seen["x-forwarded-for"]  # a client cannot claim another address


def test_websockets_pass_through_the_edge(world: World) -> None:
    w = world
    hostname = w.project["hostname"]
    sock = socket.create_connection(("127.0.0.1", w.edge_port), timeout=30)
    with connect(f"ws://{hostname}:{w.edge_port}/echo", sock=sock, open_timeout=30) as ws:
        for message in ("hello", "x" * 5000):
            ws.send(message)
            assert ws.recv(timeout=30) == message


def test_a_custom_domain_is_checked_through_the_edge_then_routed(world: World) -> None:
    w = world
    domain = f"shop-{secrets.token_hex(3)}.example.org"
    domains = f"/v1/projects/{w.project['id']}/domains"
    added = _ok(w.http.post(domains, headers=w.auth, json={"hostname": domain}))
    assert added["status"] == "DOMAIN_STATUS_PENDING"
    assert added["verificationPath"] == f"/.well-known/hangar-domain/{added['verificationToken']}"
    assert w.at(domain).status_code == 404  # not routed before it is verified

    def verified() -> dict[str, Any] | None:
        # Pending until the edge answers its check (project -> runtime -> edge, by events).
        reply = w.http.post(f"{domains}/{domain}:verify", headers=w.auth, json={})
        if reply.status_code == 200:
            return dict(reply.json())
        assert reply.status_code == 400, reply.text  # FAILED_PRECONDITION: not yet
        return None

    done = wait_for(verified, "the domain's check to pass through the edge", 60, 0.2)
    assert done["status"] == "DOMAIN_STATUS_VERIFIED" and not done["verificationToken"]
    wait_for(lambda: w.at(domain).text == "v1", "the domain to reach the app", 60, 0.1)
    assert w.at(domain, added["verificationPath"]).status_code != 200 or (
        w.at(domain, added["verificationPath"]).text != added["verificationToken"]
    )  # the check's answer is gone: the name is the app's now

    # Another organization cannot take the name, and an outsider cannot see the domains.
    other = sign_up(w.http, "rival")
    assert w.http.get(domains, headers=other.auth).status_code == 403
    _ok(w.http.delete(f"{domains}/{domain}", headers=w.auth))
    wait_for(lambda: w.at(domain).status_code == 404, "the removed domain to go", 60, 0.1)


def _edge_tags(w: World) -> list[str] | None:
    """The tags of the certificates Caddy has loaded (its admin API, loopback); None when the
    admin API dropped the request (it does while it loads a new config: ask again)."""
    admin = w.stack.env["HANGAR_EDGE_ADMIN_ADDRESS"]
    try:
        reply = httpx.get(f"http://{admin}/config/apps/tls/certificates/load_pem", timeout=30)
    except httpx.TransportError:
        return None
    loaded = reply.json() if reply.status_code == 200 else None
    return [tag for entry in loaded or [] for tag in entry.get("tags", [])]


def _edge_has(w: World, tag: str, loaded: bool) -> bool:
    tags = _edge_tags(w)
    return tags is not None and (tag in tags) == loaded


def test_an_uploaded_certificate_is_what_the_edge_serves_for_its_domain(world: World) -> None:
    # project (SetDomainCertificate) -> project.domains_changed -> runtime's route.changed
    # -> the edge reads ListDomainCertificates -> Caddy serves it for that name.
    w = world
    domain = f"tls-{secrets.token_hex(3)}.example.org"
    domains = f"/v1/projects/{w.project['id']}/domains"
    _ok(w.http.post(domains, headers=w.auth, json={"hostname": domain}))

    def verified() -> bool:
        return w.http.post(f"{domains}/{domain}:verify", headers=w.auth, json={}).is_success

    wait_for(verified, "the domain's check to pass through the edge", 60, 0.2)
    ca = TestCA()
    url = f"{domains}/{domain}/certificate"
    now = datetime.now(UTC)
    expired = ca.leaf(
        domain, not_before=now - timedelta(days=9), not_after=now - timedelta(hours=1)
    )
    refused = w.http.put(
        url,
        headers=w.auth,
        json={"certificateChainPem": expired.chain_pem, "privateKeyPem": expired.key_pem},
    )
    assert refused.status_code == 400 and "certificate_chain_pem" in refused.text
    leaf = ca.leaf(domain)
    body = {"certificateChainPem": leaf.chain_pem, "privateKeyPem": leaf.key_pem}
    stored = _ok(w.http.put(url, headers=w.auth, json=body))
    assert stored["certificate"]["sha256Fingerprint"] == leaf.fingerprint
    assert "PRIVATE KEY" not in json.dumps(stored)
    # Once Caddy has it (never before: a handshake for this name would go to ACME).
    tag = f"hangar-domain:{domain}"
    wait_for(lambda: _edge_has(w, tag, True), "the edge to load the certificate", 60, 0.1)

    trusted = ssl.create_default_context(cadata=ca.root_pem)  # chain and name verified
    https = f"https://127.0.0.1:{w.stack.env['HANGAR_EDGE_HTTPS_PORT']}/"
    with httpx.Client(verify=trusted, timeout=30, trust_env=False) as tls:
        reply = tls.get(https, headers={"Host": domain}, extensions={"sni_hostname": domain})
    assert reply.status_code == 200 and reply.text == "v1"
    port = int(w.stack.env["HANGAR_EDGE_HTTPS_PORT"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        trusted.wrap_socket(raw, server_hostname=domain) as handshake,
    ):
        served = handshake.getpeercert(binary_form=True)
    assert served is not None and hashlib.sha256(served).hexdigest() == leaf.fingerprint

    _ok(w.http.delete(url, headers=w.auth))
    wait_for(lambda: _edge_has(w, tag, False), "the edge to drop the certificate", 60, 0.1)
    _ok(w.http.delete(f"{domains}/{domain}", headers=w.auth))


@dataclass
class Load:
    """Four keep-alive clients asking the project's name through the edge until the block
    ends: every answer counted by body, every error or non-200 a failure."""

    w: World
    failures: list[str] = field(default_factory=list)
    answers: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self) -> None:
        with httpx.Client(base_url=self.w.edge.base_url, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    reply = client.get("/", headers={"Host": self.w.project["hostname"]})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if reply.status_code != 200:
                    self.failures.append(f"{reply.status_code}: {reply.text[:200]}")
                else:
                    self.answers[reply.text] = self.answers.get(reply.text, 0) + 1

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._loop) for _ in range(4)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def test_a_redeploy_and_a_rollback_under_load_lose_no_request(world: World) -> None:
    w = world
    with Load(w) as load:
        second = _deploy(w, "v2")
        _serves(w, "v2")
        rollback = _ok(w.http.post(f"/v1/deployments/{second['id']}:rollback", headers=w.auth))
        _wait(w, rollback["id"], RUNNING)
        _serves(w, "v1")
        w.deployments["v1"] = rollback["id"]
    assert not load.failures, load.failures[:5]
    assert load.answers.get("v1", 0) > 0 and load.answers.get("v2", 0) > 0, load.answers


def test_a_dead_server_s_app_comes_back_on_the_other_one(world: World) -> None:
    w = world
    current = _ok(w.http.get(f"/v1/deployments/{w.deployments['v1']}", headers=w.auth))
    admin = {"Authorization": f"Bearer {w.stack.admin_token}"}
    server = _ok(w.http.get(f"/v1/servers/{current['serverId']}", headers=admin))
    victim = "agent" if server["name"] != SECOND_AGENT else SECOND_AGENT
    process = w.stack.processes[victim]
    process.proc.kill()  # no goodbye: its containers run on, unseen
    process.proc.wait()

    def moved() -> dict[str, Any] | None:
        listed = _ok(w.http.get(f"/v1/projects/{w.project['id']}/deployments", headers=w.auth))[
            "deployments"
        ]
        return next(
            (
                d
                for d in listed
                if d["releaseReason"] == "RELEASE_REASON_FAILOVER" and d["status"] == RUNNING
            ),
            None,
        )

    again = wait_for(moved, "the release running on the other server", 120, 0.5)
    assert again["serverId"] != current["serverId"]
    _serves(w, "v1")

    # The agent returns: what it still runs of the failed deployment is stopped.
    w.stack.restart(victim)

    def stale_gone() -> bool:
        listed = _ok(w.http.get(f"/v1/projects/{w.project['id']}/containers", headers=w.auth))[
            "containers"
        ]
        live = [c for c in listed if c["status"].endswith(("RUNNING", "STARTING", "STOPPING"))]
        return [c["deploymentId"] for c in live] == [again["id"]]

    wait_for(stale_gone, "the stale container on the returning server to stop", 120, 0.5)
    _serves(w, "v1")


def _app_processes(marker: str) -> list[int]:
    """Host pids of the edge app's processes running as release `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if f"MARKER={marker}".encode() in environ and cmdline[:2] == [b"python3", b"-c"]:
            found.append(int(entry.name))
    return found


def test_two_replicas_share_the_traffic_and_one_killed_loses_no_request(world: World) -> None:
    w = world
    marker = f"r{secrets.token_hex(3)}"
    url = f"/v1/projects/{w.project['id']}/deployments"
    body = {"command": edge_app.command(marker), "replicas": 2}
    first = _ok(w.http.post(url, headers=w.auth, json=body))
    assert (first["replicas"], first.get("replicaIndex", 0)) == (2, 0)
    _wait(w, first["id"], RUNNING)
    listed = _ok(w.http.get(url, headers=w.auth, params={"pageSize": 50}))["deployments"]
    replicas = [d for d in listed if d["replicaSetId"] == first["id"]]
    assert sorted(d.get("replicaIndex", 0) for d in replicas) == [0, 1]
    assert {d["status"] for d in replicas} == {RUNNING}  # the set switched over together
    assert len({d["serverId"] for d in replicas}) == 2  # one on each server
    shares = [(d["resources"]["ramMb"], d["resources"]["cpuMillis"]) for d in replicas]
    assert shares == [(64, 50), (64, 50)], shares  # the project's 128 MB / 100 mCPU, halved
    _serves(w, marker)

    def whoami(client: httpx.Client) -> str:
        reply = client.get("/whoami", headers={"Host": w.project["hostname"]})
        assert reply.status_code == 200, reply.text
        seen_marker, token = reply.text.split()
        assert seen_marker == marker
        return token

    # Round robin over both: two processes answer.
    def both_answer() -> bool:
        return len({whoami(w.edge) for _ in range(10)}) == 2

    wait_for(both_answer, "both replicas to take requests through the edge", 60, 0.2)
    before = {whoami(w.edge) for _ in range(10)}
    assert len(before) == 2

    pids = wait_for(lambda: _app_processes(marker) or None, "the replicas' processes", 30)
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    # Traffic goes on, on the other replica (a fresh connection per request, and a request
    # that meets the dead one is tried again on the other by the edge): nothing fails.
    with httpx.Client(base_url=w.edge.base_url, timeout=30) as fresh:
        after = [whoami(fresh) for _ in range(30)]
    assert len(before & set(after)) == 1, (before, after)  # the survivor, never the dead one


def test_a_rolling_rollout_of_two_replicas_under_load_loses_no_request(world: World) -> None:
    w = world
    marker = f"roll{secrets.token_hex(3)}"
    url = f"/v1/projects/{w.project['id']}/deployments"
    body = {"command": edge_app.command(marker), "replicas": 2, "maxSurge": 1, "maxUnavailable": 0}
    with Load(w) as load:
        first = _ok(w.http.post(url, headers=w.auth, json=body))
        assert (first["maxSurge"], first.get("maxUnavailable", 0)) == (1, 0)
        _wait(w, first["id"], RUNNING)

        def rolled() -> bool:
            listed = _ok(w.http.get(url, headers=w.auth, params={"pageSize": 50}))
            new = [d for d in listed["deployments"] if d["replicaSetId"] == first["id"]]
            return len(new) == 2 and all(d["status"] == RUNNING for d in new)

        wait_for(rolled, "both replicas of the rolling release to run", 120, 0.3)
        _serves(w, marker)
    assert not load.failures, load.failures[:5]
    assert load.answers.get(marker, 0) > 0, load.answers


def _edge_state(w: World, project_id: str) -> str:
    """What the edge's DNS says of a project (TXT: state=awake|asleep|wake-failed); asking
    wakes nothing. The DNS's address is in Caddy's config (its resolver)."""
    import re

    from dnslib import DNSRecord

    from services.edge.dns import srv_name

    admin = w.stack.env["HANGAR_EDGE_ADMIN_ADDRESS"]
    config = httpx.get(f"http://{admin}/config/", timeout=10).text
    found = re.search(r'"udp/127\.0\.0\.1:(\d+)"', config)
    if found is None:
        return ""
    question = DNSRecord.question(srv_name(project_id), "TXT")
    reply = DNSRecord.parse(question.send("127.0.0.1", int(found.group(1)), timeout=5))
    return str(reply.rr[0].rdata).strip('"') if reply.rr else ""


def _sent_bytes(w: World, auth: dict[str, str], project_id: str) -> int:
    """Bytes the project's app sent to clients, as metered (the network TX counters)."""
    now = datetime.now(UTC)
    params = {
        "metric": "METRIC_TYPE_NETWORK_TX_BYTES",
        "aggregation": "AGGREGATION_SUM",
        "step": "86400s",
        "startTime": (now - timedelta(days=1)).isoformat().replace("+00:00", "Z"),
        "endTime": (now + timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
    }
    reply = _ok(w.http.get(f"/v1/projects/{project_id}/metrics", headers=auth, params=params))
    return int(sum(p.get("value", 0) for s in reply.get("series", []) for p in s["points"]))


def test_a_sleeping_app_answers_its_first_request_held_at_the_edge_and_metered_once(
    world: World,
) -> None:
    w = world
    owner = sign_up(w.http, "sleeper")
    slug = f"zz{secrets.token_hex(3)}"
    org = _ok(
        w.http.post("/v1/organizations", headers=owner.auth, json={"name": "Z", "slug": slug})
    )
    spec = {"name": "Nap", "slug": "nap", "resources": {"ramMb": 64, "cpuMillis": 50}}

    def create() -> dict[str, Any] | None:
        url = f"/v1/organizations/{org['id']}/projects"
        reply = w.http.post(url, headers=owner.auth, json=spec)
        return reply.json() if reply.status_code == 200 else None

    project = wait_for(create, "the project (once the organization's pool exists)")
    base = f"/v1/projects/{project['id']}"
    secret = {"value": edge_app.APP_SOURCE, "restart": False}
    _ok(w.http.put(f"{base}/secrets/APP_SOURCE", headers=owner.auth, json=secret))
    # Sleep after 30 s without a request (the shortest allowed).
    sleepy = {"sleepEnabled": True, "sleepAfterSeconds": 30}
    _ok(w.http.patch(base, headers=owner.auth, json=sleepy))
    marker = f"nap{secrets.token_hex(3)}"
    created = _ok(
        w.http.post(
            f"{base}/deployments", headers=owner.auth, json={"command": edge_app.command(marker)}
        )
    )

    def running() -> bool:
        found = _ok(w.http.get(f"/v1/deployments/{created['id']}", headers=owner.auth))
        return bool(found["status"] == RUNNING)

    wait_for(running, "the sleepy app to run", 120, 0.3)
    host = project["hostname"]
    wait_for(lambda: w.at(host).text == marker, "the edge to serve the app", 60, 0.1)

    # Idle: runtime's sleep controller puts it to sleep, and the edge learns it (route.changed).
    wait_for(lambda: _edge_state(w, project["id"]) == "state=asleep", "the app asleep", 240, 0.5)
    (container,) = [
        c
        for c in _ok(w.http.get(f"{base}/containers", headers=owner.auth))["containers"]
        if c["status"] == "CONTAINER_STATUS_RUNNING"
    ]
    assert container["sleepStatus"] == "SLEEP_STATUS_SLEEPING"
    before = wait_for(
        lambda: _sent_bytes(w, owner.auth, project["id"]) or None,
        "the app's bytes metered while it served",
        60,
        1,
    )

    # The first request: held by the edge (the edge's DNS gives Caddy no address of the
    # sleeping app, only its hold) while runtime wakes it through its agent, then served.
    padding = {f"X-Pad-{i}": secrets.token_hex(1000) for i in range(8)}  # Caddy 431s from ~20 KB
    reply = w.edge.get("/headers", headers={"Host": host, **padding}, timeout=60)

    assert reply.status_code == 200, reply.text[:300]
    echoed = {k.lower(): v for k, v in json.loads(reply.text).items()}
    assert all(echoed[k.lower()] == v for k, v in padding.items())
    assert _edge_state(w, project["id"]) == "state=awake"  # woken through the edge
    # Metered once, at the agent's proxy: the counter moved by the answer's size, not twice.
    size = len(reply.content)
    after = wait_for(
        lambda: (n := _sent_bytes(w, owner.auth, project["id"])) >= before + size and n,
        "the answer's bytes metered",
        60,
        1,
    )
    assert before + size <= after < before + 2 * size, (before, size, after)
