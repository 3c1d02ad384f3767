"""Typed settings, read once from the environment at process start."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

SERVICES = ("identity", "project", "runtime", "billing")

DEFAULT_PORTS = {
    "identity": 50051,
    "project": 50052,
    "runtime": 50053,
    "billing": 50054,
    "agent": 50060,
    "gateway": 8080,
}


def role_name(service: str) -> str:
    """The PostgreSQL login role of a service: it may touch only its own schema."""
    return f"hangar_{service}"


MIGRATOR_ROLE = "hangar_migrator"


def url_with_credentials(url: str, user: str, password: str) -> str:
    """The same database URL, logging in as another role."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    return urlunsplit((parts.scheme, f"{auth}@{host}", parts.path, parts.query, parts.fragment))


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    """Everything a Hangar process reads from its environment, in one place."""

    service: str
    database_url: str = ""  # the admin URL; services log in with their own role (below)
    db_passwords: dict[str, str] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    grace_seconds: float = 5.0
    call_timeout_seconds: float = 5.0
    service_secrets: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, service: str) -> Settings:
        addresses = {
            name: _env(f"HANGAR_{name.upper()}_ADDR", f"127.0.0.1:{port}")
            for name, port in DEFAULT_PORTS.items()
        }
        return cls(
            service=service,
            database_url=_env("DATABASE_URL"),
            db_passwords={s: _env(f"HANGAR_{s.upper()}_DB_PASSWORD") for s in SERVICES},
            addresses=addresses,
            log_level=_env("HANGAR_LOG_LEVEL", "INFO"),
            grace_seconds=float(_env("HANGAR_GRACE_SECONDS", "5")),
            call_timeout_seconds=float(_env("HANGAR_CALL_TIMEOUT_SECONDS", "5")),
            service_secrets={
                s: _env(f"HANGAR_{s.upper()}_SERVICE_SECRET") for s in (*SERVICES, "agent")
            },
        )

    @property
    def listen_address(self) -> str:
        return self.addresses[self.service]

    def service_database_url(self, service: str | None = None) -> str:
        """The URL a service connects with: its own login role, never the admin one."""
        svc = service or self.service
        return url_with_credentials(
            self.database_url, role_name(svc), self.db_passwords.get(svc, "")
        )
