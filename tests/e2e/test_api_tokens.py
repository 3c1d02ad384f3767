"""Personal API tokens, as scripts and CI use them: over real HTTP through the gateway, every
service its own process (tests/support/stack.py). A token's secret is shown once; it works
as a bearer token within its scope and organization, never for more than its owner can do;
revoking it is refused on the very next request, on every service; an expired one is
refused; tokens cannot make tokens; creating and revoking are in the audit log.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.support import stack as stack_fixtures
from tests.support.stack import Account, Stack, sign_up, wait_for

pytestmark = pytest.mark.slow

stack = stack_fixtures.stack


@dataclass
class World:
    stack: Stack
    http: httpx.Client
    owner: Account | None = None
    orgs: list[dict[str, Any]] = field(default_factory=list)
    projects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        assert self.owner is not None
        return self.owner.auth


@pytest.fixture(scope="module")
def world(stack: Stack) -> Iterator[World]:
    with stack.client() as http:
        w = World(stack, http)
        w.owner = sign_up(http, "scripter")
        spec = {"name": "web", "slug": "web", "resources": {"ramMb": 128, "cpuMillis": 100}}
        for name in ("A", "B"):
            org = _ok(
                http.post(
                    "/v1/organizations",
                    headers=w.auth,
                    json={"name": name, "slug": f"tok-{name.lower()}-{secrets.token_hex(3)}"},
                )
            )
            w.orgs.append(org)

            def create(org_id: str = org["id"]) -> dict[str, Any] | None:
                response = http.post(
                    f"/v1/organizations/{org_id}/projects", headers=w.auth, json=spec
                )
                return response.json() if response.status_code == 200 else None

            w.projects.append(wait_for(create, "a project (once the plan's pool exists)"))
        yield w


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.request.url}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _token(w: World, **spec: Any) -> tuple[dict[str, Any], str]:
    made = _ok(w.http.post("/v1/users/me/tokens", headers=w.auth, json=spec))
    return made["token"], made["secret"]


def _deploy(w: World, secret: str, project: dict[str, Any]) -> httpx.Response:
    return w.http.post(
        f"/v1/projects/{project['id']}/deployments",
        headers=_bearer(secret),
        json={"command": "python3 -m http.server $PORT"},
    )


def test_a_token_s_secret_is_shown_once_and_works_as_a_bearer(world: World) -> None:
    w = world
    token, secret = _token(w, name="ci", scope="deploy")
    assert secret.startswith("hgr_") and len(secret) > 40
    assert token["scope"] == "deploy" and secret.startswith(token["prefix"])
    listed = _ok(w.http.get("/v1/users/me/tokens", headers=w.auth))["tokens"]
    assert [t["id"] for t in listed] == [token["id"]]
    assert secret not in str(listed) and "lastUsedTime" not in listed[0]

    me = _ok(w.http.get("/v1/users/me", headers=_bearer(secret)))
    assert me["id"] == w.owner.user_id  # type: ignore[union-attr]
    project = w.projects[0]
    assert _deploy(w, secret, project).status_code == 200  # deploy scope: a developer's
    listed = _ok(w.http.get("/v1/users/me/tokens", headers=w.auth))["tokens"]
    assert "lastUsedTime" in listed[0]

    # Not an admin's: deleting the project is refused, though its owner may.
    refused = w.http.delete(f"/v1/projects/{project['id']}", headers=_bearer(secret))
    assert refused.status_code == 403, refused.text


def test_a_read_token_reads_and_cannot_deploy(world: World) -> None:
    w = world
    _, secret = _token(w, name="dashboard", scope="read")
    project = w.projects[0]
    _ok(w.http.get(f"/v1/projects/{project['id']}/deployments", headers=_bearer(secret)))
    refused = _deploy(w, secret, project)
    assert refused.status_code == 403, refused.text


def test_a_token_of_one_organization_is_refused_in_another(world: World) -> None:
    w = world
    a, b = w.orgs
    _, secret = _token(w, name="only-a", scope="deploy", organizationId=a["id"])
    _ok(w.http.get(f"/v1/organizations/{a['id']}/projects", headers=_bearer(secret)))
    refused = w.http.get(f"/v1/organizations/{b['id']}/projects", headers=_bearer(secret))
    assert refused.status_code == 403, refused.text
    assert _deploy(w, secret, w.projects[1]).status_code == 403
    stranger = sign_up(w.http, "stranger")
    not_member = w.http.post(
        "/v1/users/me/tokens", headers=stranger.auth, json={"name": "x", "organizationId": a["id"]}
    )
    assert not_member.status_code == 403, not_member.text


def test_tokens_cannot_make_or_revoke_tokens(world: World) -> None:
    w = world
    token, secret = _token(w, name="admin-token", scope="admin")
    made = w.http.post("/v1/users/me/tokens", headers=_bearer(secret), json={"name": "more"})
    assert made.status_code == 403, made.text
    revoked = w.http.delete(f"/v1/users/me/tokens/{token['id']}", headers=_bearer(secret))
    assert revoked.status_code == 403, revoked.text


def test_a_revoked_token_is_refused_on_the_next_request_everywhere(world: World) -> None:
    w = world
    token, secret = _token(w, name="leaked", scope="deploy", organizationId=w.orgs[0]["id"])
    project = w.projects[0]
    # Each service has the token's session cached as live: project, runtime, billing.
    urls = (
        f"/v1/projects/{project['id']}",
        f"/v1/projects/{project['id']}/deployments",
        f"/v1/organizations/{w.orgs[0]['id']}/subscription",
    )
    for url in urls:
        _ok(w.http.get(url, headers=_bearer(secret)))
    _ok(w.http.delete(f"/v1/users/me/tokens/{token['id']}", headers=w.auth))
    for url in urls:
        assert w.http.get(url, headers=_bearer(secret)).status_code == 401, url
    listed = _ok(w.http.get("/v1/users/me/tokens", headers=w.auth))["tokens"]
    assert "revokeTime" in next(t for t in listed if t["id"] == token["id"])

    entries = _ok(w.http.get(f"/v1/organizations/{w.orgs[0]['id']}/audit-logs", headers=w.auth))[
        "auditLogs"
    ]
    actions = {e["action"] for e in entries if e.get("targetId") == token["id"]}
    assert actions == {"api_token.created", "api_token.revoked"}, actions


def test_an_expired_token_is_refused(world: World) -> None:
    w = world
    soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat().replace("+00:00", "Z")
    _, secret = _token(w, name="short", scope="read", expireTime=soon)
    url = f"/v1/projects/{w.projects[0]['id']}"
    _ok(w.http.get(url, headers=_bearer(secret)))
    wait_for(
        lambda: w.http.get(url, headers=_bearer(secret)).status_code == 401,
        "the token to expire",
        within=30,
    )
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    refused = w.http.post(
        "/v1/users/me/tokens", headers=w.auth, json={"name": "late", "expireTime": past}
    )
    assert refused.status_code == 400 and "token.expire_time" in refused.text


def test_an_unknown_or_garbled_token_is_refused(world: World) -> None:
    w = world
    for secret in ("hgr_" + secrets.token_urlsafe(32), "hgr_", "hgr_\u00e9"[:4]):
        response = w.http.get("/v1/users/me", headers=_bearer(secret))
        assert response.status_code == 401, (secret, response.text)


def test_nobody_else_sees_or_revokes_a_user_s_tokens(world: World) -> None:
    w = world
    token, secret = _token(w, name="mine", scope="read")
    stranger = sign_up(w.http, "other")
    assert _ok(w.http.get("/v1/users/me/tokens", headers=stranger.auth))["tokens"] == []
    refused = w.http.delete(f"/v1/users/me/tokens/{token['id']}", headers=stranger.auth)
    assert refused.status_code == 404, refused.text  # as for a token that does not exist
    _ok(w.http.get("/v1/users/me", headers=_bearer(secret)))  # still works


def test_a_project_s_deploy_token_acts_on_that_project_only(world: World) -> None:
    """A CI deploy token: one project of one organization, the deploy scope."""
    w = world
    a = w.orgs[0]
    mine = w.projects[0]
    other = _ok(
        w.http.post(
            f"/v1/organizations/{a['id']}/projects",
            headers=w.auth,
            json={"name": "api", "slug": "api", "resources": {"ramMb": 64, "cpuMillis": 50}},
        )
    )
    token, secret = _token(
        w, name="ci", scope="deploy", organizationId=a["id"], projectId=mine["id"]
    )
    assert token["projectId"] == mine["id"]
    assert _deploy(w, secret, mine).status_code == 200
    _ok(w.http.get(f"/v1/projects/{mine['id']}/logs", headers=_bearer(secret)))
    _ok(
        w.http.put(
            f"/v1/projects/{mine['id']}/secrets/FROM_CI",
            headers=_bearer(secret),
            json={"value": "1", "restart": False},
        )
    )
    for refused in (
        _deploy(w, secret, other),
        w.http.get(f"/v1/projects/{other['id']}", headers=_bearer(secret)),
        w.http.get(f"/v1/projects/{other['id']}/deployments", headers=_bearer(secret)),
        w.http.get(f"/v1/organizations/{a['id']}/subscription", headers=_bearer(secret)),
        w.http.get(f"/v1/organizations/{a['id']}/members", headers=_bearer(secret)),
        w.http.get(f"/v1/organizations/{a['id']}/projects", headers=_bearer(secret)),
    ):
        assert refused.status_code == 403, (refused.request.url, refused.text)

    # A write made with the token says so in the audit log.
    def write_audited() -> bool:
        entries = _ok(w.http.get(f"/v1/organizations/{a['id']}/audit-logs", headers=w.auth))[
            "auditLogs"
        ]
        return any(
            e["action"] == "secret.set"
            and (e.get("metadata") or {}).get("api_token") == token["id"]
            for e in entries
        )

    wait_for(write_audited, "the token's write in the audit log", within=30)
    without_org = w.http.post(
        "/v1/users/me/tokens", headers=w.auth, json={"name": "x", "projectId": mine["id"]}
    )
    assert without_org.status_code == 400 and "token.organization_id" in without_org.text


def test_a_token_may_name_its_permissions(world: World) -> None:
    w = world
    _, secret = _token(w, name="deployer", scope="deployments.create,deployments.get")
    project = w.projects[0]
    assert _deploy(w, secret, project).status_code == 200
    listed = w.http.get(f"/v1/projects/{project['id']}/deployments", headers=_bearer(secret))
    assert listed.status_code == 403, listed.text  # deployments.list was not named
    bad = w.http.post(
        "/v1/users/me/tokens", headers=w.auth, json={"name": "x", "scope": "deployments.fly"}
    )
    assert bad.status_code == 400 and "token.scope" in bad.text
