"""The agent's MetricShipper: network bytes a driver counts (the process driver's ingress
proxy) become NETWORK_RX/TX samples per container, as deltas per interval."""

from __future__ import annotations

from datetime import UTC, datetime

from hangar.runtime.v1 import runtime_pb2 as pb
from services.agent.domain import ContainerInfo, ContainerState, ResourceSample
from services.agent.shipping import MetricShipper

RX, TX = pb.METRIC_TYPE_NETWORK_RX_BYTES, pb.METRIC_TYPE_NETWORK_TX_BYTES


class CountingDriver:
    """Just enough of a Driver for MetricShipper.sample: containers with set counters."""

    def __init__(self) -> None:
        self.counters: dict[str, tuple[int, int] | None] = {}
        self.ended: set[str] = set()

    def list(self) -> list[ContainerInfo]:
        return [
            ContainerInfo(
                cid,
                "d",
                "p",
                ContainerState.STOPPED if cid in self.ended else ContainerState.RUNNING,
                started_at=datetime.now(UTC),
            )
            for cid in self.counters
        ]

    def sample(self, container_id: str) -> ResourceSample | None:
        counted = self.counters[container_id]
        rx, tx = counted if counted is not None else (None, None)
        return ResourceSample(container_id, 1 << 20, 0.5, datetime.now(UTC), rx, tx)


def _net(shipper: MetricShipper) -> dict[tuple[str, int], float]:
    out = {(s.container_id, s.metric): s.value for s in shipper.pending if s.metric in (RX, TX)}
    shipper.pending.clear()
    return out


def test_counted_bytes_become_rx_and_tx_deltas_per_container() -> None:
    driver = CountingDriver()
    shipper = MetricShipper(driver, stub=None, server=lambda: "s", server_totals=False)  # type: ignore[arg-type]
    driver.counters = {"a": (100, 5000), "b": (0, 0), "quiet": None}
    shipper.sample()
    # The first reading counts from zero: the proxy starts with the container.
    assert _net(shipper) == {("a", RX): 100, ("a", TX): 5000, ("b", RX): 0, ("b", TX): 0}

    driver.counters.update(a=(150, 9000), b=(7, 70))
    shipper.sample()
    assert _net(shipper) == {("a", RX): 50, ("a", TX): 4000, ("b", RX): 7, ("b", TX): 70}

    shipper.sample()  # nothing moved
    assert _net(shipper) == {("a", RX): 0, ("a", TX): 0, ("b", RX): 0, ("b", TX): 0}

    driver.ended.add("a")  # an ended container is forgotten; "quiet" never counts bytes
    driver.counters.update(b=(10, 100))
    shipper.sample()
    assert _net(shipper) == {("b", RX): 3, ("b", TX): 30}
    assert "a" not in shipper._net
