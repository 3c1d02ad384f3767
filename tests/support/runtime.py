"""Runtime for tests, beside the real services it calls: identity (signed tokens, Authorize,
platform admins promoted as `hangar admin promote` does), project (projects made through
CreateProject, read back by runtime's RemoteProjects with the caller's own token) and billing
(the organization's pool), all in this process on loopback ports (tests/support/project.py).
Runtime verifies tokens against identity's JWKS and asks identity.Authorize through its
RemoteAuthorizer, as in production. Tests that drive the scheduler or the store directly
need no callers: servers are registered straight in the store, and the capacity invariant is
read back as a superuser."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest

from hangar.identity.v1 import identity_pb2 as ipb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.runtime import store
from services.runtime.domain import Isolation
from services.runtime.server import RuntimeApp
from services.runtime.store import DeploymentSpec
from shared.db import Database
from shared.ids import new_id
from shared.resources import Resources
from shared.server import RunningServer, start_server
from shared.settings import Settings
from tests.support.identity import PASSWORD, bearer
from tests.support.procs import free_port
from tests.support.project import Member, Stack, Tenant, running_stack

Metadata = tuple[tuple[str, str], ...]


def runtime_settings(database_url: str, db_passwords: dict[str, str], **kwargs: Any) -> Settings:
    """Settings for runtime's database role only (tests that call no other service)."""
    return Settings(
        service="runtime",
        database_url=database_url,
        addresses={name: "127.0.0.1:1" for name in ("identity", "project", "runtime")},
        db_passwords=db_passwords,
        **kwargs,
    )


async def runtime_database(
    database_url: str, db_passwords: dict[str, str], max_size: int = 40
) -> Database:
    """A pool on the runtime role, as the service itself connects."""
    url = runtime_settings(database_url, db_passwords).service_database_url()
    return await Database.connect(url, min_size=1, max_size=max_size)


@dataclass
class Neighbours:
    """Real identity, billing and project for runtime, and the callers tests need."""

    stack: Stack
    _tokens: dict[str, str] = field(default_factory=dict)

    @property
    def identity_address(self) -> str:
        return self.stack.identity.address

    async def tenant(self, *roles: str) -> Tenant:
        """A new organization (identity) with billing's pool: its owner and one member per
        role ("viewer", "developer", "admin", "owner"), each with a SignUp access token."""
        return await self.stack.tenant(*roles)

    async def user(self) -> Member:
        """A signed-up user in no organization."""
        return await self.stack.user()

    async def project(self, tenant: Tenant, region: str = "local") -> str:
        """project.CreateProject by the tenant's owner; the project's id."""
        return str((await self.stack.create(tenant, region=region)).id)

    async def platform_admin(self) -> Member:
        """A user promoted the way `hangar admin promote` does, then logged in again (the
        claim is in tokens issued after the promotion)."""
        member = await self.user()
        identity = self.stack.identity
        assert identity.app is not None
        assert await identity.app.accounts.promote(member.email)
        auth = await identity.stub.Login(ipb.LoginRequest(email=member.email, password=PASSWORD))
        return Member(member.user_id, member.email, auth.access_token)

    async def service_token(self, name: str) -> str:
        """A service's token from identity.IssueServiceToken (minted once per module)."""
        if name not in self._tokens:
            self._tokens[name] = await self.stack.identity.service_token(name)
        return self._tokens[name]

    async def service(self, name: str) -> Metadata:
        return bearer(await self.service_token(name))

    def settings(
        self, runtime_address: str, *, billing_address: str = "", **overrides: Any
    ) -> Settings:
        """Runtime's settings next to these services (billing: the stack's, unless given)."""
        settings = live_runtime_settings(
            self.stack.identity, self.stack.project_address, runtime_address, **overrides
        )
        settings.addresses["billing"] = billing_address or self.stack.billing_address
        return settings


@pytest.fixture(scope="module")
async def neighbours(database_url: str, db_passwords: dict[str, str]) -> AsyncIterator[Neighbours]:
    """Identity, billing and project in this process, once per test module."""
    async with running_stack(database_url, db_passwords) as stack:
        yield Neighbours(stack)


