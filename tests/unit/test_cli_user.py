"""The `hangar` user command without a server: packing rules (.gitignore, .hangarignore,
.git/), the config file's modes, error sentences and exit codes, the silent token refresh
(against an httpx mock transport), argv routing between the platform and user commands."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from hangar_cli import cli
from hangar_cli.user import app as user_app
from hangar_cli.user.client import (
    ApiError,
    Client,
    Config,
    config_path,
    exit_code_for,
    format_status,
)
from hangar_cli.user.deploy import format_entry, parse_since
from hangar_cli.user.env import parse_assignments
from hangar_cli.user.pack import iter_files, pack


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_pack_honours_gitignore_hangarignore_and_skips_git(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "Procfile": "web: app\n",
            "app.py": "print()\n",
            ".gitignore": "*.pyc\nbuild/\nsecret.env\n",
            ".hangarignore": "docs/\n!secret.env\n",
            "mod.pyc": "x",
            "build/out.bin": "x",
            "docs/readme.md": "x",
            "secret.env": "x",
            ".git/HEAD": "ref\n",
            "hangar.toml": "[project]\n",
            "sub/.gitignore": "local.txt\n/only-here.txt\n",
            "sub/local.txt": "x",
            "sub/only-here.txt": "x",
            "sub/keep.py": "x",
            "local.txt": "kept: the rule is sub/'s",
            "only-here.txt": "kept too",
        },
    )
    files = set(iter_files(root))
    assert files == {
        ".gitignore",
        ".hangarignore",
        "Procfile",
        "app.py",
        "hangar.toml",
        "secret.env",  # .hangarignore's ! brings it back
        "sub",
        "sub/.gitignore",
        "sub/keep.py",
        "local.txt",
        "only-here.txt",
    }


def test_pack_writes_a_gzip_tar_whose_digest_it_reports(tmp_path: Path) -> None:
    root = _tree(
        tmp_path / "app", {"Procfile": "web: x\n", "junk.log": "x", ".hangarignore": "*.log\n"}
    )
    (root / "link").symlink_to("Procfile")
    out = io.BytesIO()
    packed = pack(root, out)
    data = out.getvalue()
    import hashlib

    assert packed.sha256 == hashlib.sha256(data).hexdigest()
    assert packed.size_bytes == len(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {".hangarignore", "Procfile", "link"}
    assert members["link"].issym() and members["link"].linkname == "Procfile"
    assert all(m.uid == 0 and m.uname == "" for m in members.values())


def test_config_file_is_0600_in_a_0700_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "hangar").mkdir(parents=True, mode=0o755)
    (tmp_path / "xdg" / "hangar").chmod(0o755)
    path = Config(url="http://h", access_token="a", refresh_token="r", email="e@x").save()
    assert path == config_path() == tmp_path / "xdg" / "hangar" / "config.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert Config.load() == Config("http://h", "a", "r", "e@x")
    Config.forget()
    assert Config.load() == Config()


def test_config_defaults_to_dot_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_path() == tmp_path / ".config" / "hangar" / "config.json"


BAD_REQUEST = {
    "code": 3,
    "message": "invalid organization",
    "details": [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT"},
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "slug", "description": "must match ^[a-z0-9-]+$"}],
        },
    ],
}


def test_error_sentence_names_field_violations() -> None:
    text = format_status(400, BAD_REQUEST)
    assert text == "invalid organization (field slug: must match ^[a-z0-9-]+$)"
    assert "\n" not in format_status(500, {"message": "two\nlines"})
    assert format_status(502, "Bad Gateway") == "the server answered HTTP 502: Bad Gateway"
    error = ApiError(400, BAD_REQUEST)
    assert error.exit_code == 2 and error.reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("http", "code", "expected"),
    [
        (400, 3, 2),
        (400, 11, 2),
        (401, 16, 3),
        (403, 7, 3),
        (404, 5, 4),
        (409, 6, 5),
        (409, 10, 5),
        (400, 9, 5),  # FAILED_PRECONDITION: a conflict with the current state
        (412, None, 5),
        (500, 13, 1),
        (503, 14, 1),
        (404, None, 4),
    ],
)
def test_exit_codes(http: int, code: int | None, expected: int) -> None:
    body: dict[str, Any] = {"message": "m"} if code is None else {"code": code, "message": "m"}
    assert exit_code_for(http, body) == expected


def _client(handler: Any, config: Config) -> Client:
    client = Client("http://gateway", config=config)
    client.http = httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(handler))
    return client


def test_silent_refresh_stores_new_tokens_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("HANGAR_TOKEN", raising=False)
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization", "")))
        if request.url.path == "/v1/auth/refresh":
            assert json.loads(request.content) == {"refreshToken": "old-refresh"}
            return httpx.Response(200, json={"accessToken": "new", "refreshToken": "new-r"})
        if request.headers.get("authorization") == "Bearer new":
            return httpx.Response(200, json={"email": "a@x"})
        return httpx.Response(401, json={"code": 16, "message": "token expired"})

    config = Config("http://gateway", "old", "old-refresh", "a@x")
    with _client(handler, config) as client:
        assert client.get("/v1/users/me") == {"email": "a@x"}
    assert [path for path, _ in seen] == ["/v1/users/me", "/v1/auth/refresh", "/v1/users/me"]
    assert Config.load() == Config("http://gateway", "new", "new-r", "a@x")


def test_no_refresh_with_hangar_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("HANGAR_TOKEN", "ci-token")
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("authorization", ""))
        return httpx.Response(401, json={"code": 16, "message": "token expired"})

    with _client(handler, Config("", "stored", "refresh", "")) as client:
        with pytest.raises(ApiError) as raised:
            client.get("/v1/users/me")
    assert raised.value.exit_code == 3 and raised.value.message == "token expired"
    assert calls == ["Bearer ci-token"]


def test_run_prints_one_line_and_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("HANGAR_URL", "http://127.0.0.1:9")  # nothing listens (discard port)
    monkeypatch.delenv("HANGAR_TOKEN", raising=False)
    assert user_app.run(["whoami"]) == 3  # not logged in
    assert capsys.readouterr().err == "hangar: not logged in: run `hangar login`\n"
    monkeypatch.setenv("HANGAR_TOKEN", "t")
    assert user_app.run(["whoami"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hangar: cannot reach http://127.0.0.1:9") and err.count("\n") == 1
    assert user_app.run(["env", "set", "not-an-assignment"]) == 2
    assert user_app.run(["no-such-command"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_help_lists_user_and_platform_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    text = capsys.readouterr().out
    for command in ("login", "deploy", "logs", "releases", "rollback", "env", "open"):
        assert command in text
    for command in ("up", "migrate", "serve", "admin"):
        assert command in text


def test_platform_commands_still_go_to_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["serve", "--help"])
    assert raised.value.code == 0
    assert "usage: hangar serve" in capsys.readouterr().out


def test_small_parsers() -> None:
    assert parse_since("10m").total_seconds() == 600
    assert parse_since("2h").total_seconds() == 7200
    assert parse_since("45").total_seconds() == 45
    assert parse_assignments(["A=1", "B_2=x=y", "C="]) == [("A", "1"), ("B_2", "x=y"), ("C", "")]
    build = {"stream": "LOG_STREAM_BUILD", "line": "-----> Procfile app"}
    app_line = {"stream": "LOG_STREAM_STDOUT", "line": "hi", "containerId": "abcdef123"}
    assert format_entry(build) == "-----> Procfile app"
    assert format_entry(app_line) == "app[abcdef] | hi"
