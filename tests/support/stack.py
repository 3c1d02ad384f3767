"""The whole platform as real processes for end-to-end tests: identity, project, billing,
runtime, an agent and the gateway, each `hangar serve NAME` on a free loopback port against a
freshly migrated database, with the credentials `hangar up` would give them (hangar_cli's
load_credentials / service_environment). The agent is registered as a server through the
gateway by a platform admin, made with `hangar admin promote` as an operator would.

Each process writes stderr to a file; when one dies (at start-up or during the tests) its
stderr is printed. Stopping sends SIGTERM in reverse start order, then SIGKILL after a grace.

With `replicas=2`, every service and the gateway run twice (the second as `<name>-2`, on a
port of its own): each service's clients get both addresses (HANGAR_<SVC>_TARGETS) and
spread their calls over them. With `metrics=True`, every process serves /metrics. With
`tls=True`, every gRPC hop is mutual TLS, each process with its own certificate (as `hangar
up` makes them).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from hangar_cli.cli import (
    load_credentials,
    platform_tls,
    service_environment,
    supervisor_tls,
    wait_healthy,
)
from shared.settings import SERVICES
from shared.tls import TlsCredentials
from tests.support.procs import free_port

REPO = Path(__file__).resolve().parents[2]
# Start order: identity first (everyone verifies its tokens), then its dependants; the agent
# fetches identity's keys; the gateway last, healthy only once every upstream is.
ORDER = ("identity", "billing", "project", "runtime", "agent", "gateway", "edge")
PASSWORD = "correct horse battery staple"
REGION = "local"  # project's DEFAULT_REGION: where a project's deployments are placed
AGENT_SERVER_NAME = "e2e-agent"
REPLICATED = (*SERVICES, "gateway")  # what start_stack(replicas=N) runs N of


class StackError(RuntimeError):
    """A process of the stack did not start, or died."""


@dataclass
class Process:
    name: str
    address: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    _stderr: IO[bytes] = field(repr=False)
    service: str = ""  # what `hangar serve` runs (the name, unless another agent's)
    env: dict[str, str] | None = field(default=None, repr=False)  # the stack's, unless given

    def stderr(self, limit: int = 4000) -> str:
        self._stderr.flush()
        text = self.stderr_path.read_text(errors="replace")
        return text[-limit:]

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Stack:
    """A running platform: `url` is the gateway's base URL."""

    url: str
    addresses: dict[str, str]
    env: dict[str, str] = field(repr=False)
    home: Path
    processes: dict[str, Process] = field(default_factory=dict)
    admin_token: str = field(default="", repr=False)
    server_id: str = ""  # the agent, registered as a server (empty without an agent)
    metrics_addresses: dict[str, str] = field(default_factory=dict)  # process -> /metrics
    killed: set[str] = field(default_factory=set)  # SIGKILLed on purpose (kill), not "dead"
    # start_stack(tls=True): each process's HANGAR_TLS_* (by service), and the tests' own.
    tls_env: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)
    client_tls: TlsCredentials | None = field(default=None, repr=False)

    def client(self, token: str = "", *, via: str = "", **kwargs: Any) -> httpx.Client:
        """An HTTP client of the gateway (or of the gateway process `via`, a replica's)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs.setdefault("timeout", 15)
        url = f"http://{self.addresses[via]}" if via else self.url
        return httpx.Client(base_url=url, headers=headers, **kwargs)

    def replicas(self, service: str) -> list[str]:
        """The processes that run `service`: its name, then `<service>-2`..."""
        return [name for name, p in self.processes.items() if (p.service or name) == service]

    def metrics(self, name: str) -> str:
        """The process's /metrics page (start_stack(metrics=True))."""
        reply = httpx.get(f"http://{self.metrics_addresses[name]}/metrics", timeout=10)
        reply.raise_for_status()
        return reply.text

    def dead(self) -> dict[str, str]:
        """Processes that exited (other than those kill ended), with the end of their stderr."""
        return {
            name: f"exit {p.proc.returncode}: {p.stderr()}"
            for name, p in self.processes.items()
            if not p.alive() and name not in self.killed
        }

    def check_alive(self) -> None:
        dead = self.dead()
        if dead:
            raise StackError("; ".join(f"{name} died ({why})" for name, why in dead.items()))

    def kill(self, name: str) -> None:
        """SIGKILL one process (no chance to clean up) and leave it down."""
        process = self.processes[name]
        process.proc.kill()
        process.proc.wait()
        self.killed.add(name)

    def restart(self, name: str, timeout: float = 60.0) -> Process:
        """SIGKILL one process (no chance to clean up), then start it again, healthy."""
        process = self.processes[name]
        if process.alive():
            process.proc.kill()
        process.proc.wait()
        process._stderr.close()
        self.killed.discard(name)
        return _start(
            self, name, time.monotonic() + timeout, service=process.service, env=process.env
        )

    def stop(self, grace: float = 8.0) -> dict[str, int]:
        """SIGTERM everything in reverse start order, SIGKILL whatever outlives the grace."""
        codes: dict[str, int] = {}
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.alive():
                process.proc.send_signal(signal.SIGTERM)
                try:
                    process.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    process.proc.kill()
                    process.proc.wait()
            codes[name] = process.proc.returncode
            process._stderr.close()
        return codes


