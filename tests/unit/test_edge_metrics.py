"""The edge's metrics config and filter: Caddy's HTTP metrics are on only with the edge's
metrics, never per host, and change nothing between two tables' configs; of Caddy's own
exposition only `caddy_*` families without a per-host or per-upstream label are served."""

from __future__ import annotations

import dataclasses

from services.edge.caddy import caddy_config, canonical
from services.edge.metrics import caddy_families
from tests.unit.test_edge_config import DOWN, WEB, edge

CADDY_TEXT = """\
# HELP caddy_http_requests_total Counter of HTTP(S) requests made.
# TYPE caddy_http_requests_total counter
caddy_http_requests_total{handler="reverse_proxy",server="hangar_http"} 3
# HELP caddy_reverse_proxy_upstreams_healthy Health status of reverse proxy upstreams.
# TYPE caddy_reverse_proxy_upstreams_healthy gauge
caddy_reverse_proxy_upstreams_healthy{upstream="h-10-0-0-7.hosts.hangar.internal:4001"} 1
# HELP caddy_http_request_duration_seconds Histogram of round-trip request durations.
# TYPE caddy_http_request_duration_seconds histogram
caddy_http_request_duration_seconds_bucket{code="200",handler="reverse_proxy",le="0.005"} 3
caddy_http_request_duration_seconds_bucket{code="200",handler="reverse_proxy",le="+Inf"} 3
caddy_http_request_duration_seconds_sum{code="200",handler="reverse_proxy"} 0.01
caddy_http_request_duration_seconds_count{code="200",handler="reverse_proxy"} 3
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 42
# HELP caddy_http_host_requests_total Per host, as per_host would label them.
# TYPE caddy_http_host_requests_total counter
caddy_http_host_requests_total{host="web-ada.localhost",server="hangar_http"} 1
"""


def test_caddys_http_metrics_are_on_only_with_the_edges_and_never_per_host() -> None:
    assert "metrics" not in caddy_config([WEB], edge())["apps"]["http"]
    metered = dataclasses.replace(edge(), metrics=True)
    assert caddy_config([WEB], metered)["apps"]["http"]["metrics"] == {}
    assert canonical(caddy_config([WEB, DOWN], metered)) == canonical(
        caddy_config([WEB, DOWN], metered)
    )


def test_only_caddys_bounded_families_are_served() -> None:
    families = {f.name: f for f in caddy_families(CADDY_TEXT)}
    assert set(families) == {"caddy_http_requests", "caddy_http_request_duration_seconds"}
    assert families["caddy_http_requests"].samples[0].value == 3
