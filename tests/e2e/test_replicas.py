"""Two of everything (issue 21, part 3): two processes of each service (identity, project,
runtime, billing) and two gateways on one database, each service's clients spreading their
calls over both of its replicas (HANGAR_<SVC>_TARGETS, gRPC round_robin), and the journey
through the gateways is correct:

- sign up, organization, project, secret, a command app deployed and answering: the work was
  spread (every replica's gRPC server answered Hangar RPCs, both gateways HTTP requests:
  their /metrics say so);
- nothing was done twice by the replicas' background work: each audit event reached identity's
  trail once, one subscription per organization and its allocation the sum of its projects,
  each server's reserved capacity the sum of its deployments holding some, every usage
  report billed once (tests/e2e/test_faults.py's invariants), and a period closed by both
  billing replicas' cycles is one invoice billing each usage record once;
- one replica of each service (the first: the one HANGAR_<SVC>_ADDR names) and a gateway are
  killed with SIGKILL while reads flow through the other gateway, and none of them fails;
  the journey goes on: redeploy, roll back, delete, with the same invariants. Idempotent
  calls are retried on UNAVAILABLE by the channel, so they never fail; a non-idempotent
  call is not (docs/reliability.md): one picked for a dead replica
  before its channel saw the connection drop answers 503 UNAVAILABLE, having done nothing,
  and is sent again. That, at most once per call, is the only failure tolerated.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.pg import Postgres
from shared.settings import SERVICES
from tests.e2e.test_faults import (
    Platform,
    _answers,
    _check_settled,
    _ok,
    _running_container,
)
from tests.support.stack import (
    Account,
    Stack,
    migrated_database,
    sign_up,
    start_stack,
    wait_for,
)

pytestmark = pytest.mark.slow

GREETING = "hello-from-both"
APP = 'echo "release {release}: greeting is $GREETING"; exec python3 -m http.server "$PORT"'
RUNNING = "DEPLOYMENT_STATUS_RUNNING"
UNAVAILABLE = 14  # google.rpc.Code
WAIT = 120.0  # generous: ten processes and an app on a loaded 2-core machine


class Gateways:
    """HTTP through each gateway in turn, as a load balancer in front of them would."""

    def __init__(self, stack: Stack, names: list[str], account: Account) -> None:
        self.clients = {name: stack.client(account.token, via=name) for name in names}
        self._turns = itertools.cycle(list(self.clients))

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.clients[next(self._turns)].request(method, url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def drop(self, name: str) -> None:
        self.clients.pop(name).close()
        self._turns = itertools.cycle(list(self.clients))

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


@dataclass
class Replicated:
    stack: Stack
    platform: Platform  # test_faults' invariants, over this module's database
    gateways: Gateways
    served_at_start: dict[str, float]
    project: dict[str, Any] = field(default_factory=dict)
    deployments: list[str] = field(default_factory=list)
    served_at_kill: dict[str, float] = field(default_factory=dict)
    unavailable: list[str] = field(default_factory=list)  # non-idempotent calls sent again

    def need(self, *names: str) -> None:
        for name in names:
            if not getattr(self, name):
                pytest.fail(f"an earlier step did not make {name}; see its failure")


@pytest.fixture(scope="module")
def replicated(
    create_database: Callable[[str], str],
    db_passwords: dict[str, str],
    postgres: Postgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Replicated]:
    url = migrated_database(create_database, db_passwords)
    home = tmp_path_factory.mktemp("replicas")
    stack = start_stack(
        url,
        db_passwords,
        home,
        replicas=2,
        metrics=True,
        extra_env={
            # each billing replica's cycle runs every second: both race for every due period
            "HANGAR_BILLING_CYCLE_SECONDS": "1",
            # usage windows of 10 s, billed 5 s after they end (not 60 + 60): both runtime
            # replicas compute and send them, under their lock and claims, within the test
            "HANGAR_TELEMETRY_USAGE_WINDOW_SECONDS": "10",
            "HANGAR_TELEMETRY_USAGE_LATENESS_SECONDS": "5",
        },
        timeout=240,
    )
    gateways: Gateways | None = None
    try:
        with stack.client() as http:
            owner = sign_up(http, "replicas")
        platform = Platform(stack, home, url, postgres, owner)
        gateways = Gateways(stack, stack.replicas("gateway"), owner)
        served = {name: _served(stack, name) for name in _replicas(stack)}
        yield Replicated(stack, platform, gateways, served)
    finally:
        if gateways is not None:
            gateways.close()
        dead = stack.dead()
        stack.stop()
        for name, why in dead.items():
            print(f"\n[replicas] {name} died during the tests ({why})", file=sys.stderr)
        left = [name for name, process in stack.processes.items() if process.alive()]
        assert not left, f"processes left running: {left}"


def _replicas(stack: Stack) -> list[str]:
    return [name for svc in (*SERVICES, "gateway") for name in stack.replicas(svc)]


def _served(stack: Stack, name: str) -> float:
    """What the process answered: Hangar RPCs (health checks and reflection left out), or,
    for a gateway, HTTP requests other than /healthz."""
    total = 0.0
    for family in text_string_to_metric_families(stack.metrics(name)):
        for sample in family.samples:
            if sample.name == "grpc_server_handled_total":
                if sample.labels.get("grpc_service", "").startswith("hangar."):
                    total += sample.value
            elif sample.name == "http_requests_total" and sample.labels["route"] != "/healthz":
                total += sample.value
    return total


def _deployment(r: Replicated, deployment_id: str) -> dict[str, Any]:
    return _ok(r.gateways.get(f"/v1/deployments/{deployment_id}"))


def _wait_status(r: Replicated, deployment_id: str, status: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        current = _deployment(r, deployment_id)
        return current if current["status"] == status else None

    found: dict[str, Any] = wait_for(probe, f"deployment {deployment_id} {status}", WAIT, 0.5)
    return found


def _app_answers(r: Replicated, deployment_id: str) -> str:
    project_id = r.project["id"]
    container = wait_for(
        lambda: _running_container(r.platform, project_id, deployment_id),
        f"a running container of {deployment_id}",
        WAIT,
        0.5,
    )
    address = str(container["address"])
    wait_for(lambda: _answers(address), f"the app of {deployment_id} to answer", WAIT, 0.5)
    return address


def _deployment_ids(r: Replicated) -> list[str]:
    listed = _ok(r.gateways.get(f"/v1/projects/{r.project['id']}/deployments"))
    return [d["id"] for d in listed["deployments"]]


def _sent_again_if_unavailable(
    r: Replicated, what: str, send: Callable[[], httpx.Response], did_nothing: Callable[[], bool]
) -> httpx.Response:
    """A non-idempotent call just after the kill: the channel does not retry it, so it may
    answer 503 UNAVAILABLE once, when it was sent to a replica that had just died; it must
    then have done nothing, and is sent again (what a client does with a 503)."""
    response = send()
    if response.status_code == 503 and response.json().get("code") == UNAVAILABLE:
        assert did_nothing(), f"{what} answered UNAVAILABLE but took effect: {response.text}"
        r.unavailable.append(what)
        response = send()
    return response


@contextlib.contextmanager
def _reading(stack: Stack, account: Account, urls: list[str]) -> Iterator[list[tuple[str, int]]]:
    """GETs of `urls` in turn through the first gateway (never killed), from a thread, until
    the block ends; each answer's (url, status) in the list yielded."""
    answers: list[tuple[str, int]] = []
    stop = threading.Event()

    def read() -> None:
        with stack.client(account.token) as http:
            for url in itertools.cycle(urls):
                if stop.is_set():
                    return
                try:
                    answers.append((url, http.get(url).status_code))
                except httpx.HTTPError as error:
                    answers.append((url, -1))
                    print(f"\n[replicas] GET {url}: {error!r}", file=sys.stderr)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        yield answers
    finally:
        stop.set()
        reader.join()


