"""`hangar tokens ...`: personal API tokens for scripts and CI (`HANGAR_TOKEN`).

A token's secret is printed once, at creation; keep it in the CI's secret store and give it
to the CLI as `HANGAR_TOKEN`. A CI deploy token is a `deploy` token of one organization."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from hangar_cli.user.client import Client
from hangar_cli.user.common import (
    JsonOpt,
    OrgOpt,
    console,
    emit_json,
    resolve_org,
    resolve_project,
    when,
)

tokens_app = typer.Typer(help="Personal API tokens for scripts and CI.", no_args_is_help=True)


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="What it is for, e.g. 'github-actions'.")],
    scope: Annotated[
        str, typer.Option(help="read, deploy (a developer's permissions) or admin.")
    ] = "deploy",
    org: OrgOpt = None,
    all_orgs: Annotated[
        bool, typer.Option("--all-orgs", help="Not limited to one organization.")
    ] = False,
    project: Annotated[
        str | None,
        typer.Option("--project", "-p", help="Only this project (a CI deploy token)."),
    ] = None,
    expires_in_days: Annotated[
        int | None, typer.Option("--expires-in-days", min=1, help="It stops working then.")
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Create a token; its secret is printed this once."""
    spec: dict[str, Any] = {"name": name, "scope": scope}
    with Client() as client:
        if project is not None:
            found = resolve_project(client, project)
            spec["organizationId"] = found["organizationId"]
            spec["projectId"] = found["id"]
        elif not all_orgs:
            spec["organizationId"] = resolve_org(client, org)["id"]
        if expires_in_days is not None:
            expires = datetime.now(UTC) + timedelta(days=expires_in_days)
            spec["expireTime"] = expires.isoformat().replace("+00:00", "Z")
        made = client.post("/v1/users/me/tokens", spec)
    if json_output:
        emit_json(made)
        return
    token = made["token"]
    console.print(f"Created token [bold]{token['name']}[/] ({token['scope']}), id {token['id']}.")
    console.print("Its secret, shown this once (give it to scripts as HANGAR_TOKEN):")
    console.print(made["secret"], soft_wrap=True, highlight=False, markup=False)


@tokens_app.command("list")
def tokens_list(json_output: JsonOpt = False) -> None:
    """Your tokens (never their secrets)."""
    with Client() as client:
        tokens = client.get("/v1/users/me/tokens").get("tokens") or []
    if json_output:
        emit_json({"tokens": tokens})
        return
    table = Table("ID", "NAME", "SCOPE", "PREFIX", "CREATED", "LAST USED", "EXPIRES", "REVOKED")
    for t in tokens:
        table.add_row(
            t["id"],
            t["name"],
            t["scope"],
            t.get("prefix", ""),
            when(t.get("createTime")),
            when(t.get("lastUsedTime")),
            when(t.get("expireTime")),
            when(t.get("revokeTime")),
        )
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id.")],
    json_output: JsonOpt = False,
) -> None:
    """Revoke a token: refused on its very next use, everywhere."""
    with Client() as client:
        client.call("DELETE", f"/v1/users/me/tokens/{token_id}")
    if json_output:
        emit_json({"revoked": token_id})
        return
    console.print(f"Revoked token {token_id}.")
