"""The `hangar` command: `up` starts the whole platform locally, `migrate` applies the schema,
`serve SERVICE` runs one service process."""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from hangar_cli import agent_join
from shared.files import write_private
from shared.settings import DEFAULT_PORTS, SERVICES

if TYPE_CHECKING:
    from shared.tls import TlsCredentials

GRPC_SERVICES = SERVICES  # identity, project, runtime, billing
# What each process calls, so what must answer its health check before it starts (the call
# graph in docs/architecture.md); PROCESSES lists them in an order that starts every one after
# what it needs.
NEEDS: dict[str, tuple[str, ...]] = {
    "identity": (),
    "billing": ("identity",),
    "project": ("identity", "billing"),
    "runtime": ("identity", "project", "billing"),
    "agent": ("identity", "runtime"),
    "gateway": ("identity", "project", "runtime", "billing"),
    "edge": ("identity", "runtime"),
}
PROCESSES = ("identity", "billing", "project", "runtime", "agent", "gateway", "edge")
# The edge answers its health check on a name no app can have (.invalid is reserved).
EDGE_HEALTH_HOST = "edge.hangar.invalid"
LOCAL_REGION = "local"  # project's default region: where local projects deploy
# Where `hangar up` serves each process's Prometheus metrics (docs/metrics.md), unless
# HANGAR_<PROCESS>_METRICS_ADDR says otherwise (empty: that process serves none).
METRICS_PORTS = {
    "identity": 9151,
    "project": 9152,
    "runtime": 9153,
    "billing": 9154,
    "agent": 9160,
    "gateway": 9180,
    "edge": 9181,
}


def _fail(message: str) -> int:
    print(f"hangar: {message}", file=sys.stderr)
    return 1


def state_dir() -> Path:
    return Path(os.environ.get("HANGAR_HOME", ".hangar")).resolve()


