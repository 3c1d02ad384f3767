"""The edge's Caddy config, built from a route table: which host goes where, Hangar's
pages, the TLS policy per apps domain, the admin address, and no trusted proxies."""

from __future__ import annotations

from typing import Any

from hangar.runtime.v1.runtime_pb2 import DomainChallenge
from services.edge.caddy import (
    HEALTH_HOST,
    HTTP_SERVER,
    HTTPS_SERVER,
    EdgeConfig,
    Route,
    caddy_config,
    canonical,
    page_html,
)
from services.edge.dns import srv_name

ASK = "http://127.0.0.1:9999/ask"
DNS = "udp/127.0.0.1:9998"


def edge(domain: str = "localhost") -> EdgeConfig:
    return EdgeConfig(
        http_address="127.0.0.1:8000",
        https_port=8443,
        admin_address="127.0.0.1:2019",
        apps_domain=domain,
        storage_dir="/state/caddy",
        ask_url=ASK,
        dns_address=DNS,
    )


WEB = Route(
    project_id="p1",
    hostnames=["web-ada.localhost", "www.example.com"],
    upstreams=["10.0.0.1:4001", "10.0.0.2:4001"],
)
DOWN = Route(project_id="p2", hostnames=["api-ada.localhost"], unavailable_reason="failed")


def routes_of(config: dict[str, Any], server: str = HTTP_SERVER) -> list[dict[str, Any]]:
    return config["apps"]["http"]["servers"][server]["routes"]  # type: ignore[no-any-return]


def route_for(config: dict[str, Any], host: str) -> dict[str, Any]:
    for route in routes_of(config):
        if any(host in m.get("host", []) for m in route.get("match", [])):
            return route
    raise AssertionError(f"no route for {host}")


def test_each_project_hostname_proxies_round_robin_to_its_upstreams_from_the_edge_dns() -> None:
    config = caddy_config([WEB], edge())
    handler = route_for(config, "www.example.com")["handle"][0]
    assert route_for(config, "web-ada.localhost") is route_for(config, "www.example.com")
    assert handler["handler"] == "reverse_proxy"
    assert "upstreams" not in handler  # found in the edge's DNS (SRV), never in the config
    assert handler["dynamic_upstreams"]["source"] == "srv"
    assert handler["dynamic_upstreams"]["name"] == srv_name("p1")
    assert handler["dynamic_upstreams"]["resolver"] == {"addresses": [DNS]}
    assert handler["transport"]["resolver"] == {"addresses": [DNS]}  # the targets' A records
    assert handler["load_balancing"]["selection_policy"] == {"policy": "round_robin"}
    assert handler["health_checks"]["passive"]["max_fails"] == 1


def test_a_deploy_changes_no_config() -> None:
    # Upstreams moving (a new release, a rollback, a failover) must not reload Caddy: a load
    # closes every tenant's idle keep-alive connections.
    moved = Route(project_id="p1", hostnames=list(WEB.hostnames), upstreams=["10.0.0.9:4444"])
    assert canonical(caddy_config([WEB], edge())) == canonical(caddy_config([moved], edge()))
    down = Route(project_id="p1", hostnames=list(WEB.hostnames), unavailable_reason="failed")
    assert canonical(caddy_config([WEB], edge())) != canonical(caddy_config([down], edge()))


def test_client_forwarded_headers_are_never_trusted() -> None:
    config = caddy_config([WEB], edge())
    for server in config["apps"]["http"]["servers"].values():
        assert "trusted_proxies" not in server
    assert "trusted_proxies" not in route_for(config, "web-ada.localhost")["handle"][0]


def test_a_project_without_upstreams_answers_503_naming_the_reason() -> None:
    page = route_for(caddy_config([DOWN], edge()), "api-ada.localhost")["handle"][0]
    assert page["handler"] == "static_response" and page["status_code"] == 503
    assert "failed" in page["body"]
    assert page["headers"]["Cache-Control"] == ["no-store"]
    assert page["headers"]["Content-Type"] == ["text/html; charset=utf-8"]


def test_an_unknown_host_falls_through_to_the_404_page_and_failures_to_502() -> None:
    config = caddy_config([WEB], edge())
    last = routes_of(config)[-1]
    assert "match" not in last and last["handle"][0]["status_code"] == 404
    errors = config["apps"]["http"]["servers"][HTTP_SERVER]["errors"]["routes"]
    assert errors[0]["handle"][0]["status_code"] == 502


