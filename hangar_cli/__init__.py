"""The `hangar` command line (`hangar_cli.cli`); `python -m hangar_cli` runs it too."""
