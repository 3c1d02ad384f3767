"""Runtime for tests: an in-process server on a loopback port with stand-ins for identity and
project (bearer tokens "user:<id>", "admin:<id>" (platform admin), "service:<name>";
memberships and project owners set by the test), servers registered straight in the store,
and the capacity invariant read back as a superuser."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest

from hangar.runtime.v1 import runtime_pb2_grpc
from services.runtime import store
from services.runtime.domain import Resources
from services.runtime.projects import ProjectInfo, ResolvedEnv
from services.runtime.server import RuntimeApp
from services.runtime.store import DeploymentSpec
from shared.auth import require_caller
from shared.context import Principal, PrincipalKind
from shared.db import Database
from shared.errors import PermissionDenied, Unauthenticated
from shared.ids import new_id
from shared.server import RunningServer, start_server
from shared.settings import Settings

ROLES = {"viewer": 1, "developer": 2, "admin": 3, "owner": 4}
NEEDED = {
    "deployments.list": 1,
    "deployments.get": 1,
    "deployments.create": 2,
    "deployments.cancel": 2,
    "deployments.rollback": 2,
}


class TokenNames:
    """Authenticator: the token names the principal (tests only)."""

    async def authenticate(self, token: str) -> Principal:
        kind, _, subject = token.partition(":")
        if kind in ("user", "admin") and subject:
            return Principal(
                kind=PrincipalKind.USER, subject=subject, is_platform_admin=kind == "admin"
            )
        if kind == "service" and subject:
            return Principal(kind=PrincipalKind.SERVICE, subject=subject)
        raise Unauthenticated("bad test token")


@dataclass
class Memberships:
    """Authorizer: roles the test grants; anyone else gets PERMISSION_DENIED."""

    roles: dict[tuple[str, str], str] = field(default_factory=dict)

    async def require(self, organization_id: str, permission: str) -> int:
        principal = require_caller()
        role = ROLES.get(self.roles.get((organization_id, principal.subject), ""), 0)
        if not principal.is_user or role < NEEDED[permission]:
            raise PermissionDenied(f"missing permission {permission} in this organization")
        return role


@dataclass
class ProjectDirectory:
    """Projects: project -> organization, visible to that organization's members only."""

    members: Memberships
    organizations: dict[str, str] = field(default_factory=dict)

    async def organization_of(self, project_id: str) -> str:
        principal = require_caller()
        org = self.organizations.get(project_id, "")
        if not org or (org, principal.subject) not in self.members.roles:
            raise PermissionDenied("missing permission projects.get")
        return org

    async def get(self, project_id: str) -> ProjectInfo:
        org = await self.organization_of(project_id)
        return ProjectInfo(project_id, org, Resources(128, 100), "local")

    async def resolve_secrets(self, project_id: str) -> ResolvedEnv:
        return ResolvedEnv({}, "")


def user(user_id: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer user:{user_id}"),)


def admin(user_id: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer admin:{user_id}"),)


def service(name: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer service:{name}"),)


def runtime_settings(database_url: str, db_passwords: dict[str, str], **kwargs: Any) -> Settings:
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
class Runtime:
    app: RuntimeApp
    server: RunningServer
    channel: grpc.aio.Channel
    members: Memberships
    projects: ProjectDirectory

    @property
    def stub(self) -> runtime_pb2_grpc.RuntimeServiceStub:
        return runtime_pb2_grpc.RuntimeServiceStub(self.channel)

    def new_project(self, *, owner: str = "", org: str = "") -> tuple[str, str]:
        """(organization id, project id), with `owner` as the organization's owner."""
        org = org or new_id()
        project = new_id()
        self.projects.organizations[project] = org
        if owner:
            self.members.roles[(org, owner)] = "owner"
        return org, project


RuntimeFactory = Callable[..., Any]


@pytest.fixture
async def start_runtime(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RuntimeFactory]:
    """Start runtime servers (several may share the database); all stop at teardown."""
    started: list[Runtime] = []

    async def start(**settings_kwargs: Any) -> Runtime:
        settings = runtime_settings(database_url, db_passwords, **settings_kwargs)
        db = await Database.connect(settings.service_database_url(), max_size=40)
        members = Memberships()
        projects = ProjectDirectory(members)
        app = RuntimeApp(settings, db, authorizer=members, projects=projects, background=False)
        server = await start_server(app, "127.0.0.1:0", authenticator=TokenNames(), grace=0.5)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        runtime = Runtime(app, server, channel, members, projects)
        started.append(runtime)
        return runtime

    yield start
    for runtime in started:
        await runtime.channel.close()
        await runtime.server.stop()


@pytest.fixture
async def runtime(start_runtime: RuntimeFactory) -> Runtime:
    return await start_runtime()  # type: ignore[no-any-return]


# ------------------------------------------------------------------- fleet and checks


async def add_servers(
    db: Database, region: str, count: int, ram_mb: int, cpu_millis: int
) -> list[str]:
    ids = []
    async with db.transaction() as tx:
        for i in range(count):
            server = await store.insert_server(
                tx,
                name=f"{region}-{i}-{new_id()[:6]}",
                region=region,
                agent_address=f"127.0.0.1:{60000 + i}",
                capacity=Resources(ram_mb, cpu_millis),
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
            Resources(r["ram_mb"], r["cpu_millis"]),
            Resources(r["ram_mb_reserved"], r["cpu_millis_reserved"]),
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
        "runtime_schedule_retry_seconds": 0.5,
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
