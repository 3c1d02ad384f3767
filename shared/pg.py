"""Where PostgreSQL comes from: DATABASE_URL, else Docker (tests), else embedded pgserver."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL could be reached or started."""


@dataclass
class Postgres:
    """A running PostgreSQL and how to stop it (a no-op for one we did not start)."""

    url: str
    kind: str  # "external" | "docker" | "embedded"
    _stop: Callable[[], None] | None = None

    def stop(self) -> None:
        if self._stop is not None:
            stop, self._stop = self._stop, None
            stop()


def docker_engine_answers(timeout: float = 1.0) -> bool:
    """True only if a Docker engine answers a ping: the client alone is not enough."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            path = host.removeprefix("unix://")
            if not Path(path).exists():
                return False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(path)
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                return b"200 OK" in s.recv(256)
        if host.startswith("tcp://"):
            hostport = host.removeprefix("tcp://")
            name, _, port = hostport.partition(":")
            with socket.create_connection((name, int(port or 2375)), timeout=timeout) as s:
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                return b"200 OK" in s.recv(256)
    except OSError:
        return False
    return False


def start_embedded(data_dir: Path, *, delete_on_stop: bool) -> Postgres:
    """An embedded PostgreSQL (pgserver's own binaries), reachable over a unix socket."""
    try:
        from pgserver import postgres_server
    except ImportError as exc:  # pragma: no cover - pgserver is a dependency
        raise PostgresUnavailable("the pgserver package is not installed") from exc
    try:
        private_data_dir(data_dir)
    except OSError as exc:
        raise PostgresUnavailable(f"cannot make {data_dir} a private directory: {exc}") from exc
    # As root, pgserver runs PostgreSQL as its own "pgserver" user and opens every directory
    # above the data to g+rx,o+rx so that user can reach it; it only needs to traverse them.
    ancestors = _modes(data_dir.resolve().parents) if os.geteuid() == 0 else {}
    try:
        server = postgres_server.get_server(
            data_dir, cleanup_mode="delete" if delete_on_stop else "stop"
        )
    except Exception as exc:
        raise PostgresUnavailable(
            f"embedded PostgreSQL did not start in {data_dir}: {exc}"
        ) from exc
    finally:
        _restore_traversable(ancestors)
    return Postgres(url=server.get_uri(), kind="embedded", _stop=server.cleanup)


def private_data_dir(data_dir: Path) -> None:
    """The data directory, created 0700 (an existing looser one is tightened): the database's
    files are nobody else's business (PostgreSQL itself accepts only 0700 or 0750)."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(mode=0o700, exist_ok=True)
    if data_dir.stat().st_mode & 0o077:
        data_dir.chmod(0o700)


def _modes(paths: Iterable[Path]) -> dict[Path, int]:
    modes = {}
    for path in paths:
        with contextlib.suppress(OSError):
            modes[path] = stat.S_IMODE(path.stat().st_mode)
    return modes


def _restore_traversable(before: dict[Path, int]) -> None:
    """Put back each directory's mode as it was, plus only the search (x) bits for group and
    others that the pgserver user needs to reach the data."""
    for path, mode in before.items():
        with contextlib.suppress(OSError):
            if stat.S_IMODE(path.stat().st_mode) != mode:
                path.chmod(mode | 0o011)


def start_docker() -> Postgres:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:16-alpine", driver=None)
    container.start()
    return Postgres(url=container.get_connection_url(), kind="docker", _stop=container.stop)


def provision(data_dir: Path, *, ephemeral: bool) -> Postgres:
    """DATABASE_URL if set; else (for throw-away databases) Docker; else embedded pgserver."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return Postgres(url=url, kind="external")
    if ephemeral and docker_engine_answers():
        log.info("starting PostgreSQL in Docker (testcontainers)")
        return start_docker()
    return start_embedded(data_dir, delete_on_stop=ephemeral)


def with_database(url: str, database: str) -> str:
    """The same server and credentials, another database."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def create_database(admin_url: str, database: str) -> str:
    """Create an empty database (if missing) and return its admin URL."""
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    return with_database(admin_url, database)
