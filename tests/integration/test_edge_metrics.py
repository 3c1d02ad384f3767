"""The edge's GET /metrics with a real Caddy: route applies counted exactly (and whether
Caddy's config was loaded), the table's size, the uploaded certificates loaded and near their
end, the `ask` answers, the DNS lookups Caddy made, a failed read of the table, and Caddy's
own HTTP metrics through the same port, without per-host or per-upstream labels."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from services.edge.caddy import Route
from services.edge.certificates import StaticCertificates
from services.edge.controller import StaticRoutes
from shared.metrics import Metrics, MetricsServer, serve_metrics
from tests.integration.test_edge_caddy import DEADLINE, HOST, App, Edge, running_edge
from tests.integration.test_edge_certificates import CUSTOM, uploaded
from tests.support.certificates import TestCA
from tests.support.metrics import Samples, delta, scrape, value

APPLIES = "edge_route_applies_total"


class FlakyRoutes(StaticRoutes):
    """A table whose reads fail while `failing` (runtime away)."""

    failing = False

    async def fetch(self) -> list[Route]:
        if self.failing:
            raise ConnectionError("runtime is away (test)")
        return await super().fetch()


def project(*upstreams: str) -> Route:
    return Route(project_id="p-web", hostnames=[HOST, CUSTOM], upstreams=list(upstreams))


@pytest.fixture
async def two_apps() -> AsyncIterator[tuple[App, App]]:
    a, b = await App("a").start(), await App("b").start()
    yield a, b
    for app in (a, b):
        await app.close()


@pytest.fixture
async def metrics_server() -> AsyncIterator[MetricsServer]:
    server = await serve_metrics(Metrics(), "127.0.0.1:0")
    yield server
    await server.close()


async def until_scraped(port: int, ready: Callable[[Samples], bool], what: str) -> Samples:
    """Scrapes (bounded) until `ready` holds: Caddy's families come from its admin API at
    each scrape, and a request's count lands once Caddy has answered it."""
    deadline = time.monotonic() + DEADLINE
    while True:
        samples = await scrape(port)
        if ready(samples):
            return samples
        assert time.monotonic() < deadline, f"never scraped: {what}"
        await asyncio.sleep(0.05)


async def test_the_edge_counts_its_applies_and_serves_caddys_http_metrics(
    two_apps: tuple[App, App], metrics_server: MetricsServer
) -> None:
    a, b = two_apps
    leaf = TestCA().leaf(CUSTOM, not_after=datetime.now(UTC) + timedelta(days=10))
    source = FlakyRoutes()
    certificates = StaticCertificates([uploaded(leaf)])
    port = metrics_server.port
    running = running_edge(
        source, certificates, metrics=metrics_server.metrics, resync_seconds=3600
    )
    client = httpx.AsyncClient(trust_env=False, timeout=DEADLINE)
    async with client, running as (controller, caddy, http, https_port):
        edge = Edge(source, controller, caddy, http, https_port)
        before = await scrape(port)
        assert value(before, "edge_route_table_projects") == 0

        await edge.set_routes(project(a.address))  # a name added: Caddy's config loads
        added = await scrape(port)
        assert delta(added, before, APPLIES, reloaded="true") == 1
        assert delta(added, before, APPLIES, reloaded="false") == 0
        assert delta(added, before, "edge_route_apply_seconds_count") == 1
        assert value(added, "edge_route_table_projects") == 1
        assert value(added, "edge_route_table_hostnames") == 2
        assert value(added, "edge_certificates_loaded") == 1
        assert value(added, "edge_certificates_expiring") == 1  # 10 days left

        reply = await client.get(f"{http}/", headers={"Host": HOST})
        assert reply.status_code == 200 and reply.json()["app"] == "a"
        proxied = {"server": "hangar_http", "handler": "reverse_proxy"}
        served = await until_scraped(
            port, lambda s: value(s, "caddy_http_requests_total", **proxied) >= 1, "caddy's count"
        )
        assert value(served, "edge_dns_queries_total", qtype="SRV", rcode="NOERROR") >= 1
        assert value(served, "edge_dns_queries_total", qtype="A", rcode="NOERROR") >= 1
        for name, labels in served:
            assert not {"host", "upstream"} & {k for k, _ in labels}, name
            assert not name.startswith(("go_", "process_")), name

        await edge.set_routes(project(b.address))  # a deploy: the DNS only, no config load
        moved = await scrape(port)
        assert delta(moved, added, APPLIES, reloaded="false") == 1
        assert delta(moved, added, APPLIES, reloaded="true") == 0
        assert caddy.loads == 1  # the one load above

        ask = controller.edge.ask_url
        assert (await client.get(ask, params={"domain": HOST})).status_code == 200
        assert (await client.get(ask, params={"domain": "evil.example"})).status_code == 403
        asked = await scrape(port)
        for answer in ("allowed", "refused"):
            assert delta(asked, moved, "edge_tls_ask_total", answer=answer) == 1, answer

        source.failing = True
        source.set([project(b.address)])
        await until_scraped(
            port,
            lambda s: value(s, "edge_route_read_failures_total", source="routes") >= 1,
            "a failed read of the table",
        )
        assert value(await scrape(port), "edge_route_apply_failures_total") == 0
