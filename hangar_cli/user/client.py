"""The gateway's HTTP client for user commands: where the config lives, which URL and token
to use, google.rpc.Status errors turned into one sentence and an exit code, and the silent
refresh of an expired access token.

The config file is `$XDG_CONFIG_HOME/hangar/config.json` (default
`~/.config/hangar/config.json`), mode 0600 in a 0700 directory. `HANGAR_URL` and
`HANGAR_TOKEN` override it (CI needs no file: the token is used as the bearer as is).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://localhost:8080"

# Exit codes of every user command.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INVALID = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5

# google.rpc.Code numbers -> exit code (FAILED_PRECONDITION is HTTP 400 at the gateway, yet
# it is a conflict with the current state, not bad input).
_EXIT_BY_GRPC_CODE = {
    3: EXIT_INVALID,  # INVALID_ARGUMENT
    11: EXIT_INVALID,  # OUT_OF_RANGE
    16: EXIT_AUTH,  # UNAUTHENTICATED
    7: EXIT_AUTH,  # PERMISSION_DENIED
    5: EXIT_NOT_FOUND,  # NOT_FOUND
    6: EXIT_CONFLICT,  # ALREADY_EXISTS
    10: EXIT_CONFLICT,  # ABORTED
    9: EXIT_CONFLICT,  # FAILED_PRECONDITION
}
_EXIT_BY_HTTP_STATUS = {
    400: EXIT_INVALID,
    401: EXIT_AUTH,
    403: EXIT_AUTH,
    404: EXIT_NOT_FOUND,
    409: EXIT_CONFLICT,
    412: EXIT_CONFLICT,
}


class CliError(Exception):
    """A failure to report as one line on stderr, ending the command with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class ApiError(CliError):
    """An error answer of the gateway (a google.rpc.Status body), as one readable sentence."""

    def __init__(self, http_status: int, body: Any) -> None:
        self.http_status = http_status
        self.status: dict[str, Any] = body if isinstance(body, dict) else {}
        self.reason = error_reason(self.status)
        super().__init__(format_status(http_status, body), exit_code_for(http_status, body))


def exit_code_for(http_status: int, body: Any) -> int:
    """The exit code of an error answer: from the Status' gRPC code, else the HTTP status."""
    code = body.get("code") if isinstance(body, dict) else None
    if isinstance(code, int) and code in _EXIT_BY_GRPC_CODE:
        return _EXIT_BY_GRPC_CODE[code]
    return _EXIT_BY_HTTP_STATUS.get(http_status, EXIT_ERROR)


def field_violations(status: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, description) of every BadRequest detail of a Status."""
    found: list[tuple[str, str]] = []
    for detail in status.get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("BadRequest"):
            for violation in detail.get("fieldViolations") or []:
                found.append(
                    (str(violation.get("field", "")), str(violation.get("description", "")))
                )
    return found


def error_reason(status: dict[str, Any]) -> str:
    """The ErrorInfo reason of a Status (e.g. "NO_BUILD_SANDBOX"), or ""."""
    for detail in status.get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("ErrorInfo"):
            return str(detail.get("reason", ""))
    return ""


def format_status(http_status: int, body: Any) -> str:
    """One sentence for an error answer: the Status message, then each field violation that
    the message does not already name, e.g. `invalid project (field slug: must match ...)`."""
    status = body if isinstance(body, dict) else {}
    message = str(status.get("message") or "").strip()
    if not message:
        message = f"the server answered HTTP {http_status}"
        if isinstance(body, str) and body.strip():
            message += f": {body.strip()[:200]}"
    extra = [
        f"field {name}: {description}" if description else f"field {name}"
        for name, description in field_violations(status)
        if name and (name not in message or description not in message)
    ]
    if extra:
        message = f"{message.rstrip('.')} ({'; '.join(extra)})"
    return " ".join(message.split())


def config_path() -> Path:
    """Where `hangar login` keeps its config: $XDG_CONFIG_HOME/hangar/config.json."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hangar" / "config.json"


@dataclass
class Config:
    """What `hangar login` stored: the gateway URL, the tokens and who logged in."""

    url: str = ""
    access_token: str = ""
    refresh_token: str = ""
    email: str = ""

    @classmethod
    def load(cls, path: Path | None = None) -> Config:
        """The stored config, or an empty one when there is none (or it is unreadable)."""
        path = path or config_path()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        return cls(
            **{
                key: str(data.get(key) or "")
                for key in ("url", "access_token", "refresh_token", "email")
            }
        )

    def save(self, path: Path | None = None) -> Path:
        """Write the config atomically as a 0600 file in a 0700 directory."""
        path = path or config_path()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.parent.stat().st_mode & 0o077:
            path.parent.chmod(0o700)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(asdict(self), indent=2) + "\n")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @staticmethod
    def forget(path: Path | None = None) -> None:
        """Delete the stored config (logout)."""
        (path or config_path()).unlink(missing_ok=True)


