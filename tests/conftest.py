"""Test fixtures: a real, throw-away PostgreSQL for the whole session.

DATABASE_URL if set; else testcontainers when a Docker engine answers; else embedded pgserver.
Each test module that needs isolation asks `create_database` for a fresh database.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.pg import Postgres, provision
from shared.pg import create_database as _create_database
from shared.settings import SERVICES


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    # Not under pytest's tmp_path: pytest prunes all but its three newest base directories,
    # so a second pytest run starting meanwhile could delete a live data directory.
    data_dir = Path(tempfile.mkdtemp(prefix="hangar-test-pg-"))
    pg = provision(data_dir / "data", ephemeral=True)
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def db_passwords() -> dict[str, str]:
    """Fresh passwords for the service roles, so a shared server never accepts stale ones."""
    return {svc: secrets.token_urlsafe(16) for svc in SERVICES}


@pytest.fixture(scope="session")
def create_database(postgres: Postgres) -> Callable[[str], str]:
    """Make an empty database with a unique name; returns its admin URL."""

    def make(prefix: str = "hangar_test") -> str:
        name = f"{prefix}_{secrets.token_hex(4)}"
        return asyncio.run(_create_database(postgres.url, name))

    return make


@pytest.fixture(scope="session")
def database_url(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    """The admin URL of a database migrated to head, shared by the session's tests."""
    from shared.migrate import migrate

    url = create_database("hangar_test")
    migrate(url, db_passwords)
    return url
