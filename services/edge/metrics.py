"""The edge's Prometheus metrics (HANGAR_EDGE_METRICS_ADDR; off when empty, as everywhere).

The edge's own: the controller's route applies (counted, timed, whether Caddy's config was
loaded), reads of the table or the certificates that failed, the table's size, the uploaded
certificates in Caddy's config and those near their end, the on-demand TLS `ask` answers,
the DNS answers Caddy got from the edge and the wakes it asked for. Then Caddy's own HTTP
metrics (`apps.http.metrics` in its config, no per-host labels), read from its admin API's
`/metrics` at each scrape and served on the edge's port, so Prometheus scrapes one target per
edge. Only Caddy's `caddy_*` families, and none labelled by upstream: an upstream is a
container's address, a new one at each deploy, so those series would grow for as long as
Caddy runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from services.edge.certificates import EXPIRY_WARNING
from shared.metrics import Metrics

if TYPE_CHECKING:
    from services.edge.caddy import Caddy
    from services.edge.controller import AskServer, EdgeController
    from services.edge.dns import UpstreamDns
    from services.edge.wake import RouteWaker

# What a table read can fail on: runtime's routes, project's uploaded certificates.
READ_SOURCES = ("routes", "certificates")
# Route applies take milliseconds (the DNS table) to tens of them (a Caddy config load).
APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CADDY_PREFIX = "caddy_"
UNBOUNDED_CADDY_LABELS = frozenset({"upstream", "host"})


class EdgeMetrics:
    """Counted by the controller as it applies; the rest read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        r = metrics.registry
        applies = Counter(
            "edge_route_applies",
            "Route tables applied, by whether Caddy's config was loaded (reloaded) or only "
            "the edge's DNS changed.",
            ["reloaded"],
            registry=r,
        )
        self._applies = {True: applies.labels("true"), False: applies.labels("false")}
        self._apply_failures = Counter(
            "edge_route_apply_failures",
            "Route tables whose apply raised (Caddy refused or did not answer).",
            registry=r,
        )
        read_failures = Counter(
            "edge_route_read_failures",
            "Reads of runtime's route table or project's certificates that failed.",
            ["source"],
            registry=r,
        )
        self._read_failures = {s: read_failures.labels(s) for s in READ_SOURCES}
        self._apply_seconds = Histogram(
            "edge_route_apply_seconds",
            "Time to apply a route table (the DNS's upstreams, then Caddy's config if it changed).",
            buckets=APPLY_BUCKETS,
            registry=r,
        )
        self._caddy: list[Metric] = []

    # --- counted by the controller -------------------------------------------------------

    def applied(self, seconds: float, reloaded: bool) -> None:
        self._applies[reloaded].inc()
        self._apply_seconds.observe(seconds)

    def apply_failed(self) -> None:
        self._apply_failures.inc()

    def read_failed(self, source: str) -> None:
        self._read_failures[source].inc()

    # --- read at scrape time -------------------------------------------------------------

    def watch(
        self,
        controller: EdgeController,
        dns: UpstreamDns,
        ask: AskServer,
        caddy: Caddy,
        waker: RouteWaker | None = None,
    ) -> None:
        """The gauges of this edge's parts, and Caddy's own metrics, at each scrape."""

        def read() -> Iterator[Metric]:
            yield from _table(controller)
            yield from _certificates(controller, datetime.now(UTC))
            answers = CounterMetricFamily(
                "edge_tls_ask",
                "Caddy's on-demand TLS questions answered: allowed (a name of the table) or "
                "refused.",
                labels=["answer"],
            )
            for answer, count in sorted(ask.answers.items()):
                answers.add_metric([answer], count)
            yield answers
            queries = CounterMetricFamily(
                "edge_dns_queries",
                "DNS queries the edge's upstream DNS answered, by type and response code.",
                labels=["qtype", "rcode"],
            )
            for (qtype, rcode), count in sorted(dns.answered.items()):
                queries.add_metric([qtype, rcode], count)
            yield queries
            if waker is not None:
                yield CounterMetricFamily(
                    "edge_wake_calls",
                    "Runtime's WakeRoute called for a sleeping project's held requests.",
                    value=waker.asked,
                )
                yield CounterMetricFamily(
                    "edge_wake_failures",
                    "Of those, the calls that failed (their requests got the 503 page).",
                    value=waker.failed,
                )
            yield from self._caddy

        async def read_caddy() -> None:
            self._caddy = []  # Caddy not answering: its families are absent, never stale
            self._caddy = caddy_families(await caddy.metrics_text())

        self.metrics.add_gauges(read)
        self.metrics.add_refresher(read_caddy)


def _table(controller: EdgeController) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "edge_route_table_projects",
        "Projects in the route table the edge applied last.",
        value=len(controller.routes),
    )
    yield GaugeMetricFamily(
        "edge_route_table_hostnames",
        "Hostnames (valid, distinct) in the route table the edge applied last.",
        value=len(controller.hostnames),
    )


def _certificates(controller: EdgeController, now: datetime) -> Iterator[Metric]:
    loaded = controller.loaded_certificates
    yield GaugeMetricFamily(
        "edge_certificates_loaded",
        "Uploaded certificates in Caddy's config (each served for its own name).",
        value=len(loaded),
    )
    yield GaugeMetricFamily(
        "edge_certificates_expiring",
        "Of the uploaded certificates loaded, those that expire within 14 days.",
        value=sum(1 for c in loaded if c.not_after - now <= EXPIRY_WARNING),
    )


def caddy_families(text: str) -> list[Metric]:
    """Caddy's `caddy_*` families from its exposition, without those labelled by upstream
    or host (unbounded over Caddy's life)."""
    kept = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(CADDY_PREFIX):
            continue  # go_*, process_*: Caddy's runtime, not the edge's business here
        if any(UNBOUNDED_CADDY_LABELS & sample.labels.keys() for sample in family.samples):
            continue
        kept.append(family)
    return kept
