"""SdkStripeGateway's requests, against recorded Stripe responses, where localstripe can't go.

localstripe cannot create a standalone invoice (POST /v1/invoices with Stripe's parameters
answers 500) and has no Prices API (see test_billing_stripe). So the real SDK is pointed
here at an in-process transport that answers with Stripe responses shaped as Stripe's API
reference records them (invoice, invoice item, list, subscription, error objects), and the
test checks what our side sends: paths, form fields, deterministic Idempotency-Keys, and
that a send which failed half-way resumes on its recorded draft instead of making another.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import stripe

from services.billing.domain import InvoiceLine, InvoiceStatus, Metric, invoice_item_key
from services.billing.stripe_gateway import InvoiceToSend, PriceRef, SdkStripeGateway, SendFailed

START = datetime(2026, 1, 15, 12, tzinfo=UTC)


def _invoice(status: str = "draft") -> dict[str, Any]:
    return {
        "id": "in_1QrecordedDraft",
        "object": "invoice",
        "auto_advance": status != "draft",
        "collection_method": "charge_automatically",
        "currency": "usd",
        "customer": "cus_Rrecorded",
        "status": status,
        "metadata": {"hangar_invoice_id": "inv1"},
        "total": 2500,
    }


def _item(key: str) -> dict[str, Any]:
    return {
        "id": "ii_1Qrecorded",
        "object": "invoiceitem",
        "amount": 2000,
        "currency": "usd",
        "customer": "cus_Rrecorded",
        "invoice": "in_1QrecordedDraft",
        "metadata": {"hangar_line_key": key},
    }


ERROR = {
    "error": {
        "type": "invalid_request_error",
        "code": "parameter_invalid_integer",
        "message": "Invalid integer: amount",
        "param": "amount",
    }
}


class Recorder:
    """An httpx transport answering like Stripe; remembers every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], str]] = []
        self.fail_items_after = 10**6
        self.items_made = 0
        self.draft_status = "draft"
        self.attached: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode())) if request.content else {}
        key = request.headers.get("idempotency-key", "")
        self.requests.append((request.method, request.url.path, form, key))
        path, method = request.url.path, request.method
        if method == "POST" and path == "/v1/invoices":
            return httpx.Response(200, json=_invoice())
        if method == "GET" and path == "/v1/invoices/in_1QrecordedDraft":
            return httpx.Response(200, json=_invoice(self.draft_status))
        if method == "GET" and path == "/v1/invoiceitems":
            data = [_item(k) for k in self.attached]
            return httpx.Response(
                200,
                json={"object": "list", "data": data, "has_more": False, "url": path},
            )
        if method == "POST" and path == "/v1/invoiceitems":
            if self.items_made >= self.fail_items_after:
                return httpx.Response(400, json=ERROR)
            self.items_made += 1
            self.attached.append(form["metadata[hangar_line_key]"])
            return httpx.Response(200, json=_item(form["metadata[hangar_line_key]"]))
        if method == "POST" and path == "/v1/invoices/in_1QrecordedDraft/finalize":
            return httpx.Response(200, json=_invoice("open"))
        if method == "GET" and path == "/v1/subscriptions/sub_Rrecorded":
            return httpx.Response(200, json=_subscription())
        if method == "POST" and path in ("/v1/subscriptions", "/v1/subscriptions/sub_Rrecorded"):
            return httpx.Response(200, json=_subscription())
        return httpx.Response(404, json={"error": {"type": "invalid_request_error"}})


def _subscription() -> dict[str, Any]:
    return {
        "id": "sub_Rrecorded",
        "object": "subscription",
        "customer": "cus_Rrecorded",
        "status": "active",
        "items": {
            "object": "list",
            "data": [{"id": "si_Rrecorded", "object": "subscription_item"}],
            "has_more": False,
        },
        "metadata": {},
    }


def _gateway(recorder: Recorder) -> SdkStripeGateway:
    http = stripe.HTTPXClient()
    http._client_async = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
    return SdkStripeGateway("sk_test_recorded", "https://api.stripe.test", http_client=http)


