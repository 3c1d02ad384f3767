"""The edge's own DNS server: how Caddy finds what serves a project without a reload.

Caddy's config names no container. A project's route proxies to the upstreams of an SRV
lookup, `<project id>.routes.hangar.internal`, asked of this server on loopback (Caddy's
`dynamic_upstreams`, refreshed every SRV_REFRESH); each SRV target is a name of this zone
(`h-10-0-0-7.hosts.hangar.internal` for 10.0.0.7) that this server also answers, for the
dial. So a deploy, a rollback or a failover changes this table only: Caddy keeps its config
and its connections (a config load closes every client's idle keep-alive connection, and
would on every tenant's deploy). Caddy's config changes only when a name is added or
removed, or a project starts or stops being served (its 503 page).

Answers: SRV and A for those names (AAAA: none, NOERROR), NXDOMAIN for anything else; TTL 0
(Caddy keeps a lookup SRV_REFRESH, and on a failed lookup the previous answer for a grace).
Messages are parsed and built by dnslib.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence
from typing import cast

from dnslib import QTYPE, RCODE, RR, SRV, A, DNSError, DNSRecord

from hangar.runtime.v1 import runtime_pb2

log = logging.getLogger("hangar.edge.dns")

ZONE = "hangar.internal"
ROUTES = f"routes.{ZONE}"
HOSTS = f"hosts.{ZONE}"
_COUNTED_TYPES = frozenset({"SRV", "A", "AAAA"})


def srv_name(project_id: str) -> str:
    """The SRV name of a project's upstreams."""
    return f"{project_id.lower()}.{ROUTES}"


def host_name(ip: str) -> str:
    """The name this server gives an upstream's IPv4 address."""
    return f"h-{ip.replace('.', '-')}.{HOSTS}"


class UpstreamDns(asyncio.DatagramProtocol):
    """The table (project -> [(target, port)]) and the UDP server answering from it."""

    def __init__(self) -> None:
        self._srv: dict[str, list[tuple[str, int]]] = {}
        self._hosts: dict[str, str] = {}
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
        for route in routes:
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
        if name in self._srv:
            if kind == "SRV":
                for target, port in self._srv[name]:
                    reply.add_answer(
                        RR(query.q.qname, QTYPE.SRV, ttl=0, rdata=SRV(10, 10, port, f"{target}."))
                    )
        elif name in self._hosts:
            if kind == "A":
                reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=0, rdata=A(self._hosts[name])))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


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