# --------------------------------------------------------------------------- invariants


def _check_allocations(p: Platform) -> None:
    """One subscription for the organization (its organization.created consumed once), the
    allocations billing holds are the organization's projects, and what the subscription has
    allocated is their sum."""
    org = p.org_id
    projects = {
        r["id"]: (r["ram_mb"], r["cpu_millis"])
        for r in p.query(
            f"SELECT id, ram_mb, cpu_millis FROM project.projects WHERE organization_id = '{org}'"
        )
    }

    def matching() -> dict[str, tuple[int, int]] | None:
        held = {
            r["project_id"]: (r["ram_mb"], r["cpu_millis"])
            for r in p.query(
                "SELECT project_id, ram_mb, cpu_millis FROM billing.allocations"
                f" WHERE organization_id = '{org}'"
            )
        }
        return held if held == projects else None

    wait_for(lambda: matching() is not None, f"billing's allocations to be {projects}", WAIT, 0.5)
    subscriptions = p.query(
        "SELECT allocated_ram_mb, allocated_cpu_millis FROM billing.subscriptions"
        f" WHERE organization_id = '{org}'"
    )
    assert len(subscriptions) == 1, subscriptions
    allocated = (subscriptions[0]["allocated_ram_mb"], subscriptions[0]["allocated_cpu_millis"])
    assert allocated == (
        sum(ram for ram, _ in projects.values()),
        sum(cpu for _, cpu in projects.values()),
    )


