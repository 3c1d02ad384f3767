"""The dashboard's session cookie (services/gateway/session_cookie.py) through the real gateway
process in front of the real services, over real HTTP: the refresh token in an HttpOnly
cookie for requests that opt in with `X-Hangar-Session: cookie`, the JSON body unchanged for
API clients, and the CSRF refusals.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest

from shared.settings import Settings
from tests.integration.test_gateway_services import gateway
from tests.support.stack import PASSWORD

__all__ = ["gateway"]  # the real gateway and services, shared with test_gateway_services

DASHBOARD = {"X-Hangar-Session": "cookie"}
MAX_AGE = Settings("gateway").refresh_token_ttl_seconds  # the default: 30 days


@pytest.fixture(scope="module")
def client(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=30) as http:
        yield http


def post(
    client: httpx.Client,
    path: str,
    body: dict[str, str] | None = None,
    *,
    cookie: str = "",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """A POST carrying exactly the cookie given (none kept between calls)."""
    sent = dict(headers or {})
    if cookie:
        sent["Cookie"] = f"hangar_refresh={cookie}"
    client.cookies.clear()
    try:
        return client.post(path, json=body if body is not None else {}, headers=sent)
    finally:
        client.cookies.clear()


def set_cookie(response: httpx.Response) -> str:
    values = response.headers.get_list("set-cookie")
    assert len(values) == 1, values
    return values[0]


def cookie_value(response: httpx.Response) -> str:
    first = set_cookie(response).split(";", 1)[0]
    name, _, value = first.partition("=")
    assert name == "hangar_refresh", first
    return value


def dashboard_sign_up(client: httpx.Client) -> tuple[str, str]:
    """(email, the refresh token in the cookie) of a new account signed up as the dashboard."""
    email = f"cookie-{secrets.token_hex(4)}@example.com"
    reply = post(
        client, "/v1/auth/signup", {"email": email, "password": PASSWORD}, headers=DASHBOARD
    )
    assert reply.status_code == 200, reply.text
    return email, cookie_value(reply)


def own_origin(client: httpx.Client) -> str:
    return str(client.base_url).rstrip("/")


def assert_refused(reply: httpx.Response) -> None:
    assert reply.status_code == 403, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["code"] == 7  # PERMISSION_DENIED, as a google.rpc.Status
    reasons = [d.get("reason") for d in body["details"]]
    assert "SESSION_COOKIE_REFUSED" in reasons, body
    assert "set-cookie" not in reply.headers


def test_a_dashboard_sign_in_sets_exactly_the_cookie_and_leaves_the_token_out_of_the_body(
    client: httpx.Client,
) -> None:
    email, _ = dashboard_sign_up(client)
    reply = post(
        client, "/v1/auth/login", {"email": email, "password": PASSWORD}, headers=DASHBOARD
    )
    assert reply.status_code == 200, reply.text
    token = cookie_value(reply)
    assert token
    assert set_cookie(reply) == (
        f"hangar_refresh={token}; HttpOnly; SameSite=Lax; Path=/v1/auth; Max-Age={MAX_AGE}"
    )  # no Secure: this request came over plain http
    body = reply.json()
    assert "refreshToken" not in body
    assert body["accessToken"] and body["user"]["email"] == email


def test_api_clients_still_get_the_refresh_token_in_the_body_and_no_cookie(
    client: httpx.Client,
) -> None:
    email, _ = dashboard_sign_up(client)
    reply = post(client, "/v1/auth/login", {"email": email, "password": PASSWORD})
    assert reply.status_code == 200, reply.text
    assert reply.json()["refreshToken"]
    assert "set-cookie" not in reply.headers
    renewed = post(client, "/v1/auth/refresh", {"refreshToken": reply.json()["refreshToken"]})
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["refreshToken"]
    assert "set-cookie" not in renewed.headers


def test_a_refresh_with_the_cookie_rotates_it(client: httpx.Client) -> None:
    email, token = dashboard_sign_up(client)
    renewed = post(client, "/v1/auth/refresh", cookie=token, headers=DASHBOARD)
    assert renewed.status_code == 200, renewed.text
    assert "refreshToken" not in renewed.json()
    assert renewed.json()["user"]["email"] == email
    rotated = cookie_value(renewed)
    assert rotated and rotated != token
    me = client.get(
        "/v1/users/me", headers={"Authorization": f"Bearer {renewed.json()['accessToken']}"}
    )
    assert me.status_code == 200, me.text
    again = post(client, "/v1/auth/refresh", cookie=rotated, headers=DASHBOARD)
    assert again.status_code == 200, again.text


def test_a_same_origin_request_may_use_the_cookie(client: httpx.Client) -> None:
    _, token = dashboard_sign_up(client)
    headers = {**DASHBOARD, "Origin": own_origin(client)}
    renewed = post(client, "/v1/auth/refresh", cookie=token, headers=headers)
    assert renewed.status_code == 200, renewed.text


def test_a_cookie_refresh_without_the_header_is_refused_and_spends_nothing(
    client: httpx.Client,
) -> None:
    _, token = dashboard_sign_up(client)
    assert_refused(post(client, "/v1/auth/refresh", cookie=token))
    assert_refused(post(client, "/v1/auth/logout", cookie=token))
    still = post(client, "/v1/auth/refresh", cookie=token, headers=DASHBOARD)
    assert still.status_code == 200, still.text  # the refused attempts did not use the token


def test_a_cookie_refresh_from_a_foreign_origin_is_refused(client: httpx.Client) -> None:
    email, token = dashboard_sign_up(client)
    for origin in ("https://evil.example", "null", own_origin(client) + ".evil.example"):
        headers = {**DASHBOARD, "Origin": origin}
        assert_refused(post(client, "/v1/auth/refresh", cookie=token, headers=headers))
        assert_refused(post(client, "/v1/auth/logout", cookie=token, headers=headers))
        login = post(
            client, "/v1/auth/login", {"email": email, "password": PASSWORD}, headers=headers
        )
        assert_refused(login)  # nor may another site sign this browser in
    still = post(client, "/v1/auth/refresh", cookie=token, headers=DASHBOARD)
    assert still.status_code == 200, still.text


def test_the_gateway_approves_no_cross_origin_preflight(client: httpx.Client) -> None:
    preflight = client.options(
        "/v1/auth/refresh",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-hangar-session",
        },
    )
    assert preflight.status_code >= 400, preflight.text
    assert not [h for h in preflight.headers if h.lower().startswith("access-control-")]


def test_logout_clears_the_cookie_and_its_token_is_refused_afterwards(
    client: httpx.Client,
) -> None:
    _, token = dashboard_sign_up(client)
    out = post(client, "/v1/auth/logout", cookie=token, headers=DASHBOARD)
    assert out.status_code == 200, out.text
    assert set_cookie(out) == "hangar_refresh=; HttpOnly; SameSite=Lax; Path=/v1/auth; Max-Age=0"
    by_cookie = post(client, "/v1/auth/refresh", cookie=token, headers=DASHBOARD)
    assert by_cookie.status_code == 401, by_cookie.text
    by_body = post(client, "/v1/auth/refresh", {"refreshToken": token})
    assert by_body.status_code == 401, by_body.text


def test_a_dashboard_refresh_without_a_cookie_is_a_401(client: httpx.Client) -> None:
    reply = post(client, "/v1/auth/refresh", headers=DASHBOARD)
    assert reply.status_code == 401, reply.text
    reasons = [d.get("reason") for d in reply.json()["details"]]
    assert reasons == ["SESSION_COOKIE_MISSING"], reply.text


def test_the_cookie_is_ignored_on_every_other_route(client: httpx.Client) -> None:
    _, token = dashboard_sign_up(client)
    client.cookies.clear()
    cookie = {**DASHBOARD, "Cookie": f"hangar_refresh={token}"}
    me = client.get("/v1/users/me", headers=cookie)
    assert me.status_code == 401, me.text
    created = client.post(
        "/v1/organizations", json={"name": "Acme", "slug": "acme"}, headers=cookie
    )
    assert created.status_code == 401, created.text
    assert "set-cookie" not in me.headers and "set-cookie" not in created.headers
    still = post(client, "/v1/auth/refresh", cookie=token, headers=DASHBOARD)
    assert still.status_code == 200, still.text


def test_the_cookie_is_secure_behind_a_trusted_tls_proxy(client: httpx.Client) -> None:
    # uvicorn trusts X-Forwarded-Proto from 127.0.0.1 (its forwarded_allow_ips default).
    email, _ = dashboard_sign_up(client)
    https = own_origin(client).replace("http://", "https://", 1)
    headers = {**DASHBOARD, "X-Forwarded-Proto": "https", "Origin": https}
    reply = post(client, "/v1/auth/login", {"email": email, "password": PASSWORD}, headers=headers)
    assert reply.status_code == 200, reply.text
    assert set_cookie(reply).endswith(f"; Max-Age={MAX_AGE}; Secure")
