"""Conversions between domain values and protobuf well-known types, shared by every servicer."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """A Timestamp (a naive datetime is taken as UTC); arithmetic, so cheap on hot paths."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def optional_timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    """None stays None: an unset message field, not the epoch."""
    return None if moment is None else timestamp(moment)
