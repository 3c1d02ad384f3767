"""The usage metrics billing charges for, as runtime reports them and billing stores them.

One definition for both services: runtime's usage ledger, billing's usage records and the
idempotency keys between them spell a metric by these values.
"""

from __future__ import annotations

from enum import StrEnum


class UsageMetric(StrEnum):
    RAM_MB_SECONDS = "ram_mb_seconds"
    CPU_MILLIS_SECONDS = "cpu_millis_seconds"
    BANDWIDTH_BYTES = "bandwidth_bytes"


USAGE_METRICS: tuple[UsageMetric, ...] = tuple(UsageMetric)
