"""Uploaded certificates in the edge's Caddy config: loaded with a tag per name, selected by
SNI for their own name only (never for another name their SANs cover), left out when
expired or not in the table, warned about before expiry (never logging a key), and a
config that does not depend on the order they were read in."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from services.edge.caddy import HTTPS_SERVER, EdgeConfig, Route, caddy_config, canonical
from services.edge.certificates import ExpiryWarnings, UploadedCertificate

NOW = datetime(2026, 12, 7, tzinfo=UTC)
KEY = "-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n"


def edge() -> EdgeConfig:
    return EdgeConfig(
        http_address="127.0.0.1:8000",
        https_port=8443,
        admin_address="127.0.0.1:2019",
        apps_domain="localhost",
        storage_dir="/state/caddy",
        ask_url="http://127.0.0.1:9999/ask",
        dns_address="udp/127.0.0.1:9998",
    )


def cert(hostname: str, *names: str, days: float = 60) -> UploadedCertificate:
    return UploadedCertificate(
        hostname=hostname,
        chain_pem=f"chain of {hostname}",
        key_pem=KEY,
        not_after=NOW + timedelta(days=days),
        sha256_fingerprint=f"fp-{hostname}",
        project_id="p1",
        dns_names=names or (hostname,),
    )


ROUTES = [
    Route(project_id="p1", hostnames=["web-ada.localhost", "shop.ada.dev"], upstreams=["a:1"]),
    Route(project_id="p2", hostnames=["blog.ada.dev", "other.dev"], upstreams=["b:1"]),
]


def test_no_upload_keeps_the_config_as_it_was() -> None:
    config = caddy_config(ROUTES, edge())
    assert "certificates" not in config["apps"]["tls"]
    assert config["apps"]["http"]["servers"][HTTPS_SERVER]["tls_connection_policies"] == [{}]


def test_an_upload_is_loaded_tagged_and_selected_for_its_own_name_only() -> None:
    wildcard = cert("shop.ada.dev", "*.ada.dev")
    config = caddy_config(ROUTES, edge(), [wildcard])
    assert config["apps"]["tls"]["certificates"]["load_pem"] == [
        {"certificate": "chain of shop.ada.dev", "key": KEY, "tags": ["hangar-domain:shop.ada.dev"]}
    ]
    policies = config["apps"]["http"]["servers"][HTTPS_SERVER]["tls_connection_policies"]
    assert policies == [
        # blog.ada.dev is another project's name the wildcard covers: it selects nothing
        # from the cache, so it gets its own certificate on demand.
        {
            "match": {"sni": ["blog.ada.dev"]},
            "certificate_selection": {"any_tag": ["hangar-domain:blog.ada.dev"]},
        },
        {
            "match": {"sni": ["shop.ada.dev"]},
            "certificate_selection": {"any_tag": ["hangar-domain:shop.ada.dev"]},
        },
        {},
    ]
    # On-demand issuance is unchanged for every other name.
    assert (
        config["apps"]["tls"]["automation"]
        == caddy_config(ROUTES, edge())["apps"]["tls"]["automation"]
    )


def test_the_config_does_not_depend_on_the_order_certificates_were_read() -> None:
    warnings = ExpiryWarnings()
    names = frozenset({"shop.ada.dev", "blog.ada.dev"})
    first = warnings.usable([cert("shop.ada.dev"), cert("blog.ada.dev")], names, NOW)
    second = warnings.usable([cert("blog.ada.dev"), cert("shop.ada.dev")], names, NOW)
    assert canonical(caddy_config(ROUTES, edge(), first)) == canonical(
        caddy_config(ROUTES, edge(), second)
    )


def test_expired_and_unrouted_uploads_are_left_out_and_near_expiry_is_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    warnings = ExpiryWarnings()
    names = frozenset({"shop.ada.dev", "blog.ada.dev", "old.ada.dev"})
    read = [
        cert("shop.ada.dev", days=60),
        cert("blog.ada.dev", days=10),  # within 14 days: served, and warned about
        cert("old.ada.dev", days=-1),  # expired: left out (on demand again)
        cert("gone.ada.dev"),  # not in the table
    ]
    with caplog.at_level(logging.WARNING, logger="hangar.edge"):
        usable = warnings.usable(read, names, NOW)
        assert [c.hostname for c in usable] == ["blog.ada.dev", "shop.ada.dev"]
        warnings.usable(read, names, NOW)  # the next read: no second warning
    warned = [(r.getMessage(), getattr(r, "hostname", "")) for r in caplog.records]
    assert warned == [
        ("uploaded certificate expires soon; upload a renewed one", "blog.ada.dev"),
        ("uploaded certificate expired; the name gets one on demand", "old.ada.dev"),
    ]
    assert "secret" not in caplog.text and "secret" not in repr(read)