def _check_audit(r: Replicated) -> None:
    """Every audit event project, runtime and billing wrote is in identity's trail exactly
    once (relayed by whichever replica held the relay), and the chain verifies."""
    p = r.platform
    org = p.org_id

    def written() -> list[str]:
        return sorted(
            row["id"]
            for schema in ("project", "runtime", "billing")
            for row in p.query(
                f"SELECT id FROM {schema}.outbox"
                f" WHERE type LIKE 'audit.%' AND organization_id = '{org}'"
            )
        )

    def logged() -> list[str]:
        return sorted(
            row["event_id"]
            for row in p.query(
                "SELECT event_id FROM identity.audit_logs"
                f" WHERE organization_id = '{org}' AND service <> 'identity'"
            )
        )

    wait_for(lambda: written() == logged(), "every audit event relayed to identity", WAIT, 0.5)
    assert written(), "no audit event was written"
    created = p.query(
        "SELECT count(*) AS n FROM identity.audit_logs"
        f" WHERE organization_id = '{org}' AND action = 'organization.created'"
    )
    assert created[0]["n"] == 1
    verify = _ok(r.gateways.get(f"/v1/organizations/{org}/audit-logs:verify"))
    assert verify["ok"] is True, verify


def _check_invoices_once(p: Platform) -> None:
    """No period invoiced twice, and each usage record on one invoice's line only."""
    doubled = p.query(
        "SELECT subscription_id, period_start, count(*) FROM billing.invoices"
        " GROUP BY 1, 2 HAVING count(*) > 1"
    )
    assert not doubled, f"a period invoiced twice: {doubled}"
    for invoice in p.query(
        "SELECT id, lines::text AS lines FROM billing.invoices"
        f" WHERE organization_id = '{p.org_id}'"
    ):
        billed = {
            row["metric_type"]: row["quantity"]
            for row in p.query(
                "SELECT metric_type, sum(quantity) AS quantity FROM billing.usage_records"
                f" WHERE invoice_id = '{invoice['id']}' GROUP BY 1"
            )
        }
        lines = {
            line["metric"]: line["quantity"]
            for line in json.loads(invoice["lines"])
            if not line["adjustment"]
        }
        nonzero = {m: q for m, q in billed.items() if q}
        assert {m: q for m, q in lines.items() if q} == nonzero, (invoice["id"], lines, billed)


def _check_all(r: Replicated) -> None:
    _check_settled(r.platform)  # nothing stuck, apps answer, reserved = sum, usage once
    _check_allocations(r.platform)
    _check_audit(r)
    _check_invoices_once(r.platform)


# --------------------------------------------------------------------------------- steps


def test_two_processes_of_every_service_and_of_the_gateway(replicated: Replicated) -> None:
    stack = replicated.stack
    for svc in (*SERVICES, "gateway"):
        names = stack.replicas(svc)
        assert len(names) == 2, names
        assert all(stack.processes[name].alive() for name in names)
        addresses = [stack.addresses[name] for name in names]
        assert len(set(addresses)) == 2
        if svc != "gateway":  # every client is given both addresses
            assert stack.env[f"HANGAR_{svc.upper()}_TARGETS"].split(",") == addresses