def private_dir(directory: Path) -> Path:
    """`directory` as 0711: only its owner lists or reads it; others may only pass through
    it, as the agent's containers' user namespaces must to reach their images (under
    agent/, which is 0711 too; every file with a secret in it is 0600, every other
    directory 0700)."""
    directory.mkdir(mode=0o711, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o777 != 0o711:
        directory.chmod(0o711)
    return directory


def load_credentials(directory: Path) -> dict[str, Any]:
    """Local credentials, generated once and kept so `make run` reuses its data: the file 0600
    in a 0711 directory (existing ones with other modes are set to those)."""
    private_dir(directory)
    path = directory / "credentials.json"
    if path.exists():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        creds: dict[str, Any] = json.loads(path.read_text())
    else:
        creds = {}
    changed = False
    principals = (*SERVICES, "agent", "edge")  # every process with a service identity
    for group, names in (("db_passwords", SERVICES), ("service_secrets", principals)):
        bucket = creds.setdefault(group, {})
        for name in names:
            if name not in bucket:
                bucket[name] = secrets.token_urlsafe(24)
                changed = True
    if not creds.get("jwt_signing_keys"):
        from shared.auth import generate_signing_key

        key = generate_signing_key()
        creds["jwt_signing_keys"] = [{"kid": key.kid, "private_key_pem": key.private_key_pem}]
        changed = True
    if not creds.get("project_master_keys"):
        # Wraps project secrets' data keys; kept so local secrets stay readable across runs.
        kid = f"mk-{secrets.token_hex(4)}"
        creds["project_master_keys"] = {kid: base64.b64encode(secrets.token_bytes(32)).decode()}
        creds["project_master_key_id"] = kid
        changed = True
    if changed:
        write_private(path, json.dumps(creds, indent=2))
    return creds


def service_environment(
    database_url: str, creds: dict[str, Any], addresses: dict[str, str]
) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url
    for svc, password in creds["db_passwords"].items():
        env[f"HANGAR_{svc.upper()}_DB_PASSWORD"] = password
    for svc, secret in creds["service_secrets"].items():
        env[f"HANGAR_{svc.upper()}_SERVICE_SECRET"] = secret
    for name, address in addresses.items():
        env[f"HANGAR_{name.upper()}_ADDR"] = address
    # Identity signs with the first key; keep an old one listed after it while rotating.
    env["HANGAR_JWT_SIGNING_KEYS"] = json.dumps(creds.get("jwt_signing_keys", []))
    env["HANGAR_PROJECT_MASTER_KEYS"] = json.dumps(creds.get("project_master_keys", {}))
    env["HANGAR_PROJECT_MASTER_KEY_ID"] = creds.get("project_master_key_id", "")
    return env


def process_environment(name: str, env: dict[str, str]) -> dict[str, str]:
    """What one service process may see (least privilege): its own database login (as its own
    role, never the admin URL) and its own service secret; identity also every service's secret
    (it checks them) and the token signing keys; project the master keys; the gateway nothing
    secret."""
    from shared.settings import role_name, url_with_credentials

    own_password = f"HANGAR_{name.upper()}_DB_PASSWORD"
    own_secret = f"HANGAR_{name.upper()}_SERVICE_SECRET"
    view: dict[str, str] = {}
    for key, value in env.items():
        if key.endswith("_DB_PASSWORD") and key != own_password:
            continue
        if key.endswith("_SERVICE_SECRET") and key != own_secret and name != "identity":
            continue
        if key == "HANGAR_JWT_SIGNING_KEYS" and name != "identity":
            continue
        if key.startswith("HANGAR_PROJECT_MASTER_KEY") and name != "project":
            continue
        view[key] = value
    if name in SERVICES:
        view["DATABASE_URL"] = url_with_credentials(
            env["DATABASE_URL"], role_name(name), env.get(own_password, "")
        )
    else:
        view.pop("DATABASE_URL", None)
    return view


def agent_environment(env: dict[str, str], server_name: str) -> dict[str, str]:
    """The agent's environment: its own secret, none of the database's or other services'."""
    agent_env = {
        key: value
        for key, value in env.items()
        if not (key.endswith("_DB_PASSWORD") or key.endswith("_SERVICE_SECRET"))
        and key not in ("DATABASE_URL", "HANGAR_JWT_SIGNING_KEYS", "HANGAR_PROJECT_MASTER_KEYS")
    }
    agent_env["HANGAR_AGENT_SERVICE_SECRET"] = env.get("HANGAR_AGENT_SERVICE_SECRET", "")
    agent_env["HANGAR_AGENT_SERVER"] = server_name
    return agent_env


def local_capacity() -> tuple[int, int]:
    """(RAM in MB, CPU in millicores) of this machine."""
    import psutil

    return psutil.virtual_memory().total // (1024 * 1024), (psutil.cpu_count() or 1) * 1000


def register_local_server(
    database_url: str, runtime_password: str, name: str, agent_address: str
) -> tuple[str, int, int]:
    """This machine as a server of region "local", idempotent on its name.

    Straight through runtime's own store code and database role, as `hangar admin promote`
    goes through identity's: on a fresh machine there is no platform admin yet to call
    RegisterServer with, and widening that RPC to services would open it on every fleet.
    """
    import asyncio

    from services.runtime import store
    from shared.db import Database
    from shared.resources import Resources
    from shared.settings import role_name, url_with_credentials

    ram_mb, cpu_millis = local_capacity()

    async def register() -> store.Server:
        url = url_with_credentials(database_url, role_name("runtime"), runtime_password)
        db = await Database.connect(url, min_size=1, max_size=1)
        try:
            async with db.transaction() as tx:
                return await store.upsert_local_server(
                    tx,
                    name=name,
                    region=LOCAL_REGION,
                    agent_address=agent_address,
                    capacity=Resources(ram_mb, cpu_millis),
                )
        finally:
            await db.close()

    server = asyncio.run(register())
    return server.id, server.capacity.ram_mb, server.capacity.cpu_millis


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_healthy(
    name: str, address: str, deadline: float, tls: TlsCredentials | None = None
) -> bool:
    """Poll grpc.health.v1 (or the gateway's and the edge's /healthz) until SERVING or the
    deadline; over mutual TLS with `tls` (the gRPC processes)."""
    while time.monotonic() < deadline:
        if name in ("gateway", "edge"):
            import httpx

            headers = {"Host": EDGE_HEALTH_HOST} if name == "edge" else {}
            try:
                reply = httpx.get(f"http://{address}/healthz", headers=headers, timeout=1)
                if reply.status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
        else:
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            with (
                grpc.insecure_channel(address)
                if tls is None
                else grpc.secure_channel(
                    address, tls.channel_credentials(), options=tls.channel_options(name)
                )
            ) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                except grpc.RpcError:
                    pass
        time.sleep(0.1)
    return False


def redact(url: str) -> str:
    """The URL without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Connect once, so a wrong DATABASE_URL fails before anything is started."""
    import asyncio

    import asyncpg

    from shared.pg import PostgresUnavailable

    async def probe() -> None:
        conn = await asyncpg.connect(url, timeout=timeout)
        await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PostgresUnavailable(f"{redact(url)}: {reason}") from None


def exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"


@dataclass
class Child:
    """One supervised process: how to start it, the running one, and its back-off state."""

    name: str
    command: list[str]
    env: dict[str, str] = field(repr=False)
    needs: tuple[str, ...] = ()  # a restart waits while one of these waits for its own
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    crashes: int = 0  # in a row: each doubles the wait before the next start
    restart_at: float | None = None  # set while a crashed child waits for its restart


class Supervisor:
    """Runs `hangar up`'s processes: starts them, restarts one that ends with back-off
    (`first_delay` doubling up to `max_delay`, back to `first_delay` once a run lasted
    `stable_after` seconds) while the others keep serving, and stops them all at the end."""

    def __init__(
        self,
        *,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
        stable_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.stable_after = stable_after
        self.clock = clock
        self.children: dict[str, Child] = {}

    def start(
        self, name: str, command: list[str], env: dict[str, str], needs: Sequence[str] = ()
    ) -> Child:
        child = self.children[name] = Child(name, command, env, tuple(needs))
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(
            child.command,
            env=child.env,
            start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
        )
        child.started_at = self.clock()
        child.restart_at = None

    def wait_ready(
        self,
        name: str,
        address: str,
        deadline: float,
        stopping: Callable[[], bool],
        tls: TlsCredentials | None = None,
    ) -> str | None:
        """Wait until `name` answers its health check; else why not (it exited, the deadline
        passed, or a stop was asked for)."""
        proc = self.children[name].proc
        assert proc is not None
        while not wait_healthy(name, address, min(deadline, time.monotonic() + 0.5), tls):
            if stopping():
                return "stopped while starting"
            if proc.poll() is not None:
                return f"{name} {exit_description(proc.returncode)}"
            if time.monotonic() >= deadline:
                return f"{name} did not become healthy"
        return None

    def check(self) -> None:
        """Note the children that ended (one line each) and start those whose wait is over."""
        now = self.clock()
        for child in self.children.values():
            assert child.proc is not None
            if child.restart_at is not None:
                if now >= child.restart_at and not self._restarting(child.needs):
                    self._spawn(child)
                continue
            code = child.proc.poll()
            if code is None:
                continue
            ran = now - child.started_at
            if ran >= self.stable_after:
                child.crashes = 0
            delay = min(self.first_delay * 2**child.crashes, self.max_delay)
            child.crashes += 1
            child.restart_at = now + delay
            print(
                f"hangar: {child.name} {exit_description(code)} after {ran:.1f}s;"
                f" restarting it in {delay:g}s",
                file=sys.stderr,
                flush=True,
            )

    def _restarting(self, names: Sequence[str]) -> bool:
        return any(self.children[n].restart_at is not None for n in names if n in self.children)

    def stop(self, grace: float) -> None:
        """SIGTERM to every child, the last started first; SIGKILL to those that outlive
        `grace`."""
        running = [
            c.proc for c in reversed(self.children.values()) if c.proc and c.proc.poll() is None
        ]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def apps_unisolated(env: dict[str, str]) -> str | None:
    """Why the local agent will run apps as plain processes, or None when in containers."""
    from services.agent.containers import unavailable_reason

    driver = env.get("HANGAR_AGENT_DRIVER", "auto")
    if driver == "process":
        return "HANGAR_AGENT_DRIVER=process"
    return unavailable_reason() if driver == "auto" else None


SUPERVISOR = "supervisor"  # the certificate `hangar up` checks its processes' health with


def platform_tls(home: Path, addresses: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Mutual TLS for `hangar up` (docs/tls.md): the CA in home/tls (made once), a certificate
    per process (issued again when it expires within 30 days), and each process's
    HANGAR_TLS_* settings: its own key only."""
    from shared.tls import ensure_platform_certificates, host_of, tls_environment

    directory = home / "tls"
    hosts = {name: [host_of(addresses[name])] for name in PROCESSES}
    ensure_platform_certificates(directory, {**hosts, SUPERVISOR: []})
    env = {name: tls_environment(directory / name) for name in (*PROCESSES, SUPERVISOR)}
    env["runtime"]["HANGAR_RUNTIME_AGENT_CA_DIR"] = str(directory / "agent-ca")  # enrolment
    return env


def supervisor_tls(home: Path) -> TlsCredentials | None:
    """`hangar up`'s own client credentials (its health checks); None before it made them."""
    from shared.tls import TlsCredentials

    directory = home / "tls" / SUPERVISOR
    return TlsCredentials.from_directory(directory) if directory.is_dir() else None


def metrics_addresses(environ: Mapping[str, str]) -> dict[str, str]:
    """Each process's metrics address for `hangar up`: its setting, else its default port on
    loopback; a setting left empty turns that process's endpoint off."""
    addresses = {
        name: environ.get(f"HANGAR_{name.upper()}_METRICS_ADDR", f"127.0.0.1:{port}")
        for name, port in METRICS_PORTS.items()
    }
    return {name: address for name, address in addresses.items() if address}


def cmd_up(args: argparse.Namespace) -> int:
    from shared.migrate import migrate
    from shared.pg import PostgresUnavailable, provision

    started = time.monotonic()
    addresses = {
        name: os.environ.get(f"HANGAR_{name.upper()}_ADDR", f"127.0.0.1:{port}")
        for name, port in DEFAULT_PORTS.items()
    }
    edge_host = addresses["edge"].rpartition(":")[0]
    metrics = metrics_addresses(os.environ)
    extra_ports = {
        "edge https": f"{edge_host}:{os.environ.get('HANGAR_EDGE_HTTPS_PORT', '8443')}",
        "edge admin": os.environ.get("HANGAR_EDGE_ADMIN_ADDRESS", "127.0.0.1:2019"),
        **{f"{name} metrics": address for name, address in metrics.items()},
    }
    for name, address in [*((n, addresses[n]) for n in PROCESSES), *extra_ports.items()]:
        host, _, port = address.rpartition(":")
        if port_in_use(host, int(port)):
            return _fail(f"port {port} ({name}) is already in use; is Hangar already running?")

    home = state_dir()
    creds = load_credentials(home)
    try:
        pg = provision(home / "pgdata", ephemeral=False)
    except PostgresUnavailable as exc:
        return _fail(f"PostgreSQL is not available: {exc}")
    try:
        check_reachable(pg.url)
    except PostgresUnavailable as exc:
        pg.stop()
        return _fail(f"PostgreSQL is not available: {exc}")
    supervisor = Supervisor()
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        try:
            migrate(pg.url, creds["db_passwords"])
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            return _fail(f"migrations failed against {pg.kind} PostgreSQL: {first_line}")
        env = service_environment(pg.url, creds, addresses)
        env.update({f"HANGAR_{n.upper()}_METRICS_ADDR": a for n, a in metrics.items()})
        env.setdefault("HANGAR_AGENT_STATE_DIR", str(home / "agent"))
        env.setdefault("HANGAR_ARTIFACTS_DIR", str(home / "artifacts"))
        env.setdefault("HANGAR_EDGE_STATE_DIR", str(home / "edge"))
        if (why_not := apps_unisolated(env)) is not None:
            # Every app runs as a plain process here: only one tenant may use this machine.
            env.setdefault("HANGAR_SINGLE_TENANT", "1")
            print(f"hangar: apps are NOT isolated on this machine ({why_not})", file=sys.stderr)
        tls_env = platform_tls(home, addresses)
        client_tls = supervisor_tls(home)
        server_name = socket.gethostname()
        # This machine runs apps through the local agent: registered before the agent starts,
        # so its first heartbeat finds its server.
        server_id, ram_mb, cpu_millis = register_local_server(
            pg.url, creds["db_passwords"]["runtime"], server_name, addresses["agent"]
        )
        deadline = time.monotonic() + args.timeout
        for name in PROCESSES:  # each once what it needs answers its health check
            own_env = (
                agent_environment(env, server_name)
                if name == "agent"
                else process_environment(name, env)
            )
            supervisor.start(
                name,
                [sys.executable, "-m", "hangar_cli", "serve", name],
                {**own_env, **tls_env[name]},
                NEEDS[name],
            )
            why = supervisor.wait_ready(
                name, addresses[name], deadline, lambda: stopping, client_tls
            )
            if why is not None:
                return _fail(f"{why}; stopping everything")
        print(f"Hangar is up in {time.monotonic() - started:.1f}s  (Ctrl-C stops it)")
        print(f"  DATABASE_URL  {redact(pg.url)}  ({pg.kind})")
        print(
            f"  server    {server_name} ({server_id}), region {LOCAL_REGION},"
            f" {ram_mb} MB, {cpu_millis} mCPU"
        )
        for name in PROCESSES:
            kind = "http" if name in ("gateway", "edge") else "grpc"
            print(f"  {name:<9} {kind}://{addresses[name]}")
        if metrics:
            print("  metrics   " + ", ".join(f"{n} http://{a}/metrics" for n, a in metrics.items()))
        print(f"  tls       mutual TLS between every process (CA and certificates: {home}/tls)")
        domain = os.environ.get("HANGAR_APPS_DOMAIN", "localhost")
        port = addresses["edge"].rpartition(":")[2]
        print(f"  apps      http://<project>-<organization>.{domain}:{port}")
        sys.stdout.flush()
        while not stopping:  # a process that ends is restarted; only a signal stops them all
            supervisor.check()
            time.sleep(0.2)
        return 0
    finally:
        supervisor.stop(grace=float(os.environ.get("HANGAR_GRACE_SECONDS", "5")) + 2)
        pg.stop()
        print("Hangar stopped.")


def cmd_migrate(args: argparse.Namespace) -> int:
    from shared.migrate import migrate

    url = os.environ.get("DATABASE_URL")
    if not url:
        return _fail("DATABASE_URL is not set")
    passwords = {
        svc: os.environ[f"HANGAR_{svc.upper()}_DB_PASSWORD"]
        for svc in SERVICES
        if os.environ.get(f"HANGAR_{svc.upper()}_DB_PASSWORD")
    }
    migrate(url, passwords)
    print("migrated")
    return 0


def cmd_admin_promote(args: argparse.Namespace) -> int:
    """Make an existing user a platform admin (audited in identity's trail)."""
    import asyncio

    from shared.settings import Settings, role_name, url_with_credentials

    settings = Settings.from_env("identity")
    home = state_dir()
    creds = load_credentials(home) if not settings.database_url else {}
    pg = None
    url = settings.database_url
    if not url:
        from shared.pg import PostgresUnavailable, provision

        try:
            pg = provision(home / "pgdata", ephemeral=False)
        except PostgresUnavailable as exc:
            return _fail(f"PostgreSQL is not available: {exc}")
        url = pg.url
    password = settings.db_passwords.get("identity") or creds.get("db_passwords", {}).get(
        "identity", ""
    )
    try:
        found = asyncio.run(
            _promote(url_with_credentials(url, role_name("identity"), password), args.email)
        )
    finally:
        if pg is not None:
            pg.stop()
    if not found:
        return _fail(f"no user with email {args.email.strip().lower()}")
    print(f"{args.email.strip().lower()} is now a platform admin")
    return 0


async def _promote(identity_url: str, email: str) -> bool:
    from services.identity.access import AccessBroadcaster
    from services.identity.accounts import Accounts
    from services.identity.audit import AuditTrail
    from services.identity.passwords import Passwords
    from services.identity.service_auth import LocalAuthorizer
    from services.identity.tokens import KeySet
    from shared.db import Database
    from shared.settings import Settings

    settings = Settings.from_env("identity")
    db = await Database.connect(identity_url, min_size=1, max_size=1)
    try:
        accounts = Accounts(
            db,
            settings,
            KeySet.from_settings(settings),
            Passwords.from_settings(settings),
            AuditTrail(db, LocalAuthorizer(db)),
            AccessBroadcaster(),
        )
        return await accounts.promote(email)
    finally:
        await db.close()


def cmd_serve(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"services.{args.service}.server")
    module.main()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Platform commands (`up`, `migrate`, `admin`, `serve`) run with argparse; anything else
    (no arguments and `--help` included) goes to the user commands (hangar_cli.user.app)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in ("up", "migrate", "admin", "serve", "agent"):
        from hangar_cli.user.app import run

        return run(args_list)
    parser = argparse.ArgumentParser(prog="hangar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start PostgreSQL, migrate, and run every service")
    up.add_argument("--timeout", type=float, default=60, help="seconds to wait for health")
    up.set_defaults(func=cmd_up)
    sub.add_parser("migrate", help="apply all migrations to DATABASE_URL").set_defaults(
        func=cmd_migrate
    )
    admin = sub.add_parser("admin", help="platform administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    promote = admin_sub.add_parser("promote", help="make a user a platform admin")
    promote.add_argument("email")
    promote.set_defaults(func=cmd_admin_promote)
    serve = sub.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=PROCESSES)
    serve.set_defaults(func=cmd_serve)
    agent_join.add_commands(sub)
    args = parser.parse_args(args_list)
    return int(args.func(args))
