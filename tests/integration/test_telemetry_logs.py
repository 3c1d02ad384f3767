"""Logs from app processes through the agent's shipper to runtime, and back out through
QueryLogs and TailLogs (real PostgreSQL, real gRPC, real app processes, real identity and
project: the agent's service token, the tenant's own tokens, projects from CreateProject)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from hangar.runtime.v1 import runtime_pb2 as pb
from services.runtime.telemetry import IncomingLine, LogIngest
from tests.support import runtime as runtime_fixtures
from tests.support import telemetry as telemetry_fixtures
from tests.support.telemetry import (
    Fleet,
    eventually,
    log_line,
    place_container,
    run_app,
    shipping_agent,
    stored_lines,
)

pytestmark = pytest.mark.asyncio
fleet = telemetry_fixtures.fleet
neighbours = runtime_fixtures.neighbours
PY = sys.executable


def printer(count: int, *, delay: float = 0.0, every: float = 0.0, prefix: str = "line") -> str:
    """A shell command: a Python app printing `count` numbered lines."""
    code = (
        "import sys,time\n"
        f"time.sleep({delay})\n"
        f"for i in range(1, {count + 1}):\n"
        f"    print('{prefix}', i, flush=True)\n"
        f"    time.sleep({every})\n"
        "time.sleep(30)\n"
    )
    return f'{PY} -c "{code}"'


async def test_app_output_appears_in_query_logs_and_a_tail_started_before_it(
    fleet: Fleet,
) -> None:
    runtime = await fleet.start()
    tenant, org, project = await fleet.new_project("viewer")
    ann = tenant.members["viewer"].md  # logs.read: viewers read logs
    placed = await place_container(runtime.db, project, org)

    tail = runtime.stub.TailLogs(
        pb.TailLogsRequest(project_id=project, tail_lines=10), metadata=ann
    )
    await asyncio.wait_for(tail.initial_metadata(), 2)  # headers come at once

    async with shipping_agent(runtime.address, fleet.agent_token) as (driver, _logs, _metrics):
        await run_app(driver, placed, printer(5, delay=0.3))
        received = []
        async for entry in tail:
            received.append(entry)
            if len(received) == 5:
                break
        # Live: the lines came while the app still runs (it sleeps 30 s after printing), not
        # when its output ended.
        (info,) = [c for c in driver.list() if c.container_id == placed.container_id]
        assert not info.state.ended, info
        assert [e.line for e in received] == [f"line {i}" for i in range(1, 6)]
        assert {e.container_id for e in received} == {placed.container_id}
        assert received[0].deployment_id == placed.deployment_id
        assert received[0].stream == pb.LOG_STREAM_STDOUT

        page = await runtime.stub.QueryLogs(
            pb.QueryLogsRequest(project_id=project, page_size=2), metadata=ann
        )
        assert [e.line for e in page.entries] == ["line 5", "line 4"]  # newest first
        rest = await runtime.stub.QueryLogs(
            pb.QueryLogsRequest(project_id=project, page_size=10, page_token=page.next_page_token),
            metadata=ann,
        )
        assert [e.line for e in rest.entries] == ["line 3", "line 2", "line 1"]
        assert rest.next_page_token == ""
        found = await runtime.stub.QueryLogs(
            pb.QueryLogsRequest(
                project_id=project, contains="e 3", container_id=placed.container_id
            ),
            metadata=ann,
        )
        assert [e.line for e in found.entries] == ["line 3"]
        other_deployment = await runtime.stub.QueryLogs(
            pb.QueryLogsRequest(project_id=project, deployment_id="nope"), metadata=ann
        )
        assert list(other_deployment.entries) == []
    tail.cancel()


async def test_a_tail_sends_history_then_live_lines_and_ends_when_the_client_goes(
    fleet: Fleet,
) -> None:
    runtime = await fleet.start()
    tenant, org, project = await fleet.new_project()
    ann = tenant.owner.md
    placed = await place_container(runtime.db, project, org)
    async with shipping_agent(runtime.address, fleet.agent_token) as (driver, _logs, _metrics):
        await run_app(driver, placed, printer(3, prefix="old"))
        await eventually(lambda: runtime.app.telemetry.stats.lines_stored >= 3)
        tail = runtime.stub.TailLogs(
            pb.TailLogsRequest(project_id=project, tail_lines=2), metadata=ann
        )
        history = [await tail.read(), await tail.read()]
        assert [e.line for e in history] == ["old 2", "old 3"]
        second = await place_container(runtime.db, project, org, placed.server_id)
        await run_app(driver, second, printer(2, prefix="new"))
        live = [await tail.read(), await tail.read()]
        assert [e.line for e in live] == ["new 1", "new 2"]
        assert {e.container_id for e in live} == {second.container_id}
        tail.cancel()
        hub = runtime.app.telemetry.hub
        await eventually(lambda: not hub._subs)  # the server side let go of the tail


async def test_tail_and_query_of_another_tenants_project_are_denied(fleet: Fleet) -> None:
    # The full matrix over every org-scoped RPC is in test_runtime_api; here, the log reads
    # of a project with lines in it, and ShipLogs, which only the agent's token may call.
    runtime = await fleet.start()
    tenant, org, project = await fleet.new_project()
    placed = await place_container(runtime.db, project, org)
    now = datetime.now(UTC)
    agent = await fleet.agent()
    await runtime.stub.ShipLogs(
        iter([pb.ShipLogsRequest(lines=[log_line(placed.container_id, 1, "secret", now)])]),
        metadata=agent,
    )
    stranger = (await fleet.tenant()).owner  # owns an organization of their own
    nobody = await fleet.user()  # in no organization
    for who in (stranger, nobody):
        tail = runtime.stub.TailLogs(pb.TailLogsRequest(project_id=project), metadata=who.md)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await tail.read()
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await runtime.stub.QueryLogs(pb.QueryLogsRequest(project_id=project), metadata=who.md)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    found = await runtime.stub.QueryLogs(
        pb.QueryLogsRequest(project_id=project), metadata=tenant.owner.md
    )
    assert [e.line for e in found.entries] == ["secret"]
    for caller in (tenant.owner.md, await fleet.neighbours.service("project")):
        with pytest.raises(grpc.aio.AioRpcError) as denied:  # only the agent ships
            await runtime.stub.ShipLogs(iter([pb.ShipLogsRequest()]), metadata=caller)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_bad_lines_are_refused_or_trimmed_and_the_rest_of_the_stream_goes_on(
    fleet: Fleet, database_url: str
) -> None:
    runtime = await fleet.start()
    _, org, project = await fleet.new_project()
    placed = await place_container(runtime.db, project, org)
    cid = placed.container_id
    agent = await fleet.agent()
    now = datetime.now(UTC)
    batches = [
        pb.ShipLogsRequest(
            lines=[
                log_line(cid, 1, "fine", now),
                log_line("no-such-container", 1, "who?", now),
                log_line(cid, 2, "from the future", now + timedelta(days=2)),
                log_line(cid, 3, "x" * 40_000, now),
            ]
        ),
        pb.ShipLogsRequest(lines=[log_line(cid, 4, "still going\x00", now)]),
    ]
    reply = await runtime.stub.ShipLogs(iter(batches), metadata=agent)
    assert dict(reply.acknowledged_sequences) == {cid: 4}
    assert reply.rejected_lines == 2
    assert "no-such-container" in reply.rejected_reason
    rows = await stored_lines(database_url, cid)
    assert [r["sequence"] for r in rows] == [1, 3, 4]
    assert len(rows[1]["line"]) == 16 * 1024
    assert rows[2]["line"] == "still going\ufffd"

    again = await runtime.stub.ShipLogs(iter(batches), metadata=agent)  # a re-send
    assert dict(again.acknowledged_sequences) == {cid: 4}
    assert [r["sequence"] for r in await stored_lines(database_url, cid)] == [1, 3, 4]


def printer_in_two_parts(first: int, total: int, go: Path, *, every: float = 0.001) -> str:
    """A shell command: an app printing lines 1..`first`, then, once the file `go` exists,
    the rest up to `total`."""
    code = (
        "import os,time\n"
        f"for i in range(1, {total + 1}):\n"
        f"    if i == {first + 1}:\n"
        f"        while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "    print('line', i, flush=True)\n"
        f"    time.sleep({every})\n"
        "time.sleep(30)\n"
    )
    return f'{PY} -c "{code}"'


@dataclass
class HeldIngest(LogIngest):
    """Runtime's ingest of one ShipLogs stream that stores the first batch it is given, and
    then neither reads more nor answers: the stream stays open with lines stored that no
    acknowledgement covers, until runtime stops and cancels it."""

    held: asyncio.Event = field(default_factory=asyncio.Event)
    stored_sequences: list[int] = field(default_factory=list)

    async def add(self, lines: Sequence[IncomingLine]) -> None:
        await super().add(lines)
        await self.finish()  # the batch is in runtime.logs
        self.stored_sequences += [line.sequence for line in lines]
        self.held.set()
        await asyncio.Future()  # until the server cancels the call


async def test_runtime_restarted_mid_stream_loses_and_doubles_no_acknowledged_line(
    fleet: Fleet, database_url: str, tmp_path: Path
) -> None:
    """Runtime stops while a stream is open with lines it stored but never acknowledged
    (the stream is held there, so this happens every run). The agent sends them again to
    the restarted runtime, which skips them: every line is stored once, in order; the lines
    acknowledged before the stop are not sent again; only the unacknowledged ones are."""
    runtime = await fleet.start()
    port = int(runtime.address.rsplit(":", 1)[1])
    _, org, project = await fleet.new_project()
    placed = await place_container(runtime.db, project, org)
    first, total = 1000, 3000
    go = tmp_path / "go"
    async with shipping_agent(
        runtime.address, fleet.agent_token, log_lines=10_000, batch_lines=100
    ) as (
        driver,
        logs,
        _metrics,
    ):
        await run_app(driver, placed, printer_in_two_parts(first, total, go))
        cid = placed.container_id
        await eventually(lambda: logs.acknowledged.get(cid) == first, within=20)

        telemetry = runtime.app.telemetry
        holding = HeldIngest(telemetry.db, telemetry.directory, telemetry.limits, telemetry.stats)
        telemetry.log_ingest = lambda: holding  # type: ignore[method-assign]
        go.touch()  # the app prints the rest; the next stream is held after one batch
        await asyncio.wait_for(holding.held.wait(), 20)
        failures = logs.failures
        await fleet.stop(runtime)  # mid-stream: stored, never acknowledged
        assert holding.stored_sequences[0] == first + 1
        assert logs.acknowledged[cid] == first and logs.shipped < total
        await eventually(lambda: logs.failures > failures, within=20)  # the held stream failed

        runtime = await fleet.start(port)
        buffer = driver.logs(cid)
        assert buffer is not None
        await eventually(lambda: logs.acknowledged.get(cid) == total, within=30)
        rows = await stored_lines(database_url, cid)
        assert [r["sequence"] for r in rows] == list(range(1, total + 1))
        assert [r["line"] for r in rows] == [f"line {i}" for i in range(1, total + 1)]
        assert buffer.dropped == 0
        # Re-sent and skipped: exactly the lines stored without an acknowledgement.
        assert runtime.app.telemetry.stats.lines_duplicate == len(holding.stored_sequences) > 0


async def test_lines_beyond_the_buffer_while_runtime_is_down_are_counted_and_announced(
    fleet: Fleet, database_url: str
) -> None:
    runtime = await fleet.start()
    port = int(runtime.address.rsplit(":", 1)[1])
    _, org, project = await fleet.new_project()
    placed = await place_container(runtime.db, project, org)
    await fleet.stop(runtime)
    async with shipping_agent(runtime.address, fleet.agent_token, log_lines=100) as (
        driver,
        logs,
        _metrics,
    ):
        await run_app(driver, placed, printer(250))
        buffer = await eventually(
            lambda: (
                (b := driver.logs(placed.container_id)) is not None and b.last_sequence >= 250 and b
            )
        )
        runtime = await fleet.start(port)
        await eventually(lambda: logs.acknowledged.get(placed.container_id, 0) > 250, within=10)
        rows = await stored_lines(database_url, placed.container_id)
        notices = [r["line"] for r in rows if r["line"].startswith("[hangar agent]")]
        numbers = [int(r["line"].split()[1]) for r in rows if r["line"].startswith("line")]
        # The newest lines, without a gap; the agent's notices account for every older one
        # (they take buffer room too, so there may be a few of them, never duplicates).
        assert numbers == list(range(numbers[0], 251))
        announced = sum(int(n.split()[2]) for n in notices)
        assert announced == numbers[0] - 1 == sum(logs.lost.values())
        assert 1 <= len(notices) and 100 - len(notices) <= len(numbers)
        assert buffer.dropped >= announced
