"""The dashboard's session cookie: its refresh token in `hangar_refresh`, out of scripts' reach.

Opt-in per request with `X-Hangar-Session: cookie` (API clients are unchanged): a sign-in or
refresh then answers with the refresh token in an HttpOnly, SameSite=Lax cookie (Secure when
the request came over TLS: uvicorn puts a trusted proxy's X-Forwarded-Proto in the scheme)
instead of the JSON body; Refresh and Logout with no token in the body take the cookie's, and
Logout clears it. The cookie is read for those two routes only.

CSRF: a request that uses the cookie must carry the header (a cross-site form cannot set it,
and a cross-origin fetch with it needs a CORS preflight the gateway never approves) and, when
it has an Origin, come from the gateway's own origin.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from services.gateway.errors import GatewayError
from services.gateway.transcode import dump
from shared.errors import PermissionDenied, Unauthenticated

COOKIE = "hangar_refresh"
HEADER = b"x-hangar-session"
HEADER_VALUE = b"cookie"
COOKIE_PATH = "/v1/auth"
_IDENTITY = "/hangar.identity.v1.IdentityService/"
SIGN_INS = frozenset(_IDENTITY + name for name in ("SignUp", "Login", "Refresh", "LoginWithOAuth"))
READS_COOKIE = frozenset(_IDENTITY + name for name in ("Refresh", "Logout"))
LOGOUT = _IDENTITY + "Logout"
ROUTES = SIGN_INS | READS_COOKIE


@dataclass(frozen=True)
class CookieSession:
    """One dashboard request's cookie handling (made by `session_for`)."""

    rpc_path: str
    secure: bool
    max_age_seconds: int

    def headers_before(self) -> list[tuple[bytes, bytes]]:
        """Headers for whatever the answer is: Logout clears the cookie even on an error."""
        return [self._set_cookie("", 0)] if self.rpc_path == LOGOUT else []

    def answer(self, reply: Message, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """(body, headers) of a reply rendered as `body`: a sign-in's refresh token moves from
        the JSON body into a Set-Cookie header."""
        token: str = getattr(reply, "refresh_token", "")
        if self.rpc_path not in SIGN_INS or not token:
            return body, []
        data = json.loads(body)
        data.pop("refreshToken", None)
        return dump(data), [self._set_cookie(token, self.max_age_seconds)]

    def _set_cookie(self, value: str, max_age: int) -> tuple[bytes, bytes]:
        attributes = f"{COOKIE}={value}; HttpOnly; SameSite=Lax; Path={COOKIE_PATH}"
        attributes += f"; Max-Age={max_age}"
        if self.secure:
            attributes += "; Secure"
        return b"set-cookie", attributes.encode("latin-1")


def session_for(
    rpc_path: str,
    scope: Mapping[str, Any],
    headers: Mapping[bytes, bytes],
    request: Message,
    max_age_seconds: int,
) -> CookieSession | None:
    """The cookie session of a request to one of the auth routes, None for any other request
    or one without the header; fills Refresh's or Logout's empty refresh_token from the
    cookie. Raises a 403 (PERMISSION_DENIED) for a cross-site attempt to use the cookie, a 401
    when the dashboard has neither token nor cookie (signed out)."""
    if rpc_path not in ROUTES:
        return None
    opted_in = headers.get(HEADER, b"").strip().lower() == HEADER_VALUE
    wants_cookie = rpc_path in READS_COOKIE and not getattr(request, "refresh_token", "")
    cookie = _cookie(headers.get(b"cookie", b"")) if wants_cookie else ""
    if not opted_in:
        if cookie:
            raise _forbidden(f"using the session cookie needs the {HEADER.decode()} header")
        return None
    origin = headers.get(b"origin")
    if origin is not None and origin.decode("latin-1").lower() != _own_origin(scope, headers):
        raise _forbidden("the session cookie is used only by the gateway's own origin")
    if wants_cookie and not cookie:
        raise GatewayError.from_domain(
            Unauthenticated("no session: sign in again", reason="SESSION_COOKIE_MISSING")
        )
    if cookie:
        request.refresh_token = cookie
    return CookieSession(rpc_path, scope.get("scheme") == "https", max_age_seconds)


def _own_origin(scope: Mapping[str, Any], headers: Mapping[bytes, bytes]) -> str:
    host = headers.get(b"host", b"").decode("latin-1").lower()
    return f"{scope.get('scheme', 'http')}://{host}"


def _cookie(header: bytes) -> str:
    # By hand: SimpleCookie drops every cookie after one it cannot parse (another app's).
    for pair in header.decode("latin-1").split(";"):
        name, _, value = pair.strip().partition("=")
        if name == COOKIE:
            return value.strip().strip('"')
    return ""


def _forbidden(message: str) -> GatewayError:
    return GatewayError.from_domain(PermissionDenied(message, reason="SESSION_COOKIE_REFUSED"))
