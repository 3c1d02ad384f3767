"""The dashboard's "Continue with <provider>" log-in in a real headless Chromium, against the
platform (tests/support/stack.py, no agent) configured with a tiny OpenID Connect provider
that runs in this test on a loopback port: its /authorize sends the browser straight back to
the dashboard with an id_token (signed by tests.support.identity.TestIssuer, for the nonce
the browser sent) and the state, as the implicit flow's fragment. Signed in through it; a
tampered state, a refusal at the provider and an id_token issued for another sign-in (its
nonce, refused by identity) each explained in a sentence, nobody signed in.

Waits are explicit DOM conditions with a generous bound, never sleeps.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from tests.e2e import test_dashboard as dashboard
from tests.e2e.test_dashboard import Journey, _console_errors, session_cookies
from tests.support.identity import TestIssuer
from tests.support.stack import Stack, module_stack

pytestmark = pytest.mark.slow

LABEL = "Test IdP"
CLIENT_ID = "hangar-dashboard"

# The dashboard tests' browser (skipped, saying why, without chromium), on this module's stack.
journey = dashboard.journey


@dataclass
class TinyIdp:
    """An OpenID Connect provider that signs in whoever it is told to, at once: /authorize
    redirects to redirect_uri with #id_token=...&state=... (or what `answer` makes of it)."""

    issuer: TestIssuer  # signs the id_tokens; its `issuer` is this server's address
    email: str = ""
    # What /authorize sends back, from the request's parameters; by default a signed-in user.
    answer: Callable[[dict[str, str]], dict[str, str]] | None = None
    requests: list[dict[str, str]] = field(default_factory=list)

    def respond(self, query: dict[str, str]) -> dict[str, str]:
        self.requests.append(query)
        if self.answer is not None:
            return self.answer(query)
        token = self.issuer.id_token(
            f"sub-{self.email}", self.email, audience=query["client_id"], nonce=query["nonce"]
        )
        return {"id_token": token, "state": query["state"]}

    def settings(self) -> dict[str, Any]:
        """Its entry in HANGAR_OAUTH_PROVIDERS (keys inline: identity fetches nothing)."""
        return {
            "issuer": self.issuer.issuer,
            "client_id": self.issuer.client_id,
            "jwks": self.issuer.jwks(),
            "authorization_endpoint": f"{self.issuer.issuer}/authorize",
            "label": LABEL,
        }


class _IdpServer(ThreadingHTTPServer):
    idp: TinyIdp


