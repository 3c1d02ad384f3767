"""The user half of the `hangar` command: an HTTP client of the gateway (Typer + rich).

`hangar_cli.user.app.run(argv)` runs one user command (login, projects, deploy, logs, ...);
`hangar_cli.cli.main` sends every argv that does not start with a platform command here.
"""
