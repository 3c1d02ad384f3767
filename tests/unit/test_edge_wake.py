"""The edge's answers for sleeping projects (dns.py) and its waker's debounce (wake.py):
an asleep project's SRV answer is the HOLD target, whose address never resolves (Caddy's
dial fails and is tried again), and asking it tells the waker; a failed wake points the
project at the page server; the waker calls once per project while a call is in flight or
has succeeded and no table was read since, and not again while a failure's page holds."""

from __future__ import annotations

import asyncio

from dnslib import RCODE, DNSRecord

from services.edge.caddy import Route
from services.edge.dns import HOLD, WAKE_FAILED, UpstreamDns, host_name, srv_name
from services.edge.wake import RouteWaker, WakePages


class Told:
    """What the DNS tells a waker, and what it answers (a failure or none)."""

    def __init__(self) -> None:
        self.wanted_for: list[str] = []
        self.failed: dict[str, str] = {}

    def wanted(self, project_id: str) -> None:
        self.wanted_for.append(project_id)

    def failure(self, project_id: str) -> str | None:
        return self.failed.get(project_id)

    def table_applied(self) -> None:
        pass


def ask(dns: UpstreamDns, name: str, kind: str) -> DNSRecord:
    return dns.answer(DNSRecord.question(name, kind))


def asleep(project_id: str, *sleeping: str, awake: tuple[str, ...] = ()) -> Route:
    return Route(
        project_id=project_id,
        upstreams=list(awake),
        sleeping_upstreams=list(sleeping),
        sleep_enabled=True,
    )


async def test_an_asleep_project_is_held_and_asking_for_it_wants_a_wake() -> None:
    told = Told()
    dns = UpstreamDns(told, pages_port=4321)
    await dns.set_routes([asleep("p1", "10.0.0.1:4001")])

    (record,) = ask(dns, srv_name("p1"), "SRV").rr
    assert (str(record.rdata.target), record.ttl) == (HOLD + ".", 0)
    assert ask(dns, HOLD, "A").header.rcode == RCODE.NXDOMAIN  # the dial fails, is retried
    assert ask(dns, host_name("10.0.0.1"), "A").header.rcode == RCODE.NXDOMAIN  # not listed
    assert told.wanted_for == ["p1"]
    # Neither the state (TXT) nor an address lookup asks for a wake.
    assert [str(r.rdata) for r in ask(dns, srv_name("p1"), "TXT").rr] == ['"state=asleep"']
    ask(dns, srv_name("p1"), "A")
    assert told.wanted_for == ["p1"]


async def test_a_failed_wake_points_the_project_at_the_page_server() -> None:
    told = Told()
    dns = UpstreamDns(told, pages_port=4321)
    await dns.set_routes([asleep("p1", "10.0.0.1:4001")])
    told.failed["p1"] = "it did not wake in time"

    (record,) = ask(dns, srv_name("p1"), "SRV").rr
    assert (str(record.rdata.target), record.rdata.port) == (WAKE_FAILED + ".", 4321)
    assert [str(r.rdata) for r in ask(dns, WAKE_FAILED, "A").rr] == ["127.0.0.1"]
    assert [str(r.rdata) for r in ask(dns, srv_name("p1"), "TXT").rr] == ['"state=wake-failed"']


async def test_a_partly_asleep_project_is_served_by_its_awake_containers_and_wakes_the_rest() -> (
    None
):
    told = Told()
    dns = UpstreamDns(told)
    await dns.set_routes([asleep("p1", "10.0.0.2:4002", awake=("10.0.0.1:4001",))])

    records = ask(dns, srv_name("p1"), "SRV").rr
    assert [(str(r.rdata.target), r.rdata.port) for r in records] == [
        (host_name("10.0.0.1") + ".", 4001)
    ]
    assert told.wanted_for == ["p1"]
    assert [str(r.rdata) for r in ask(dns, srv_name("p1"), "TXT").rr] == ['"state=awake"']


async def test_an_awake_project_wants_no_wake() -> None:
    told = Told()
    dns = UpstreamDns(told)
    await dns.set_routes([Route(project_id="p1", upstreams=["10.0.0.1:4001"], sleep_enabled=True)])
    ask(dns, srv_name("p1"), "SRV")
    assert told.wanted_for == []


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_the_waker_calls_once_while_a_wake_is_under_way_or_just_done() -> None:
    calls: list[str] = []
    release = asyncio.Event()

    async def wake(project_id: str) -> None:
        calls.append(project_id)
        await release.wait()

    done = asyncio.Event()
    clock = Clock()
    waker = RouteWaker(wake, on_done=done.set, quiet_seconds=2, clock=clock)
    for _ in range(5):
        waker.wanted("p1")
    waker.wanted("p2")
    await asyncio.sleep(0)
    assert calls == ["p1", "p2"]
    release.set()
    await asyncio.wait_for(done.wait(), 10)
    await waker.close()

    waker.wanted("p1")  # just woken: the table's re-read will list it awake
    assert waker.asked == 2
    clock.now += 3
    waker.wanted("p1")  # still asked for after the quiet time: asked again
    assert waker.asked == 3
    release.clear()
    done.clear()
    release.set()
    await asyncio.wait_for(done.wait(), 10)
    waker.wanted("p1")
    assert waker.asked == 3
    waker.table_applied()  # a table read since lists it asleep again: asleep again
    waker.wanted("p1")
    assert waker.asked == 4
    await waker.close()


async def test_a_failed_wake_holds_its_reason_then_a_request_tries_again() -> None:
    async def wake(project_id: str) -> None:
        raise RuntimeError("the app could not be woken: exit 3")

    done = asyncio.Event()
    clock = Clock()
    waker = RouteWaker(wake, on_done=done.set, failed_seconds=5, clock=clock)
    waker.wanted("p1")
    await asyncio.wait_for(done.wait(), 10)

    assert waker.failure("p1") == "the app could not be woken: exit 3"
    waker.wanted("p1")
    assert (waker.asked, waker.failed) == (1, 1)  # its page answers meanwhile
    pages = WakePages(lambda host: waker.failure("p1") if host == "a.localhost" else None)
    page = pages.page("a.localhost").decode()
    assert page.startswith("HTTP/1.1 503 ") and "exit 3" in page
    clock.now += 5
    assert waker.failure("p1") is None
    waker.wanted("p1")
    assert waker.asked == 2
    await waker.close()
