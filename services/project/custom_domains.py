"""Projects' custom domains: added pending, verified by an HTTP check, then routed.

A domain is verified when `GET http://<hostname>/.well-known/hangar-domain/<token>` answers
the token. Nothing but this platform's edge answers it: runtime hands the edge each pending
domain's token (project.domains_changed -> ListRoutes' challenges), so the check proves the
name reaches this platform's edge, as an ACME HTTP-01 challenge does. The check connects to
the name's public addresses only (never a private, loopback or link-local one: the project
service must not be a way into the platform's network), or to HANGAR_DOMAIN_CHECK_ADDRESS
when the operator names one; it follows no redirect, reads at most a few bytes, and has the
call deadline.

Every change writes project.domains_changed (payload: the verified names, and each pending
one's token) in its transaction; runtime keeps them with the project's route.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
import socket
from dataclasses import dataclass
from typing import Protocol

import httpx

from services.project import store
from services.project.domain import Project
from shared.db import Database, Session
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from shared.outbox import write_event

PERM_LIST = "domains.list"
PERM_MANAGE = "domains.manage"
CHALLENGE_PATH = "/.well-known/hangar-domain/"
MAX_DOMAINS = 20  # per project
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Names that are never someone's public domain (RFC 6761, 6762, 7686, 8375; ICANN's .internal).
RESERVED_TLDS = frozenset(
    {"localhost", "local", "internal", "invalid", "test", "example", "onion", "arpa", "home"}
)


def check_hostname(raw: str, apps_domain: str, field: str = "domain.hostname") -> str:
    """The hostname, normalized; INVALID_ARGUMENT naming `field` and the rule it breaks."""
    name = raw.strip().rstrip(".").lower()
    labels = name.split(".")
    if not name or len(name) > 253 or len(labels) < 2:
        raise InvalidArgument.field(field, "a domain name of 2 labels or more, at most 253")
    if not all(_LABEL.match(label) for label in labels):
        raise InvalidArgument.field(
            field, "labels of letters, digits and '-' (not first or last), at most 63 each"
        )
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise InvalidArgument.field(field, "a domain name, not an IP address")
    if labels[-1] in RESERVED_TLDS or labels[-1].isdigit():
        raise InvalidArgument.field(field, f"'.{labels[-1]}' is never a public domain")
    if name == apps_domain or name.endswith(f".{apps_domain}"):
        raise InvalidArgument.field(
            field, f"names under {apps_domain} are the platform's (each project has one)"
        )
    return name


@dataclass(frozen=True)
class DomainView:
    hostname: str
    token: str
    verified: bool
    stored: store.StoredDomain


class DomainCheck(Protocol):
    async def answers(self, hostname: str, path: str, token: str) -> str:
        """ "" when http://<hostname><path> answered `token`; else what happened."""
        ...


class HttpDomainCheck:
    """The check over HTTP (see the module's docstring)."""

    def __init__(self, connect_to: str = "", timeout: float = 5.0) -> None:
        self.connect_to = connect_to
        self.timeout = timeout

    async def answers(self, hostname: str, path: str, token: str) -> str:
        if self.connect_to:
            target = self.connect_to
        else:
            try:
                address = await asyncio.wait_for(_public_address(hostname), self.timeout)
            except TimeoutError:
                return f"{hostname} did not resolve within {self.timeout:g} s"
            if address is None:
                return f"{hostname} has no public IPv4 address"
            target = f"{address}:80"
        try:
            async with httpx.AsyncClient(timeout=self.timeout, trust_env=False) as client:
                reply = await client.get(
                    f"http://{target}{path}", headers={"Host": hostname}, follow_redirects=False
                )
        except httpx.HTTPError as exc:
            return f"http://{hostname}{path} did not answer ({type(exc).__name__})"
        if reply.status_code != 200:
            return f"http://{hostname}{path} answered {reply.status_code}"
        if reply.content[:256].strip() != token.encode():
            return f"http://{hostname}{path} answered something else than the token"
        return ""


async def _public_address(hostname: str) -> str | None:
    try:
        found = await asyncio.get_running_loop().getaddrinfo(
            hostname, 80, family=socket.AF_INET, type=socket.SOCK_STREAM
        )
    except OSError:
        return None
    for *_, sockaddr in found:
        address = ipaddress.ip_address(sockaddr[0])
        if address.is_global:
            return str(address)
    return None


class Domains:
    """The domain use cases (authorization is the caller's: see Projects.domains_of)."""

    def __init__(self, db: Database, check: DomainCheck, apps_domain: str) -> None:
        self.db = db
        self.check = check
        self.apps_domain = apps_domain

    async def add(self, project: Project, raw_hostname: str) -> DomainView:
        hostname = check_hostname(raw_hostname, self.apps_domain)
        async with self.db.transaction() as tx:
            await store.lock_project(tx, project.id)
            if len(await store.project_domains(tx, project.id)) >= MAX_DOMAINS:
                raise FailedPrecondition(f"a project has at most {MAX_DOMAINS} custom domains")
            added = await store.insert_domain(tx, project.id, hostname, secrets.token_hex(16))
            if added is None:
                raise AlreadyExists(
                    f"{hostname} is already a domain of a project",
                    metadata={"field": "domain.hostname"},
                )
            await domains_changed(tx, project)
        return view(added)

    async def list(self, project: Project) -> list[DomainView]:
        async with self.db.session() as s:
            return [view(d) for d in await store.project_domains(s, project.id)]

    async def verify(self, project: Project, raw_hostname: str) -> DomainView:
        hostname = check_hostname(raw_hostname, self.apps_domain, "hostname")
        async with self.db.session() as s:
            found = await store.get_domain(s, project.id, hostname)
        if found is None:
            raise NotFound(f"{hostname} is not a domain of this project")
        if found.verified_at is not None:
            return view(found)
        outcome = await self.check.answers(hostname, CHALLENGE_PATH + found.token, found.token)
        if outcome:
            raise FailedPrecondition(
                f"{hostname} is not verified: {outcome}. Point the name at the edge (a CNAME "
                "to the project's hostname, or an A record to the edge's address) and try again"
            )
        async with self.db.transaction() as tx:
            await store.lock_project(tx, project.id)
            verified = await store.set_domain_verified(tx, project.id, hostname)
            if verified is None:
                raise NotFound(f"{hostname} is not a domain of this project")
            await domains_changed(tx, project)
        return view(verified)

    async def remove(self, project: Project, raw_hostname: str) -> None:
        hostname = check_hostname(raw_hostname, self.apps_domain, "hostname")
        async with self.db.transaction() as tx:
            await store.lock_project(tx, project.id)
            if not await store.delete_domain(tx, project.id, hostname):
                raise NotFound(f"{hostname} is not a domain of this project")
            await domains_changed(tx, project)


def view(stored: store.StoredDomain) -> DomainView:
    return DomainView(stored.hostname, stored.token, stored.verified_at is not None, stored)


async def domains_changed(tx: Session, project: Project) -> None:
    """project.domains_changed: the project's verified names and pending challenges, whole."""
    current = await store.project_domains(tx, project.id)
    await write_event(
        tx,
        store.SCHEMA,
        "project.domains_changed",
        organization_id=project.organization_id,
        aggregate_id=project.id,
        payload={
            "domains": [d.hostname for d in current if d.verified_at is not None],
            "challenges": [
                {"hostname": d.hostname, "token": d.token} for d in current if d.verified_at is None
            ],
        },
    )
