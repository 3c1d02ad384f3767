"""The gateway's dashboard files (services/gateway/web.py): `/` and `/ui/...` with their
content types, security and cache headers; nothing outside the web folder reachable, however
the path is spelled; the API's paths and their JSON errors untouched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.gateway.app import Gateway
from services.gateway.web import CONTENT_SECURITY_POLICY, WEB_ROOT, Dashboard, load_files
from shared.settings import Settings

Sent = tuple[int, dict[bytes, bytes], bytes]


async def _get(
    gateway: Gateway, raw_path: bytes, method: str = "GET", headers: list[Any] | None = None
) -> Sent:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": raw_path.decode("latin-1"),
        "raw_path": raw_path,
        "query_string": b"",
        "headers": headers or [],
    }
    await gateway(scope, receive, send)
    start, body = sent[0], sent[1]
    return start["status"], dict(start["headers"]), body.get("body", b"")


@pytest.fixture(scope="module")
def gateway() -> Gateway:
    return Gateway(Settings.from_env("gateway"))  # not started: no upstream is called


def _secure(headers: dict[bytes, bytes]) -> None:
    csp = headers[b"content-security-policy"].decode()
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"referrer-policy"] == b"no-referrer"


async def test_the_page_is_served_at_the_root_with_strict_headers(gateway: Gateway) -> None:
    status, headers, body = await _get(gateway, b"/")
    assert status == 200
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    assert headers[b"cache-control"] == b"no-cache" and headers[b"etag"].startswith(b'"')
    assert headers[b"content-length"] == str(len(body)).encode()
    assert b'<script type="module" src="/ui/app.js">' in body
    _secure(headers)
    assert headers[b"content-security-policy"].decode() == CONTENT_SECURITY_POLICY


async def test_the_page_has_no_inline_script_or_style(gateway: Gateway) -> None:
    _, _, body = await _get(gateway, b"/")
    page = body.decode()
    assert page.count("<script") == page.count('<script type="module" src=')
    assert "<style" not in page and " style=" not in page and "onload=" not in page


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        (b"/ui/app.js", b"text/javascript; charset=utf-8"),
        (b"/ui/vendor/preact.mjs", b"text/javascript; charset=utf-8"),
        (b"/ui/app.css", b"text/css; charset=utf-8"),
    ],
)
async def test_assets_have_their_content_types(
    gateway: Gateway, path: bytes, content_type: bytes
) -> None:
    status, headers, body = await _get(gateway, path)
    assert status == 200 and body
    assert headers[b"content-type"] == content_type
    _secure(headers)


async def test_an_unchanged_file_is_a_304_by_its_etag(gateway: Gateway) -> None:
    _, headers, _ = await _get(gateway, b"/ui/app.js")
    etag = headers[b"etag"]
    status, again, body = await _get(gateway, b"/ui/app.js", headers=[(b"if-none-match", etag)])
    assert status == 304 and body == b"" and again[b"etag"] == etag
    status, _, _ = await _get(gateway, b"/ui/app.js", headers=[(b"if-none-match", b'"other"')])
    assert status == 200


async def test_head_answers_and_other_methods_are_refused(gateway: Gateway) -> None:
    status, headers, _ = await _get(gateway, b"/", method="HEAD")
    assert status == 200 and headers[b"content-type"].startswith(b"text/html")
    status, headers, _ = await _get(gateway, b"/ui/app.js", method="POST")
    assert status == 405 and headers[b"allow"] == b"GET, HEAD"


@pytest.mark.parametrize(
    "path",
    [
        b"/ui/../../etc/passwd",
        b"/ui/../app.py",
        b"/ui/%2e%2e/%2e%2e/etc/passwd",
        b"/ui/%2E%2E%2Fapp.py",
        b"/ui/..%2fapp.py",
        b"/ui/..%5capp.py",
        b"/ui/%252e%252e/app.py",
        b"/ui//etc/passwd",
        b"/ui/vendor/../../web.py",
        b"/ui/./app.js/../../app.py",
        b"/ui/",
        b"/ui/index.html",
        b"/ui/app.js%00.png",
        b"/ui/missing.js",
    ],
)
async def test_no_path_reaches_outside_the_known_files(gateway: Gateway, path: bytes) -> None:
    status, headers, body = await _get(gateway, path)
    assert status == 404
    assert headers[b"content-type"] == b"application/json"
    error = json.loads(body)
    assert error["details"][0]["reason"] == "ROUTE_NOT_FOUND"
    assert b"root:" not in body and b"import" not in body


def test_only_regular_files_inside_the_folder_are_served(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("1")
    (tmp_path / ".secret").write_text("x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("outside")
    (tmp_path / "link.txt").symlink_to(outside)
    files = load_files(tmp_path)
    assert sorted(files) == ["/", "/ui/app.js"]


def test_every_file_of_the_dashboard_is_served() -> None:
    served = Dashboard().files
    on_disk = [p for p in WEB_ROOT.rglob("*") if p.is_file()]
    assert len(served) == len(on_disk)
    for path in on_disk:
        if path.suffix in {".js", ".mjs", ".css", ".html"}:
            text = path.read_text()
            if path.parent.name != "vendor":
                assert "innerHTML" not in text and "dangerouslySetInnerHTML" not in text, path


async def test_api_paths_keep_their_json_errors(gateway: Gateway) -> None:
    status, headers, body = await _get(gateway, b"/v1/no-such-thing")
    assert status == 404 and headers[b"content-type"] == b"application/json"
    assert json.loads(body)["details"][0]["reason"] == "ROUTE_NOT_FOUND"
    assert b"content-security-policy" not in headers
    status, headers, body = await _get(gateway, b"/openapi.json")
    assert status == 200 and json.loads(body)["openapi"].startswith("3.")
