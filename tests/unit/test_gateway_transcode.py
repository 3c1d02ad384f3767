"""HTTP request -> request message and reply -> JSON, without a network."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import message_factory, timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from hangar.events.v1 import events_pb2
from hangar.identity.v1 import identity_pb2
from hangar.project.v1 import project_pb2
from hangar.runtime.v1 import runtime_pb2
from hangar.type.v1 import resources_pb2
from services.gateway.app import PUBLIC_SERVICES
from services.gateway.errors import GatewayError
from services.gateway.routes import Match, Route, Router, build_routes, parse_template
from services.gateway.transcode import build_request, prepare, render_response

IDENTITY = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]


@pytest.fixture(scope="module")
def router() -> Router:
    routes = build_routes(PUBLIC_SERVICES, message_factory.GetMessageClass)
    for route in routes:
        route.plan = prepare(route)
    return Router(routes)


def request(
    router: Router,
    method: str,
    path: str,
    query: str = "",
    body: Any = None,
    headers: dict[bytes, bytes] | None = None,
) -> Any:
    match = router.match(method, path)
    assert isinstance(match, Match), match
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    return build_request(match.route, match.variables, query, raw, headers or {})


def rejected(router: Router, *args: Any, **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(GatewayError) as caught:
        request(router, *args, **kwargs)
    assert caught.value.http == 400
    return json.loads(caught.value.body())


def violations(error: dict[str, Any]) -> list[str]:
    return [
        v["field"]
        for d in error["details"]
        if d["@type"].endswith("google.rpc.BadRequest")
        for v in d.get("fieldViolations", [])
    ]


def custom_route(method_name: str, template: str, body: str = "") -> Route:
    """A route for an RPC the protos do not annotate this way, to reach more field kinds."""
    method = IDENTITY.methods_by_name[method_name]
    route = Route(
        http_method="GET",
        template=parse_template(template),
        service=IDENTITY,
        method=method,
        upstream="identity",
        body=body,
        response_body="",
        request_class=message_factory.GetMessageClass(method.input_type),
        response_class=message_factory.GetMessageClass(method.output_type),
    )
    route.plan = prepare(route)
    return route


# --- body ----------------------------------------------------------------------------------


def test_body_star_accepts_original_and_lower_camel_case_names(router: Router) -> None:
    camel = request(router, "POST", "/v1/auth/refresh", body={"refreshToken": "r1"})
    snake = request(router, "POST", "/v1/auth/refresh", body={"refresh_token": "r1"})
    assert camel == snake == identity_pb2.RefreshRequest(refresh_token="r1")


def test_named_body_field_fills_that_field(router: Router) -> None:
    message = request(router, "POST", "/v1/organizations", body={"name": "Acme", "slug": "acme"})
    assert message == identity_pb2.CreateOrganizationRequest(
        organization=identity_pb2.Organization(name="Acme", slug="acme")
    )


def test_empty_named_body_still_sets_the_field(router: Router) -> None:
    message = request(router, "POST", "/v1/organizations", body={})
    assert message.HasField("organization")


def test_no_body_leaves_the_message_empty(router: Router) -> None:
    message = request(router, "POST", "/v1/deployments/d1:rollback")
    assert message == runtime_pb2.RollbackDeploymentRequest(id="d1")


def test_path_variable_wins_over_the_body(router: Router) -> None:
    message = request(
        router,
        "POST",
        "/v1/organizations/o1/members",
        body={"organizationId": "evil", "email": "a@example.com", "role": "ROLE_ADMIN"},
    )
    assert message == identity_pb2.AddMemberRequest(
        organization_id="o1", email="a@example.com", role=identity_pb2.ROLE_ADMIN
    )


def test_nested_path_variable_wins_over_the_body_field_and_keeps_the_rest(
    router: Router,
) -> None:
    message = request(
        router,
        "PATCH",
        "/v1/projects/p1",
        query="updateMask=name,resources.ramMb",
        body={"id": "evil", "name": "web", "resources": {"ramMb": 512}},
    )
    assert message == project_pb2.UpdateProjectRequest(
        project=project_pb2.Project(
            id="p1", name="web", resources=resources_pb2.Resources(ram_mb=512)
        ),
        update_mask={"paths": ["name", "resources.ram_mb"]},
    )


def test_enums_by_name_or_number(router: Router) -> None:
    by_name = request(
        router, "PATCH", "/v1/organizations/o/members/u", body={"role": "ROLE_VIEWER"}
    )
    by_number = request(router, "PATCH", "/v1/organizations/o/members/u", body={"role": 1})
    assert by_name.role == by_number.role == identity_pb2.ROLE_VIEWER


def test_stripe_webhook_forwards_raw_bytes_and_signature(router: Router) -> None:
    raw = b'{"id": "evt_1",  "type": "invoice.paid"}'  # spacing kept: the signature covers it
    message = request(
        router,
        "POST",
        "/v1/webhooks/stripe",
        body=raw,
        headers={b"stripe-signature": b"t=1,v1=abc", b"content-type": b"application/json"},
    )
    assert message.body.data == raw
    assert message.body.content_type == "application/json"
    assert message.stripe_signature == "t=1,v1=abc"


# --- bad bodies: always a 400 naming what is wrong ----------------------------------------


def test_malformed_json_is_a_400(router: Router) -> None:
    error = rejected(router, "POST", "/v1/auth/login", body=b'{"email": ')
    assert error["code"] == 3
    assert "not valid JSON" in error["message"]
    assert error["details"][0]["reason"] == "MALFORMED_JSON"


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"null", b"3"])
def test_a_body_that_is_not_an_object_is_a_400(router: Router, body: bytes) -> None:
    rejected(router, "POST", "/v1/auth/login", body=body)


def test_a_string_where_an_int_is_expected_names_the_field(router: Router) -> None:
    error = rejected(
        router,
        "POST",
        "/v1/organizations/o1/projects",
        body={"name": "web", "resources": {"ramMb": "lots"}},
    )
    assert violations(error) == ["project.resources.ramMb"]


def test_an_unknown_body_field_is_named(router: Router) -> None:
    error = rejected(router, "POST", "/v1/auth/login", body={"email": "a", "pasword": "x"})
    assert violations(error) == ["pasword"]
    assert "unknown field" in error["message"]


def test_an_int32_out_of_range_is_a_400(router: Router) -> None:
    error = rejected(
        router, "POST", "/v1/organizations/o1/projects", body={"resources": {"ramMb": 2**40}}
    )
    assert violations(error) == ["project.resources.ramMb"]


def test_invalid_utf8_is_a_400(router: Router) -> None:
    rejected(router, "POST", "/v1/auth/login", body=b'{"email": "\xff"}')


def test_deeply_nested_json_is_a_400(router: Router) -> None:
    rejected(router, "POST", "/v1/auth/login", body=b"[" * 100_000)


# --- query string --------------------------------------------------------------------------


def test_query_ints_and_strings_in_either_spelling(router: Router) -> None:
    camel = request(router, "GET", "/v1/organizations", query="pageSize=5&pageToken=abc")
    snake = request(router, "GET", "/v1/organizations", query="page_size=5&page_token=abc")
    assert camel == snake == identity_pb2.ListOrganizationsRequest(page_size=5, page_token="abc")


def test_query_bools_enums_timestamps_and_durations(router: Router) -> None:
    projects = request(router, "GET", "/v1/organizations/o1/projects", query="sleepEnabled=true")
    assert projects.HasField("sleep_enabled") and projects.sleep_enabled is True
    metrics = request(
        router,
        "GET",
        "/v1/projects/p1/metrics",
        query="metric=METRIC_TYPE_CPU_MILLICORES&startTime=2024-01-01T00:00:00Z&step=60s",
    )
    assert metrics.metric == runtime_pb2.METRIC_TYPE_CPU_MILLICORES
    assert metrics.start_time == timestamp_pb2.Timestamp(seconds=1704067200)
    assert metrics.step.seconds == 60
    by_number = request(router, "GET", "/v1/projects/p1/metrics", query="metric=2")
    assert by_number.metric == metrics.metric


def test_repeated_query_parameters_and_nested_dotted_names() -> None:
    watch = custom_route("WatchEvents", "/v1/events")
    message = build_request(watch, {}, "types=a.created&types=b.deleted&afterCursor=c9", b"", {})
    assert message == events_pb2.WatchEventsRequest(
        types=["a.created", "b.deleted"], after_cursor="c9"
    )
    update = custom_route("UpdateOrganization", "/v1/orgs/{organization.id}")
    message = build_request(
        update,
        {"organization.id": "o1"},
        "organization.name=Acme&organization.createdAt=2024-01-01T00:00:00Z&update_mask=name",
        b"",
        {},
    )
    assert message.organization.id == "o1"
    assert message.organization.name == "Acme"
    assert message.organization.created_at.seconds == 1704067200
    assert list(message.update_mask.paths) == ["name"]


def test_a_nested_path_bound_field_is_not_a_query_parameter() -> None:
    update = custom_route("UpdateOrganization", "/v1/orgs/{organization.id}")
    with pytest.raises(GatewayError) as caught:
        build_request(update, {"organization.id": "o1"}, "organization.id=evil", b"", {})
    assert violations(json.loads(caught.value.body())) == ["organization.id"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("pageSize=abc", "pageSize"),
        ("page_size=1.5", "page_size"),
        ("pageSize=99999999999", "pageSize"),
        ("nope=1", "nope"),
        ("pageSize=1&pageSize=2", "pageSize"),
    ],
)
def test_bad_query_parameters_are_400s_naming_the_parameter(
    router: Router, query: str, field: str
) -> None:
    assert violations(rejected(router, "GET", "/v1/organizations", query=query)) == [field]


def test_bad_query_bool_enum_and_timestamp_name_the_parameter(router: Router) -> None:
    assert violations(
        rejected(router, "GET", "/v1/organizations/o1/projects", query="sleepEnabled=maybe")
    ) == ["sleepEnabled"]
    assert violations(rejected(router, "GET", "/v1/projects/p1/metrics", query="metric=NOPE")) == [
        "metric"
    ]
    assert violations(
        rejected(router, "GET", "/v1/projects/p1/metrics", query="startTime=yesterday")
    ) == ["startTime"]


def test_body_star_takes_no_query_parameters(router: Router) -> None:
    rejected(router, "POST", "/v1/auth/login", query="email=a", body={"password": "x"})


def test_path_bound_fields_are_not_query_parameters(router: Router) -> None:
    rejected(router, "GET", "/v1/organizations/o1/members", query="organizationId=o2")


# --- responses ------------------------------------------------------------------------------


def test_replies_use_lower_camel_case_and_print_defaults(router: Router) -> None:
    match = router.match("GET", "/v1/organizations/o1/members")
    assert isinstance(match, Match)
    reply = identity_pb2.ListMembersResponse(
        members=[identity_pb2.Member(user_id="u1", role=identity_pb2.ROLE_OWNER)]
    )
    content_type, body = render_response(match.route.plan, reply)
    assert content_type == b"application/json"
    assert json.loads(body) == {
        "members": [{"userId": "u1", "email": "", "role": "ROLE_OWNER"}],
        "nextPageToken": "",
    }
    _, empty = render_response(match.route.plan, identity_pb2.ListMembersResponse())
    assert json.loads(empty) == {"members": [], "nextPageToken": ""}


def test_int64_renders_as_a_string_and_unset_messages_stay_absent(router: Router) -> None:
    match = router.match("GET", "/v1/organizations/o1/audit-logs:verify")
    assert isinstance(match, Match)
    _, body = render_response(
        match.route.plan, identity_pb2.VerifyAuditChainResponse(ok=True, checked=12)
    )
    assert json.loads(body) == {"ok": True, "checked": "12", "firstBrokenEntryId": ""}
    match = router.match("GET", "/v1/users/me")
    assert isinstance(match, Match)
    _, body = render_response(match.route.plan, identity_pb2.User(id="u1"))
    assert "createdAt" not in json.loads(body)


# --- never a crash on bad input ------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
_keys = st.sampled_from(
    ["name", "slug", "resources", "ram_mb", "organization", "role", "createdAt", "updateMask", "x"]
)
_bodies = st.dictionaries(_keys, _json, max_size=5) | _json


@settings(max_examples=300, deadline=None)
@given(
    target=st.sampled_from(
        [
            ("POST", "/v1/organizations/o1/projects"),
            ("PATCH", "/v1/projects/p1"),
            ("POST", "/v1/organizations/o1/members"),
            ("POST", "/v1/organizations"),
            ("PUT", "/v1/projects/p1/secrets/S"),
        ]
    ),
    body=_bodies,
    query=st.text(max_size=30),
)
def test_any_json_body_or_query_is_a_message_or_a_400(
    router: Router, target: tuple[str, str], body: Any, query: str
) -> None:
    try:
        request(router, *target, query=query, body=json.dumps(body).encode())
    except GatewayError as error:
        assert error.http == 400


def test_a_patch_without_update_mask_updates_the_fields_its_body_names(router: Router) -> None:
    """AIP-134's implied mask: the body's fields, in either spelling, minus the resource id
    the path binds; a mask that is given is kept as it is."""
    implied = request(
        router,
        "PATCH",
        "/v1/projects/p1",
        body={"id": "p1", "sleepEnabled": False, "sleep_after_seconds": 60, "name": "web"},
    )
    assert list(implied.update_mask.paths) == ["sleep_enabled", "sleep_after_seconds", "name"]
    assert implied.project.id == "p1" and not implied.project.sleep_enabled
    given = request(
        router,
        "PATCH",
        "/v1/projects/p1",
        query="updateMask=name",
        body={"name": "x", "resources": {"ramMb": 1}},
    )
    assert list(given.update_mask.paths) == ["name"]
    assert list(request(router, "PATCH", "/v1/projects/p1").update_mask.paths) == []
