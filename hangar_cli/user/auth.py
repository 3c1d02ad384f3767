"""`hangar login`, `hangar logout`, `hangar whoami`: who the other commands act as."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from hangar_cli.user.client import EXIT_INVALID, ApiError, Client, CliError, Config
from hangar_cli.user.common import JsonOpt, console, emit_json, err_console


def _stdin_line(what: str) -> str:
    value = sys.stdin.readline().rstrip("\r\n")
    if not value:
        raise CliError(f"nothing on stdin for the {what}", EXIT_INVALID)
    return value


def _ask(what: str, *, hide: bool) -> str:
    if not sys.stdin.isatty():
        flag = "--email" if what == "email" else "--password-stdin"
        raise CliError(f"no {what} given and stdin is not a terminal: pass {flag}", EXIT_INVALID)
    value: str = typer.prompt(what.capitalize(), hide_input=hide)
    return value.strip() if not hide else value


def _signed_in(
    client: Client, answer: dict[str, Any], address: str
) -> tuple[dict[str, Any], Config]:
    """The user and the session to store, from a login's or a sign-up's answer."""
    user: dict[str, Any] = answer.get("user") or {}
    config = Config(
        url=client.url,
        access_token=answer.get("accessToken", ""),
        refresh_token=answer.get("refreshToken", ""),
        email=user.get("email", address),
    )
    return user, config


def login(
    url: Annotated[str | None, typer.Option(help="Gateway URL (default: HANGAR_URL).")] = None,
    email: Annotated[str | None, typer.Option(help="Your account's email.")] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
    token_stdin: Annotated[
        bool,
        typer.Option("--token-stdin", help="Read a bearer token from stdin and store it as is."),
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Log in and store the tokens in the config file (0600)."""
    config = Config.load()
    with Client(url or "", config=Config()) as client:
        if token_stdin:
            token = _stdin_line("token")
            client.config.access_token = token
            user: dict[str, Any] = client.get("/v1/users/me")
            config = Config(url=client.url, access_token=token, email=user.get("email", ""))
        else:
            address = email or _ask("email", hide=False)
            password = _stdin_line("password") if password_stdin else _ask("password", hide=True)
            answer = client.post(
                "/v1/auth/login", {"email": address, "password": password}, auth=False
            )
            user, config = _signed_in(client, answer, address)
    path = config.save()
    if json_output:
        emit_json({"url": config.url, "user": user, "config": str(path)})
        return
    console.print(f"Logged in to {config.url} as [bold]{config.email}[/bold].")


def signup(
    url: Annotated[str | None, typer.Option(help="Gateway URL (default: HANGAR_URL).")] = None,
    email: Annotated[str | None, typer.Option(help="Your email.")] = None,
    name: Annotated[str, typer.Option(help="Your name.")] = "",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Create an account and log in to it (the tokens stored as `login` stores them)."""
    with Client(url or "", config=Config()) as client:
        address = email or _ask("email", hide=False)
        password = _stdin_line("password") if password_stdin else _ask("password", hide=True)
        answer = client.post(
            "/v1/auth/signup",
            {"email": address, "password": password, "name": name},
            auth=False,
        )
        user, config = _signed_in(client, answer, address)
    path = config.save()
    if json_output:
        emit_json({"url": config.url, "user": user, "config": str(path)})
        return
    console.print(f"Signed up and logged in to {config.url} as [bold]{config.email}[/bold].")


def logout(json_output: JsonOpt = False) -> None:
    """Revoke the stored refresh token and forget the config file."""
    config = Config.load()
    if config.refresh_token:
        with Client(config=config) as client:
            try:
                client.post("/v1/auth/logout", {"refreshToken": config.refresh_token}, auth=False)
            except ApiError as exc:  # an expired session is logged out all the same
                err_console.print(f"note: the server said: {exc.message}")
    Config.forget()
    if json_output:
        emit_json({})
        return
    console.print("Logged out.")


def whoami(json_output: JsonOpt = False) -> None:
    """Show the user the stored (or HANGAR_TOKEN's) credentials act as."""
    with Client() as client:
        if not client.token:
            raise CliError("not logged in: run `hangar login`", 3)
        user = client.get("/v1/users/me")
        if json_output:
            emit_json(user)
            return
        admin = " (platform admin)" if user.get("isPlatformAdmin") else ""
        name = f" ({user['name']})" if user.get("name") else ""
        console.print(f"{user.get('email')}{name}{admin} on {client.url}")