def test_the_reserved_health_host_answers_ok_before_any_project() -> None:
    first = routes_of(caddy_config([WEB], edge()))[0]
    assert first["match"] == [{"host": [HEALTH_HOST], "path": ["/healthz"]}]
    assert first["handle"][0]["body"] == "ok"


def test_a_route_may_not_claim_the_health_host_or_an_invalid_or_taken_name() -> None:
    greedy = Route(
        project_id="p3",
        hostnames=[HEALTH_HOST, "bad name", "web-ada.localhost"],
        upstreams=["10.0.0.3:1"],
    )
    config = caddy_config([WEB, greedy], edge())
    hosts = [h for r in routes_of(config) for m in r.get("match", []) for h in m.get("host", [])]
    assert hosts.count(HEALTH_HOST) == 1 and hosts.count("web-ada.localhost") == 1
    assert "bad name" not in hosts


def test_page_text_cannot_inject_caddy_placeholders_or_html() -> None:
    page = page_html(503, "{http.request.header.Cookie} <script>")
    assert "{" not in page and "}" not in page and "<script>" not in page


def test_servers_listen_where_the_settings_say_with_their_protocols() -> None:
    config = caddy_config([], edge())
    servers = config["apps"]["http"]["servers"]
    assert servers[HTTP_SERVER]["listen"] == ["127.0.0.1:8000"]
    assert servers[HTTP_SERVER]["protocols"] == ["h1", "h2c"]
    assert servers[HTTP_SERVER]["automatic_https"]["disable_redirects"] is True
    assert servers[HTTPS_SERVER]["listen"] == ["127.0.0.1:8443"]
    assert servers[HTTPS_SERVER]["protocols"] == ["h1", "h2"]
    assert config["admin"]["listen"] == "127.0.0.1:2019"
    assert config["storage"] == {"module": "file_system", "root": "/state/caddy"}


def test_localhost_names_use_the_local_ca_on_demand_guarded_by_ask() -> None:
    automation = caddy_config([WEB], edge())["apps"]["tls"]["automation"]
    local, other = automation["policies"]
    assert local["issuers"] == [{"module": "internal"}] and local["on_demand"] is True
    assert "web-ada.localhost" in local["subjects"] and "*.localhost" in local["subjects"]
    assert "www.example.com" not in local["subjects"]
    assert other == {"on_demand": True}  # ACME, Caddy's default issuers
    assert automation["on_demand"]["permission"] == {"module": "http", "endpoint": ASK}


def test_a_public_apps_domain_gets_acme_on_demand_only() -> None:
    public = Route(project_id="p", hostnames=["web-ada.apps.example.net"], upstreams=["1:1"])
    automation = caddy_config([public], edge("apps.example.net"))["apps"]["tls"]["automation"]
    assert automation["policies"] == [{"on_demand": True}]
    assert automation["on_demand"]["permission"] == {"module": "http", "endpoint": ASK}


def test_the_same_table_gives_the_same_canonical_config() -> None:
    assert canonical(caddy_config([WEB, DOWN], edge())) == canonical(
        caddy_config([WEB, DOWN], edge())
    )
    assert canonical(caddy_config([WEB], edge())) != canonical(caddy_config([DOWN], edge()))


def test_a_pending_domain_answers_its_check_and_nothing_else() -> None:
    token = "a" * 32
    pending = Route(
        project_id="p3",
        hostnames=["shop-ada.localhost"],
        upstreams=["10.0.0.5:4001"],
        challenges=[
            DomainChallenge(hostname="Shop.Example.org", token=token),
            DomainChallenge(hostname="web-ada.localhost", token=token),  # routed: never
            DomainChallenge(hostname="bad.example.org", token="<script>"),  # not a token
        ],
    )
    routes = routes_of(caddy_config([WEB, pending], edge()))
    checks = [r for r in routes if any("path" in m for m in r.get("match", []))]
    checks = [r for r in checks if r["match"][0]["host"] != [HEALTH_HOST]]
    assert [r["match"] for r in checks] == [
        [{"host": ["shop.example.org"], "path": [f"/.well-known/hangar-domain/{token}"]}]
    ]
    assert checks[0]["handle"][0]["body"] == token
    assert routes[-1]["handle"][0]["status_code"] == 404  # the rest of that name: not found
