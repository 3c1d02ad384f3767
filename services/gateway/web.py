"""The web dashboard's static files: `GET /` (the page) and `GET /ui/<file>` (its scripts and
styles), from services/gateway/web/, read once at start.

The dashboard is a client of the public `/v1/...` API like the CLI, so the gateway serves
files only: no templates, no session, no private endpoint. Files are looked up in a table
built from the folder at start, never joined onto a filesystem path: a request path that is
not exactly a known name (`..`, encoded or not) finds nothing and falls through to the
gateway's JSON 404.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path

WEB_ROOT = Path(__file__).with_name("web")
ASSET_PREFIX = "/ui/"
INDEX_PATH = "/"
INDEX_FILE = "index.html"
ALLOWED_METHODS = frozenset({"GET", "HEAD"})

# Scripts only from this origin's files (no inline script, no eval), calls only to this
# origin's API, and no framing. Every header below goes on every dashboard response.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
# Names are not content-hashed, so browsers keep a copy but ask again (ETag) every time: a
# new release of the gateway is picked up at the next load, and an unchanged file costs a 304.
CACHE_CONTROL = b"no-cache"
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
    ".json": b"application/json",
    ".txt": b"text/plain; charset=utf-8",
}


@dataclass(frozen=True)
class StaticFile:
    content_type: bytes
    body: bytes
    etag: bytes


@dataclass(frozen=True)
class WebAnswer:
    """What to send: status, content type, body and the headers beyond content type/length."""

    status: int
    content_type: bytes
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def _content_type(path: Path) -> bytes:
    known = CONTENT_TYPES.get(path.suffix.lower())
    if known is not None:
        return known
    guessed, _ = mimetypes.guess_type(path.name)
    return (guessed or "application/octet-stream").encode()


def load_files(root: Path = WEB_ROOT) -> dict[str, StaticFile]:
    """URL path -> file, for every regular file under root (symlinks and dotfiles left out)."""
    files: dict[str, StaticFile] = {}
    if not root.is_dir():
        return files
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_symlink() or not path.is_file():
            continue
        if any(part.startswith(".") for part in relative.parts):
            continue
        body = path.read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
        name = relative.as_posix()
        url = INDEX_PATH if name == INDEX_FILE else ASSET_PREFIX + name
        files[url] = StaticFile(_content_type(path), body, etag)
    return files


class Dashboard:
    """Answers the dashboard's paths; None for any other path (the API's)."""

    def __init__(self, root: Path = WEB_ROOT) -> None:
        self.files = load_files(root)

    def answer(self, method: str, path: str, headers: dict[bytes, bytes]) -> WebAnswer | None:
        found = self.files.get(path)
        if found is None:
            return None
        if method not in ALLOWED_METHODS:
            allowed = ", ".join(sorted(ALLOWED_METHODS)).encode()
            return WebAnswer(
                405,
                b"text/plain; charset=utf-8",
                b"method not allowed\n",
                [(b"allow", allowed), *SECURITY_HEADERS],
            )
        common = [
            (b"cache-control", CACHE_CONTROL),
            (b"etag", found.etag),
            *SECURITY_HEADERS,
        ]
        if _etag_matches(headers.get(b"if-none-match"), found.etag):
            return WebAnswer(304, found.content_type, b"", common)
        return WebAnswer(200, found.content_type, found.body, common)


def _etag_matches(given: bytes | None, etag: bytes) -> bool:
    if given is None:
        return False
    candidates = {c.strip().removeprefix(b"W/") for c in given.split(b",")}
    return etag in candidates or b"*" in candidates
