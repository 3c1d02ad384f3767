"""`hangar projects ...` and `hangar link`: projects, and which one a directory deploys."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from hangar_cli.user.client import EXIT_INVALID, Client, CliError
from hangar_cli.user.common import (
    JsonOpt,
    OrgOpt,
    ProjectOpt,
    console,
    emit_json,
    organizations,
    resolve_org,
    resolve_project,
    when,
    write_link,
)
from hangar_cli.user.orgs import slugify

projects_app = typer.Typer(help="Projects: create, list, show, delete.", no_args_is_help=True)


def _link(project: dict[str, Any], json_output: bool) -> None:
    path = write_link(project)
    if not json_output:
        console.print(f"Linked this directory to {project.get('slug')} ({path.name}).")


@projects_app.command("create")
def projects_create(
    name: Annotated[str, typer.Argument(help="Display name.")],
    org: OrgOpt = None,
    slug: Annotated[str | None, typer.Option(help="URL name (default: from NAME).")] = None,
    ram: Annotated[int, typer.Option(help="RAM in MB, from the organization's pool.")] = 256,
    cpu: Annotated[int, typer.Option(help="CPU in millicores (1000 = one core).")] = 250,
    region: Annotated[str | None, typer.Option(help="Region (default: the platform's).")] = None,
    link: Annotated[bool, typer.Option("--link", help="Write hangar.toml here.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Create a project in an organization."""
    body: dict[str, Any] = {
        "name": name,
        "slug": slug or slugify(name),
        "resources": {"ramMb": ram, "cpuMillis": cpu},
    }
    if region:
        body["region"] = region
    with Client() as client:
        organization = resolve_org(client, org)
        project = client.post(f"/v1/organizations/{organization['id']}/projects", body)
    if json_output:
        emit_json(project)
    else:
        console.print(
            f"Created project [bold]{project.get('slug')}[/bold] ({project.get('id')}) in "
            f"{organization.get('slug')}: {_size(project)}, "
            f"region {project.get('region') or '-'}."
        )
    if link:
        _link(project, json_output)


@projects_app.command("list")
def projects_list(org: OrgOpt = None, json_output: JsonOpt = False) -> None:
    """List projects (of one organization with --org, else of all of yours)."""
    with Client() as client:
        orgs = [resolve_org(client, org)] if org else organizations(client)
        rows = [
            (organization, project)
            for organization in orgs
            for project in client.list_all(
                f"/v1/organizations/{organization['id']}/projects", "projects"
            )
        ]
    if json_output:
        emit_json({"projects": [project for _, project in rows]})
        return
    table = Table("ORG", "SLUG", "NAME", "ID", "RAM MB", "CPU m", "REGION")
    for organization, project in rows:
        table.add_row(
            organization.get("slug"),
            project.get("slug"),
            project.get("name"),
            project.get("id"),
            str(_resources(project).get("ramMb", 0)),
            str(_resources(project).get("cpuMillis", 0)),
            project.get("region") or "-",
        )
    console.print(table)


@projects_app.command("show")
def projects_show(
    project: Annotated[str | None, typer.Argument(help="Id or slug (default: linked).")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Show a project's settings."""
    with Client() as client:
        found = resolve_project(client, project)
    if json_output:
        emit_json(found)
        return
    table = Table.grid(padding=(0, 2))
    for key in ("id", "slug", "name", "organizationId"):
        table.add_row(key, str(found.get(key, "")))
    table.add_row("resources", _size(found))
    table.add_row("region", str(found.get("region", "")))
    table.add_row(
        "sleep",
        f"after {found.get('sleepAfterSeconds', 0)}s" if found.get("sleepEnabled") else "off",
    )
    table.add_row("created", when(found.get("createdAt")))
    console.print(table)


@projects_app.command("delete")
def projects_delete(
    project: Annotated[str, typer.Argument(help="Id or slug.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask to confirm.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Delete a project (its apps stop); asks you to type its slug unless --yes."""
    with Client() as client:
        found = resolve_project(client, project)
        slug = str(found.get("slug"))
        if not yes:
            if not sys.stdin.isatty():
                raise CliError(
                    "refusing to delete without --yes (stdin is not a terminal)", EXIT_INVALID
                )
            typed = typer.prompt(f"Type {slug} to delete the project")
            if typed.strip() != slug:
                raise CliError("the slug did not match: nothing deleted", EXIT_INVALID)
        client.call("DELETE", f"/v1/projects/{found['id']}")
    if json_output:
        emit_json({})
        return
    console.print(f"Deleted project {slug}.")


def link(
    project: Annotated[str, typer.Argument(help="Id or slug.")],
    json_output: JsonOpt = False,
) -> None:
    """Write hangar.toml here naming PROJECT, so later commands need no --project."""
    with Client() as client:
        found = resolve_project(client, project)
    if json_output:
        emit_json(found)
    _link(found, json_output)


def scale(
    ram: Annotated[int | None, typer.Option("--ram", help="RAM in MB.")] = None,
    cpu: Annotated[
        int | None, typer.Option("--cpu", help="CPU in millicores (1000: a core).")
    ] = None,
    project: ProjectOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Resize a project: its RAM and CPU, drawn from the organization's plan pool. The next
    release runs with them (`hangar deploy`, `hangar rollback`, or a config change)."""
    changes = {k: v for k, v in (("ramMb", ram), ("cpuMillis", cpu)) if v is not None}
    if not changes:
        raise CliError("give --ram and/or --cpu", EXIT_INVALID)
    with Client() as client:
        found = resolve_project(client, project)
        updated = client.call(
            "PATCH",
            f"/v1/projects/{found['id']}",
            # The gateway's update mask: the fields the body names (AIP-134), here
            # resources.ram_mb and/or resources.cpu_millis.
            json={"resources": changes},
        )
    if json_output:
        emit_json(updated)
        return
    console.print(f"[bold]{updated['slug']}[/]: {_size(updated)} (for its next release)")


def _resources(project: dict[str, Any]) -> dict[str, Any]:
    resources = project.get("resources")
    return resources if isinstance(resources, dict) else {}


def _size(project: dict[str, Any]) -> str:
    resources = _resources(project)
    return f"{resources.get('ramMb', 0)} MB, {resources.get('cpuMillis', 0)} mCPU"
