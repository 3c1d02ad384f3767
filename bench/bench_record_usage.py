"""RecordUsage ingest: records/s end to end over gRPC, side by side with a raw asyncpg
copy_records_to_table of the same rows and a naive row-by-row INSERT. Batches of 1,000.

    .venv/bin/python bench/bench_record_usage.py [--records 200000] [--concurrency 8]

PostgreSQL: DATABASE_URL if set, else an embedded one (pgserver) in a temp dir. The billing
server runs in its own process (uvloop), the load generator in this one.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import grpc
from google.protobuf import timestamp_pb2

from hangar.billing.v1 import billing_pb2, billing_pb2_grpc
from hangar.events.v1 import events_pb2
from shared.context import Principal, PrincipalKind
from shared.errors import Unauthenticated
from shared.ids import new_id
from shared.settings import SERVICES, Settings

BATCH = 1000


class BenchTokenNames:
    """BENCH ONLY, NOT FOR TESTS: believes "service:<name>" bearer tokens, so the bench times
    ingest without an identity service (tests use real identity: house rule 2)."""

    async def authenticate(self, token: str) -> Principal:
        kind, _, subject = token.partition(":")
        if kind == "service" and subject:
            return Principal(kind=PrincipalKind.SERVICE, subject=subject)
        raise Unauthenticated("bench tokens are 'service:<name>'")


def _serve(admin_url: str, passwords: dict[str, str], port_queue: multiprocessing.Queue) -> None:
    import uvloop

    from services.billing.server import BillingApp
    from shared.db import Database
    from shared.server import start_server

    async def main() -> None:
        settings = Settings(
            service="billing",
            database_url=admin_url,
            db_passwords=passwords,
            addresses={"identity": "127.0.0.1:1", "billing": "127.0.0.1:0"},
        )
        db = await Database.connect(settings.service_database_url(), min_size=8, max_size=16)
        app = BillingApp(settings, db, consume_identity=False, run_cycle=False)
        running = await start_server(app, "127.0.0.1:0", authenticator=BenchTokenNames())
        port_queue.put(running.port)
        await asyncio.Event().wait()

    uvloop.run(main())


def _rows(org: str, n: int, tag: str) -> list[tuple]:
    at = datetime(2026, 1, 20, tzinfo=UTC)
    return [
        (new_id(), org, "p1", "ram_mb_seconds", 60, at + timedelta(seconds=i), f"{tag}-{i}")
        for i in range(n)
    ]


async def bench_grpc(port: int, org: str, total: int, concurrency: int) -> float:
    at = timestamp_pb2.Timestamp()
    at.FromDatetime(datetime(2026, 1, 20, tzinfo=UTC))
    requests = [
        billing_pb2.RecordUsageRequest(
            records=[
                billing_pb2.UsageRecord(
                    organization_id=org,
                    project_id="p1",
                    metric=billing_pb2.USAGE_METRIC_RAM_MB_SECONDS,
                    quantity=60,
                    recorded_at=at,
                    idempotency_key=f"grpc-{b}-{i}",
                )
                for i in range(BATCH)
            ]
        )
        for b in range(total // BATCH)
    ]
    metadata = (("authorization", "Bearer service:runtime"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        await stub.RecordUsage(billing_pb2.RecordUsageRequest(), metadata=metadata)  # warm up
        queue = list(reversed(requests))
        accepted = 0

        async def worker() -> None:
            nonlocal accepted
            while queue:
                reply = await stub.RecordUsage(queue.pop(), metadata=metadata, timeout=60)
                accepted += reply.accepted

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    assert accepted == total, (accepted, total)
    return total / elapsed


async def bench_copy(url: str, org: str, sub_id: str, total: int, concurrency: int) -> float:
    pool = await asyncpg.create_pool(url, min_size=concurrency, max_size=concurrency)
    batches = [
        [(r[0], r[1], sub_id, *r[2:]) for r in _rows(org, BATCH, f"copy-{b}")]
        for b in range(total // BATCH)
    ]
    columns = (
        "id",
        "organization_id",
        "subscription_id",
        "project_id",
        "metric_type",
        "quantity",
        "recorded_at",
        "idempotency_key",
    )

    async def worker() -> None:
        while batches:
            rows = batches.pop()
            async with pool.acquire() as conn:
                await conn.copy_records_to_table(
                    "usage_records", schema_name="billing", records=rows, columns=columns
                )

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return total / elapsed


async def bench_naive(url: str, org: str, sub_id: str, total: int, concurrency: int) -> float:
    pool = await asyncpg.create_pool(url, min_size=concurrency, max_size=concurrency)
    batches = [_rows(org, BATCH, f"naive-{b}") for b in range(total // BATCH)]

    async def worker() -> None:
        while batches:
            rows = batches.pop()
            async with pool.acquire() as conn, conn.transaction():
                for r in rows:
                    await conn.execute(
                        "INSERT INTO billing.usage_records (id, organization_id, subscription_id,"
                        " project_id, metric_type, quantity, recorded_at, idempotency_key)"
                        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                        " ON CONFLICT (organization_id, idempotency_key) DO NOTHING",
                        r[0],
                        r[1],
                        sub_id,
                        *r[2:],
                    )

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return total / elapsed


async def _make_org(url: str) -> tuple[str, str]:
    from services.billing.server import BillingApp
    from shared.db import Database

    db = await Database.connect(url)
    app = BillingApp(
        Settings(service="billing", addresses={"identity": "127.0.0.1:1"}),
        db,
        consume_identity=False,
        run_cycle=False,
    )
    org = new_id()
    async with db.transaction() as tx:
        await app.on_identity_event(
            tx, events_pb2.Event(id=new_id(), type="organization.created", organization_id=org)
        )
        sub_id = await tx.fetchval(
            "SELECT id FROM billing.subscriptions WHERE organization_id = $1", org
        )
    await db.close()
    return org, sub_id


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--naive-records", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    from shared.migrate import migrate
    from shared.pg import create_database, provision

    pg = None
    admin = os.environ.get("DATABASE_URL", "")
    if not admin:
        pg = provision(Path(tempfile.mkdtemp(prefix="hangar-bench-")), ephemeral=True)
        admin = pg.url
    try:
        url = asyncio.run(create_database(admin, f"hangar_bench_{secrets.token_hex(4)}"))
        passwords = {s: secrets.token_urlsafe(16) for s in SERVICES}
        migrate(url, passwords)
        service_url = Settings(
            service="billing", database_url=url, db_passwords=passwords
        ).service_database_url()

        ctx = multiprocessing.get_context("spawn")
        ports: multiprocessing.Queue = ctx.Queue()
        server = ctx.Process(target=_serve, args=(url, passwords, ports), daemon=True)
        server.start()
        port = ports.get(timeout=30)
        try:
            import uvloop

            org_g, _ = asyncio.run(_make_org(service_url))
            org_c, sub_c = asyncio.run(_make_org(service_url))
            org_n, sub_n = asyncio.run(_make_org(service_url))
            grpc_rate = uvloop.run(bench_grpc(port, org_g, args.records, args.concurrency))
            copy_rate = uvloop.run(
                bench_copy(service_url, org_c, sub_c, args.records, args.concurrency)
            )
            naive_rate = uvloop.run(
                bench_naive(service_url, org_n, sub_n, args.naive_records, args.concurrency)
            )
        finally:
            server.terminate()
            server.join(10)
    finally:
        if pg is not None:
            pg.stop()

    print(f"RecordUsage ingest, batches of {BATCH}, concurrency {args.concurrency}")
    print(f"{'path':<44}{'records':>10}{'records/s':>12}{'vs COPY':>10}")
    for name, n, rate in (
        ("gRPC RecordUsage (COPY staging + INSERT)", args.records, grpc_rate),
        ("raw asyncpg copy_records_to_table", args.records, copy_rate),
        ("naive row-by-row INSERT", args.naive_records, naive_rate),
    ):
        print(f"{name:<44}{n:>10}{rate:>12,.0f}{rate / copy_rate:>10.2f}")


if __name__ == "__main__":
    main()
