"""`hangar servers ...` (platform admins): join tokens that enrol a server's agent, and
revoking a server's agent certificates (docs/tls.md, "Agent enrolment")."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from hangar_cli.user.client import Client, CliError
from hangar_cli.user.common import JsonOpt, console, emit_json

servers_app = typer.Typer(help="Servers and their agents (platform admins).", no_args_is_help=True)


def _server(client: Client, server: str) -> dict[str, Any]:
    """A server by id or name."""
    found = client.get("/v1/servers", params={"pageSize": 500}).get("servers") or []
    for s in found:
        if server in (s["id"], s["name"]):
            return dict(s)
    raise CliError(f"no server {server!r}")


@servers_app.command("join-token")
def servers_join_token(
    server: Annotated[str, typer.Argument(help="The server's id or name.")],
    ttl_minutes: Annotated[
        int, typer.Option("--ttl-minutes", min=1, max=1440, help="How long it may be used.")
    ] = 60,
    json_output: JsonOpt = False,
) -> None:
    """A one-time token for `hangar agent join` on that server; printed this once."""
    with Client() as client:
        found = _server(client, server)
        made = client.post(
            f"/v1/servers/{found['id']}:createJoinToken", {"ttl": f"{ttl_minutes * 60}s"}
        )
    if json_output:
        emit_json(made)
        return
    console.print(
        f"Join token for server [bold]{found['name']}[/] ({found['id']}),"
        f" valid until {made['expireTime']}, once. On that machine run:"
    )
    console.print(
        f"hangar agent join {made['token']} --runtime RUNTIME_ENROLMENT_ADDRESS",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )


@servers_app.command("revoke-agent")
def servers_revoke_agent(
    server: Annotated[str, typer.Argument(help="The server's id or name.")],
    json_output: JsonOpt = False,
) -> None:
    """Refuse the server's agent certificates from now on (it must join again)."""
    with Client() as client:
        found = _server(client, server)
        revoked = client.post(f"/v1/servers/{found['id']}:revokeAgentCertificate", {})
    if json_output:
        emit_json(revoked)
        return
    console.print(f"Agent certificates of server {found['name']} ({found['id']}) revoked.")