def test_the_journey_spreads_over_both_replicas(replicated: Replicated) -> None:
    r = replicated
    p = r.platform
    org = _ok(
        r.gateways.request(
            "POST",
            "/v1/organizations",
            json={"name": "Both", "slug": f"both-{secrets.token_hex(3)}"},
        )
    )
    p.org_id = org["id"]
    wait_for(
        lambda: r.gateways.get(f"/v1/organizations/{p.org_id}/subscription").is_success,
        "the organization's subscription",
        WAIT,
    )
    spec = {
        "name": "Web",
        "slug": f"web-{secrets.token_hex(3)}",
        "resources": {"ramMb": 128, "cpuMillis": 100, "bandwidthGb": 1},
    }
    r.project = _ok(r.gateways.request("POST", f"/v1/organizations/{p.org_id}/projects", json=spec))
    p.projects.append(r.project["id"])
    assert r.project["resources"]["ramMb"] == 128
    base = f"/v1/projects/{r.project['id']}"
    _ok(r.gateways.request("PUT", f"{base}/secrets/GREETING", json={"value": GREETING}))

    created = _ok(
        r.gateways.request("POST", f"{base}/deployments", json={"command": APP.format(release=1)})
    )
    running = _wait_status(r, created["id"], RUNNING)
    assert running["capacityReserved"] is True
    r.deployments.append(created["id"])
    p.running[r.project["id"]] = created["id"]
    _app_answers(r, created["id"])
    assert _ok(r.gateways.get(base))["id"] == r.project["id"]

    def secret_reached_the_app() -> bool:
        logs = _ok(r.gateways.get(f"{base}/logs", params={"contains": "greeting is"}))
        return any(GREETING in entry["line"] for entry in logs["entries"])

    wait_for(secret_reached_the_app, "the secret in the app's first log line", WAIT, 0.5)

    # Every replica answered calls. Round robin gives each ready replica every other call of
    # a channel: reads through both gateways reach each service's two replicas.
    reads = [
        "/v1/users/me",
        base,
        f"/v1/deployments/{created['id']}",
        f"/v1/organizations/{p.org_id}/subscription",
    ]

    def idle() -> list[str]:
        for url in reads:
            _ok(r.gateways.get(url))
        return [
            name for name in _replicas(r.stack) if _served(r.stack, name) <= r.served_at_start[name]
        ]

    wait_for(lambda: not idle(), "every replica to answer calls", WAIT, 0.5)


def test_both_billing_cycles_close_a_period_into_one_invoice(replicated: Replicated) -> None:
    r = replicated
    p = r.platform
    r.need("project")
    # Usage reached billing before the period ends, so the invoice has lines to check.
    wait_for(
        lambda: p.query(
            f"SELECT 1 FROM billing.usage_records WHERE organization_id = '{p.org_id}' LIMIT 1"
        ),
        "usage recorded for the app",
        WAIT,
        0.5,
    )
    cycles = "billing cycle pass"
    runs = {name: _loop_runs(r.stack, name, cycles) for name in r.stack.replicas("billing")}
    # The period ends now (as a month would): both replicas' cycles, every second, race for it.
    p.query(
        "UPDATE billing.subscriptions SET current_period_start = now() - interval '30 days',"
        f" current_period_end = now() WHERE organization_id = '{p.org_id}' RETURNING id"
    )
    invoices = wait_for(
        lambda: _ok(r.gateways.get(f"/v1/organizations/{p.org_id}/invoices"))["invoices"],
        "the period's invoice",
        WAIT,
        0.5,
    )
    # Both cycles ran at least twice more since: neither made a second one.
    wait_for(
        lambda: all(_loop_runs(r.stack, name, cycles) >= runs[name] + 2 for name in runs),
        "both billing replicas' cycles to run again",
        WAIT,
        0.5,
    )
    again = _ok(r.gateways.get(f"/v1/organizations/{p.org_id}/invoices"))["invoices"]
    assert [i["id"] for i in again] == [i["id"] for i in invoices]
    assert len(again) == 1, again
    billed = p.query(
        f"SELECT count(*) AS n FROM billing.usage_records WHERE invoice_id = '{again[0]['id']}'"
    )
    assert billed[0]["n"] > 0, "the invoice billed no usage record"
    _check_all(r)


def _loop_runs(stack: Stack, name: str, loop: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(stack.metrics(name))
        for sample in family.samples
        if sample.name == "loop_runs_total" and sample.labels.get("loop") == loop
    )