def _line(metric: Metric, cents: int) -> InvoiceLine:
    return InvoiceLine(
        metric=metric,
        quantity=10**10,
        included=0,
        unit_cents=Decimal("0.0000002"),
        amount_cents=cents,
        period_start=START,
    )


def _to_send(draft: str = "") -> InvoiceToSend:
    return InvoiceToSend(
        id="inv1",
        organization_id="org1",
        subscription_id="sub1",
        customer_id="cus_Rrecorded",
        period_start=START,
        period_end=START,
        currency="usd",
        lines=[
            _line(Metric.RAM_MB_SECONDS, 2000),
            _line(Metric.CPU_MILLIS_SECONDS, 500),
            _line(Metric.BANDWIDTH_BYTES, 0),  # nothing owed: no item
        ],
        stripe_invoice_id=draft,
    )


async def test_a_half_done_send_resumes_on_its_draft() -> None:
    recorder = Recorder()
    recorder.fail_items_after = 1
    gateway = _gateway(recorder)
    with pytest.raises(SendFailed) as failed:
        await gateway.send_invoice(_to_send())
    assert failed.value.stripe_invoice_id == "in_1QrecordedDraft"
    first = [(m, p, k) for m, p, _, k in recorder.requests]
    assert first[0] == ("POST", "/v1/invoices", "hangar-in-sub1-20260115T120000Z")
    ram_key = invoice_item_key("sub1", START, _line(Metric.RAM_MB_SECONDS, 2000))
    cpu_key = invoice_item_key("sub1", START, _line(Metric.CPU_MILLIS_SECONDS, 500))
    assert first[1:] == [
        ("POST", "/v1/invoiceitems", ram_key),
        ("POST", "/v1/invoiceitems", cpu_key),  # refused
    ]
    draft_form = recorder.requests[0][2]
    assert draft_form["pending_invoice_items_behavior"] == "exclude"
    assert draft_form["auto_advance"] == "false"

    # The retry (a day later, say: past Stripe's idempotency window) makes no new draft and
    # does not add the RAM item again.
    recorder.requests.clear()
    recorder.fail_items_after = 10**6
    sent = await gateway.send_invoice(_to_send(draft="in_1QrecordedDraft"))
    assert sent.stripe_invoice_id == "in_1QrecordedDraft" and sent.status is InvoiceStatus.OPEN
    retry = [(m, p, k) for m, p, _, k in recorder.requests]
    assert retry == [
        ("GET", "/v1/invoices/in_1QrecordedDraft", ""),
        ("GET", "/v1/invoiceitems", ""),
        ("POST", "/v1/invoiceitems", cpu_key),
        ("POST", "/v1/invoices/in_1QrecordedDraft/finalize", "hangar-fin-in_1QrecordedDraft"),
    ]
    assert recorder.attached == [ram_key, cpu_key]


async def test_a_draft_already_finalized_is_the_answer() -> None:
    recorder = Recorder()
    recorder.draft_status = "open"
    sent = await _gateway(recorder).send_invoice(_to_send(draft="in_1QrecordedDraft"))
    assert sent.status is InvoiceStatus.OPEN
    assert [(m, p) for m, p, _, _ in recorder.requests] == [
        ("GET", "/v1/invoices/in_1QrecordedDraft")
    ]


async def test_configured_prices_go_out_as_price_and_replace_the_one_item() -> None:
    recorder = Recorder()
    gateway = _gateway(recorder)
    price = PriceRef("price_1Qpro")
    await gateway.create_subscription("cus_Rrecorded", "sub1", "pro", price)
    await gateway.update_subscription_plan("sub_Rrecorded", "sub1", "team", price, 7)
    (create, read, update) = recorder.requests
    assert create[2]["items[0][price]"] == "price_1Qpro" and "items[0][plan]" not in create[2]
    assert create[3] == "hangar-sub-sub1-pro"
    assert read[:2] == ("GET", "/v1/subscriptions/sub_Rrecorded")
    assert update[2]["items[0][id]"] == "si_Rrecorded"  # replaced, not added
    assert update[2]["items[0][price]"] == "price_1Qpro"
    assert update[3] == "hangar-subupd-sub1-v7-team"
    assert json.dumps(update[2]).count("items[1]") == 0
