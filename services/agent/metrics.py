"""The agent's own Prometheus metrics, read from its driver at scrape time: containers by
state, and the OOM kills the kernel made in their cgroups."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.agent.domain import ContainerState
from services.agent.drivers import Driver
from shared.metrics import Metrics


def watch_agent(metrics: Metrics, driver: Driver) -> None:
    """`agent_containers{state}` and `agent_oom_kills_total`.

    OOM kills are the per-run counts the container driver keeps for each sandbox (the process
    driver has none: the counter stays absent); this adds what grew since the last scrape, so
    kills of a container removed between two scrapes are missed."""
    seen: dict[str, int] = {}
    total = 0

    def read() -> Iterator[Metric]:
        nonlocal total
        states = Counter(info.state for info in driver.list())
        containers = GaugeMetricFamily(
            "agent_containers", "Containers this agent holds, by state.", labels=["state"]
        )
        for state in ContainerState:
            containers.add_metric([state.value], states.get(state, 0))
        yield containers
        # The container driver's sandboxes (services/agent/containers.py) carry the counts.
        sandboxes = getattr(driver, "_sandboxes", None)
        if not isinstance(sandboxes, dict):
            return
        for container_id, sandbox in list(sandboxes.items()):
            now = int(getattr(sandbox, "oom_kills", 0))
            before = seen.get(container_id, 0)
            total += now - before if now >= before else now  # lower: a new run's count
            seen[container_id] = now
        for container_id in [cid for cid in seen if cid not in sandboxes]:
            del seen[container_id]
        yield CounterMetricFamily(
            "agent_oom_kills", "Processes of apps the kernel killed for memory.", value=total
        )

    metrics.add_gauges(read)
