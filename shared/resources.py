"""RAM, CPU and bandwidth in one type: a plan's pool, an organization's allocation, a project's
size, a server's capacity and reservations, a deployment's and a container's limits.

It mirrors the one proto message (hangar.type.v1.Resources) every service's contract uses, so
the deploy path reads project -> runtime -> agent without translating field by field.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hangar.type.v1 import resources_pb2

DIMENSIONS = ("ram_mb", "cpu_millis", "bandwidth_gb")


@dataclass(frozen=True)
class Resources:
    ram_mb: int = 0
    cpu_millis: int = 0
    bandwidth_gb: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.ram_mb + other.ram_mb,
            self.cpu_millis + other.cpu_millis,
            self.bandwidth_gb + other.bandwidth_gb,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.ram_mb - other.ram_mb,
            self.cpu_millis - other.cpu_millis,
            self.bandwidth_gb - other.bandwidth_gb,
        )

    def items(self) -> Iterator[tuple[str, int]]:
        return ((name, getattr(self, name)) for name in DIMENSIONS)

    def fits_in(self, room: Resources) -> bool:
        """True when no dimension is larger than `room`'s."""
        return all(value <= getattr(room, name) for name, value in self.items())

    @property
    def compute(self) -> Resources:
        """RAM and CPU only: what a server reserves and a container is limited to (bandwidth
        is metered per project, never held by one machine)."""
        return Resources(self.ram_mb, self.cpu_millis) if self.bandwidth_gb else self

    def to_proto(self) -> resources_pb2.Resources:
        return resources_pb2.Resources(
            ram_mb=self.ram_mb, cpu_millis=self.cpu_millis, bandwidth_gb=self.bandwidth_gb
        )

    @classmethod
    def from_proto(cls, message: resources_pb2.Resources) -> Resources:
        return cls(message.ram_mb, message.cpu_millis, message.bandwidth_gb)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], prefix: str = "", suffix: str = "") -> Resources:
        """From columns named `<prefix><dimension><suffix>`: RAM and CPU must be there (a
        KeyError names a column the query forgot); bandwidth is 0 where the table has none."""
        bandwidth = f"{prefix}bandwidth_gb{suffix}"
        return cls(
            row[f"{prefix}ram_mb{suffix}"],
            row[f"{prefix}cpu_millis{suffix}"],
            row[bandwidth] if bandwidth in row.keys() else 0,
        )
