"""Errors say what happened: NUL in text is a 400 naming the field, an oversize header a 431,
identity or PostgreSQL down a 503 / UNAVAILABLE with a retry hint, never a 500.

Through the gateway: every service a real process (`hangar serve NAME`) on the migrated test
database, over real HTTP. PostgreSQL down: real identity / project / billing servers whose
pool points where no PostgreSQL listens (a closed TCP port, a socket directory that does not
exist), called over real gRPC.
"""

from __future__ import annotations

import re
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hangar.billing.v1 import billing_pb2, billing_pb2_grpc
from hangar.identity.v1 import identity_pb2, identity_pb2_grpc
from hangar.project.v1 import project_pb2, project_pb2_grpc
from services.billing.server import BillingApp
from services.identity.server import IdentityApp
from services.project.server import ProjectApp
from shared.db import Database, create_pool
from shared.server import start_server
from shared.settings import SERVICES
from tests.support.identity import PASSWORD, RunningIdentity, bearer, running_identity
from tests.support.procs import ServiceProcess, free_port, service_env
from tests.support.project import master_keys, project_settings

# ------------------------------------------------------------------- through the gateway


@dataclass
class Platform:
    url: str
    processes: dict[str, ServiceProcess]
    addresses: dict[str, str]
    env: dict[str, str]


@pytest.fixture(scope="module")
def platform(database_url: str, db_passwords: dict[str, str]) -> Iterator[Platform]:
    addresses = {name: f"127.0.0.1:{free_port()}" for name in (*SERVICES, "gateway")}
    secrets_env = {
        f"HANGAR_{name.upper()}_SERVICE_SECRET": secrets.token_urlsafe(16)
        for name in (*SERVICES, "agent")
    }
    env = service_env(database_url, db_passwords, addresses, secrets_env)
    started: dict[str, ServiceProcess] = {}
    try:
        for name in (*SERVICES, "gateway"):
            started[name] = ServiceProcess.start(name, addresses[name], env)
        yield Platform(f"http://{addresses['gateway']}", started, addresses, env)
    finally:
        for process in reversed(list(started.values())):
            process.stop()


@pytest.fixture(scope="module")
def client(platform: Platform) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=platform.url, timeout=20) as http:
        yield http


@pytest.fixture(scope="module")
def token(client: httpx.Client) -> str:
    email = f"outage-{secrets.token_hex(4)}@example.com"
    signup = client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
    assert signup.status_code == 200, signup.text
    return str(signup.json()["accessToken"])


def violations(body: dict[str, Any]) -> list[dict[str, str]]:
    for detail in body["details"]:
        if detail["@type"] == "type.googleapis.com/google.rpc.BadRequest":
            return list(detail["fieldViolations"])
    return []


def no_tracebacks(platform: Platform) -> None:
    """No request logged a crash (a background loop's warning at start-up is not ours)."""
    for name, process in platform.processes.items():
        crashes = [
            line
            for line in process.stderr_text().splitlines()
            if "rpc crashed" in line
            or "gateway crashed" in line
            or ('"hangar.rpc"' in line and "Traceback" in line)
        ]
        assert not crashes, (name, crashes[-3:])


