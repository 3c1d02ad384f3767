"""The Typer app of the user commands, and `run(argv)`, which runs one and turns every
failure into one line on stderr and an exit code (0 ok, 1 other error, 2 invalid input,
3 not authenticated or not allowed, 4 not found, 5 conflict or failed precondition).

The platform commands (`up`, `migrate`, `serve`, `admin`) are argparse's
(hangar_cli.cli.main sends them there before this app sees them); they are listed here so
`hangar --help` shows both kinds.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from hangar_cli.user import auth, deploy, env, orgs, projects, servers, tokens
from hangar_cli.user.client import EXIT_ERROR, EXIT_OK, CliError

PLATFORM_COMMANDS = {
    "up": "Start PostgreSQL, migrate, and run every service (operators).",
    "migrate": "Apply all migrations to DATABASE_URL (operators).",
    "serve": "Run one service in the foreground (operators).",
    "admin": "Platform administration, e.g. `admin promote EMAIL` (operators).",
    "agent": "This machine's agent: `agent join TOKEN` enrols it (operators).",
}
USER_PANEL = "Your apps"
ACCOUNT_PANEL = "Account"
PLATFORM_PANEL = "Platform (run the platform itself; see `hangar up --help`)"

app = typer.Typer(
    name="hangar",
    help="Hangar: deploy and run apps on a Hangar platform (HTTP client of its gateway).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

app.command(rich_help_panel=ACCOUNT_PANEL)(auth.login)
app.command(rich_help_panel=ACCOUNT_PANEL)(auth.signup)
app.command(rich_help_panel=ACCOUNT_PANEL)(auth.logout)
app.command(rich_help_panel=ACCOUNT_PANEL)(auth.whoami)
app.add_typer(orgs.orgs_app, name="orgs", rich_help_panel=ACCOUNT_PANEL)
app.add_typer(orgs.members_app, name="members", rich_help_panel=ACCOUNT_PANEL)
app.add_typer(tokens.tokens_app, name="tokens", rich_help_panel=ACCOUNT_PANEL)
app.add_typer(projects.projects_app, name="projects", rich_help_panel=USER_PANEL)
app.command(rich_help_panel=USER_PANEL)(projects.link)
app.command(rich_help_panel=USER_PANEL)(projects.scale)
app.command(rich_help_panel=USER_PANEL)(deploy.deploy)
app.command(rich_help_panel=USER_PANEL)(deploy.logs)
app.command(rich_help_panel=USER_PANEL)(deploy.releases)
app.command(rich_help_panel=USER_PANEL)(deploy.rollback)
app.command("open", rich_help_panel=USER_PANEL)(deploy.open_app)
app.add_typer(env.env_app, name="env", rich_help_panel=USER_PANEL)
app.add_typer(servers.servers_app, name="servers", rich_help_panel=PLATFORM_PANEL)


def _platform_stub(name: str) -> None:
    def stub(ctx: typer.Context) -> None:
        # Only `hangar --help` shows this: hangar_cli.cli.main runs platform commands with
        # argparse before the user app is reached (importing it here would be a cycle).
        raise CliError(f"`{name}` is a platform command: run `hangar {name}` itself")

    stub.__doc__ = PLATFORM_COMMANDS[name]
    app.command(
        name,
        rich_help_panel=PLATFORM_PANEL,
        context_settings={
            "allow_extra_args": True,
            "ignore_unknown_options": True,
            "help_option_names": [],
        },
        add_help_option=False,
    )(stub)


for _name in PLATFORM_COMMANDS:
    _platform_stub(_name)


def _fail(message: str) -> None:
    sys.stderr.write(f"hangar: {' '.join(message.split())}\n")
    sys.stderr.flush()


def run(argv: Sequence[str]) -> int:
    """Run the user command `argv` (without the program name); its exit code. Errors are
    one line on stderr, never a traceback."""
    args = list(argv) or ["--help"]
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="hangar", standalone_mode=False)
    except CliError as exc:
        _fail(exc.message)
        return exc.exit_code
    except typer.TyperException as exc:  # Typer's (vendored click's) usage errors
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            _fail(exc.format_message())
        if type(exc).__name__ == "NoArgsIsHelpError":  # `hangar env`: its help, not an error
            return EXIT_OK
        return int(exc.exit_code)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as exc:
        _fail(str(exc))
        return EXIT_ERROR
    return int(result) if isinstance(result, int) else EXIT_OK
