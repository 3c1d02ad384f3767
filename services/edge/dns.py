"""The edge's own DNS server: how Caddy finds what serves a project without a reload.

Caddy's config names no container. A project's route proxies to the upstreams of an SRV
lookup, `<project id>.routes.hangar.internal`, asked of this server on loopback (Caddy's
`dynamic_upstreams`, refreshed every SRV_REFRESH); each SRV target is a name of this zone
(`h-10-0-0-7.hosts.hangar.internal` for 10.0.0.7) that this server also answers, for the
dial. So a deploy, a rollback or a failover changes this table only: Caddy keeps its config
and its connections (a config load closes every client's idle keep-alive connection, and
would on every tenant's deploy). Caddy's config changes only when a name is added or
removed, or a project starts or stops being served (its 503 page).

Answers: SRV and A for those names (AAAA: none, NOERROR; TXT on a project's name: what the
edge knows of it, `state=awake|asleep|wake-failed`), NXDOMAIN for anything else; TTL 0
(Caddy keeps a lookup SRV_REFRESH, and on a failed lookup the previous answer for a grace).
Messages are parsed and built by dnslib.

A sleeping project (a route whose serving containers are all asleep) is answered with one
SRV target, HOLD, whose address lookup fails: Caddy's dial fails and it tries again every
try_interval, looking the SRV name up again each SRV_REFRESH, until the project's containers
are listed awake (or its hold ends). Never an empty or failed SRV answer: Caddy would keep its
previous answer for the whole grace period without asking again. An SRV query for a route
with sleeping containers is a request waiting for them: the `Waker` is told (it asks runtime
to wake them, once for a burst). While the project's last wake failed, the target is
WAKE_FAILED instead: the edge's loopback page server, which answers 503 with the reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence
from typing import Protocol, cast

from dnslib import QTYPE, RCODE, RR, SRV, TXT, A, DNSError, DNSRecord

from hangar.runtime.v1 import runtime_pb2

log = logging.getLogger("hangar.edge.dns")

ZONE = "hangar.internal"
ROUTES = f"routes.{ZONE}"
HOSTS = f"hosts.{ZONE}"
_COUNTED_TYPES = frozenset({"SRV", "A", "AAAA"})
# A sleeping project's target: a name of the zone with no address (so Caddy's dial fails
# and is tried again), and the page server's name for a project whose wake failed.
HOLD = f"asleep.{HOSTS}"
WAKE_FAILED = f"wake-failed.{HOSTS}"
_HOLD_PORT = 9  # any: the dial never gets that far
_LOOPBACK = "127.0.0.1"


class Waker(Protocol):
    """What the DNS tells of sleeping projects (wake.RouteWaker)."""

    def wanted(self, project_id: str) -> None:
        """A request waits for this project's sleeping containers."""
        ...

    def failure(self, project_id: str) -> str | None:
        """Why its last wake failed, while that still holds its requests' answer."""
        ...

    def table_applied(self) -> None:
        """A new table is in use (what earlier wakes woke is listed in it)."""
        ...


def srv_name(project_id: str) -> str:
    """The SRV name of a project's upstreams."""
    return f"{project_id.lower()}.{ROUTES}"


def host_name(ip: str) -> str:
    """The name this server gives an upstream's IPv4 address."""
    return f"h-{ip.replace('.', '-')}.{HOSTS}"


