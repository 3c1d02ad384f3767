"""The edge's DNS (where Caddy finds a project's upstreams): SRV for a project, A for its
targets, no AAAA, NXDOMAIN for anything else, nothing for what is not DNS; a table set again
replaces the old one whole."""

from __future__ import annotations

from dnslib import QTYPE, RCODE, DNSRecord

from services.edge.caddy import Route
from services.edge.dns import UpstreamDns, host_name, srv_name


async def _dns(*routes: Route) -> UpstreamDns:
    dns = UpstreamDns()
    await dns.set_routes(routes)
    return dns


def ask(dns: UpstreamDns, name: str, kind: str) -> DNSRecord:
    return dns.answer(DNSRecord.question(name, kind))


async def test_a_project_s_upstreams_are_srv_records_with_resolvable_targets() -> None:
    dns = await _dns(
        Route(
            project_id="P1",
            hostnames=["web-ada.localhost"],
            upstreams=["10.0.0.1:4001", "10.0.0.2:4002", "10.0.0.1:4001"],
        ),
        Route(project_id="p2", hostnames=["down-ada.localhost"]),
    )
    answer = ask(dns, srv_name("p1"), "SRV")
    records = sorted((str(r.rdata.target), r.rdata.port) for r in answer.rr)
    assert records == [
        (host_name("10.0.0.1") + ".", 4001),
        (host_name("10.0.0.2") + ".", 4002),
    ]
    assert all(r.ttl == 0 for r in answer.rr)
    a = ask(dns, host_name("10.0.0.2"), "A")
    assert [str(r.rdata) for r in a.rr] == ["10.0.0.2"]
    aaaa = ask(dns, host_name("10.0.0.2"), "AAAA")
    assert aaaa.header.rcode == RCODE.NOERROR and not aaaa.rr
    assert ask(dns, srv_name("p2"), "SRV").header.rcode == RCODE.NXDOMAIN  # nothing serves
    assert ask(dns, "example.com", "A").header.rcode == RCODE.NXDOMAIN


async def test_a_new_table_replaces_the_old_one() -> None:
    dns = await _dns(Route(project_id="p1", upstreams=["10.0.0.1:4001"]))
    await dns.set_routes([Route(project_id="p1", upstreams=["10.0.0.3:5000"])])
    (record,) = ask(dns, srv_name("p1"), "SRV").rr
    assert (str(record.rdata.target), record.rdata.port) == (host_name("10.0.0.3") + ".", 5000)
    assert ask(dns, host_name("10.0.0.1"), "A").header.rcode == RCODE.NXDOMAIN


async def test_over_udp_and_garbage_gets_no_answer() -> None:
    import asyncio
    import socket

    dns = await _dns(Route(project_id="p1", upstreams=["127.0.0.1:4001"]))
    address = await dns.start()
    host, _, port = address.removeprefix("udp/").rpartition(":")
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((host, int(port)))
        await loop.sock_sendall(sock, b"not dns")
        await loop.sock_sendall(sock, DNSRecord.question(srv_name("p1"), "SRV").pack())
        reply = DNSRecord.parse(await asyncio.wait_for(loop.sock_recv(sock, 4096), 30))
    dns.close()
    assert QTYPE[reply.q.qtype] == "SRV" and reply.rr[0].rdata.port == 4001
