"""The agent's MetricShipper: network bytes a driver counts (the process driver's ingress
proxy) become NETWORK_RX/TX samples per container, as deltas per interval; a container's
last reading, taken as it ended, is shipped once, stamped at its end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hangar.runtime.v1 import runtime_pb2 as pb
from services.agent.domain import ContainerInfo, ContainerState, ResourceSample, SleepState
from services.agent.shipping import MetricShipper

RX, TX = pb.METRIC_TYPE_NETWORK_RX_BYTES, pb.METRIC_TYPE_NETWORK_TX_BYTES


class CountingDriver:
    """Just enough of a Driver for MetricShipper.sample: containers with set counters."""

    def __init__(self) -> None:
        self.counters: dict[str, tuple[int, int] | None] = {}
        self.ended: set[str] = set()
        self.final: ResourceSample | None = None  # what sample() returns once ended
        self.sleeping: set[str] = set()
        self.runs: dict[str, tuple[int, datetime]] = {}  # container -> (run, its start)

    def list(self) -> list[ContainerInfo]:
        return [
            ContainerInfo(
                cid,
                "d",
                "p",
                ContainerState.STOPPED if cid in self.ended else ContainerState.RUNNING,
                started_at=self.runs.get(cid, (1, datetime.now(UTC)))[1],
                sleep=SleepState.SLEEPING if cid in self.sleeping else SleepState.AWAKE,
                run=self.runs.get(cid, (1, datetime.now(UTC)))[0],
            )
            for cid in self.counters
        ]

    def sample(self, container_id: str) -> ResourceSample | None:
        resting = container_id in self.ended or container_id in self.sleeping
        if resting and self.final is not None:
            return self.final
        counted = self.counters[container_id]
        rx, tx = counted if counted is not None else (None, None)
        run = self.runs.get(container_id, (1, None))[0]
        return ResourceSample(container_id, 1 << 20, 0.5, datetime.now(UTC), rx, tx, run=run)

    def final_reading(self, container_id: str) -> ResourceSample | None:
        return self.final


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

    # "a" ends: its last reading (what the driver read as it ended) is taken once, then it
    # is forgotten; "quiet" never counts bytes.
    driver.ended.add("a")
    driver.counters.update(a=(160, 9100), b=(10, 100))
    shipper.sample()
    assert _net(shipper) == {("a", RX): 10, ("a", TX): 100, ("b", RX): 3, ("b", TX): 30}
    assert "a" not in shipper._net
    shipper.sample()
    assert _net(shipper) == {("b", RX): 0, ("b", TX): 0}


def test_the_last_reading_covers_the_time_since_the_last_sample_at_the_last_rss() -> None:
    driver = CountingDriver()
    shipper = MetricShipper(driver, stub=None, server=lambda: "s", server_totals=False)  # type: ignore[arg-type]
    driver.counters = {"a": (0, 0)}
    shipper.sample()
    shipper.pending.clear()
    ended_at = datetime.now(UTC) + timedelta(seconds=2)
    driver.ended.add("a")
    driver.final = ResourceSample("a", 9 << 30, 2.5, ended_at, 0, 0)  # peak RSS, all CPU
    shipper.sample()
    got = {s.metric: s for s in shipper.pending}
    assert {s.sampled_at.ToDatetime(UTC) for s in got.values()} == {ended_at}
    assert got[pb.METRIC_TYPE_MEMORY_RSS_BYTES].value == 1 << 20  # the last RSS read
    # 0.5 s of CPU at the first reading, 2.5 s at the end: 2 s over the ~2 s between them.
    assert 900 < got[pb.METRIC_TYPE_CPU_MILLICORES].value < 1001


def _one_run_sampled_once() -> tuple[CountingDriver, MetricShipper, datetime]:
    """Container "a" in its first run, begun 10 s ago, read once by the shipper."""
    driver = CountingDriver()
    shipper = MetricShipper(driver, stub=None, server=lambda: "s", server_totals=False)  # type: ignore[arg-type]
    begun = datetime.now(UTC) - timedelta(seconds=10)
    driver.counters = {"a": (0, 0)}
    driver.runs = {"a": (1, begun)}
    shipper.sample()
    return driver, shipper, begun


def test_a_sleep_ends_a_run_and_a_wake_starts_the_next_from_zero() -> None:
    driver, shipper, begun = _one_run_sampled_once()
    first = [(s.metric, s.value, s.sampled_at.ToDatetime(UTC)) for s in shipper.pending]
    shipper.pending.clear()
    # The run's start: zeros stamped there, so the first reading covers exactly 10 s.
    assert (pb.METRIC_TYPE_CPU_MILLICORES, 0, begun) in first
    assert (pb.METRIC_TYPE_MEMORY_RSS_BYTES, 0, begun) in first

    slept_at = datetime.now(UTC) + timedelta(seconds=1)
    driver.sleeping.add("a")
    driver.final = ResourceSample("a", 1 << 20, 0.75, slept_at, 40, 400)
    shipper.sample()
    got = {s.metric: s for s in shipper.pending}
    shipper.pending.clear()
    assert {s.sampled_at.ToDatetime(UTC) for s in got.values()} == {slept_at}
    assert got[RX].value == 40 and got[TX].value == 400
    shipper.sample()  # asleep: nothing more for that run
    assert not shipper.pending

    woke_at = slept_at + timedelta(minutes=30)
    driver.sleeping.discard("a")
    driver.final = None
    driver.runs = {"a": (2, woke_at)}
    driver.counters = {"a": (50, 500)}  # the proxy's counts go on across runs
    shipper.sample()
    woke = [(s.metric, s.value, s.sampled_at.ToDatetime(UTC)) for s in shipper.pending]
    # A new process: zeros at its start (the sleep is billed as nothing), bytes continue.
    assert (pb.METRIC_TYPE_MEMORY_RSS_BYTES, 0, woke_at) in woke
    assert (pb.METRIC_TYPE_CPU_MILLICORES, 0, woke_at) in woke
    assert {m: v for m, v, _ in woke if m in (RX, TX)} == {RX: 10, TX: 100}


def test_a_sleep_and_a_wake_between_two_rounds_still_ship_the_first_runs_last_reading() -> None:
    driver, shipper, _ = _one_run_sampled_once()
    shipper.pending.clear()
    # Between rounds: asleep at slept_at (its last reading kept), then woken at woke_at.
    slept_at = datetime.now(UTC) + timedelta(seconds=2)
    woke_at = slept_at + timedelta(seconds=1)
    driver.final = ResourceSample("a", 1 << 20, 2.5, slept_at, 30, 300, run=1)
    driver.runs = {"a": (2, woke_at)}
    driver.counters = {"a": (35, 350)}
    shipper.sample()
    got = [(s.metric, round(s.value), s.sampled_at.ToDatetime(UTC)) for s in shipper.pending]
    # Run 1's last reading, at its end: 2 s more CPU over the ~2 s since the first round.
    owed = [(m, v) for m, v, t in got if t == slept_at]
    assert (RX, 30) in owed and (TX, 300) in owed
    assert any(m == pb.METRIC_TYPE_CPU_MILLICORES and 900 < v < 1001 for m, v in owed)
    # Then run 2 from zero at its start.
    assert (pb.METRIC_TYPE_CPU_MILLICORES, 0, woke_at) in got
    shipper.pending.clear()
    shipper.sample()  # owed once only
    assert all(s.sampled_at.ToDatetime(UTC) != slept_at for s in shipper.pending)
