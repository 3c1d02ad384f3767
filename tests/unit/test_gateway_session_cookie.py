"""The session cookie's parsing and its CSRF rules, without a network (services/gateway/
session_cookie.py); tests/integration/test_gateway_session_cookie.py runs them for real."""

from __future__ import annotations

import pytest

from hangar.identity.v1 import identity_pb2
from services.gateway.errors import GatewayError
from services.gateway.session_cookie import session_for

REFRESH = "/hangar.identity.v1.IdentityService/Refresh"
SCOPE = {"scheme": "http"}


def headers(**extra: str) -> dict[bytes, bytes]:
    sent = {b"host": b"hangar.example:8080", b"x-hangar-session": b"cookie"}
    sent.update({k.replace("_", "-").encode(): v.encode() for k, v in extra.items()})
    return sent


def test_the_token_is_found_among_other_apps_cookies_even_malformed_ones() -> None:
    request = identity_pb2.RefreshRequest()
    cookie = 'other={"json": [1,2]}; broken; hangar_refresh=abc-DEF_123; last=1'
    session = session_for(REFRESH, SCOPE, headers(cookie=cookie), request, 60)
    assert session is not None
    assert request.refresh_token == "abc-DEF_123"


def test_a_token_in_the_body_wins_and_the_cookie_is_not_read() -> None:
    request = identity_pb2.RefreshRequest(refresh_token="from-body")
    sent = {b"cookie": b"hangar_refresh=from-cookie"}  # no header: an API client
    assert session_for(REFRESH, SCOPE, sent, request, 60) is None
    assert request.refresh_token == "from-body"


@pytest.mark.parametrize(
    "origin",
    ["http://hangar.example", "https://hangar.example:8080", "http://evil.example", "null"],
)
def test_only_the_gateways_own_origin_may_use_the_cookie(origin: str) -> None:
    request = identity_pb2.RefreshRequest()
    sent = headers(cookie="hangar_refresh=t", origin=origin)
    with pytest.raises(GatewayError) as refused:
        session_for(REFRESH, SCOPE, sent, request, 60)
    assert refused.value.http == 403
    assert request.refresh_token == ""


def test_the_own_origin_compares_without_case() -> None:
    request = identity_pb2.RefreshRequest()
    sent = headers(cookie="hangar_refresh=t", origin="HTTP://Hangar.Example:8080")
    assert session_for(REFRESH, SCOPE, sent, request, 60) is not None


def test_other_routes_never_read_the_cookie() -> None:
    request = identity_pb2.GetCurrentUserRequest()
    path = "/hangar.identity.v1.IdentityService/GetCurrentUser"
    assert session_for(path, SCOPE, headers(cookie="hangar_refresh=t"), request, 60) is None