def _start(
    stack: Stack,
    name: str,
    deadline: float,
    *,
    service: str = "",
    env: dict[str, str] | None = None,
) -> Process:
    stderr_path = stack.home / f"{name}.stderr"
    stderr = stderr_path.open("ab")  # a restart appends to what the process said before
    proc = subprocess.Popen(
        [sys.executable, "-m", "hangar_cli", "serve", service or name],
        env={**(env or stack.env), **stack.tls_env.get(service or name, {})},
        cwd=REPO,
        stdout=stderr,  # services log to stderr; anything printed goes to the same file
        stderr=stderr,
    )
    process = Process(name, stack.addresses[name], proc, stderr_path, stderr, service, env)
    stack.processes[name] = process
    while not wait_healthy(
        service or name, process.address, min(deadline, time.monotonic() + 0.5), stack.client_tls
    ):
        if not process.alive() or time.monotonic() >= deadline:
            why = "exited" if not process.alive() else "did not become healthy"
            raise StackError(f"{name} {why}; its stderr:\n{process.stderr()}")
    return process


def _promote(stack: Stack, email: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hangar_cli", "admin", "promote", email],
        env=stack.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise StackError(f"hangar admin promote failed: {done.stderr[-2000:]}")


def _register_agent(stack: Stack, ram_mb: int, cpu_millis: int) -> None:
    """A platform admin (signed up, promoted, logged in again) registers the agent."""
    email = f"admin-{secrets.token_hex(4)}@example.com"
    with stack.client() as http:
        signup = http.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
        if signup.status_code != 200:
            raise StackError(f"admin sign-up failed: {signup.status_code} {signup.text}")
        _promote(stack, email)
        login = http.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        if login.status_code != 200:
            raise StackError(f"admin login failed: {login.status_code} {login.text}")
        stack.admin_token = login.json()["accessToken"]
        server = http.post(
            "/v1/servers",
            headers={"Authorization": f"Bearer {stack.admin_token}"},
            json={
                "name": AGENT_SERVER_NAME,
                "region": REGION,
                "agentAddress": stack.addresses["agent"],
                "capacity": {"ramMb": ram_mb, "cpuMillis": cpu_millis},
            },
        )
        if server.status_code != 200:
            raise StackError(f"registering the agent failed: {server.status_code} {server.text}")
        stack.server_id = server.json()["id"]


def add_agent(stack: Stack, name: str, timeout: float = 60.0) -> Process:
    """Another agent on this machine (its own address, state directory and cgroups), run
    as the process `name` and registered as the server `name` in the stack's region."""
    address = f"127.0.0.1:{free_port()}"
    stack.addresses[name] = address
    env = {
        **stack.env,
        "HANGAR_AGENT_ADDR": address,
        "HANGAR_AGENT_SERVER": name,
        "HANGAR_AGENT_STATE_DIR": str(stack.home / name),
    }
    if stack.metrics_addresses:  # a /metrics port of its own
        stack.metrics_addresses[name] = env["HANGAR_AGENT_METRICS_ADDR"] = _loopback()
    process = _start(stack, name, time.monotonic() + timeout, service="agent", env=env)
    with stack.client(stack.admin_token) as http:
        server = http.post(
            "/v1/servers",
            json={
                "name": name,
                "region": REGION,
                "agentAddress": address,
                "capacity": {"ramMb": 8192, "cpuMillis": 8000},
            },
        )
    if server.status_code != 200:
        raise StackError(f"registering {name} failed: {server.status_code} {server.text}")
    return process


def searchable_by_others(path: Path) -> None:
    """Lets others search (o+x, never list) the directories above `path` that are ours:
    an agent's state directory must be reachable by its containers' user namespaces'
    root (the host's nobody), as under /var/lib in production; pytest's are 0700."""
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == os.geteuid() and not st.st_mode & 0o001:
            os.chmod(directory, (st.st_mode & 0o7777) | 0o001)


def _loopback() -> str:
    return f"127.0.0.1:{free_port()}"


def start_stack(
    database_url: str,
    db_passwords: Mapping[str, str],
    home: Path,
    *,
    agent: bool = True,
    edge: bool = False,
    stripe_api_base: str = "",
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    replicas: int = 1,
    metrics: bool = False,
    tls: bool = False,
) -> Stack:
    """Start everything against `database_url` (already migrated with `db_passwords`); the
    edge (Caddy in front of the apps, addresses["edge"]) only when asked. `replicas`
    processes of each service and of the gateway; `metrics`: /metrics on every process;
    `tls`: mutual TLS between every process (certificates under home/tls)."""
    home.mkdir(parents=True, exist_ok=True)
    if agent:
        searchable_by_others(home)
    creds = load_credentials(home)  # service secrets, JWT signing key, project master key
    creds["db_passwords"] = dict(db_passwords)  # the roles the migration created
    names = tuple(n for n in ORDER if (agent or n != "agent") and (edge or n != "edge"))
    addresses = {name: _loopback() for name in ORDER}
    env = service_environment(database_url, creds, addresses)
    # The second and later replicas: their own port (HANGAR_<SVC>_ADDR in their own env);
    # every client reaches a service through the list of all of its replicas.
    more: dict[str, list[str]] = {
        name: [f"{name}-{n}" for n in range(2, replicas + 1)] for name in REPLICATED
    }
    for name, extra in more.items():
        addresses.update({replica: _loopback() for replica in extra})
        if extra and name in SERVICES:
            every = [addresses[name], *(addresses[replica] for replica in extra)]
            env[f"HANGAR_{name.upper()}_TARGETS"] = ",".join(every)
    metrics_addresses: dict[str, str] = {}
    if metrics:
        for name in names:
            metrics_addresses[name] = _loopback()
            env[f"HANGAR_{name.upper()}_METRICS_ADDR"] = metrics_addresses[name]
            metrics_addresses.update({replica: _loopback() for replica in more.get(name, [])})
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "HANGAR_LOG_LEVEL": "WARNING",
            "HANGAR_GRACE_SECONDS": "2",
            "HANGAR_AGENT_STOP_GRACE_SECONDS": "2",
            "HANGAR_AGENT_START_TIMEOUT_SECONDS": "20",
            "HANGAR_AGENT_RESTART_BACKOFF_SECONDS": "0.2",  # a crash loop in seconds, not 15
            "HANGAR_RUNTIME_SCHEDULE_RETRY_SECONDS": "0.5",
            # the agent reports as the server it is registered as (_register_agent), often
            "HANGAR_AGENT_SERVER": AGENT_SERVER_NAME,
            "HANGAR_AGENT_HEARTBEAT_SECONDS": "1",
            "HANGAR_AGENT_STATE_DIR": str(home / "agent"),
            "HANGAR_ARTIFACTS_DIR": str(home / "artifacts"),
            "HANGAR_RUNTIME_AGENT_SWEEP_SECONDS": "0.5",
            # Replaced containers stop at once (the edge's rollout test sets a drain time).
            "HANGAR_RUNTIME_DRAIN_SECONDS": "0",
            "HANGAR_TELEMETRY_SAMPLE_SECONDS": "1",
            "HANGAR_TELEMETRY_USAGE_SECONDS": "2",
            "HANGAR_EDGE_HTTPS_PORT": str(free_port()),
            "HANGAR_EDGE_ADMIN_ADDRESS": f"127.0.0.1:{free_port()}",
            "HANGAR_EDGE_STATE_DIR": str(home / "edge"),
        }
    )
    if stripe_api_base:
        env.update(
            {
                "STRIPE_API_KEY": "sk_test_hangar",
                "STRIPE_API_BASE": stripe_api_base,
                "STRIPE_WEBHOOK_SECRET": "whsec_" + secrets.token_hex(16),
            }
        )
    else:  # without STRIPE_API_KEY, invoices are computed and stored, not sent
        for key in ("STRIPE_API_KEY", "STRIPE_API_BASE", "STRIPE_WEBHOOK_SECRET"):
            env.pop(key, None)
    if edge:  # custom domains' checks reach the stack's edge on loopback (no DNS here)
        env["HANGAR_DOMAIN_CHECK_ADDRESS"] = addresses["edge"]
    env.update(extra_env or {})
    stack = Stack(f"http://{addresses['gateway']}", addresses, env, home)
    stack.metrics_addresses = metrics_addresses
    if tls:
        stack.tls_env = platform_tls(home, addresses)
        stack.client_tls = supervisor_tls(home)
    deadline = time.monotonic() + timeout
    try:
        for name in names:
            _start(stack, name, deadline)
            for replica in more.get(name, []):
                own = {f"HANGAR_{name.upper()}_ADDR": addresses[replica]}
                if replica in metrics_addresses:
                    own[f"HANGAR_{name.upper()}_METRICS_ADDR"] = metrics_addresses[replica]
                _start(stack, replica, deadline, service=name, env={**env, **own})
        if agent:
            _register_agent(stack, ram_mb=8192, cpu_millis=8000)
    except BaseException:
        stack.stop(grace=3)
        raise
    return stack


