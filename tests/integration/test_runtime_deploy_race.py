"""Issue 6's race through the real front door: 200 concurrent CreateDeployment calls over gRPC
(real identity, billing and project behind them) against 5 servers with room for 50."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import pytest

from hangar.runtime.v1 import runtime_pb2 as rpb
from tests.support.runtime import (
    Neighbours,
    Runtime,
    add_servers,
    assert_invariant,
    launch_runtime,
    neighbours,  # noqa: F401  (module fixture)
    region_name,
)


@pytest.fixture
async def runtime(neighbours: Neighbours) -> AsyncIterator[Runtime]:  # noqa: F811
    # Agents at these servers' addresses never answer: placed deployments keep their capacity
    # while runtime retries the start, which outlives the test.
    started = await launch_runtime(
        neighbours, runtime_start_timeout_seconds=600.0, call_timeout_seconds=60.0
    )
    yield started
    await started.stop()


async def test_200_concurrent_create_deployment_calls_place_exactly_50(
    runtime: Runtime,
    neighbours: Neighbours,  # noqa: F811
    database_url: str,
) -> None:
    region = region_name("race")
    servers = await add_servers(runtime.db, region, count=5, ram_mb=1000, cpu_millis=1000)
    tenant = await neighbours.tenant("developer")
    project = await neighbours.stack.create(tenant, region=region, ram_mb=100, cpu_millis=100)
    project_id = project.id
    developer = tenant.members["developer"].md
    peaks: list[tuple[int, int, int, int]] = []
    stop = asyncio.Event()

    async def watch_counters() -> None:
        conn = await asyncpg.connect(database_url)  # a superuser, reading while calls run
        try:
            while not stop.is_set():
                rows = await conn.fetch(
                    "SELECT ram_mb, cpu_millis, ram_mb_reserved, cpu_millis_reserved"
                    " FROM runtime.servers WHERE id = ANY($1::text[])",
                    servers,
                )
                peaks.extend(tuple(r) for r in rows)
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch_counters())
    calls = [
        runtime.stub.CreateDeployment(
            rpb.CreateDeploymentRequest(
                project_id=project_id,
                deployment=rpb.Deployment(command="python3 -m http.server $PORT"),
            ),
            metadata=developer,
            timeout=120,
        )
        for _ in range(200)
    ]
    created = await asyncio.gather(*calls)
    stop.set()
    await watcher

    try:
        assert len({d.id for d in created}) == 200
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT status, capacity_reserved, server_id FROM runtime.deployments"
                " WHERE project_id = $1",
                project_id,
            )
        finally:
            await conn.close()
        holding = [r for r in rows if r["capacity_reserved"]]
        assert len(holding) == 50  # 10 of 100 MB / 100 mCPU on each 1000 / 1000 server
        assert Counter(r["server_id"] for r in holding) == {sid: 10 for sid in servers}
        assert Counter(r["status"] for r in rows if not r["capacity_reserved"]) == {"queued": 150}
        await assert_invariant(database_url, servers)
        assert peaks and all(r <= ram and c <= cpu for ram, cpu, r, c in peaks)
    finally:
        # Leave nothing for later tests' runtimes to retry: every deployment ends (released).
        await asyncio.gather(
            *(
                runtime.stub.CancelDeployment(
                    rpb.CancelDeploymentRequest(id=d.id), metadata=developer, timeout=60
                )
                for d in created
            )
        )
    await assert_invariant(database_url, servers)
