"""The gateway's route table: templates parsed from google.api.http, matched by a segment trie."""

from __future__ import annotations

import pytest
from google.protobuf import message_factory

from hangar.identity.v1 import identity_pb2
from services.gateway.app import PUBLIC_SERVICES
from services.gateway.routes import (
    Match,
    Route,
    Router,
    TemplateError,
    Variable,
    build_routes,
    http_rules,
    parse_template,
)


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(build_routes(PUBLIC_SERVICES, message_factory.GetMessageClass))


def matched(router: Router, method: str, path: str) -> Match:
    result = router.match(method, path)
    assert isinstance(result, Match), f"{method} {path} -> {result}"
    return result


def test_template_with_variables_nested_field_and_verb() -> None:
    template = parse_template("/v1/organizations/{organization.id}/members/{user_id}:promote")
    assert template.segments == ("v1", "organizations", "*", "members", "*")
    assert template.variables == (
        Variable(("organization", "id"), 2, 3),
        Variable(("user_id",), 4, 5),
    )
    assert template.verb == "promote"


def test_template_variable_with_segments_and_double_wildcard() -> None:
    template = parse_template("/v1/{name=projects/*/secrets/*}/{rest=**}")
    assert template.segments == ("v1", "projects", "*", "secrets", "*", "**")
    assert template.variables[0] == Variable(("name",), 1, 5)
    values = template.extract(["v1", "projects", "p", "secrets", "s", "a", "b"])
    assert values == {"name": "projects/p/secrets/s", "rest": "a/b"}


@pytest.mark.parametrize(
    "text",
    [
        "v1/plans",  # no leading slash
        "/v1/{id",  # unbalanced
        "/v1/{1id}",  # not an identifier
        "/v1//plans",  # empty segment
        "/v1/**/x",  # ** not last
        "/v1/{id}:",  # empty verb
        "/v1/a*b",
    ],
)
def test_malformed_templates_are_refused(text: str) -> None:
    with pytest.raises(TemplateError):
        parse_template(text)


def test_every_annotated_rpc_of_the_public_services_is_routed(router: Router) -> None:
    expected = {
        (method.full_name, rule.WhichOneof("pattern"))
        for service in PUBLIC_SERVICES
        for method in service.methods
        for rule in http_rules(method)
    }
    routed = {(r.method.full_name, r.http_method.lower()) for r in router.routes}
    assert routed == expected
    assert len(router.routes) >= 45


def test_unannotated_internal_rpcs_are_not_routed(router: Router) -> None:
    names = {r.method.name for r in router.routes}
    assert not names & {"Authorize", "AppendAuditEvents", "IssueServiceToken", "WatchEvents"}
    assert not names & {"ResolveSecrets", "ReserveAllocation", "RecordUsage", "Heartbeat"}


