"""The `hangar` user command end to end: the whole platform as real processes
(tests/support/stack.py) and the CLI run as a subprocess (`python -m hangar_cli ...`) with its
own config directory, as a user would: log in, create an organization and a project linked to
an app directory, deploy it (a live one under a pseudo-terminal), read its logs, change its
config, roll back, and the errors' exit codes.

The tests run in file order and share one `Session`. The deploy steps need the container
sandbox (builds run only there) and are skipped saying why without it.
"""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.agent.containers import unavailable_reason
from tests.support import stack as stack_fixtures
from tests.support.stack import PASSWORD, Account, Stack, sign_up, wait_for

pytestmark = pytest.mark.slow

stack = stack_fixtures.stack

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "tests" / "data" / "apps" / "procfile-only"
DEPLOY_WITHIN = 300


@dataclass
class Session:
    """The CLI's environment and what the steps made so far."""

    stack: Stack
    home: Path
    app_dir: Path
    owner: Account | None = None
    org_slug: str = ""
    project: dict[str, Any] = field(default_factory=dict)
    address: str = ""

    @property
    def env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("HANGAR_") and key not in ("DATABASE_URL",)
        }
        env.update(
            {
                "HOME": str(self.home),
                "XDG_CONFIG_HOME": str(self.home / "config"),
                "HANGAR_URL": self.stack.url,
                "PYTHONPATH": str(REPO),
                "COLUMNS": "200",
            }
        )
        return env

    def run(
        self, *args: str, stdin: str = "", cwd: Path | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`hangar ARGS` in the app directory (or `cwd`)."""
        return subprocess.run(
            [sys.executable, "-m", "hangar_cli", *args],
            input=stdin,
            env=self.env,
            cwd=cwd or self.app_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        done = self.run(*args, **kwargs)
        assert done.returncode == 0, f"hangar {' '.join(args)}: {done.returncode}\n{done.stderr}"
        return done

    def json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.ok(*args, "--json", **kwargs).stdout)

    def need_project(self) -> None:
        if not self.project:
            pytest.fail("an earlier step did not make the project; see its failure")


@pytest.fixture(scope="module")
def session(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    home = tmp_path_factory.mktemp("cli-home")
    app_dir = tmp_path_factory.mktemp("cli-app") / "app"
    shutil.copytree(APP, app_dir)
    (app_dir / "junk.log").write_text("not for the server\n")
    (app_dir / "kept.txt").write_text("shipped\n")
    (app_dir / ".hangarignore").write_text("*.log\n")
    (app_dir / ".git").mkdir()
    (app_dir / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    yield Session(stack, home, app_dir)
    stack.check_alive()


def _needs_sandbox() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"builds run only in the container sandbox: {reason}")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def test_login_and_whoami(session: Session) -> None:
    with session.stack.client() as http:
        session.owner = sign_up(http, "cli")
    done = session.ok(
        "login", "--email", session.owner.email, "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert session.owner.email in done.stdout
    config = session.home / "config" / "hangar" / "config.json"
    assert config.stat().st_mode & 0o777 == 0o600
    assert config.parent.stat().st_mode & 0o777 == 0o700
    stored = json.loads(config.read_text())
    assert stored["url"] == session.stack.url and stored["refresh_token"]
    me = session.json("whoami")
    assert me["email"] == session.owner.email
    assert session.owner.email in session.ok("whoami").stdout


def test_signup_makes_an_account_and_logs_in(session: Session, tmp_path: Path) -> None:
    env = {**session.env, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    email = f"new-{os.getpid()}-{id(tmp_path)}@example.com"
    done = subprocess.run(
        [sys.executable, "-m", "hangar_cli", "signup", "--email", email, "--password-stdin"],
        input=PASSWORD + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert email in done.stdout
    again = subprocess.run(
        [sys.executable, "-m", "hangar_cli", "whoami", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(again.stdout)["email"] == email


def test_wrong_password_exits_3(session: Session) -> None:
    assert session.owner is not None
    done = session.run(
        "login",
        "--email",
        session.owner.email,
        "--password-stdin",
        stdin="wrong password\n",
        cwd=session.home,
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_org_and_linked_project(session: Session) -> None:
    slug = f"cli-{secrets.token_hex(3)}"
    org = session.json("orgs", "create", "CLI Org", "--slug", slug)
    assert org["slug"] == slug
    session.org_slug = slug
    listed = session.json("orgs", "list")
    assert [o["slug"] for o in listed["organizations"]] == [slug]
    assert slug in session.ok("orgs", "list").stdout

    def create() -> dict[str, Any] | None:  # the plan's pool arrives with billing's event
        done = session.run(
            "projects",
            "create",
            "Web App",
            "--slug",
            "web",
            "--ram",
            "256",
            "--cpu",
            "250",
            "--link",
            "--json",
        )
        return json.loads(done.stdout) if done.returncode == 0 else None

    session.project = wait_for(create, "projects create to succeed", within=30, every=0.5)
    assert (session.app_dir / "hangar.toml").is_file()
    shown = session.json("projects", "show")  # from hangar.toml
    assert shown["id"] == session.project["id"]
    assert session.json("projects", "show", "web", cwd=session.home)["id"] == shown["id"]
    listed = session.json("projects", "list")
    assert [p["slug"] for p in listed["projects"]] == ["web"]


def test_errors_are_one_line_with_exit_codes(session: Session) -> None:
    session.need_project()
    missing = session.run("projects", "show", "nope")
    assert missing.returncode == 4, missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "Traceback" not in missing.stderr
    assert "nope" in missing.stderr

    invalid = session.run("orgs", "create", "Bad", "--slug", "Not A Slug!")
    assert invalid.returncode == 2, invalid.stderr
    assert invalid.stderr.strip().count("\n") == 0 and "Traceback" not in invalid.stderr
    assert "slug" in invalid.stderr

    taken = session.run("orgs", "create", "Again", "--slug", session.org_slug)
    assert taken.returncode == 5, taken.stderr

    logged_out = session.run("whoami", cwd=session.home)
    assert logged_out.returncode == 0  # still logged in; see below for a bad token
    env = {**session.env, "HANGAR_TOKEN": "not-a-token"}
    bad = subprocess.run(
        [sys.executable, "-m", "hangar_cli", "whoami"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 3, bad.stderr


def test_deploy_reaches_running(session: Session) -> None:
    session.need_project()
    _needs_sandbox()
    result = session.json("deploy", timeout=DEPLOY_WITHIN)
    packed = result["packedFiles"]
    assert "Procfile" in packed and "kept.txt" in packed and "hangar.toml" in packed
    assert "junk.log" not in packed and not any(p.startswith(".git/") for p in packed)
    assert result["deployment"]["status"] == "DEPLOYMENT_STATUS_RUNNING"
    assert result["address"].startswith("http://")
    assert wait_for(lambda: _answers(result["address"]), "the app to answer", within=30)
    assert result["url"].startswith("http://") and ".localhost:" in result["url"]
    assert session.ok("open").stdout.strip() == result["url"]  # the project's public name
    session.address = result["address"]


def test_deploy_in_a_terminal_shows_progress_and_live_lines(session: Session) -> None:
    session.need_project()
    _needs_sandbox()
    (session.app_dir / "kept.txt").write_text(f"changed {secrets.token_hex(4)}\n")
    pid, fd = pty.fork()
    if pid == 0:  # the child: hangar deploy on the terminal
        os.chdir(session.app_dir)
        os.execve(sys.executable, [sys.executable, "-m", "hangar_cli", "deploy"], session.env)
    output = b""
    deadline = time.monotonic() + DEPLOY_WITHIN
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    assert os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    assert "Uploading" in text and "━" in text, text[-3000:]  # rich's progress bar
    assert "Build succeeded" in text, text[-3000:]  # the build's own lines, live
    assert "==> scheduling" in text and "==> running" in text, text[-3000:]
    assert re.search(r"Running at\s+http://", text), text[-3000:]


def test_logs_show_the_build(session: Session) -> None:
    session.need_project()
    _needs_sandbox()
    done = session.ok("logs", "--since", "30m")
    assert "build |" in done.stdout, done.stdout[-2000:]
    entries = session.json("logs", "--since", "30m")["entries"]
    assert any(e.get("stream") == "LOG_STREAM_BUILD" for e in entries)


def test_env_set_makes_a_config_change_release(session: Session) -> None:
    session.need_project()
    _needs_sandbox()
    session.ok("env", "set", "GREETING=hi")
    names = [s["name"] for s in session.json("env", "list")["secrets"]]
    assert names == ["GREETING"]

    def config_change_running() -> bool:
        deployments = session.json("releases")["deployments"]
        return any(
            d["releaseReason"] == "RELEASE_REASON_CONFIG_CHANGE"
            and d["status"] == "DEPLOYMENT_STATUS_RUNNING"
            for d in deployments
        )

    wait_for(config_change_running, "the config change release to run", within=120, every=1)
    assert "config change" in session.ok("releases").stdout
    session.ok("env", "unset", "GREETING", "--no-restart")
    assert session.json("env", "list")["secrets"] == []


def test_scale_resizes_the_project_for_its_next_release(session: Session) -> None:
    session.need_project()
    scaled = session.json("scale", "--ram", "192", "--cpu", "200")
    assert (scaled["resources"]["ramMb"], scaled["resources"]["cpuMillis"]) == (192, 200)
    assert session.json("projects", "show")["resources"]["ramMb"] == 192
    too_much = session.run("scale", "--ram", "999999")
    assert too_much.returncode == 2 and len(too_much.stderr.strip().splitlines()) == 1
    assert session.run("scale").returncode == 2


def test_rollback(session: Session) -> None:
    session.need_project()
    _needs_sandbox()
    created = session.json("rollback")
    assert created["releaseReason"] == "RELEASE_REASON_ROLLBACK"

    def rolled_back_running() -> bool:
        current = session.json("releases")["deployments"]
        return any(
            d["id"] == created["id"] and d["status"] == "DEPLOYMENT_STATUS_RUNNING" for d in current
        )

    wait_for(rolled_back_running, "the rollback release to run", within=120, every=1)


def test_deploy_with_replicas_builds_once_and_runs_each(session: Session) -> None:
    session.need_project()
    _needs_sandbox()
    (session.app_dir / "kept.txt").write_text(f"replicated {secrets.token_hex(4)}\n")
    result = session.json("deploy", "--replicas", "2", timeout=DEPLOY_WITHIN)
    lead = result["deployment"]
    assert (lead["status"], lead["replicas"]) == ("DEPLOYMENT_STATUS_RUNNING", 2)
    releases = session.json("releases")["deployments"]
    replicas = [d for d in releases if d["replicaSetId"] == lead["id"]]
    assert sorted(d.get("replicaIndex", 0) for d in replicas) == [0, 1]
    assert {d["status"] for d in replicas} == {"DEPLOYMENT_STATUS_RUNNING"}
    assert len({d["slugSha256"] for d in replicas}) == 1  # built once, run by both
    ids = {d["id"] for d in replicas}
    entries = session.json("logs", "--since", "30m", "--lines", "2000")["entries"]
    builders = {
        e["deploymentId"]
        for e in entries
        if e.get("stream") == "LOG_STREAM_BUILD" and e.get("deploymentId") in ids
    }
    assert builders == {lead["id"]}
    assert "2/2" in session.ok("releases").stdout


def test_a_ci_token_deploys_and_is_refused_once_revoked(session: Session) -> None:
    """CI: a deploy token of the project, given as HANGAR_TOKEN with no login."""
    session.need_project()
    _needs_sandbox()
    made = session.json(
        "tokens", "create", "ci", "--scope", "deploy", "--project", session.project["id"]
    )
    assert made["token"]["projectId"] == session.project["id"]
    assert made["secret"].startswith("hgr_")
    read_only = session.json("tokens", "create", "dashboard", "--scope", "read")
    listed = session.json("tokens", "list")["tokens"]
    assert {t["name"] for t in listed} == {"ci", "dashboard"}
    assert made["secret"] not in json.dumps(listed)

    def as_ci(secret: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**session.env, "HANGAR_TOKEN": secret}
        env["XDG_CONFIG_HOME"] = str(session.home / "no-login")  # no stored session at all
        return subprocess.run(
            [sys.executable, "-m", "hangar_cli", *args],
            env=env,
            cwd=session.app_dir,
            capture_output=True,
            text=True,
            timeout=DEPLOY_WITHIN,
        )

    deployed = as_ci(made["secret"], "deploy", "--json")
    assert deployed.returncode == 0, deployed.stderr
    assert json.loads(deployed.stdout)["deployment"]["status"] == "DEPLOYMENT_STATUS_RUNNING"

    refused = as_ci(read_only["secret"], "deploy", "--no-wait")
    assert refused.returncode == 3, refused.stderr
    assert as_ci(read_only["secret"], "releases").returncode == 0

    session.ok("tokens", "revoke", made["token"]["id"])
    gone = as_ci(made["secret"], "releases")
    assert gone.returncode == 3 and len(gone.stderr.strip().splitlines()) == 1, gone.stderr


def test_delete_needs_the_slug_or_yes_then_logout(session: Session) -> None:
    session.need_project()
    refused = session.run("projects", "delete", "web")  # stdin is no terminal: no prompt
    assert refused.returncode == 2
    session.ok("projects", "delete", "web", "--yes")
    gone = session.run("projects", "show")  # hangar.toml names a deleted project
    # The API does not tell a deleted project from another tenant's: PERMISSION_DENIED.
    assert gone.returncode == 3 and "cannot access" in gone.stderr, gone.stderr
    session.ok("logout")
    assert not (session.home / "config" / "hangar" / "config.json").exists()
    assert session.run("whoami").returncode == 3
