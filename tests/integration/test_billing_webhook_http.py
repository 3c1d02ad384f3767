"""POST /v1/webhooks/stripe over real HTTP: the gateway process (`hangar serve gateway`) in
front of the billing process, each on a free port against the migrated test database.

The gateway passes the raw body byte for byte (google.api.HttpBody) and the Stripe-Signature
header into HandleStripeWebhookRequest.stripe_signature; billing verifies it. A signature
that does not verify (wrong secret, altered body, older than 300 s, missing) is
INVALID_ARGUMENT, so HTTP 400 with the usual {"code", "message", "details"} body, and nothing
is stored: 400 is what Stripe's webhook docs ask an endpoint to answer for a bad signature
(401 would say our credentials were missing; a Stripe signature is a property of the body).
Stripe retries any non-2xx, so a secret rotated on one side only heals once both agree.

Only billing and the gateway run (no identity, project or runtime): the webhook needs no
bearer token, and the gateway is waited for by asking it to reach billing, not by /healthz
(which wants every upstream).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from shared.ids import new_id
from shared.settings import SERVICES
from tests.support.billing import WEBHOOK_SECRET, sign, stripe_event
from tests.support.procs import ServiceProcess, free_port, service_env, stderr_file

PATH = "/v1/webhooks/stripe"


def _start_gateway(address: str, env: dict[str, str]) -> ServiceProcess:
    log_path = stderr_file("gateway")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hangar_cli", "serve", "gateway"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    started = ServiceProcess("gateway", address, proc, env, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            # 400 from billing (no signature) proves gateway -> billing works end to end.
            if httpx.post(f"http://{address}{PATH}", content=b"{}", timeout=1).status_code == 400:
                return started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    started.stop(keep_log=True)
    err = started.stderr_text()[-2000:]
    started.remove_log()
    raise RuntimeError(f"gateway did not reach billing: {err}")


@pytest.fixture(scope="module")
def gateway(database_url: str, db_passwords: dict[str, str]) -> Iterator[str]:
    addresses = {name: f"127.0.0.1:{free_port()}" for name in (*SERVICES, "gateway")}
    extra = {
        f"HANGAR_{name.upper()}_SERVICE_SECRET": secrets.token_urlsafe(16)
        for name in (*SERVICES, "agent")
    }
    extra["STRIPE_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    extra["STRIPE_API_KEY"] = ""  # no Stripe calls from this billing process
    env = service_env(database_url, db_passwords, addresses, extra)
    started: list[ServiceProcess] = []
    try:
        started.append(ServiceProcess.start("billing", addresses["billing"], env))
        started.append(_start_gateway(addresses["gateway"], env))
        yield f"http://{addresses['gateway']}"
    finally:
        for process in reversed(started):
            process.stop()


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def _open_invoice(conn: asyncpg.Connection) -> str:
    """An organization's subscription and an open invoice, as the billing cycle leaves them."""
    org, sub, invoice = new_id(), new_id(), new_id()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    await conn.execute(
        """INSERT INTO billing.subscriptions (id, organization_id, plan_id, status,
               current_period_start, current_period_end, pool_ram_mb, pool_cpu_millis,
               pool_bandwidth_gb)
           VALUES ($1, $2, 'hobby', 'active', $3, $4, 1024, 1000, 10)""",
        sub,
        org,
        start + timedelta(days=31),
        start + timedelta(days=59),
    )
    await conn.execute(
        """INSERT INTO billing.invoices (id, organization_id, subscription_id, period_start,
               period_end, status, total_cents, sent, stripe_invoice_id)
           VALUES ($1, $2, $3, $4, $5, 'open', 2000, true, $6)""",
        invoice,
        org,
        sub,
        start,
        start + timedelta(days=31),
        f"in_{invoice}",
    )
    return invoice


def _paid(invoice_id: str, created: int | None = None) -> bytes:
    obj = {
        "id": f"in_{invoice_id}",
        "object": "invoice",
        "status": "paid",
        "amount_due": 2000,
        "amount_paid": 2000,
        "currency": "usd",
        "metadata": {"hangar_invoice_id": invoice_id},
    }
    return stripe_event("invoice.paid", obj, created=created)


def _post(base: str, payload: bytes, signature: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "Stripe/1.0"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return httpx.post(f"{base}{PATH}", content=payload, headers=headers, timeout=10)


async def _recorded(conn: asyncpg.Connection, payload: bytes) -> int:
    event_id = json.loads(payload)["id"]
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM billing.webhook_events WHERE provider_event_id = $1", event_id
        )
    )


async def test_a_signed_event_is_applied_once(gateway: str, admin: asyncpg.Connection) -> None:
    invoice = await _open_invoice(admin)
    payload = _paid(invoice)
    # Bytes exactly as Stripe sent them: any re-serialisation on the way would break the MAC.
    payload = payload.replace(b'", "', b'",  "')
    response = await asyncio.to_thread(_post, gateway, payload, sign(payload))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["eventId"] == json.loads(payload)["id"]
    assert not body.get("duplicate", False)
    status = await admin.fetchval("SELECT status FROM billing.invoices WHERE id = $1", invoice)
    assert status == "paid"
    assert await _recorded(admin, payload) == 1

    again = await asyncio.to_thread(_post, gateway, payload, sign(payload))
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert await _recorded(admin, payload) == 1


@pytest.mark.parametrize(
    "case", ["wrong secret", "altered body", "ten minutes old", "no header", "garbage header"]
)
async def test_a_bad_signature_is_400_and_stores_nothing(
    gateway: str, admin: asyncpg.Connection, case: str
) -> None:
    invoice = await _open_invoice(admin)
    payload = _paid(invoice)
    signature: str | None = {
        "wrong secret": sign(payload, secret="whsec_someone_else"),
        "altered body": sign(payload.replace(b"2000", b"1")),
        "ten minutes old": sign(payload, timestamp=int(time.time()) - 600),
        "no header": None,
        "garbage header": "not-a-signature",
    }[case]
    response = await asyncio.to_thread(_post, gateway, payload, signature)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == 3  # INVALID_ARGUMENT
    violations = [v for d in body["details"] for v in d.get("fieldViolations", []) if "field" in v]
    assert [v["field"] for v in violations] == ["stripe_signature"]
    assert await _recorded(admin, payload) == 0
    status = await admin.fetchval("SELECT status FROM billing.invoices WHERE id = $1", invoice)
    assert status == "open"
