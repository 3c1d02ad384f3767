"""Local state is private: `.hangar` 0700, credentials.json 0600, the PostgreSQL data 0700,
whatever the umask, and looser modes left by an older version are tightened."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hangar_cli.cli import load_credentials
from shared import pg


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """A umask of 0 would leave files as open as the code asks: the modes must be explicit."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_fresh_state_directory_and_credentials_are_private(tmp_path: Path) -> None:
    home = tmp_path / "deep" / ".hangar"
    creds = load_credentials(home)
    assert _mode(home) == 0o711  # others pass through (to the agent's images), never list
    assert _mode(home / "credentials.json") == 0o600
    assert json.loads((home / "credentials.json").read_text()) == creds
    assert sorted(p.name for p in home.iterdir()) == ["credentials.json"]  # no temp file left


def test_existing_loose_directory_and_file_are_tightened_without_rewriting(
    tmp_path: Path,
) -> None:
    home = tmp_path / ".hangar"
    creds = load_credentials(home)
    path = home / "credentials.json"
    home.chmod(0o755)
    path.chmod(0o644)
    before = path.stat()

    assert load_credentials(home) == creds
    assert _mode(home) == 0o711
    assert _mode(path) == 0o600
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_incomplete_credentials_are_completed_into_a_private_file(tmp_path: Path) -> None:
    home = tmp_path / ".hangar"
    home.mkdir(mode=0o755)
    path = home / "credentials.json"
    path.write_text(json.dumps({"db_passwords": {"identity": "kept"}}))
    path.chmod(0o644)

    creds = load_credentials(home)
    assert creds["db_passwords"]["identity"] == "kept"
    assert creds["jwt_signing_keys"] and creds["project_master_key_id"]
    assert json.loads(path.read_text()) == creds
    assert (_mode(home), _mode(path)) == (0o711, 0o600)
    assert sorted(p.name for p in home.iterdir()) == ["credentials.json"]


def test_postgres_data_directory_is_created_private(tmp_path: Path) -> None:
    data = tmp_path / "state" / "pgdata"
    pg.private_data_dir(data)
    assert _mode(data) == 0o700


def test_existing_loose_postgres_data_directory_is_tightened(tmp_path: Path) -> None:
    data = tmp_path / "pgdata"
    data.mkdir(mode=0o755)
    (data / "PG_VERSION").write_text("16\n")
    pg.private_data_dir(data)
    assert _mode(data) == 0o700
    assert (data / "PG_VERSION").read_text() == "16\n"


def test_directories_pgserver_opened_keep_only_traversal(tmp_path: Path) -> None:
    # As root, pgserver chmods every directory above the data g+rx,o+rx; afterwards each is put
    # back as it was plus the search bits its "pgserver" user needs to reach the data.
    home, other = tmp_path / "home", tmp_path / "other"
    home.mkdir(mode=0o700)
    other.mkdir(mode=0o750)
    before = {home: 0o700, other: 0o750}
    home.chmod(0o755)  # what pgserver does; `other` it left alone
    pg._restore_traversable(before)
    assert (_mode(home), _mode(other)) == (0o711, 0o750)