class _Authorize(BaseHTTPRequestHandler):
    server: _IdpServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/authorize":
            self.send_error(404)
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        fragment = urlencode(self.server.idp.respond(query))
        self.send_response(302)
        self.send_header("Location", f"{query.get('redirect_uri', '')}#{fragment}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class OAuthJourney:
    j: Journey
    idp: TinyIdp


@pytest.fixture(scope="module")
def idp() -> Iterator[TinyIdp]:
    server = _IdpServer(("127.0.0.1", 0), _Authorize)
    address = f"http://127.0.0.1:{server.server_address[1]}"
    server.idp = TinyIdp(TestIssuer(issuer=address, client_id=CLIENT_ID))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.idp
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def stack(
    create_database: Callable[[str], str],
    db_passwords: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    idp: TinyIdp,
) -> Iterator[Stack]:
    """The platform (no agent: nothing is deployed) with the tiny provider configured."""
    with module_stack(
        create_database,
        db_passwords,
        tmp_path_factory.mktemp("oauth-stack"),
        agent=False,
        extra_env={"HANGAR_OAUTH_PROVIDERS": json.dumps({"testidp": idp.settings()})},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def oauth(journey: Journey, idp: TinyIdp) -> OAuthJourney:
    return OAuthJourney(journey, idp)


def _continue(j: Journey) -> None:
    """From a fresh tab at the log-in page, click the provider's button."""
    j.open("#/login")
    j.driver.execute_script("sessionStorage.clear()")
    j.driver.delete_all_cookies()  # no session cookie either
    j.driver.refresh()
    button = j.visible("button[data-provider='testidp']")
    assert button.text == f"Continue with {LABEL}"
    button.click()


def _problem(j: Journey) -> str:
    problem = j.visible("#oauth-problem")
    assert problem.get_attribute("role") == "alert"
    assert not j.all("#who"), "signed in after a refused answer"
    text: str = problem.text
    assert text.endswith(".") and "{" not in text, text
    return text


def test_the_login_page_offers_the_provider_under_its_csp(oauth: OAuthJourney) -> None:
    j = oauth.j
    reply = j.http.get("/v1/auth/oauth/providers")
    assert reply.status_code == 200, reply.text
    [provider] = reply.json()["providers"]
    assert provider["label"] == LABEL and provider["clientId"] == CLIENT_ID
    assert "jwks" not in reply.text and '"x"' not in reply.text  # the keys stay in identity
    j.open()
    j.until(lambda: j.driver.current_url.endswith("#/login"), "the login page")
    button = j.visible("button[data-provider='testidp']")
    assert button.text == f"Continue with {LABEL}"
    j.screenshot("dashboard-login-oauth.png")
    assert _console_errors(j) == []


def test_continue_with_the_provider_signs_in(oauth: OAuthJourney) -> None:
    j, idp = oauth.j, oauth.idp
    idp.email = f"oidc-{secrets.token_hex(4)}@example.com"
    idp.answer = None
    _continue(j)
    j.until(lambda: j.find("#who").text == idp.email, "signed in as the provider's user")
    # No organization yet: the dashboard asks for one, as after a sign-up.
    j.visible('form[name="create-org"]')
    sent = idp.requests[-1]
    assert sent["response_type"] == "id_token" and sent["response_mode"] == "fragment"
    assert sent["client_id"] == CLIENT_ID and "openid" in sent["scope"].split()
    assert sent["redirect_uri"] == f"{j.stack.url}/"
    assert len(sent["state"]) >= 32 and len(sent["nonce"]) >= 32
    # The id_token left the address bar; the session is the same as a password's.
    assert "id_token" not in j.driver.current_url
    assert j.driver.execute_script("return sessionStorage.getItem('hangar.oauth')") is None
    # The refresh token is in the HttpOnly session cookie, where no script reaches it.
    assert "hangar_refresh" not in j.driver.execute_script("return document.cookie")
    assert [c["httpOnly"] for c in session_cookies(j)] == [True]
    assert _console_errors(j) == []
    j.find("#logout").click()
    j.visible('form[name="login"]')


def test_a_tampered_state_is_refused_with_a_sentence(oauth: OAuthJourney) -> None:
    j, idp = oauth.j, oauth.idp
    idp.email = f"oidc-{secrets.token_hex(4)}@example.com"

    def tampered(query: dict[str, str]) -> dict[str, str]:
        token = idp.issuer.id_token("tampered", idp.email, nonce=query["nonce"])
        return {"id_token": token, "state": query["state"][::-1]}

    idp.answer = tampered
    _continue(j)
    text = _problem(j)
    assert "state" in text and "refused" in text, text
    assert "id_token" not in j.driver.current_url


def test_a_refusal_at_the_provider_is_explained(oauth: OAuthJourney) -> None:
    j, idp = oauth.j, oauth.idp
    idp.answer = lambda query: {"error": "access_denied", "state": query["state"]}
    _continue(j)
    text = _problem(j)
    assert f"The sign-in with {LABEL} did not complete: you declined it" in text, text
    j.find('a[href="#/login"]').click()
    j.visible("button[data-provider='testidp']")


def test_an_id_token_issued_for_another_sign_in_is_refused_by_identity(
    oauth: OAuthJourney,
) -> None:
    """The state matches (the page posts it), but the token's nonce is not this tab's."""
    j, idp = oauth.j, oauth.idp
    replayed = idp.issuer.id_token("replayed", f"oidc-{secrets.token_hex(4)}@example.com")
    idp.answer = lambda query: {"id_token": replayed, "state": query["state"]}
    _continue(j)
    text = _problem(j)
    assert "another sign-in" in text and "Nonce: does not match" in text, text
