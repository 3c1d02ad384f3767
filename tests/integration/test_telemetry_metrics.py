"""Metric samples through ShipMetrics into the partitioned table, QueryMetrics' buckets, and
the partition maintenance loop (real PostgreSQL, real gRPC, a real app process, real identity
and project: the agent's service token, tenants' tokens, a promoted platform admin)."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2

from hangar.runtime.v1 import runtime_pb2 as pb
from tests.support import runtime as runtime_fixtures
from tests.support import telemetry as telemetry_fixtures
from tests.support.telemetry import (
    Fleet,
    eventually,
    place_container,
    run_app,
    shipping_agent,
    ts,
)

pytestmark = pytest.mark.asyncio
fleet = telemetry_fixtures.fleet
neighbours = runtime_fixtures.neighbours


def sample(cid: str, metric: int, value: float, at: datetime) -> pb.MetricSample:
    return pb.MetricSample(container_id=cid, metric=metric, value=value, sampled_at=ts(at))


def seconds(n: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=n)


async def test_samples_aggregate_over_steps_with_avg_max_and_sum(fleet: Fleet) -> None:
    runtime = await fleet.start()
    tenant, org, project = await fleet.new_project("viewer")
    ann = tenant.members["viewer"].md  # metrics.read: viewers read metrics
    placed = await place_container(runtime.db, project, org)
    other = await place_container(runtime.db, project, org, placed.server_id)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    rss = pb.METRIC_TYPE_MEMORY_RSS_BYTES
    samples = [
        sample(placed.container_id, rss, 10.0 * (i + 1), start + timedelta(seconds=i))
        for i in range(6)
    ]
    samples.append(sample(other.container_id, rss, 7.0, start))
    samples.append(sample("", rss, 999.0, start))  # the server's own total
    samples.append(sample("no-such-container", rss, 1.0, start))
    samples.append(sample(placed.container_id, rss, 1.0, start + timedelta(days=3)))
    request = pb.ShipMetricsRequest(server_id=placed.server_id, samples=samples)
    agent = await fleet.agent()
    reply = await runtime.stub.ShipMetrics(request, metadata=agent)
    assert (reply.accepted, reply.rejected) == (8, 2)
    again = await runtime.stub.ShipMetrics(request, metadata=agent)  # a retried call
    assert again.accepted == 8

    def query(aggregation: int, **kwargs: str) -> pb.QueryMetricsRequest:
        return pb.QueryMetricsRequest(
            project_id=project,
            metric=rss,
            start_time=ts(start),
            end_time=ts(start + timedelta(seconds=6)),
            step=seconds(2),
            aggregation=aggregation,
            **kwargs,
        )

    avg = await runtime.stub.QueryMetrics(
        query(pb.AGGREGATION_AVG, container_id=placed.container_id), metadata=ann
    )
    (series,) = avg.series
    assert series.container_id == placed.container_id
    assert series.server_id == placed.server_id
    assert [p.value for p in series.points] == [15.0, 35.0, 55.0]  # stored once, not twice
    assert [p.time.ToDatetime(UTC) for p in series.points] == [
        start + timedelta(seconds=s) for s in (0, 2, 4)
    ]
    peak = await runtime.stub.QueryMetrics(query(pb.AGGREGATION_MAX), metadata=ann)
    by_container = {s.container_id: [p.value for p in s.points] for s in peak.series}
    assert by_container == {placed.container_id: [20.0, 40.0, 60.0], other.container_id: [7.0]}
    total = await runtime.stub.QueryMetrics(
        query(pb.AGGREGATION_SUM, container_id=placed.container_id), metadata=ann
    )
    assert [p.value for p in total.series[0].points] == [30.0, 70.0, 110.0]  # per step

    root = await fleet.neighbours.platform_admin()
    totals = await runtime.stub.QueryMetrics(
        query(pb.AGGREGATION_MAX, server_id=placed.server_id), metadata=root.md
    )
    assert [(s.container_id, [p.value for p in s.points]) for s in totals.series] == [("", [999.0])]
    # A server's own totals are for platform admins: the tenant's owner naming the server
    # gets the project's containers on it, never the server's totals.
    narrowed = await runtime.stub.QueryMetrics(
        query(pb.AGGREGATION_MAX, server_id=placed.server_id), metadata=tenant.owner.md
    )
    assert {s.container_id for s in narrowed.series} == {placed.container_id, other.container_id}
    mallory = (await fleet.tenant()).owner
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await runtime.stub.QueryMetrics(query(pb.AGGREGATION_MAX), metadata=mallory.md)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await runtime.stub.QueryMetrics(
            pb.QueryMetricsRequest(project_id=project, metric=rss, step=seconds(0)),
            metadata=ann,
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_running_apps_samples_appear(fleet: Fleet) -> None:
    runtime = await fleet.start()
    tenant, org, project = await fleet.new_project()
    ann = tenant.owner.md
    placed = await place_container(runtime.db, project, org)
    server = await runtime.db.pool.fetchval(
        "SELECT name FROM runtime.servers WHERE id = $1", placed.server_id
    )
    busy = f'{sys.executable} -c "import time\nx=bytearray(20<<20)\nwhile 1: sum(range(9999))"'
    async with shipping_agent(
        runtime.address, fleet.agent_token, server=server, metrics_interval=0.2
    ) as (
        driver,
        _logs,
        metrics,
    ):
        await run_app(driver, placed, busy)

        async def points(metric: int) -> list[float]:
            reply = await runtime.stub.QueryMetrics(
                pb.QueryMetricsRequest(
                    project_id=project,
                    metric=metric,
                    step=seconds(1),
                    aggregation=pb.AGGREGATION_MAX,
                ),
                metadata=ann,
            )
            return [p.value for s in reply.series for p in s.points]

        async def big_rss() -> bool:
            return max(await points(pb.METRIC_TYPE_MEMORY_RSS_BYTES), default=0) > 20 << 20

        await eventually(big_rss, within=5)  # the app's 20 MiB bytearray shows
        cpu = await eventually(lambda: _nonzero(points(pb.METRIC_TYPE_CPU_MILLICORES)), within=5)
        assert 100 < max(cpu) <= 1500  # one busy thread: about a core
        totals = await runtime.db.pool.fetchval(
            "SELECT count(*) FROM runtime.metrics WHERE server_id = $1 AND container_id IS NULL",
            placed.server_id,
        )
        assert totals > 0  # the server's totals, under the server named by the agent
        assert metrics.dropped == 0


async def _nonzero(values: object) -> list[float]:
    got = await values  # type: ignore[misc]
    return [v for v in got if v > 0]


async def test_partitions_are_made_ahead_and_old_ones_dropped_by_one_replica(
    fleet: Fleet, database_url: str
) -> None:
    first = await fleet.start(telemetry_partitions_ahead_days=3, telemetry_retention_days=2)
    second = await fleet.start(telemetry_partitions_ahead_days=3, telemetry_retention_days=2)
    today = datetime.now(UTC).date()
    ahead = (today + timedelta(days=3)).strftime("%Y%m%d")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SET ROLE hangar_migrator")
        for table in ("logs", "metrics"):
            await conn.execute(f"DROP TABLE IF EXISTS runtime.{table}_p{ahead}")
            await conn.execute(
                f"""CREATE TABLE runtime.{table}_p20200101 PARTITION OF runtime.{table}
                    FOR VALUES FROM ('2020-01-01') TO ('2020-01-02')"""
            )
        results = await asyncio.gather(
            first.app.telemetry.partitions.run_once(), second.app.telemetry.partitions.run_once()
        )
        done = [r for r in results if r]
        created = sorted(p for r in done for p in r[0])
        dropped = sorted(p for r in done for p in r[1])
        assert created == [f"logs_p{ahead}", f"metrics_p{ahead}"]  # once, by one of them
        assert dropped == ["logs_p20200101", "metrics_p20200101"]
        names = {
            r["relname"]
            for r in await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'runtime.logs'::regclass"
            )
        }
        for offset in range(-1, 4):
            assert f"logs_p{(today + timedelta(days=offset)).strftime('%Y%m%d')}" in names
        assert "logs_p20200101" not in names
    finally:
        await conn.close()


async def test_a_short_lived_apps_whole_cpu_time_is_billed(fleet: Fleet) -> None:
    """An app that burns about 1 s of CPU and exits between two of the agent's samples: the
    reading taken as it ended still ships, so its usage is its real CPU time (before, the
    time after its last sample was lost: here all of it)."""
    from services.runtime.telemetry import UsageMetric, compute_usage

    runtime = await fleet.start()
    _tenant, org, project = await fleet.new_project()
    placed = await place_container(runtime.db, project, org)
    begun = datetime.now(UTC)
    burn = (
        f'{sys.executable} -c "import time\nend = time.process_time() + 1\n'
        'while time.process_time() < end: pass"'
    )
    async with shipping_agent(runtime.address, fleet.agent_token, metrics_interval=30) as (
        driver,
        _logs,
        metrics,
    ):
        await asyncio.sleep(0.3)  # the shipper's first round (nothing of ours yet) is done
        await run_app(driver, placed, burn)

        async def ended() -> bool:
            info = driver.inspect(placed.container_id)
            return info is not None and info.state.ended

        await eventually(ended, within=30)
        metrics.sample()  # the round that would come at the next interval
        await metrics.ship()

        async def cpu_seconds() -> float:
            async with runtime.db.transaction() as tx:
                reports = await compute_usage(
                    tx,
                    begun - timedelta(minutes=1),
                    datetime.now(UTC) + timedelta(minutes=1),
                    timedelta(seconds=90),
                    timedelta(seconds=30),
                )
            return sum(
                r.quantity / 1000
                for r in reports
                if r.container_id == placed.container_id
                and r.metric is UsageMetric.CPU_MILLIS_SECONDS
            )

        billed = await eventually(cpu_seconds, within=10)
        assert 0.9 <= billed <= 1.5  # 1 s of CPU, plus the interpreter's start-up
