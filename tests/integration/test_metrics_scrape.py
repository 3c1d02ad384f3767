"""GET /metrics of a real project service (with real identity and billing, PostgreSQL): the
counters move by exactly the calls made, and the pool and outbox gauges are there."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from hangar.project.v1 import project_pb2 as pb
from shared.ids import new_id
from shared.migrate import migrate
from tests.support.metrics import scrape
from tests.support.project import running_stack

PROJECT_SERVICE = "hangar.project.v1.ProjectService"
IDENTITY_SERVICE = "hangar.identity.v1.IdentityService"


@pytest.fixture(scope="module")
def project_db(create_database: Callable[[str], str], db_passwords: dict[str, str]) -> str:
    url = create_database("hangar_metrics")
    migrate(url, db_passwords)
    return url


def _handled(scraped: dict, code: str, side: str = "server", method: str = "GetProject") -> float:  # type: ignore[type-arg]
    labels = {"grpc_service": PROJECT_SERVICE, "grpc_method": method, "grpc_code": code}
    if side == "client":
        labels["grpc_service"] = "hangar.billing.v1.BillingService"
    return float(scraped.get((f"grpc_{side}_handled_total", frozenset(labels.items())), 0.0))


async def test_scrape_counts_exactly_the_calls_made_and_shows_the_pool(
    project_db: str, db_passwords: dict[str, str]
) -> None:
    async with running_stack(project_db, db_passwords, metrics_address="127.0.0.1:0") as stack:
        port = stack.project_server.metrics_port
        assert port is not None
        tenant = await stack.tenant()
        project = await stack.create(tenant)
        before = await scrape(port)

        for _ in range(5):
            got = await stack.project.GetProject(
                pb.GetProjectRequest(id=project.id), metadata=tenant.owner.md
            )
            assert got.id == project.id
        codes = []
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stack.project.GetProject(
                    pb.GetProjectRequest(id=new_id()), metadata=tenant.owner.md
                )
            codes.append(failed.value.code().name)
        assert codes[0] == codes[1] and codes[0] != "OK"

        after = await scrape(port)
        assert _handled(after, "OK") - _handled(before, "OK") == 5
        assert _handled(after, codes[0]) - _handled(before, codes[0]) == 2
        latency = frozenset({"grpc_service": PROJECT_SERVICE, "grpc_method": "GetProject"}.items())
        count = "grpc_server_handling_seconds_count"
        assert after[(count, latency)] - before.get((count, latency), 0.0) == 7
        # CreateProject reserved its resources in billing: project's client counted it.
        assert _handled(after, "OK", side="client", method="ReserveAllocation") >= 1
        # ...with the service token it got from identity, and the callers' tokens verified
        # with identity's keys: those channels of shared.auth are counted too (from 0).
        for method in ("IssueServiceToken", "GetJwks"):
            labels = {"grpc_service": IDENTITY_SERVICE, "grpc_method": method, "grpc_code": "OK"}
            assert after[("grpc_client_handled_total", frozenset(labels.items()))] >= 1, method
        assert after[("db_pool_size", frozenset())] >= 1
        assert ("db_pool_idle", frozenset()) in after
        assert after[("outbox_head_position", frozenset())] >= 1  # project.created

    with pytest.raises(OSError):  # nothing left listening
        await asyncio.open_connection("127.0.0.1", port)