def test_nul_in_a_json_field_of_an_anonymous_route_is_a_400_naming_it(
    client: httpx.Client, platform: Platform
) -> None:
    response = client.post(
        "/v1/auth/login", json={"email": "a\u0000@x.com", "password": "correct horse"}
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [v["field"] for v in violations(body)] == ["email"]
    assert "NUL" in violations(body)[0]["description"]
    no_tracebacks(platform)


def test_nul_in_a_path_id_of_an_authenticated_route_is_a_400_naming_it(
    client: httpx.Client, token: str, platform: Platform
) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    response = client.get("/v1/projects/a%00b", headers=auth)
    assert response.status_code == 400, response.text
    assert [v["field"] for v in violations(response.json())] == ["id"]
    no_tracebacks(platform)


def test_nul_in_any_path_variable_of_any_route_is_a_400_not_a_500(
    client: httpx.Client, token: str, platform: Platform
) -> None:
    """Organizations, deployments, invoices, plans, usage, members, PATCH / DELETE, `:cancel`:
    every route with a string variable in its path, each variable holding a NUL."""
    auth = {"Authorization": f"Bearer {token}"}
    document = client.get("/openapi.json").json()
    tried = 0
    for path, item in document["paths"].items():
        if "{" not in path:
            continue
        url = re.sub(r"\{[^}]+\}", "a%00b", path)
        for method in item:
            body: dict[str, Any] | None = None if method in ("get", "delete") else {}
            response = client.request(method.upper(), url, json=body, headers=auth)
            where = (method, path, response.status_code, response.text)
            assert response.status_code == 400, where
            assert violations(response.json()), where  # naming the field
            tried += 1
    assert tried > 20
    no_tracebacks(platform)


def test_an_oversize_authorization_header_is_a_431(client: httpx.Client) -> None:
    response = client.get("/v1/projects/p1", headers={"Authorization": "Bearer " + "x" * 100_000})
    assert response.status_code == 431, response.text
    body = response.json()
    assert body["details"][0]["reason"] == "HEADER_TOO_LARGE"
    assert body["details"][0]["metadata"]["header"] == "authorization"
    # Any other header too: a sane limit, as proxies have.
    other = client.get("/v1/plans", headers={"X-Whatever": "y" * 20_000})
    assert other.status_code == 431, other.text
    # A token of a usual size is nowhere near (a signed JWT is well under 1 KiB).
    usual = client.get("/v1/plans", headers={"Authorization": "Bearer " + "x" * 2000})
    assert usual.status_code == 401, usual.text


def test_identity_stopped_a_project_route_answers_503_with_retry_after(
    client: httpx.Client, token: str, platform: Platform
) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    orgs = []
    for _ in range(2):
        slug = f"o-{secrets.token_hex(3)}"
        org = client.post("/v1/organizations", json={"name": slug, "slug": slug}, headers=auth)
        assert org.status_code == 200, org.text
        orgs.append(org.json()["id"])
    warm = client.get(f"/v1/organizations/{orgs[0]}/projects", headers=auth)
    assert warm.status_code == 200, warm.text  # project has identity's keys from here on

    identity = platform.processes["identity"]
    identity.stop()
    try:
        # An organization project has not asked identity about yet: Authorize must go out.
        response = client.get(f"/v1/organizations/{orgs[1]}/projects", headers=auth)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"].isdigit()
        body = response.json()
        assert body["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        types = {d["@type"].rsplit("/", 1)[1]: d for d in body["details"]}
        assert types["google.rpc.ErrorInfo"]["reason"] == "IDENTITY_UNAVAILABLE"
        assert "google.rpc.RetryInfo" in types
        # identity itself behind the gateway: the gateway's own 503 carries the hint too.
        login = client.post("/v1/auth/login", json={"email": "a@x.com", "password": "p"})
        assert login.status_code == 503, login.text
        assert login.headers["retry-after"] == "1"
        no_tracebacks(platform)
    finally:
        platform.processes["identity"] = ServiceProcess.start(
            "identity", platform.addresses["identity"], platform.env
        )


# ------------------------------------------------------------------ PostgreSQL unreachable


@pytest.fixture(params=["closed-port", "missing-socket"])
async def dead_pool(request: pytest.FixtureRequest) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a PostgreSQL that is not there (min_size 0: nothing connects until asked)."""
    if request.param == "closed-port":
        url = f"postgresql://nobody:pw@127.0.0.1:{free_port()}/nothing"
    else:
        missing = f"{tempfile.gettempdir()}/no-postgres-{secrets.token_hex(4)}"
        url = f"postgresql://nobody:pw@/nothing?host={missing}"
    pool = await create_pool(url, min_size=0, max_size=2)
    try:
        yield pool
    finally:
        pool.terminate()


@pytest.fixture(scope="module")
async def identity(
    database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[RunningIdentity]:
    async with running_identity(database_url, db_passwords) as running:
        yield running


@asynccontextmanager
async def serving_without_postgresql(
    make: Callable[[Database], Any], url: str, dead_pool: asyncpg.Pool
) -> AsyncIterator[grpc.aio.Channel]:
    """The service starts on the real database (its outbox listens at start-up), then
    PostgreSQL goes away: every connection it asks for from then on is refused."""
    db = await Database.connect(url, min_size=1, max_size=4)
    server = await start_server(make(db), "127.0.0.1:0", grace=0.2)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    real, db.pool = db.pool, dead_pool
    try:
        yield channel
    finally:
        db.pool = real
        await channel.close()
        await server.stop()


def assert_unavailable(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    status = rpc_status.from_call(error)
    assert status is not None
    kinds = {d.TypeName(): d for d in status.details}
    info = error_details_pb2.ErrorInfo()
    kinds["google.rpc.ErrorInfo"].Unpack(info)
    assert info.reason == "DATABASE_UNAVAILABLE"
    retry = error_details_pb2.RetryInfo()
    kinds["google.rpc.RetryInfo"].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() > 0


async def test_identity_without_postgresql_is_unavailable(
    identity: RunningIdentity, dead_pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    url = identity.settings.service_database_url("identity")
    async with serving_without_postgresql(
        lambda db: IdentityApp(identity.settings, db), url, dead_pool
    ) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Login(identity_pb2.LoginRequest(email="a@x.com", password="pw"))
        assert_unavailable(caught.value)
    crashes = [r for r in caplog.records if r.name == "hangar.rpc" and r.exc_info]
    assert not crashes


async def test_project_without_postgresql_is_unavailable(
    identity: RunningIdentity,
    dead_pool: asyncpg.Pool,
    database_url: str,
    db_passwords: dict[str, str],
) -> None:
    settings = project_settings(
        database_url, db_passwords, identity, "127.0.0.1:1", master_keys("mk-1"), "mk-1"
    )
    owner = await identity.sign_up()
    org = await identity.create_org(owner.access_token)
    async with serving_without_postgresql(
        lambda db: ProjectApp(settings, db, run_loops=False),
        settings.service_database_url("project"),
        dead_pool,
    ) as channel:
        stub = project_pb2_grpc.ProjectServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListProjects(
                project_pb2.ListProjectsRequest(organization_id=org.id),
                metadata=bearer(owner.access_token),
            )
        assert_unavailable(caught.value)


async def test_billing_without_postgresql_is_unavailable(
    identity: RunningIdentity, dead_pool: asyncpg.Pool
) -> None:
    settings = replace(identity.settings, service="billing", jwt_signing_keys=())
    user = await identity.sign_up()
    async with serving_without_postgresql(
        lambda db: BillingApp(settings, db, consume_identity=False, run_cycle=False),
        settings.service_database_url("billing"),
        dead_pool,
    ) as channel:
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListPlans(billing_pb2.ListPlansRequest(), metadata=bearer(user.access_token))
        assert_unavailable(caught.value)