def test_one_replica_of_each_killed_and_the_journey_completes(replicated: Replicated) -> None:
    r = replicated
    p = r.platform
    r.need("project", "deployments")
    stack = r.stack
    base = f"/v1/projects/{r.project['id']}"
    reads = [
        "/v1/users/me",
        base,
        f"/v1/deployments/{r.deployments[0]}",
        f"/v1/organizations/{p.org_id}/subscription",
    ]
    with _reading(stack, p.owner, reads) as answers:
        wait_for(lambda: len(answers) >= 2 * len(reads), "reads before the kill", WAIT, 0.1)
        # The first replica of each service: the one HANGAR_<SVC>_ADDR names, so a client
        # that still dialled that setting instead of the list would fail from here on.
        for name in (*SERVICES, "gateway-2"):
            stack.kill(name)
        r.gateways.drop("gateway-2")
        at_kill = len(answers)
        wait_for(lambda: len(answers) >= at_kill + 10 * len(reads), "reads after it", WAIT, 0.1)
    # Idempotent calls in flight on a dying replica, or sent before their channel saw it
    # die, were retried on the other one: no read failed.
    failed = [(url, status) for url, status in answers if status != 200]
    assert not failed, f"reads that failed while replicas were killed: {failed}"
    stack.check_alive()
    survivors = [name for name in _replicas(stack) if name not in stack.killed]
    r.served_at_kill = {name: _served(stack, name) for name in survivors}

    known = set(_deployment_ids(r))
    second = _ok(
        _sent_again_if_unavailable(
            r,
            "CreateDeployment",
            lambda: r.gateways.request(
                "POST", f"{base}/deployments", json={"command": APP.format(release=2)}
            ),
            lambda: set(_deployment_ids(r)) == known,
        )
    )
    _wait_status(r, second["id"], RUNNING)
    first = _wait_status(r, r.deployments[0], "DEPLOYMENT_STATUS_SUPERSEDED")
    assert first["capacityReserved"] is False
    r.deployments.append(second["id"])
    p.running[r.project["id"]] = second["id"]
    _app_answers(r, second["id"])

    known = set(_deployment_ids(r))
    rollback = _ok(
        _sent_again_if_unavailable(
            r,
            "RollbackDeployment",
            lambda: r.gateways.request("POST", f"/v1/deployments/{second['id']}:rollback"),
            lambda: set(_deployment_ids(r)) == known,
        )
    )
    assert rollback["rolledBackFrom"] == second["id"]
    assert rollback["command"] == APP.format(release=1)
    _wait_status(r, rollback["id"], RUNNING)
    _wait_status(r, second["id"], "DEPLOYMENT_STATUS_ROLLED_BACK")
    r.deployments.append(rollback["id"])
    p.running[r.project["id"]] = rollback["id"]
    live = _app_answers(r, rollback["id"])
    assert _ok(r.gateways.get(base))["id"] == r.project["id"]
    _check_all(r)

    deleted = _sent_again_if_unavailable(
        r,
        "DeleteProject",
        lambda: r.gateways.request("DELETE", base),
        lambda: r.gateways.get(base).status_code == 200,
    )
    assert _ok(deleted) == {}
    p.running.clear()
    p.projects.clear()
    wait_for(lambda: not _answers(live), "the app to stop after its project was deleted", WAIT)
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    wait_for(
        lambda: (
            _ok(r.gateways.get(f"/v1/servers/{stack.server_id}", headers=admin))["reserved"][
                "ramMb"
            ]
            == 0
        ),
        "the server's capacity released",
        WAIT,
        0.5,
    )
    holding = p.query(
        "SELECT id, status FROM runtime.deployments"
        f" WHERE project_id = '{r.project['id']}' AND (status = 'running' OR capacity_reserved)"
    )
    assert not holding, f"deployments of the deleted project still running: {holding}"
    _check_all(r)

    stack.check_alive()  # the survivors never died
    still_idle = [name for name in survivors if _served(stack, name) <= r.served_at_kill[name]]
    assert not still_idle, f"replicas that answered nothing after the kill: {still_idle}"
    print(f"\n[replicas] sent again after UNAVAILABLE: {r.unavailable or 'none'}")