def _decode(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


class Client:
    """Calls the gateway as the logged-in user.

    The URL is `url` if given, else `HANGAR_URL`, else the config's, else localhost:8080. The
    bearer is `HANGAR_TOKEN` if set (never refreshed), else the config's access token; on a
    401 with a stored refresh token the client refreshes once, stores the new tokens and
    retries the request."""

    def __init__(self, url: str = "", *, config: Config | None = None, timeout: float = 30) -> None:
        self.config = config if config is not None else Config.load()
        self.env_token = os.environ.get("HANGAR_TOKEN", "")
        self.url = (url or os.environ.get("HANGAR_URL") or self.config.url or DEFAULT_URL).rstrip(
            "/"
        )
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def token(self) -> str:
        """The bearer token in use ("" when not logged in)."""
        return self.env_token or self.config.access_token

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _refresh(self) -> bool:
        """Trade the stored refresh token for new tokens; False when that is not possible."""
        if self.env_token or not self.config.refresh_token:
            return False
        response = self._send(
            "POST", "/v1/auth/refresh", json={"refreshToken": self.config.refresh_token}
        )
        if response.status_code != 200:
            return False
        body = response.json()
        self.config.access_token = body.get("accessToken", "")
        self.config.refresh_token = body.get("refreshToken", "")
        self.config.save()
        return True

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        content: Callable[[], Iterable[bytes]] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        auth: bool = True,
        timeout: float | object | None = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        request = self.http.build_request(
            method,
            path,
            json=json,
            params={k: v for k, v in (params or {}).items() if v is not None},
            content=content() if content is not None else None,
            headers=self._headers(headers) if auth else dict(headers or {}),
            timeout=timeout,  # type: ignore[arg-type]
        )
        try:
            return self.http.send(request, stream=stream)
        except httpx.TimeoutException as exc:
            raise CliError(f"{self.url} did not answer in time ({method} {path})") from exc
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach {self.url}: {exc}") from exc

    def send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        content: Callable[[], Iterable[bytes]] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        auth: bool = True,
        timeout: float | object | None = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        """One request (refreshing once on a 401); raises ApiError on an error answer. With
        `stream` the response is left open for the caller to read and close. `content` is a
        factory so a retried request sends its body again."""
        kwargs: dict[str, Any] = dict(
            json=json,
            params=params,
            content=content,
            headers=headers,
            stream=stream,
            auth=auth,
            timeout=timeout,
        )
        response = self._send(method, path, **kwargs)
        if response.status_code == 401 and auth and self._refresh():
            response.close()
            response = self._send(method, path, **kwargs)
        if response.status_code >= 400:
            if stream:
                response.read()
            response.close()
            raise ApiError(response.status_code, _decode(response))
        return response

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request, its JSON body returned ({} for an empty body)."""
        response = self.send(method, path, **kwargs)
        if not response.content:
            return {}
        return _decode(response)

    def get(self, path: str, **kwargs: Any) -> Any:
        """GET `path`; its JSON."""
        return self.call("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        """POST `body` as JSON to `path`; the answer's JSON."""
        return self.call("POST", path, json=body if body is not None else {}, **kwargs)

    def list_all(self, path: str, key: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Every item of a paginated list (following nextPageToken)."""
        items: list[Any] = []
        token = ""
        while True:
            page = self.get(path, params={**(params or {}), "pageToken": token or None})
            items.extend(page.get(key) or [])
            token = page.get("nextPageToken") or ""
            if not token:
                return items

    def ndjson(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """The `result` of each line of an NDJSON stream (logs:tail); an `error` line raises
        ApiError. No read timeout: a quiet stream is not an error."""
        response = self.send(
            "GET", path, params=params, stream=True, timeout=httpx.Timeout(30, read=None)
        )
        try:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                message = json.loads(line)
                if "error" in message:
                    error = message["error"]
                    raise ApiError(_http_of(error), error)
                yield message.get("result") or {}
        except httpx.HTTPError as exc:
            raise CliError(f"the log stream from {self.url} broke: {exc}") from exc
        finally:
            response.close()


def _http_of(status: Any) -> int:
    code = status.get("code") if isinstance(status, dict) else None
    return {3: 400, 16: 401, 7: 403, 5: 404, 6: 409, 10: 409, 9: 400}.get(
        code if isinstance(code, int) else -1, 500
    )
