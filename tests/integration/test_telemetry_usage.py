"""Usage from samples to billing.RecordUsage: each (container, metric, window) counted exactly
once across a billing outage and restart, a crash before runtime marked a report sent, and
two runtime replicas working at once (real PostgreSQL, real gRPC, a real billing server that
verifies runtime's service token from identity and authorizes RecordUsage itself; tenants
and projects from real identity and project).

Samples are shipped through ShipMetrics with known values over a known run time (10 s at
one sample a second), so the expected usage is exact."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from hangar.runtime.v1 import runtime_pb2 as pb
from services.billing.server import BillingApp
from services.runtime.telemetry import window_start_of
from shared.db import Database
from shared.migrate import migrate
from shared.server import RunningServer, start_server
from shared.settings import Settings
from tests.support import runtime as runtime_fixtures
from tests.support.procs import free_port
from tests.support.runtime import Neighbours
from tests.support.telemetry import Fleet, place_container, ts

pytestmark = pytest.mark.asyncio
neighbours = runtime_fixtures.neighbours
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def database_url(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    """A database of its own: the usage cursor is global to a database."""
    url = create_database("hangar_usage")
    migrate(url, db_passwords)
    return url


@pytest.fixture
async def fleet(neighbours: Neighbours) -> AsyncIterator[Fleet]:
    running = Fleet(neighbours)
    yield running
    await running.close()


class BillingAt:
    """A billing server on a fixed port, stopped and started again like a process, wired to
    identity as in production (TokenVerifier on identity's JWKS, RemoteAuthorizer)."""

    def __init__(self, neighbours: Neighbours, database_url: str, db_passwords: dict[str, str]):
        self.identity = neighbours.stack.identity
        self.database_url = database_url
        self.db_passwords = db_passwords
        self.address = f"127.0.0.1:{free_port()}"
        self.app: BillingApp | None = None
        self.server: RunningServer | None = None

    async def start(self) -> BillingApp:
        identity = self.identity.settings
        settings = Settings(
            service="billing",
            database_url=self.database_url,
            addresses={"identity": self.identity.address, "billing": self.address},
            db_passwords=self.db_passwords,
            service_secrets={"billing": identity.service_secrets["billing"]},
            jwt_issuer=identity.jwt_issuer,
            jwt_audience=identity.jwt_audience,
        )
        db = await Database.connect(settings.service_database_url(), max_size=5)
        self.app = BillingApp(settings, db, consume_identity=False, run_cycle=False)
        self.server = await start_server(self.app, self.address, grace=0.2)
        return self.app

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None  # stopping the server closes the app


@pytest.fixture
async def billing_at(
    neighbours: Neighbours, database_url: str, db_passwords: dict[str, str]
) -> AsyncIterator[BillingAt]:
    at = BillingAt(neighbours, database_url, db_passwords)
    yield at
    await at.stop()


async def ship_known_run(fleet: Fleet, runtime: object, container_id: str, start: datetime) -> None:
    """10 s of samples, one a second: 100 MiB, 250 millicores, 1000 B in and 500 B out."""
    stub = runtime.stub  # type: ignore[attr-defined]
    samples = []
    for i in range(10):
        at = ts(start + timedelta(seconds=i + 0.5))
        for metric, value in (
            (pb.METRIC_TYPE_MEMORY_RSS_BYTES, 100 * MIB),
            (pb.METRIC_TYPE_CPU_MILLICORES, 250),
            (pb.METRIC_TYPE_NETWORK_RX_BYTES, 1000),
            (pb.METRIC_TYPE_NETWORK_TX_BYTES, 500),
        ):
            samples.append(
                pb.MetricSample(
                    container_id=container_id, metric=metric, value=value, sampled_at=at
                )
            )
    reply = await stub.ShipMetrics(
        pb.ShipMetricsRequest(samples=samples), metadata=await fleet.agent()
    )
    assert reply.accepted == 40


EXPECTED = {"ram_mb_seconds": 1000, "cpu_millis_seconds": 2500, "bandwidth_bytes": 15000}


async def billed(database_url: str, organization_id: str) -> dict[str, tuple[int, int]]:
    """metric -> (records, total quantity) in billing's table."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT metric_type, count(*) AS n, sum(quantity)::bigint AS total
                 FROM billing.usage_records WHERE organization_id = $1 GROUP BY metric_type""",
            organization_id,
        )
    finally:
        await conn.close()
    return {r["metric_type"]: (r["n"], r["total"]) for r in rows}


async def test_usage_survives_a_billing_outage_and_a_lost_acknowledgement_exactly_once(
    fleet: Fleet, billing_at: BillingAt, database_url: str
) -> None:
    await billing_at.start()
    _, org, project = await fleet.new_project()  # billing's pool: the stack's subscription
    runtime = await fleet.start(billing_address=billing_at.address)
    usage = runtime.app.telemetry.usage
    usage.retry = timedelta(milliseconds=50)
    placed = await place_container(runtime.db, project, org)
    window = window_start_of(datetime.now(UTC) - timedelta(minutes=3), timedelta(minutes=1))
    await ship_known_run(fleet, runtime, placed.container_id, window)

    await billing_at.stop()  # billing is down when the window is due
    assert await usage.compute_due() >= 3
    assert await usage.send_due() == 0
    pending = await runtime.db.pool.fetch(
        "SELECT attempts, last_error FROM runtime.usage_reports WHERE sent_at IS NULL"
    )
    assert len(pending) == 3 and all(r["attempts"] == 1 and r["last_error"] for r in pending)
    assert await billed(database_url, org) == {}

    await billing_at.start()
    await asyncio.sleep(0.1)
    assert await usage.send_due() == 3
    expected = {metric: (1, total) for metric, total in EXPECTED.items()}
    assert await billed(database_url, org) == expected

    # Runtime died after billing accepted but before it marked the reports: sent again.
    await runtime.db.pool.execute("UPDATE runtime.usage_reports SET sent_at = NULL")
    assert await usage.send_due() == 3
    # Computing again makes nothing new for this container (other tests' windows may be due in
    # the shared database): its reports below are still exactly one per metric.
    await usage.compute_due()
    assert await billed(database_url, org) == expected
    keys = await runtime.db.pool.fetch(
        "SELECT idempotency_key FROM runtime.usage_reports WHERE container_id = $1",
        placed.container_id,
    )
    assert sorted(r["idempotency_key"] for r in keys) == sorted(
        f"{placed.container_id}:{m}:{window.isoformat()}" for m in EXPECTED
    )


async def test_two_runtime_replicas_report_each_window_once(
    fleet: Fleet, billing_at: BillingAt, database_url: str
) -> None:
    await billing_at.start()
    _, org, project = await fleet.new_project()
    replicas = [await fleet.start(billing_address=billing_at.address) for _ in range(2)]
    placed = await place_container(replicas[0].db, project, org)
    window = window_start_of(datetime.now(UTC), timedelta(minutes=1))
    await ship_known_run(fleet, replicas[0], placed.container_id, window)

    due = window + timedelta(minutes=1, seconds=1)
    for _ in range(3):  # both at once, a few rounds
        await asyncio.gather(
            *(r.app.telemetry.usage.compute_due(due) for r in replicas),
            *(r.app.telemetry.usage.send_due() for r in replicas),
        )
    await asyncio.gather(*(r.app.telemetry.usage.send_due() for r in replicas))
    assert await billed(database_url, org) == {m: (1, t) for m, t in EXPECTED.items()}
    windows = await replicas[0].db.pool.fetchval(
        "SELECT count(*) FROM runtime.usage_windows WHERE window_start = $1", window
    )
    assert windows == 1