def migrated_database(
    create_database: Callable[[str], str], db_passwords: Mapping[str, str]
) -> str:
    """A fresh database migrated to head: the stack's background loops see no other test's
    rows (servers registered by in-process tests, for one)."""
    from shared.migrate import migrate

    url = create_database("hangar_e2e")
    migrate(url, db_passwords)
    return url


@contextmanager
def module_stack(
    create_database: Callable[[str], str],
    db_passwords: dict[str, str],
    home: Path,
    **options: Any,
) -> Iterator[Stack]:
    """start_stack (`options` are its) on a migrated database of its own, stopped after,
    with any process that died meanwhile, or exited uncleanly on SIGTERM, reported."""
    url = migrated_database(create_database, db_passwords)
    running = start_stack(url, db_passwords, home, **options)
    try:
        yield running
    finally:
        dead = running.dead()
        codes = running.stop()
        for name, why in dead.items():
            print(f"\n[{home.name}] {name} died during the tests ({why})", file=sys.stderr)
        unclean = {n: c for n, c in codes.items() if n not in dead and c not in (0, -15)}
        if unclean:
            print(
                f"\n[{home.name}] unclean exits on SIGTERM: {json.dumps(unclean)}", file=sys.stderr
            )
            for name in unclean:
                print(running.processes[name].stderr(), file=sys.stderr)