@dataclass
class Runtime:
    app: RuntimeApp
    server: RunningServer
    channel: grpc.aio.Channel
    address: str
    neighbours: Neighbours

    @property
    def stub(self) -> runtime_pb2_grpc.RuntimeServiceStub:
        return runtime_pb2_grpc.RuntimeServiceStub(self.channel)

    @property
    def db(self) -> Database:
        return self.app.db

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop()


async def launch_runtime(
    neighbours: Neighbours, port: int = 0, *, billing_address: str = "", **settings: Any
) -> Runtime:
    """RuntimeApp as `hangar serve runtime` builds it (RemoteAuthorizer, RemoteProjects,
    billing over gRPC), without its background loops, on a loopback port (fixed if given,
    so it can be stopped and started again under an agent's feet)."""
    address = f"127.0.0.1:{port or free_port()}"
    config = neighbours.settings(address, billing_address=billing_address, **settings)
    db = await Database.connect(config.service_database_url(), min_size=1, max_size=20)
    app = RuntimeApp(config, db, background=False)
    server = await start_server(app, address, grace=0.2)
    channel = grpc.aio.insecure_channel(address)
    return Runtime(app, server, channel, address, neighbours)


RuntimeFactory = Callable[..., Any]


@pytest.fixture
async def start_runtime(neighbours: Neighbours) -> AsyncIterator[RuntimeFactory]:
    """Start runtime servers (several may share the database); all stop at teardown."""
    started: list[Runtime] = []

    async def start(**settings_kwargs: Any) -> Runtime:
        runtime = await launch_runtime(neighbours, **settings_kwargs)
        started.append(runtime)
        return runtime

    yield start
    for runtime in started:
        await runtime.stop()


@pytest.fixture
async def runtime(start_runtime: RuntimeFactory) -> Runtime:
    return await start_runtime()  # type: ignore[no-any-return]


def region_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


# ------------------------------------------------------------------- fleet and checks


async def add_servers(
    db: Database,
    region: str,
    count: int,
    ram_mb: int,
    cpu_millis: int,
    isolation: Isolation = Isolation.CONTAINER,
) -> list[str]:
    """Servers registered straight in the store. They isolate apps unless told otherwise, so
    that tests of capacity may place any organizations' deployments side by side."""
    ids = []
    async with db.transaction() as tx:
        for i in range(count):
            server = await store.insert_server(
                tx,
                name=f"{region}-{i}-{new_id()[:6]}",
                region=region,
                agent_address=f"127.0.0.1:{60000 + i}",
                capacity=Resources(ram_mb, cpu_millis),
                isolation=isolation,
            )
            ids.append(server.id)
    return ids


def spec(
    region: str,
    ram_mb: int = 100,
    cpu_millis: int = 100,
    *,
    project_id: str = "",
    organization_id: str = "",
    command: str = "python3 -m http.server $PORT",
) -> DeploymentSpec:
    return DeploymentSpec(
        project_id=project_id or new_id(),
        organization_id=organization_id or new_id(),
        resources=Resources(ram_mb, cpu_millis),
        region=region,
        command=command,
    )


@dataclass(frozen=True)
class Counters:
    capacity: Resources
    reserved: Resources
    actual: Resources  # sum over deployments with capacity_reserved


async def counters(admin_url: str, server_ids: Iterable[str]) -> dict[str, Counters]:
    """Each server's counters next to the sum they must equal, read in one snapshot."""
    conn = await asyncpg.connect(admin_url)
    try:
        rows = await conn.fetch(
            """SELECT s.id, s.ram_mb, s.cpu_millis, s.ram_mb_reserved, s.cpu_millis_reserved,
                      COALESCE(sum(d.ram_mb) FILTER (WHERE d.capacity_reserved), 0) AS ram_sum,
                      COALESCE(sum(d.cpu_millis) FILTER (WHERE d.capacity_reserved), 0) AS cpu_sum
                 FROM runtime.servers s LEFT JOIN runtime.deployments d ON d.server_id = s.id
                WHERE s.id = ANY($1::text[]) GROUP BY s.id""",
            list(server_ids),
        )
    finally:
        await conn.close()
    return {
        r["id"]: Counters(
            Resources.from_row(r),
            Resources.from_row(r, suffix="_reserved"),
            Resources(int(r["ram_sum"]), int(r["cpu_sum"])),
        )
        for r in rows
    }


