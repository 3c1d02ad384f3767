"""The agent's telemetry: container log lines and resource samples shipped to runtime.

Logs: each container's lines wait in the driver's bounded LogBuffer (newest kept). The
shipper opens a ShipLogs stream when there is something to send, writes batches of up to
`batch_lines` lines across containers for about `session_seconds` (each `write` waits for
HTTP/2 flow control: that is the back-pressure), then half-closes and reads the reply,
which acknowledges the highest sequence runtime stored per container. Runtime stores each
batch as it arrives, so a line is readable long before its acknowledgement. A failed
stream (runtime down or restarting) rewinds to the acknowledged sequences and retries with
backoff (every cursor the session moved goes back, including a batch whose write failed
because the stream was already dead); runtime drops the lines it already had, so nothing
acknowledged is lost or stored twice. Losses are counted from acknowledged state only:
when runtime acknowledges sequence A, every line up to A that no acknowledged session
carried left the buffer unshipped; the app's are counted lost once, logged by the agent,
and announced in the container's own log with a line of the agent's, and a notice of ours
among them gives its count back to the next one. So a batch collected long before, a
session that failed or was answered without storing, never counts or announces anything:
the notices runtime stores add up to the lines lost.

Metrics: every `interval` seconds, each live container's RSS, CPU (millicores over the
interval, from psutil's cumulative CPU time) and the server's totals; samples wait in a
bounded deque (newest kept) until ShipMetrics accepts them. Network bytes per container
(NETWORK_RX/TX: bytes over the interval, so runtime bills rx + tx): psutil has no
per-process network counters, and a process driver's apps share the host's network
namespace, so /proc/PID/net/dev would report the whole host. The process driver counts
them instead in its ingress proxy (services/agent/proxy.py: rx from clients, tx to them),
and its samples carry those totals; a container in a network namespace of its own (a
future image driver) is read from that namespace's /proc/PID/net/dev. The first reading
of a container counts from zero (the proxy starts with it); bytes after the last reading
before a container ends are not sampled (nor is its CPU then). The server's totals always
carry network bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import psutil
from google.protobuf import timestamp_pb2

from hangar.runtime.v1 import runtime_pb2 as pb
from hangar.runtime.v1 import runtime_pb2_grpc
from services.agent.domain import ContainerInfo, LogStream, ResourceSample, SleepState
from services.agent.drivers import Driver
from shared.clients import Clients
from shared.loops import cancel_and_wait
from shared.proto import timestamp
from shared.settings import Settings

log = logging.getLogger("hangar.agent.shipping")

RUNTIME_SERVICE = pb.DESCRIPTOR.services_by_name["RuntimeService"]
_STREAM = {
    LogStream.STDOUT: pb.LOG_STREAM_STDOUT,
    LogStream.STDERR: pb.LOG_STREAM_STDERR,
    LogStream.BUILD: pb.LOG_STREAM_BUILD,
}
ServerName = Callable[[], str]


class LogShipper:
    STALL_LIMIT = 3

    def __init__(
        self,
        driver: Driver,
        stub: runtime_pb2_grpc.RuntimeServiceStub,
        server: ServerName,
        *,
        batch_lines: int = 2000,
        session_seconds: float = 1.0,
        poll_seconds: float = 0.02,
        max_backoff_seconds: float = 2.0,
    ) -> None:
        self.driver = driver
        self.stub = stub
        self.server = server
        self.batch_lines = batch_lines
        self.session_seconds = session_seconds
        self.poll_seconds = poll_seconds
        self.max_backoff = max_backoff_seconds
        self.acknowledged: dict[str, int] = {}
        self._sent: dict[str, int] = {}  # cursor: >= acknowledged (refused lines are skipped)
        self.lost: dict[str, int] = {}  # evicted before they could be sent
        self._stalls: dict[str, int] = {}  # sessions in a row without progress
        # Every line up to here is stored (acknowledged), counted lost, or skipped as refused.
        self._accounted: dict[str, int] = {}
        self._unannounced: dict[str, int] = {}  # lost lines the container's log was not told of
        # Notices in a container's buffer not acknowledged yet: sequence -> the count it
        # announces. One pushed out before runtime stored it hands its count back.
        self._notices: dict[str, dict[int, int]] = {}
        self.shipped = 0
        self.sessions = 0
        self.failures = 0

    # ---------------------------------------------------------------------- loop

    async def run(self) -> None:
        backoff = 0.05
        outage_logged = False
        while True:
            try:
                sent = await self.ship_session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                if not outage_logged:
                    log.warning("cannot ship logs to runtime; retrying", extra={"error": str(exc)})
                    outage_logged = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            if outage_logged:
                log.info("shipping logs to runtime again")
                outage_logged = False
            backoff = 0.05
            if not sent:
                await asyncio.sleep(self.poll_seconds)

    async def flush(self, within_seconds: float) -> bool:
        """Ship what is buffered (the agent's shutdown); True once everything is acknowledged."""
        deadline = time.monotonic() + within_seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                # Bounded as a whole: a runtime that accepts the stream but never answers
                # must not hold the agent's shutdown for the session's own timeout.
                shipped = await asyncio.wait_for(self.ship_session(), remaining)
                if not shipped and not self._unacknowledged():
                    return True
            except TimeoutError:
                return False
            except Exception:  # runtime away: give up at the deadline
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return False

    # ------------------------------------------------------------------- session

    async def ship_session(self) -> int:
        """One ShipLogs stream; how many lines it carried (0: nothing to send, no stream)."""
        at_start = dict(self._sent)
        first = self._collect()
        if not first:
            return 0
        call = self.stub.ShipLogs(timeout=self.session_seconds + 30)
        sent_here: dict[str, int] = {}
        written: dict[str, set[int]] = {}  # what this session carried, per container
        count = 0
        try:
            batch = first
            deadline = time.monotonic() + self.session_seconds
            idle_since: float | None = None
            while True:
                if batch:
                    await call.write(pb.ShipLogsRequest(server_id=self.server(), lines=batch))
                    for line in batch:
                        sent_here[line.container_id] = line.sequence
                        written.setdefault(line.container_id, set()).add(line.sequence)
                    count += len(batch)
                    idle_since = None
                now = time.monotonic()
                if now >= deadline:
                    break
                if not batch:
                    idle_since = idle_since or now
                    if now - idle_since > 10 * self.poll_seconds:
                        break
                    await asyncio.sleep(self.poll_seconds)
                batch = self._collect()
            await call.done_writing()
            reply: pb.ShipLogsResponse = await call
        except BaseException:
            call.cancel()
            # Rewind every cursor this session moved, written or not: a write fails at once
            # when the stream is already dead (runtime down, no token), and a batch collected
            # for it never left. Runtime drops what it had already.
            for container_id in list(self._sent):
                if container_id in at_start:
                    self._sent[container_id] = at_start[container_id]
                else:
                    del self._sent[container_id]
            raise
        self.sessions += 1
        self.shipped += count
        self._apply(reply, sent_here, at_start, written)
        self.announce_losses()
        return count

    def _apply(
        self,
        reply: pb.ShipLogsResponse,
        sent_here: dict[str, int],
        at_start: dict[str, int],
        written: dict[str, set[int]],
    ) -> None:
        for container_id, sequence in reply.acknowledged_sequences.items():
            if sequence > self.acknowledged.get(container_id, 0):
                self.acknowledged[container_id] = sequence
            buffer = self.driver.logs(container_id)
            if buffer is not None:
                buffer.acknowledge(sequence)
            self._account(container_id, sequence, written.get(container_id, set()))
        if reply.rejected_lines:
            log.warning(
                "runtime refused log lines",
                extra={"count": reply.rejected_lines, "reason": reply.rejected_reason},
            )
        # Sent but not acknowledged: refused (unknown container, bad timestamp), or cut off
        # (runtime shutting down answers for what it stored). Offer them again from the
        # acknowledgement; lines that make no progress STALL_LIMIT times are skipped.
        for container_id, last_sent in sent_here.items():
            acked = self.acknowledged.get(container_id, 0)
            if acked >= last_sent:
                self._stalls.pop(container_id, None)
                continue
            before = at_start.get(container_id, 0)
            stalls = 0 if acked > before else self._stalls.get(container_id, 0) + 1
            if stalls >= self.STALL_LIMIT:
                log.warning(
                    "runtime keeps refusing these log lines; skipping them",
                    extra={"container_id": container_id, "up_to": last_sent},
                )
                self._stalls.pop(container_id, None)
                self._forget_notices(container_id, last_sent)
                self._accounted[container_id] = max(self._accounted.get(container_id, 0), last_sent)
                continue
            self._stalls[container_id] = stalls
            self._sent[container_id] = max(acked, 0)

    def _collect(self) -> list[pb.LogLine]:
        """Up to batch_lines unsent lines, across containers, oldest first per container."""
        out: list[pb.LogLine] = []
        live = set()
        for info in self.driver.list():
            container_id = info.container_id
            live.add(container_id)
            buffer = self.driver.logs(container_id)
            if buffer is None:
                continue
            if container_id not in self._sent and buffer.resumed_after:
                # Adopted after an agent restart: its lines go on past the earlier agent's.
                for cursors in (self._sent, self._accounted, self.acknowledged):
                    cursors[container_id] = buffer.resumed_after
            cursor = self._sent.get(container_id, 0)
            if buffer.last_sequence <= cursor or len(out) >= self.batch_lines:
                continue
            lines = buffer.since(cursor, self.batch_lines - len(out))
            for line in lines:
                out.append(
                    pb.LogLine(
                        container_id=container_id,
                        stream=_STREAM[line.stream],
                        line=line.text,
                        emitted_at=timestamp(line.emitted_at),
                        sequence=line.sequence,
                    )
                )
            if lines:
                self._sent[container_id] = lines[-1].sequence
        for gone in [c for c in self._sent if c not in live]:  # the driver forgot them
            self._sent.pop(gone, None)
            self.acknowledged.pop(gone, None)
            self._accounted.pop(gone, None)
            self._notices.pop(gone, None)
            self._stalls.pop(gone, None)
        return out

    def _account(self, container_id: str, acknowledged: int, written: set[int]) -> None:
        """Runtime acknowledged `acknowledged`: every line after the accounted ones up to it
        was carried by this session (stored) or left the buffer unshipped. Of the latter,
        the app's are lost (counted once); a notice of ours gives its count back, to be
        announced again. Stored notices are done with."""
        first = self._accounted.get(container_id, 0) + 1
        if acknowledged < first:
            return
        self._accounted[container_id] = acknowledged
        notices = self._notices.get(container_id, {})
        unshipped = acknowledged - first + 1 - sum(1 for s in written if first <= s <= acknowledged)
        for sequence in [s for s in notices if s <= acknowledged]:
            count = notices.pop(sequence)
            if sequence >= first and sequence not in written:
                unshipped -= 1
                self._unannounced[container_id] = self._unannounced.get(container_id, 0) + count
        if unshipped > 0:
            self.lost[container_id] = self.lost.get(container_id, 0) + unshipped
            self._unannounced[container_id] = self._unannounced.get(container_id, 0) + unshipped
            log.warning(
                "log lines dropped before they could be shipped",
                extra={"container_id": container_id, "count": unshipped},
            )

    def _forget_notices(self, container_id: str, through: int) -> None:
        notices = self._notices.get(container_id)
        if notices:
            for sequence in [s for s in notices if s <= through]:
                del notices[sequence]

    def announce_losses(self) -> None:
        """Tell each container's log how many lines it lost, once runtime takes lines again
        (written during the outage, the notice itself could be pushed out of the buffer).
        The notice is a line like the app's; until runtime acknowledges it, its count is
        remembered, and given back if the notice is pushed out unshipped (`_account`)."""
        for container_id, count in list(self._unannounced.items()):
            buffer = self.driver.logs(container_id)
            if buffer is not None:
                notice = buffer.append(
                    LogStream.STDERR,
                    f"[hangar agent] {count} log lines were dropped: runtime could not take "
                    f"them and the agent keeps only the newest {buffer.capacity}",
                )
                self._notices.setdefault(container_id, {})[notice.sequence] = count
            del self._unannounced[container_id]

    def _unacknowledged(self) -> bool:
        for info in self.driver.list():
            buffer = self.driver.logs(info.container_id)
            if buffer is not None and buffer.last_sequence > self.acknowledged.get(
                info.container_id, 0
            ):
                # Refused lines are never acknowledged; count them as done once sent.
                if buffer.last_sequence > self._sent.get(info.container_id, 0):
                    return True
        return False


# --------------------------------------------------------------------------- metrics


@dataclass
class _CpuReading:
    cpu_seconds: float
    at: float  # time.time()
    run: int = 1  # of the container's process (a wake starts a new one, from zero)


def _net_namespace(pid: int | str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def _net_dev_bytes(pid: int) -> tuple[int, int] | None:
    """(rx, tx) bytes over the non-loopback interfaces of the process's network namespace."""
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            lines = f.readlines()[2:]
    except OSError:
        return None
    rx = tx = 0
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            continue
        fields = counters.split()
        if len(fields) >= 9:
            rx += int(fields[0])
            tx += int(fields[8])
    return rx, tx


class MetricShipper:
    def __init__(
        self,
        driver: Driver,
        stub: runtime_pb2_grpc.RuntimeServiceStub,
        server: ServerName,
        *,
        interval_seconds: float = 5.0,
        buffer_samples: int = 20_000,
        batch_samples: int = 5000,
        server_totals: bool = True,
    ) -> None:
        self.driver = driver
        self.stub = stub
        self.server = server
        self.interval = interval_seconds
        self.batch = batch_samples
        self.server_totals = server_totals
        self.pending: deque[pb.MetricSample] = deque(maxlen=buffer_samples)
        self.dropped = 0
        self._cpu: dict[str, _CpuReading] = {}
        self._rss: dict[str, int] = {}  # the last RSS read of each live container
        self._net: dict[str, tuple[int, int]] = {}
        self._finished: set[tuple[str, int]] = set()  # (container, run): last reading taken
        self._host_netns = _net_namespace("self")
        self._host_cpu: tuple[float, float] | None = None  # (busy seconds, at)
        self._host_net: tuple[int, int] | None = None

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.sample()
                await self.ship()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("metric round failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def sample(self) -> int:
        """Read every live container (and the server), and take the last reading of each
        run that ended since (the container ended, or went to sleep); how many samples were
        added.

        A run's last reading, stamped at its end, covers the time since its last periodic
        sample (up to `interval` of CPU, memory and bytes that would otherwise go unbilled):
        CPU and bytes exactly, memory as the last RSS read (its peak if it never was read).
        Each run also starts with zero samples at its start, so its first reading is billed
        for the time since the start, and a sleep is billed as nothing.
        """
        now = time.time()
        at = timestamp(datetime.fromtimestamp(now, UTC))
        samples: list[pb.MetricSample] = []
        runs: set[tuple[str, int]] = set()
        live: set[str] = set()
        for info in self.driver.list():
            cid = info.container_id
            run = (cid, info.run)
            runs.add(run)
            if not info.state.ended:
                live.add(cid)
            previous = self._cpu.get(cid)
            if previous is not None and previous.run < info.run:
                # A run ended (a sleep) and the next began since the last round: its last
                # reading is still owed.
                if (cid, previous.run) not in self._finished:
                    last = self.driver.final_reading(cid)
                    if last is not None and last.run == previous.run:
                        samples += self._reading_samples(info, last, now, at, ended=True)
                    self._finished.add((cid, previous.run))
            resting = info.state.ended or info.sleep is SleepState.SLEEPING
            if resting and run in self._finished:
                continue
            reading = self.driver.sample(cid)
            if resting:
                self._finished.add(run)
            if reading is not None:
                samples += self._reading_samples(info, reading, now, at, ended=resting)
        for gone in [c for c in self._cpu if c not in live]:
            self._cpu.pop(gone, None)
            self._rss.pop(gone, None)
            self._net.pop(gone, None)
        self._finished &= runs  # the driver forgot the rest
        if self.server_totals:
            samples.extend(self._server_samples(now, at))
        before = len(self.pending)
        self.pending.extend(samples)
        self.dropped += max(0, before + len(samples) - len(self.pending))
        return len(samples)

    def _reading_samples(
        self,
        info: ContainerInfo,
        reading: ResourceSample,
        now: float,
        at: timestamp_pb2.Timestamp,
        *,
        ended: bool,
    ) -> list[pb.MetricSample]:
        """One reading of one run as samples; a run's first also gets zeros at its start."""
        cid, samples = info.container_id, []
        if ended:  # stamped at the run's end, not now
            read_at, stamp = reading.sampled_at.timestamp(), timestamp(reading.sampled_at)
        else:
            read_at, stamp = now, at
        previous = self._cpu.get(cid)
        if previous is None or previous.run != reading.run:  # a new process: from its start
            started = info.started_at if reading.run == info.run else None
            previous = _CpuReading(
                0.0, started.timestamp() if started else now - self.interval, reading.run
            )
            self._rss.pop(cid, None)
            if started is not None:
                # Runtime bills each sample for the time since the one before: zeros at the
                # start make the first reading stand for exactly the time since the start
                # (a 0.5 s job is not billed as a nominal interval).
                begun = timestamp(started)
                samples.append(self._sample(cid, pb.METRIC_TYPE_MEMORY_RSS_BYTES, 0, begun))
                samples.append(self._sample(cid, pb.METRIC_TYPE_CPU_MILLICORES, 0, begun))
        rss = self._rss.get(cid, reading.rss_bytes) if ended else reading.rss_bytes
        self._rss[cid] = rss
        samples.append(self._sample(cid, pb.METRIC_TYPE_MEMORY_RSS_BYTES, rss, stamp))
        elapsed = read_at - previous.at
        if elapsed > 0:
            used = max(0.0, reading.cpu_seconds - previous.cpu_seconds)
            samples.append(
                self._sample(cid, pb.METRIC_TYPE_CPU_MILLICORES, used / elapsed * 1000, stamp)
            )
        self._cpu[cid] = _CpuReading(reading.cpu_seconds, read_at, reading.run)
        if reading.rx_bytes is not None and reading.tx_bytes is not None:
            if cid not in self._net:  # counted by the driver since the container started
                self._net[cid] = (0, 0)
            samples.extend(self._net_samples(cid, (reading.rx_bytes, reading.tx_bytes), stamp))
        elif info.pid and _net_namespace(info.pid) not in ("", self._host_netns):
            samples.extend(self._net_samples(cid, _net_dev_bytes(info.pid), stamp))
        return samples

    def _server_samples(self, now: float, at: timestamp_pb2.Timestamp) -> list[pb.MetricSample]:
        memory = psutil.virtual_memory()
        out = [
            self._sample("", pb.METRIC_TYPE_MEMORY_RSS_BYTES, memory.total - memory.available, at)
        ]
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        if self._host_cpu is not None and now > self._host_cpu[1]:
            used = max(0.0, busy - self._host_cpu[0])
            out.append(
                self._sample(
                    "", pb.METRIC_TYPE_CPU_MILLICORES, used / (now - self._host_cpu[1]) * 1000, at
                )
            )
        self._host_cpu = (busy, now)
        counters = psutil.net_io_counters()
        if counters is not None:
            out.extend(self._net_samples("", (counters.bytes_recv, counters.bytes_sent), at))
        return out

    def _net_samples(
        self, cid: str, totals: tuple[int, int] | None, at: timestamp_pb2.Timestamp
    ) -> list[pb.MetricSample]:
        if totals is None:
            return []
        previous = self._net.get(cid) if cid else self._host_net
        if cid:
            self._net[cid] = totals
        else:
            self._host_net = totals
        if previous is None:
            return []
        rx, tx = (max(0, now - before) for now, before in zip(totals, previous, strict=True))
        return [
            self._sample(cid, pb.METRIC_TYPE_NETWORK_RX_BYTES, rx, at),
            self._sample(cid, pb.METRIC_TYPE_NETWORK_TX_BYTES, tx, at),
        ]

    @staticmethod
    def _sample(
        cid: str, metric: pb.MetricType, value: float, at: timestamp_pb2.Timestamp
    ) -> pb.MetricSample:
        return pb.MetricSample(container_id=cid, metric=metric, value=value, sampled_at=at)

    async def ship(self) -> int:
        """Send what is pending, oldest first; stops at the first failure (kept for later)."""
        shipped = 0
        while self.pending:
            chunk = [self.pending[i] for i in range(min(self.batch, len(self.pending)))]
            try:
                await self.stub.ShipMetrics(
                    pb.ShipMetricsRequest(server_id=self.server(), samples=chunk)
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("cannot ship metrics to runtime", extra={"error": exc.code().name})
                return shipped
            for _ in chunk:
                self.pending.popleft()
            shipped += len(chunk)
        return shipped


# ------------------------------------------------------------------------- the agent


class AgentTelemetry:
    """Both shippers on the agent's channel to runtime, started and stopped with the agent."""

    def __init__(
        self,
        settings: Settings,
        driver: Driver,
        clients: Clients,
        *,
        server: ServerName | None = None,
    ) -> None:
        # The agent's clients: its token, its metrics (ShipLogs and ShipMetrics are counted
        # as its other calls), and a channel to runtime that a renewed certificate replaces
        # (follow_files).
        self._clients = clients
        stub = self._runtime_stub(clients)
        name = server or (lambda: settings.agent_server or socket.gethostname())
        self.logs = LogShipper(driver, stub, name, batch_lines=settings.telemetry_ship_batch_lines)
        self.metrics = MetricShipper(
            driver,
            stub,
            name,
            interval_seconds=settings.telemetry_sample_seconds,
            buffer_samples=settings.telemetry_metric_buffer_samples,
        )
        self.flush_seconds = settings.grace_seconds
        self._tasks: list[asyncio.Task[None]] = []

    @staticmethod
    def _runtime_stub(clients: Clients) -> runtime_pb2_grpc.RuntimeServiceStub:
        return clients.stub("runtime", runtime_pb2_grpc.RuntimeServiceStub, RUNTIME_SERVICE)

    def follow_files(self) -> None:
        """The TLS files were renewed: the next log session and metric batch go on a channel
        with them (the one in flight ends on the old one)."""
        self._clients.files_changed()
        self.logs.stub = self.metrics.stub = self._runtime_stub(self._clients)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.logs.run()),
            asyncio.create_task(self.metrics.run()),
        ]

    async def close(self) -> None:
        """Call after the driver stopped the apps: their last lines still go out."""
        await cancel_and_wait(self._tasks)
        with contextlib.suppress(Exception):
            await self.logs.flush(self.flush_seconds)