@pytest.fixture(scope="module")
def stack(
    create_database: Callable[[str], str],
    db_passwords: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The whole platform for one test module, stopped (and any death reported) after it."""
    with module_stack(create_database, db_passwords, tmp_path_factory.mktemp("stack")) as running:
        yield running


@dataclass
class Account:
    """A signed-up user with a fresh access token."""

    email: str
    user_id: str
    token: str = field(repr=False)
    refresh_token: str = field(repr=False)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def sign_up(http: httpx.Client, name: str = "user") -> Account:
    email = f"{name}-{secrets.token_hex(4)}@example.com"
    response = http.post(
        "/v1/auth/signup", json={"email": email, "password": PASSWORD, "name": name.title()}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return Account(email, body["user"]["id"], body["accessToken"], body["refreshToken"])


def owner_with_project(
    stack: Stack, slug: str, ram_mb: int = 128, cpu_millis: int = 100
) -> tuple[Account, dict[str, Any]]:
    """A signed-up user who owns an organization (with its plan) and a project in it."""
    with stack.client(timeout=10) as http:
        owner = sign_up(http, "bench")
        org = http.post(
            "/v1/organizations", headers=owner.auth, json={"name": "B", "slug": slug}
        ).json()
        subscription = f"/v1/organizations/{org['id']}/subscription"
        wait_for(lambda: http.get(subscription, headers=owner.auth).is_success, "a plan")
        created = http.post(
            f"/v1/organizations/{org['id']}/projects",
            headers=owner.auth,
            json={
                "name": "Bench",
                "slug": slug,
                "resources": {"ramMb": ram_mb, "cpuMillis": cpu_millis},
            },
        )
        created.raise_for_status()
        project: dict[str, Any] = created.json()
    return owner, project


def wait_for(probe: Callable[[], Any], what: str, within: float = 20.0, every: float = 0.2) -> Any:
    """Poll `probe` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {within}s waiting for {what} (last: {last!r})")


__all__ = [
    "PASSWORD",
    "REGION",
    "Account",
    "Stack",
    "StackError",
    "migrated_database",
    "sign_up",
    "stack",
    "start_stack",
    "wait_for",
]
