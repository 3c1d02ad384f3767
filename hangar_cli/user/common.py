"""What every user command shares: the consoles, the `--json`, `--project` and `--org`
options, the `hangar.toml` link file, and resolving an organization or project given as a
slug or an id.

`hangar.toml` in the current directory names the project later commands act on:

    [project]
    id = "..."
    slug = "web"
    organization_id = "..."

`--project` (an id, or a slug looked up in the user's organizations) overrides it.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from hangar_cli.user.client import EXIT_INVALID, EXIT_NOT_FOUND, Client, CliError

LINK_FILE = "hangar.toml"
ID_PATTERN = re.compile(r"[a-z][0-9a-z]{23}")  # shared.ids: what every id looks like

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON (for scripts).")]
ProjectOpt = Annotated[
    str | None,
    typer.Option("--project", "-p", help="Project id or slug (default: hangar.toml's)."),
]
OrgOpt = Annotated[
    str | None,
    typer.Option("--org", help="Organization slug or id (default: your only one)."),
]


def emit_json(data: Any) -> None:
    """Print `data` as indented JSON on stdout, nothing else (for `--json`)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def short_enum(value: Any, prefix: str) -> str:
    """`DEPLOYMENT_STATUS_RUNNING` -> `running` (for tables)."""
    text = str(value or "")
    if text.startswith(prefix):
        text = text[len(prefix) :]
    return text.lower().replace("_", " ") or "-"


def when(value: Any) -> str:
    """An RFC 3339 timestamp as local `YYYY-MM-DD HH:MM:SS` ("-" when missing)."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def now_utc() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


# --- hangar.toml ---------------------------------------------------------------------------


def read_link(directory: Path | None = None) -> dict[str, str]:
    """The `[project]` table of `hangar.toml` in `directory` (the cwd), or {} without one."""
    path = (directory or Path.cwd()) / LINK_FILE
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{path} is not valid TOML: {exc}", EXIT_INVALID) from exc
    table = data.get("project")
    if not isinstance(table, dict):
        return {}
    return {str(key): str(value) for key, value in table.items()}


def write_link(project: dict[str, Any], directory: Path | None = None) -> Path:
    """Write `hangar.toml` naming `project` (its id, slug and organization)."""
    path = (directory or Path.cwd()) / LINK_FILE
    fields = {
        "id": project.get("id", ""),
        "slug": project.get("slug", ""),
        "organization_id": project.get("organizationId", ""),
    }
    lines = ["# Written by `hangar link`: the project hangar commands here act on.", "[project]"]
    lines += [f"{key} = {json.dumps(str(value))}" for key, value in fields.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- organizations and projects ------------------------------------------------------------


def organizations(client: Client) -> list[dict[str, Any]]:
    """Every organization the user belongs to."""
    return client.list_all("/v1/organizations", "organizations")


def resolve_org(client: Client, given: str | None) -> dict[str, Any]:
    """The organization named by slug or id; without one, the user's only organization."""
    orgs = organizations(client)
    if given:
        for org in orgs:
            if given in (org.get("slug"), org.get("id")):
                return org
        raise CliError(f"no organization {given!r} among yours", EXIT_NOT_FOUND)
    if len(orgs) == 1:
        return orgs[0]
    if not orgs:
        raise CliError(
            "you belong to no organization yet: create one with `hangar orgs create NAME`",
            EXIT_NOT_FOUND,
        )
    slugs = ", ".join(str(org.get("slug")) for org in orgs)
    raise CliError(f"you belong to several organizations ({slugs}): pass --org", EXIT_INVALID)


def resolve_project(client: Client, given: str | None) -> dict[str, Any]:
    """The project named by `--project` (an id, or a slug in one of the user's
    organizations), else the one `hangar.toml` links; its JSON."""
    if not given:
        link = read_link()
        given = link.get("id") or link.get("slug")
        if not given:
            raise CliError(
                "no project: pass --project, or run `hangar link PROJECT` in this directory",
                EXIT_INVALID,
            )
    if ID_PATTERN.fullmatch(given):  # an id (a slug may look like one too: then below)
        try:
            project: dict[str, Any] = client.get(f"/v1/projects/{given}")
            return project
        except CliError as exc:
            if exc.exit_code not in (EXIT_NOT_FOUND, EXIT_INVALID):
                raise
    matches: list[dict[str, Any]] = [
        project
        for org in organizations(client)
        for project in client.list_all(f"/v1/organizations/{org['id']}/projects", "projects")
        if given in (project.get("slug"), project.get("id"))
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CliError(f"no project {given!r} in your organizations", EXIT_NOT_FOUND)
    raise CliError(
        f"several projects are called {given!r}: pass the project's id instead", EXIT_INVALID
    )
