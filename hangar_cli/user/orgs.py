"""`hangar orgs ...` and `hangar members ...`: organizations and who belongs to them."""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.table import Table

from hangar_cli.user.client import Client
from hangar_cli.user.common import (
    JsonOpt,
    OrgOpt,
    console,
    emit_json,
    organizations,
    resolve_org,
    short_enum,
    when,
)

orgs_app = typer.Typer(help="Organizations: create and list them.", no_args_is_help=True)
members_app = typer.Typer(help="Members of an organization.", no_args_is_help=True)

ROLES = ("viewer", "developer", "admin", "owner")


def slugify(name: str) -> str:
    """A slug from a display name: lower-case words joined by '-', at most 40 characters."""
    return "-".join(re.findall(r"[a-z0-9]+", name.lower()))[:40].strip("-")


@orgs_app.command("create")
def orgs_create(
    name: Annotated[str, typer.Argument(help="Display name.")],
    slug: Annotated[str | None, typer.Option(help="URL name (default: from NAME).")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Create an organization (you become its owner)."""
    with Client() as client:
        org = client.post("/v1/organizations", {"name": name, "slug": slug or slugify(name)})
    if json_output:
        emit_json(org)
        return
    console.print(f"Created organization [bold]{org.get('slug')}[/bold] ({org.get('id')}).")


@orgs_app.command("list")
def orgs_list(json_output: JsonOpt = False) -> None:
    """List the organizations you belong to."""
    with Client() as client:
        orgs = organizations(client)
    if json_output:
        emit_json({"organizations": orgs})
        return
    table = Table("SLUG", "NAME", "ID", "CREATED")
    for org in orgs:
        table.add_row(org.get("slug"), org.get("name"), org.get("id"), when(org.get("createdAt")))
    console.print(table)


@members_app.command("add")
def members_add(
    email: Annotated[str, typer.Argument(help="Email of an existing user.")],
    role: Annotated[str, typer.Option(help="viewer, developer, admin or owner.")] = "developer",
    org: OrgOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Add a user to an organization with a role."""
    if role.lower() not in ROLES:
        raise typer.BadParameter(f"must be one of {', '.join(ROLES)}", param_hint="--role")
    with Client() as client:
        organization = resolve_org(client, org)
        member = client.post(
            f"/v1/organizations/{organization['id']}/members",
            {"email": email, "role": f"ROLE_{role.upper()}"},
        )
    if json_output:
        emit_json(member)
        return
    console.print(
        f"Added {member.get('email', email)} to {organization.get('slug')} as "
        f"{short_enum(member.get('role'), 'ROLE_')}."
    )


@members_app.command("list")
def members_list(org: OrgOpt = None, json_output: JsonOpt = False) -> None:
    """List an organization's members and their roles."""
    with Client() as client:
        organization = resolve_org(client, org)
        members = client.list_all(f"/v1/organizations/{organization['id']}/members", "members")
    if json_output:
        emit_json({"members": members})
        return
    table = Table("EMAIL", "ROLE", "USER ID")
    for member in members:
        table.add_row(
            member.get("email"), short_enum(member.get("role"), "ROLE_"), member.get("userId")
        )
    console.print(table)