async def assert_invariant(admin_url: str, server_ids: Iterable[str]) -> dict[str, Counters]:
    """Counters = sum over reserved deployments, and never above capacity."""
    found = await counters(admin_url, server_ids)
    for server_id, c in found.items():
        assert c.reserved == c.actual, (server_id, c)
        assert c.reserved.ram_mb <= c.capacity.ram_mb, (server_id, c)
        assert c.reserved.cpu_millis <= c.capacity.cpu_millis, (server_id, c)
    return found


# ------------------------------------------------------- runtime with real neighbours


def live_runtime_settings(
    identity: Any, project_address: str, runtime_address: str, **overrides: Any
) -> Settings:
    """Runtime's settings next to a real identity and project (tests.support.project's Stack),
    with loops fast enough for tests."""
    base = identity.settings
    values: dict[str, Any] = {
        "runtime_agent_sweep_seconds": 0.5,
        "runtime_reconcile_seconds": 1.0,
        "runtime_start_timeout_seconds": 15.0,
        "runtime_heartbeat_timeout_seconds": 10.0,
        "runtime_drain_seconds": 0.0,  # replaced containers stop at once (drain tests set it)
        "runtime_schedule_retry_seconds": 0.5,
        # Uploads land in a directory of the test run's own, never the machine's.
        "artifacts_dir": tempfile.mkdtemp(prefix="hangar-artifacts-"),
    }
    values.update(overrides)
    return Settings(
        service="runtime",
        database_url=base.database_url,
        db_passwords=dict(base.db_passwords),
        addresses={
            **base.addresses,
            "identity": identity.address,
            "project": project_address,
            "runtime": runtime_address,
        },
        service_secrets=dict(base.service_secrets),
        **values,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment a `hangar serve runtime` process needs for these settings."""
    from tests.support.procs import service_env

    env = service_env(settings.database_url, settings.db_passwords, settings.addresses)
    for name, secret in settings.service_secrets.items():
        env[f"HANGAR_{name.upper()}_SERVICE_SECRET"] = secret
    env.update(
        {
            "HANGAR_RUNTIME_AGENT_SWEEP_SECONDS": str(settings.runtime_agent_sweep_seconds),
            "HANGAR_RUNTIME_RECONCILE_SECONDS": str(settings.runtime_reconcile_seconds),
            "HANGAR_RUNTIME_START_TIMEOUT_SECONDS": str(settings.runtime_start_timeout_seconds),
            "HANGAR_RUNTIME_HEARTBEAT_TIMEOUT_SECONDS": str(
                settings.runtime_heartbeat_timeout_seconds
            ),
            "HANGAR_RUNTIME_SCHEDULE_RETRY_SECONDS": str(settings.runtime_schedule_retry_seconds),
            "HANGAR_RUNTIME_DRAIN_SECONDS": str(settings.runtime_drain_seconds),
        }
    )
    return env


def agent_env(identity: Any, runtime_address: str, server_name: str) -> dict[str, str]:
    """What a real agent process needs to report to runtime as `server_name`."""
    return {
        "HANGAR_AGENT_SERVICE_SECRET": identity.settings.service_secrets["agent"],
        "HANGAR_RUNTIME_ADDR": runtime_address,
        "HANGAR_AGENT_SERVER": server_name,
        "HANGAR_AGENT_HEARTBEAT_SECONDS": "0.5",
    }


async def register_server(
    db: Database, name: str, region: str, agent_address: str, ram_mb: int, cpu_millis: int
) -> str:
    async with db.transaction() as tx:
        server = await store.upsert_local_server(
            tx,
            name=name,
            region=region,
            agent_address=agent_address,
            capacity=Resources(ram_mb, cpu_millis),
        )
    return server.id


async def wait_for_deployment(
    stub: runtime_pb2_grpc.RuntimeServiceStub,
    deployment_id: str,
    metadata: Any,
    statuses: Iterable[int],
    within: float = 30.0,
) -> Any:
    """Poll GetDeployment until one of `statuses` (as a client would)."""
    import asyncio
    import time

    from hangar.runtime.v1 import runtime_pb2 as rpb

    wanted = set(statuses)
    deadline = time.monotonic() + within
    while True:
        request = rpb.GetDeploymentRequest(id=deployment_id)
        got = await stub.GetDeployment(request, metadata=metadata)
        if got.status in wanted:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"deployment stuck: {got}")
        await asyncio.sleep(0.1)
