"""Uploaded certificates at the edge, with a real Caddy: a certificate made here (a test CA
and a leaf for a custom name) loaded through the controller is exactly what a TLS client
asking for that name gets, and the request reaches the app; an unchanged table loads no
config; another name its SANs cover does not get it; deleting it (or its expiry) falls back
to on-demand issuance (Caddy's local CA for these `.localhost` names); one Caddy refuses
does not stop the routes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from services.edge.caddy import Route
from services.edge.certificates import StaticCertificates, UploadedCertificate
from services.edge.controller import StaticRoutes
from tests.integration.test_edge_caddy import DEADLINE, App, Edge, running_edge
from tests.support.certificates import Leaf, TestCA

HOST = "web-ada.localhost"
CUSTOM = "shop.ada-custom.localhost"  # a local name: the fallback is the local CA, never ACME
NEIGHBOUR = "blog.ada-custom.localhost"  # another project's name, also in the leaf's SANs


@pytest.fixture
async def app() -> AsyncIterator[App]:
    started = await App("a").start()
    yield started
    started.release.set()
    await started.close()


@pytest.fixture
async def edge() -> AsyncIterator[tuple[Edge, StaticCertificates]]:
    source, certificates = StaticRoutes(), StaticCertificates()
    async with running_edge(source, certificates) as (controller, caddy, http, https_port):
        yield Edge(source, controller, caddy, http, https_port), certificates


def uploaded(leaf: Leaf, hostname: str = CUSTOM) -> UploadedCertificate:
    return UploadedCertificate(
        hostname=hostname,
        chain_pem=leaf.chain_pem,
        key_pem=leaf.key_pem,
        not_after=leaf.cert.not_valid_after_utc,
        sha256_fingerprint=leaf.fingerprint,
        project_id="p-custom",
        dns_names=tuple(
            n.value
            for n in leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ),
    )


def routes(app: App) -> list[Route]:
    return [
        Route(project_id="p-custom", hostnames=[HOST, CUSTOM], upstreams=[app.address]),
        Route(project_id="p-neighbour", hostnames=[NEIGHBOUR], upstreams=[app.address]),
    ]


def _served(port: int, name: str) -> x509.Certificate:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def served(port: int, name: str) -> x509.Certificate:
    """The certificate the edge presents for SNI `name` (not verified here)."""
    return await asyncio.to_thread(_served, port, name)


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


async def until_served(port: int, name: str, wanted: bool, fp: str) -> x509.Certificate:
    """Polls (bounded) until the certificate for `name` is (or is no longer) `fp`."""
    deadline = time.monotonic() + DEADLINE
    while True:
        cert = None
        with contextlib.suppress(OSError, ssl.SSLError):
            cert = await served(port, name)
            if (fingerprint(cert) == fp) is wanted:
                return cert
        assert time.monotonic() < deadline, f"{name}: still {cert and fingerprint(cert)}"
        await asyncio.sleep(0.05)


def local_ca(cert: x509.Certificate) -> bool:
    return "Caddy Local Authority" in cert.issuer.rfc4514_string()


async def test_an_uploaded_certificate_is_served_for_its_name_and_routes_to_the_app(
    edge: tuple[Edge, StaticCertificates], app: App
) -> None:
    running, certificates = edge
    ca = TestCA()
    leaf = ca.leaf(CUSTOM, NEIGHBOUR)
    certificates.certificates = [uploaded(leaf)]
    await running.set_routes(*routes(app))

    cert = await until_served(running.https_port, CUSTOM, True, leaf.fingerprint)
    assert cert == leaf.cert
    trusted = ssl.create_default_context(cadata=ca.root_pem)  # verifies chain and name
    async with httpx.AsyncClient(trust_env=False, verify=trusted) as client:
        reply = await client.get(
            f"https://127.0.0.1:{running.https_port}/hello",
            headers={"Host": CUSTOM},
            extensions={"sni_hostname": CUSTOM},
            timeout=DEADLINE,
        )
    assert reply.status_code == 200 and reply.json()["app"] == "a"
    assert reply.json()["headers"]["x-forwarded-proto"] == "https"

    # Another project's name in the leaf's SANs: not served this certificate (on demand).
    for _ in range(2):  # the first handshake issues it, the next finds it
        neighbour = await served(running.https_port, NEIGHBOUR)
        assert fingerprint(neighbour) != leaf.fingerprint and local_ca(neighbour)
    assert fingerprint(await served(running.https_port, CUSTOM)) == leaf.fingerprint

    # The same table and certificates again: no config load.
    loads = running.caddy.loads
    await running.set_routes(*routes(app))
    assert running.caddy.loads == loads

    # Deleted: the name falls back to on-demand issuance (the local CA here).
    certificates.certificates = []
    await running.set_routes(*routes(app))
    fallback = await until_served(running.https_port, CUSTOM, False, leaf.fingerprint)
    assert local_ca(fallback)


async def test_an_expired_upload_is_left_out_and_a_renewed_one_replaces_it(
    edge: tuple[Edge, StaticCertificates], app: App
) -> None:
    running, certificates = edge
    ca = TestCA()
    expired = uploaded(ca.leaf(CUSTOM))
    expired = UploadedCertificate(
        expired.hostname,
        expired.chain_pem,
        expired.key_pem,
        datetime.now(UTC) - timedelta(seconds=1),  # as the edge would see it past not_after
        expired.sha256_fingerprint,
    )
    certificates.certificates = [expired]
    await running.set_routes(*routes(app))
    assert local_ca(await served(running.https_port, CUSTOM))

    renewed = ca.leaf(CUSTOM)
    certificates.certificates = [uploaded(renewed)]
    await running.set_routes(*routes(app))
    await until_served(running.https_port, CUSTOM, True, renewed.fingerprint)


async def test_a_certificate_caddy_refuses_does_not_stop_the_routes(
    edge: tuple[Edge, StaticCertificates], app: App, caplog: pytest.LogCaptureFixture
) -> None:
    running, certificates = edge
    ca = TestCA()
    leaf, other = ca.leaf(CUSTOM), ca.leaf(CUSTOM)
    refused = uploaded(leaf)
    refused = UploadedCertificate(  # a key that is not the leaf's: Caddy refuses the config
        refused.hostname, refused.chain_pem, other.key_pem, refused.not_after, "fp-bad"
    )
    certificates.certificates = [refused]
    with caplog.at_level(logging.ERROR, logger="hangar.edge"):
        await running.set_routes(*routes(app))
    assert "caddy refused the uploaded certificates" in caplog.text
    assert "PRIVATE KEY" not in caplog.text
    async with httpx.AsyncClient(trust_env=False, timeout=DEADLINE) as client:
        reply = await client.get(f"{running.http}/", headers={"Host": CUSTOM})
    assert reply.status_code == 200 and reply.json()["app"] == "a"
    assert local_ca(await served(running.https_port, CUSTOM))
