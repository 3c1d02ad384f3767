"""Telemetry's plain types: metric names, what a shipped line may look like, log and metric
queries and what they return, usage reports and their keys, log page tokens. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import asyncpg

from shared import pagination
from shared.errors import InvalidArgument
from shared.usage import UsageMetric as UsageMetric  # re-exported: telemetry's public name


def utcnow() -> datetime:
    return datetime.now(UTC)


class MetricName(StrEnum):
    MEMORY_RSS_BYTES = "memory_rss_bytes"  # gauge
    CPU_MILLICORES = "cpu_millicores"  # gauge over the sample interval
    NETWORK_RX_BYTES = "network_rx_bytes"  # bytes during the sample interval
    NETWORK_TX_BYTES = "network_tx_bytes"


class Aggregation(StrEnum):
    AVG = "avg"
    MAX = "max"
    SUM = "sum"  # the network counters' bytes per step


@dataclass(frozen=True)
class ContainerRef:
    """Where a container's telemetry belongs (from the containers row; never changes)."""

    id: str
    project_id: str
    deployment_id: str
    server_id: str
    organization_id: str


@dataclass(frozen=True)
class IngestLimits:
    """What a shipped line or sample may look like; the rest is refused or trimmed."""

    max_line_chars: int = 16 * 1024
    # Lines older than this have no partition for sure (yesterday's always exists).
    max_age: timedelta = timedelta(hours=23)
    max_skew: timedelta = timedelta(minutes=5)  # agent clocks ahead of ours

    def time_problem(self, at: datetime, now: datetime) -> str:
        """Why `at` is refused, or "" when it is acceptable."""
        if at > now + self.max_skew:
            return f"timestamp {at.isoformat()} is in the future"
        if at < now - self.max_age:
            return f"timestamp {at.isoformat()} is older than {self.max_age}"
        return ""

    def clean_line(self, text: str) -> tuple[str, bool]:
        """The line as stored (NUL cannot be stored in text), and whether it was trimmed."""
        trimmed = len(text) > self.max_line_chars
        if trimmed:
            text = text[: self.max_line_chars]
        if "\x00" in text:
            text = text.replace("\x00", "\ufffd")
        return text, trimmed


@dataclass(frozen=True)
class LogEntry:
    project_id: str
    deployment_id: str
    container_id: str
    stream: str
    line: str
    emitted_at: datetime
    sequence: int

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> LogEntry:
        return cls(
            row["project_id"],
            row["deployment_id"],
            row["container_id"],
            row["stream"],
            row["line"],
            row["emitted_at"],
            row["sequence"],
        )


@dataclass(frozen=True)
class LogQuery:
    project_id: str
    start: datetime
    end: datetime
    deployment_id: str = ""
    container_id: str = ""
    contains: str = ""


@dataclass(frozen=True)
class MetricQuery:
    project_id: str
    metric: MetricName
    start: datetime
    end: datetime
    step: timedelta
    aggregation: Aggregation = Aggregation.AVG
    container_id: str = ""
    server_id: str = ""
    server_totals: bool = False  # the server's own samples (platform admins), not the project's

    MAX_POINTS = 11_000

    def validate(self) -> MetricQuery:
        if self.end <= self.start:
            raise InvalidArgument.field("end_time", "must be after start_time")
        if self.step < timedelta(seconds=1):
            raise InvalidArgument.field("step", "at least 1s")
        if (self.end - self.start) / self.step > self.MAX_POINTS:
            raise InvalidArgument.field("step", f"at most {self.MAX_POINTS} points per series")
        if self.server_totals and not self.server_id:
            raise InvalidArgument.field("server_id", "required for server totals")
        return self


@dataclass(frozen=True)
class MetricSeries:
    container_id: str
    server_id: str
    points: list[tuple[datetime, float]]


@dataclass(frozen=True)
class UsageReport:
    idempotency_key: str
    organization_id: str
    project_id: str
    container_id: str
    metric: UsageMetric
    window_start: datetime
    window_end: datetime
    quantity: int


def usage_key(container_id: str, metric: UsageMetric, window_start: datetime) -> str:
    """Counted once by billing: container + metric + window."""
    return f"{container_id}:{metric.value}:{window_start.astimezone(UTC).isoformat()}"


def window_start_of(at: datetime, width: timedelta) -> datetime:
    """The start of the fixed (epoch-aligned) usage window holding `at`."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((at - epoch) // width) * width


# ------------------------------------------------------------------------ page tokens


def encode_log_token(entry: LogEntry) -> str:
    return pagination.encode_page_token(
        [entry.emitted_at.isoformat(), entry.container_id, entry.sequence]
    )


def decode_log_token(token: str) -> tuple[datetime, str, int]:
    key = pagination.decode_page_token(token, (str, str, int))
    if key is None:
        raise InvalidArgument.field("page_token", "not a page token from this list")
    at, container_id, sequence = key
    try:
        return datetime.fromisoformat(at), container_id, sequence
    except ValueError:
        raise InvalidArgument.field("page_token", "not a page token from this list") from None
