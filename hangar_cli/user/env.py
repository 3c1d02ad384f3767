"""`hangar env ...`: a project's environment variables (its encrypted secrets).

Setting or unsetting restarts the running release with the new config (a new release, reason
CONFIG_CHANGE) unless `--no-restart`; several variables at once make one restart (only the
last write asks for it)."""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.table import Table

from hangar_cli.user.client import Client
from hangar_cli.user.common import JsonOpt, ProjectOpt, console, emit_json, resolve_project, when

env_app = typer.Typer(help="Environment variables (secrets) of a project.", no_args_is_help=True)

NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
NoRestartOpt = Annotated[
    bool,
    typer.Option("--no-restart", help="Apply to the next release only; do not restart."),
]


@env_app.command("list")
def env_list(project: ProjectOpt = None, json_output: JsonOpt = False) -> None:
    """List the project's variables (names and versions; values are never shown)."""
    with Client() as client:
        found = resolve_project(client, project)
        secrets = client.list_all(f"/v1/projects/{found['id']}/secrets", "secrets")
    if json_output:
        emit_json({"secrets": secrets})
        return
    table = Table("NAME", "VERSION", "UPDATED")
    for secret in secrets:
        table.add_row(secret.get("name"), str(secret.get("version")), when(secret.get("updatedAt")))
    console.print(table)


def parse_assignments(pairs: list[str]) -> list[tuple[str, str]]:
    """`K=V` arguments as (name, value); a malformed one is a typer.BadParameter."""
    parsed: list[tuple[str, str]] = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not NAME.fullmatch(name):
            raise typer.BadParameter(
                f"{pair!r} is not NAME=VALUE with NAME like API_KEY", param_hint="K=V"
            )
        parsed.append((name, value))
    return parsed


@env_app.command("set")
def env_set(
    pairs: Annotated[list[str], typer.Argument(metavar="K=V...", help="Variables to set.")],
    project: ProjectOpt = None,
    no_restart: NoRestartOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Set variables; the running release restarts with them unless --no-restart."""
    assignments = parse_assignments(pairs)
    results = []
    with Client() as client:
        found = resolve_project(client, project)
        for index, (name, value) in enumerate(assignments):
            restart = not no_restart and index == len(assignments) - 1
            results.append(
                client.call(
                    "PUT",
                    f"/v1/projects/{found['id']}/secrets/{name}",
                    json={"value": value, "restart": restart},
                )
            )
    if json_output:
        emit_json({"secrets": results})
        return
    names = ", ".join(name for name, _ in assignments)
    after = "" if no_restart else "; restarting the running release"
    console.print(f"Set {names} on {found.get('slug')}{after}.")


@env_app.command("unset")
def env_unset(
    names: Annotated[list[str], typer.Argument(metavar="K...", help="Variables to remove.")],
    project: ProjectOpt = None,
    no_restart: NoRestartOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Remove variables; the running release restarts without them unless --no-restart."""
    with Client() as client:
        found = resolve_project(client, project)
        for index, name in enumerate(names):
            restart = not no_restart and index == len(names) - 1
            client.call(
                "DELETE",
                f"/v1/projects/{found['id']}/secrets/{name}",
                params={"restart": "true" if restart else "false"},
            )
    if json_output:
        emit_json({"removed": names})
        return
    after = "" if no_restart else "; restarting the running release"
    console.print(f"Removed {', '.join(names)} from {found.get('slug')}{after}.")