@pytest.mark.parametrize(
    ("method", "path", "rpc", "variables"),
    [
        ("POST", "/v1/auth/signup", "SignUp", {}),
        ("GET", "/v1/users/me", "GetCurrentUser", {}),
        ("GET", "/.well-known/jwks.json", "GetJwks", {}),
        ("GET", "/v1/organizations/o1", "GetOrganization", {"id": "o1"}),
        ("PATCH", "/v1/organizations/o1", "UpdateOrganization", {"organization.id": "o1"}),
        (
            "PATCH",
            "/v1/organizations/o1/members/u1",
            "UpdateMember",
            {"organization_id": "o1", "user_id": "u1"},
        ),
        (
            "GET",
            "/v1/organizations/o1/audit-logs:verify",
            "VerifyAuditChain",
            {"organization_id": "o1"},
        ),
        ("GET", "/v1/organizations/o1/audit-logs", "ListAuditLogs", {"organization_id": "o1"}),
        ("POST", "/v1/deployments/d1:rollback", "RollbackDeployment", {"id": "d1"}),
        ("POST", "/v1/deployments/d1:cancel", "CancelDeployment", {"id": "d1"}),
        ("GET", "/v1/deployments/d1", "GetDeployment", {"id": "d1"}),
        (
            "GET",
            "/v1/projects/p1/secrets/DB_URL:reveal",
            "RevealSecret",
            {"project_id": "p1", "name": "DB_URL"},
        ),
        (
            "PUT",
            "/v1/projects/p1/secrets/DB_URL",
            "SetSecret",
            {"project_id": "p1", "name": "DB_URL"},
        ),
        ("GET", "/v1/projects/p1/logs:tail", "TailLogs", {"project_id": "p1"}),
        ("GET", "/v1/projects/p1/logs", "QueryLogs", {"project_id": "p1"}),
        ("POST", "/v1/servers/s1:drain", "DrainServer", {"id": "s1"}),
        ("POST", "/v1/admin/master-key:rotate", "RotateMasterKey", {}),
        (
            "POST",
            "/v1/organizations/o1/subscription:change",
            "ChangePlan",
            {"organization_id": "o1"},
        ),
        ("GET", "/v1/organizations/o1/subscription", "GetSubscription", {"organization_id": "o1"}),
        ("POST", "/v1/webhooks/stripe", "HandleStripeWebhook", {}),
    ],
)
def test_routes_match_with_their_variables(
    router: Router, method: str, path: str, rpc: str, variables: dict[str, str]
) -> None:
    result = matched(router, method, path)
    assert result.route.method.name == rpc
    assert result.variables == variables


def test_literal_segments_beat_variables(router: Router) -> None:
    # /v1/users/me is a literal route; nothing may read "me" as an id.
    assert matched(router, "GET", "/v1/users/me").route.method.name == "GetCurrentUser"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/plans/",  # trailing slash
        "/v1/projects//secrets",  # empty variable
        "/v1/projects/p1/secrets/a/b",  # one segment too many
        "/v1/project/p1",  # near miss on a literal
        "/v1",
        "/",
        "",
        "v1/plans",
        "/v1/deployments/d1:rollback/x",
    ],
)
def test_no_false_matches(router: Router, path: str) -> None:
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        assert router.match(method, path) is None


def test_wrong_method_on_a_known_path_lists_the_allowed_ones(router: Router) -> None:
    assert router.match("DELETE", "/v1/plans") == {"GET"}
    assert router.match("POST", "/v1/projects/p1") == {"GET", "PATCH", "DELETE"}
    # A verb route is its own path: GET on :rollback is not allowed.
    assert router.match("GET", "/v1/deployments/d1:rollback") == {"POST"}


def test_unknown_verb_is_part_of_the_variable(router: Router) -> None:
    # The grammar lets a variable hold ':'; an unknown verb is not a route of its own.
    result = matched(router, "GET", "/v1/deployments/d1:nope")
    assert result.route.method.name == "GetDeployment"
    assert result.variables == {"id": "d1:nope"}


def test_variables_are_percent_decoded_but_an_encoded_colon_is_not_a_verb(
    router: Router,
) -> None:
    assert matched(router, "GET", "/v1/projects/a%2Fb%20c").variables == {"id": "a/b c"}
    result = matched(router, "GET", "/v1/deployments/d1%3Arollback")
    assert result.route.method.name == "GetDeployment"
    assert result.variables == {"id": "d1:rollback"}
    assert router.match("POST", "/v1/deployments/d1%3Arollback") == {"GET"}


def test_two_rpcs_on_one_binding_are_refused() -> None:
    service = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]
    routes = build_routes([service], message_factory.GetMessageClass)
    twin = Route(
        http_method="GET",
        template=parse_template("/v1/users/me"),
        service=service,
        method=service.methods_by_name["GetJwks"],
        upstream="identity",
        body="",
        response_body="",
    )
    with pytest.raises(TemplateError, match="both bind"):
        Router([*routes, twin])
