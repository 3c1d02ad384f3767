"""The gateway as a real process (`hangar serve gateway`) in front of the real services, each
its own process on a free port against the migrated test database, over real HTTP.

What the services do not implement yet answers 501 with a JSON body; the identity journey
runs once identity's SignUp is built (until then it is skipped, saying why).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest

from shared.settings import SERVICES
from tests.support.procs import ServiceProcess, free_port, service_env


@pytest.fixture(scope="module")
def gateway(database_url: str, db_passwords: dict[str, str]) -> Iterator[str]:
    addresses = {name: f"127.0.0.1:{free_port()}" for name in (*SERVICES, "gateway")}
    secrets_env = {
        f"HANGAR_{name.upper()}_SERVICE_SECRET": secrets.token_urlsafe(16)
        for name in (*SERVICES, "agent")
    }
    env = service_env(database_url, db_passwords, addresses, secrets_env)
    started: list[ServiceProcess] = []
    try:
        for name in (*SERVICES, "gateway"):  # the gateway is healthy once all upstreams are
            started.append(ServiceProcess.start(name, addresses[name], env))
        yield f"http://{addresses['gateway']}"
    finally:
        for process in reversed(started):
            process.stop()


@pytest.fixture(scope="module")
def client(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=10) as http:
        yield http


def test_healthz_reports_every_upstream_serving(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "upstreams": dict.fromkeys(SERVICES, "SERVING")}


def test_an_unbuilt_rpc_is_a_501_with_a_json_body(client: httpx.Client) -> None:
    # Services are being filled in: take any GET route that still answers UNIMPLEMENTED.
    document = client.get("/openapi.json").json()
    for path, item in document["paths"].items():
        if "get" not in item or "{" in path:
            continue
        response = client.get(path)
        if response.status_code == 501:
            body = response.json()
            assert body["code"] == 12
            assert item["get"]["x-grpc-method"].rsplit(".", 1)[1] in body["message"]
            assert isinstance(body["details"], list)
            return
    pytest.skip("every parameterless GET route is built; nothing answers 501 any more")


def test_every_route_answers_without_a_5xx_other_than_501(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    for path, item in document["paths"].items():
        for method in item:
            url = path.replace("{", "").replace("}", "")  # {id} -> id: any non-empty value
            response = client.request(method.upper(), url, json={} if method != "get" else None)
            assert response.status_code < 500 or response.status_code in (501, 503), (
                method,
                url,
                response.status_code,
                response.text,
            )
            assert response.headers["content-type"].startswith("application/"), (method, url)
            assert response.headers["x-request-id"]


def test_request_id_is_echoed(client: httpx.Client) -> None:
    response = client.get("/v1/plans", headers={"X-Request-Id": "trace-me-1"})
    assert response.headers["x-request-id"] == "trace-me-1"


def test_gateway_errors(client: httpx.Client) -> None:
    assert client.get("/v1/nowhere").status_code == 404
    assert client.get("/v1/nowhere").json()["code"] == 5
    wrong = client.put("/v1/plans")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET"
    malformed = client.post(
        "/v1/auth/signup", content=b'{"email": "a@', headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 400
    oversized = client.post("/v1/auth/signup", json={"name": "x" * (1 << 20)})
    assert oversized.status_code == 413
    typed = client.get("/v1/plans", params={"pageSize": "many"})
    assert typed.status_code == 400
    assert typed.json()["details"][1]["fieldViolations"][0]["field"] == "pageSize"


def test_jwks_route_reaches_identity(client: httpx.Client) -> None:
    response = client.get("/.well-known/jwks.json")
    assert response.status_code in (200, 501)
    if response.status_code == 200:
        keys = response.json()["keys"]
        assert keys and all(key["kty"] == "OKP" and key["crv"] == "Ed25519" for key in keys)


def test_openapi_is_served(client: httpx.Client) -> None:
    document = client.get("/openapi.json")
    assert document.status_code == 200
    assert document.json()["paths"]["/v1/auth/signup"]["post"]["operationId"] == (
        "IdentityService_SignUp"
    )


def test_sign_up_create_an_organization_and_error_mapping(client: httpx.Client) -> None:
    email = f"ada-{secrets.token_hex(4)}@example.com"
    signup = client.post(
        "/v1/auth/signup",
        json={"email": email, "password": "correct horse battery", "name": "Ada"},
    )
    if signup.status_code == 501:
        pytest.skip("identity's SignUp is not built yet (501 through the gateway)")
    assert signup.status_code == 200, signup.text
    tokens = signup.json()
    assert tokens["user"]["email"] == email
    assert tokens["accessToken"] and tokens["refreshToken"]

    login = client.post(
        "/v1/auth/login", json={"email": email, "password": "correct horse battery"}
    )
    assert login.status_code == 200, login.text
    auth = {"Authorization": f"Bearer {login.json()['accessToken']}"}

    me = client.get("/v1/users/me", headers=auth)
    assert me.status_code == 200, me.text
    assert me.json()["email"] == email

    slug = f"acme-{secrets.token_hex(3)}"
    created = client.post("/v1/organizations", json={"name": "Acme", "slug": slug}, headers=auth)
    assert created.status_code == 200, created.text
    organization = created.json()
    assert organization["slug"] == slug
    assert organization["ownerId"] == tokens["user"]["id"]

    fetched = client.get(f"/v1/organizations/{organization['id']}", headers=auth)
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["id"] == organization["id"]

    # 401 without a token, 409 on a slug conflict, 400 naming the field
    anonymous = client.post("/v1/organizations", json={"name": "Acme", "slug": slug + "x"})
    assert anonymous.status_code == 401, anonymous.text
    conflict = client.post("/v1/organizations", json={"name": "Acme", "slug": slug}, headers=auth)
    assert conflict.status_code == 409, conflict.text
    bad = client.post(
        "/v1/organizations", json={"name": "Acme", "slug": "Not A Slug"}, headers=auth
    )
    assert bad.status_code == 400, bad.text
    fields = [
        v["field"]
        for d in bad.json()["details"]
        if d["@type"].endswith("BadRequest")
        for v in d["fieldViolations"]
    ]
    assert any("slug" in f for f in fields), bad.text