class UpstreamDns(asyncio.DatagramProtocol):
    """The table (project -> [(target, port)]) and the UDP server answering from it."""

    def __init__(self, waker: Waker | None = None, pages_port: int = 0) -> None:
        self._srv: dict[str, list[tuple[str, int]]] = {}
        self._hosts: dict[str, str] = {}
        # SRV name -> project id of routes with sleeping containers; all of them asleep.
        self._sleeping: dict[str, str] = {}
        self._asleep: set[str] = set()
        self.waker = waker
        self.pages_port = pages_port  # the page server a failed wake's requests go to
        self._transport: asyncio.DatagramTransport | None = None
        self.address = ""  # "udp/127.0.0.1:PORT", as Caddy's resolver wants it
        # Queries answered, by (type: SRV, A, AAAA or other; response code), for metrics.
        self.answered: dict[tuple[str, str], int] = {}

    async def start(self, host: str = "127.0.0.1") -> str:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, 0))
        self._transport = transport
        self.address = f"udp/{host}:{transport.get_extra_info('sockname')[1]}"
        return self.address

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def set_routes(self, routes: Sequence[runtime_pb2.Route]) -> None:
        """The table from runtime's routes; upstreams named by host name are resolved here
        (runtime's agents usually advertise addresses)."""
        srv: dict[str, list[tuple[str, int]]] = {}
        hosts: dict[str, str] = {}
        sleeping: dict[str, str] = {}
        asleep: set[str] = set()
        for route in routes:
            if any(route.sleeping_upstreams):
                sleeping[srv_name(route.project_id)] = route.project_id
                if not any(route.upstreams):
                    asleep.add(srv_name(route.project_id))
                    continue
            targets = []
            for upstream in dict.fromkeys(route.upstreams):
                host, _, port = upstream.rpartition(":")
                ip = await _ipv4(host.strip("[]"))
                if ip is None or not port.isdigit():
                    log.warning("upstream not reachable over IPv4", extra={"upstream": upstream})
                    continue
                hosts[host_name(ip)] = ip
                targets.append((host_name(ip), int(port)))
            if targets:
                srv[srv_name(route.project_id)] = targets
        self._srv, self._hosts = srv, hosts
        self._sleeping, self._asleep = sleeping, asleep
        if self.waker is not None:
            self.waker.table_applied()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = DNSRecord.parse(data)
        except DNSError:
            return  # not DNS: nothing to answer
        if self._transport is not None:
            reply = self.answer(query)
            self._transport.sendto(reply.pack(), addr)
            kind = QTYPE.get(query.q.qtype, "other")
            key = (kind if kind in _COUNTED_TYPES else "other", RCODE.get(reply.header.rcode))
            self.answered[key] = self.answered.get(key, 0) + 1

    def answer(self, query: DNSRecord) -> DNSRecord:
        reply = query.reply()
        name = str(query.q.qname).rstrip(".").lower()
        kind = QTYPE[query.q.qtype]
        if kind == "SRV" and name in self._sleeping and self.waker is not None:
            self.waker.wanted(self._sleeping[name])
        if kind == "TXT" and (name in self._asleep or name in self._srv):
            reply.add_answer(RR(query.q.qname, QTYPE.TXT, ttl=0, rdata=TXT(self.state(name))))
        elif name in self._asleep:
            if kind == "SRV":
                target, port = self._asleep_target(self._sleeping[name])
                reply.add_answer(
                    RR(query.q.qname, QTYPE.SRV, ttl=0, rdata=SRV(10, 10, port, f"{target}."))
                )
        elif name in self._srv:
            if kind == "SRV":
                for target, port in self._srv[name]:
                    reply.add_answer(
                        RR(query.q.qname, QTYPE.SRV, ttl=0, rdata=SRV(10, 10, port, f"{target}."))
                    )
        elif name in self._hosts:
            if kind == "A":
                reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=0, rdata=A(self._hosts[name])))
        elif name == WAKE_FAILED and self.pages_port:
            if kind == "A":
                reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=0, rdata=A(_LOOPBACK)))
        else:
            reply.header.rcode = RCODE.NXDOMAIN  # HOLD too: its dial fails, and is tried again
        return reply

    def state(self, name: str) -> str:
        """What the edge knows of a project (a TXT answer, for operators and tests; asking
        wakes nothing): awake, asleep (its requests held), or wake-failed."""
        if name not in self._asleep:
            return "state=awake"
        target, _ = self._asleep_target(self._sleeping[name])
        return "state=wake-failed" if target == WAKE_FAILED else "state=asleep"

    def _asleep_target(self, project_id: str) -> tuple[str, int]:
        failed = self.waker is not None and self.waker.failure(project_id) is not None
        if failed and self.pages_port:
            return WAKE_FAILED, self.pages_port
        return HOLD, _HOLD_PORT


async def _ipv4(host: str) -> str | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET)
        except OSError:
            return None
        return str(found[0][4][0]) if found else None
    return str(address) if address.version == 4 else None
