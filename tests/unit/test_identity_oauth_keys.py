"""A provider whose key URL answers JSON that is not a JWK set: UNAUTHENTICATED with
PROVIDER_UNAVAILABLE (not an internal error), and nothing cached (the next call asks again).
The provider is a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from jwt.utils import base64url_encode

from services.identity.oauth import OidcVerifier
from shared.errors import Unauthenticated
from shared.settings import OAuthProvider


class _Keys(http.server.BaseHTTPRequestHandler):
    body = b"[]"
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def keys_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Keys)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/keys"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("body", [b"[]", b'{"keys": {"kid": "x"}}', b'{"keys": ["x"]}', b"7"])
async def test_a_key_set_that_is_not_one_is_provider_unavailable_and_not_cached(
    keys_url: str, body: bytes
) -> None:
    _Keys.body, _Keys.hits = body, 0
    provider = OAuthProvider(issuer="https://issuer.test", client_id="hangar", jwks_url=keys_url)
    verifier = OidcVerifier({"test": provider})
    # Only the header is read before the keys are fetched: a signature is never checked here.
    header = base64url_encode(b'{"alg":"RS256","kid":"k1","typ":"JWT"}').decode()
    token = f"{header}.{base64url_encode(b'{}').decode()}.c2ln"
    for _ in range(2):
        with pytest.raises(Unauthenticated) as caught:
            await verifier.verify("test", token)
        assert caught.value.reason == "PROVIDER_UNAVAILABLE"
    assert _Keys.hits >= 2  # the bad answer was not kept
