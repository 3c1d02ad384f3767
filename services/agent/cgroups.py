"""Reads what the kernel accounts for one container's cgroup: memory in use and at its
peak, CPU time, and how many times it was OOM-killed. runc creates and configures the
cgroup (linux.cgroupsPath in the bundle); this only reads its files, on cgroup v2 (one
unified hierarchy) and v1 (one hierarchy per controller, possibly with a hybrid v2 mount).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CgroupReading:
    memory_bytes: int  # in use, less the page cache the kernel can drop (the working set)
    memory_peak_bytes: int  # 0 where the kernel does not keep it
    cpu_seconds: float  # user + system of every process the cgroup ever held
    oom_kills: int  # processes the kernel killed for the memory limit


def unified(root: Path = ROOT) -> bool:
    """cgroup v2 only (not v1 with a hybrid v2 mount at /sys/fs/cgroup/unified)."""
    return (root / "cgroup.controllers").exists()


class Cgroup:
    """One cgroup by its runc `cgroupsPath` (absolute, e.g. /hangar/<container id>)."""

    def __init__(self, path: str, root: Path = ROOT) -> None:
        relative = path.strip("/")
        self.v2 = unified(root)
        if self.v2:
            self.memory = self.cpu = root / relative
        else:
            self.memory = root / "memory" / relative
            self.cpu = _v1_controller(root, "cpuacct") / relative

    def read(self) -> CgroupReading | None:
        """None once the cgroup is gone."""
        try:
            return self._read_v2() if self.v2 else self._read_v1()
        except (FileNotFoundError, ProcessLookupError):
            return None

    def _read_v2(self) -> CgroupReading:
        stat = _keyed(self.memory / "memory.stat")
        current = _int(self.memory / "memory.current")
        usage_usec = _keyed(self.cpu / "cpu.stat").get("usage_usec", 0)
        peak = _int(self.memory / "memory.peak") if (self.memory / "memory.peak").exists() else 0
        return CgroupReading(
            memory_bytes=max(0, current - stat.get("inactive_file", 0)),
            memory_peak_bytes=peak,
            cpu_seconds=usage_usec / 1e6,
            oom_kills=_keyed(self.memory / "memory.events").get("oom_kill", 0),
        )

    def _read_v1(self) -> CgroupReading:
        stat = _keyed(self.memory / "memory.stat")
        usage = _int(self.memory / "memory.usage_in_bytes")
        return CgroupReading(
            memory_bytes=max(0, usage - stat.get("total_inactive_file", 0)),
            memory_peak_bytes=_int(self.memory / "memory.max_usage_in_bytes"),
            cpu_seconds=_int(self.cpu / "cpuacct.usage") / 1e9,
            oom_kills=_keyed(self.memory / "memory.oom_control").get("oom_kill", 0),
        )


def _v1_controller(root: Path, name: str) -> Path:
    """The mount of a v1 controller: `cpuacct` is often co-mounted as `cpu,cpuacct`."""
    if (root / name).is_dir():
        return root / name
    for entry in sorted(os.listdir(root)):
        if name in entry.split(","):
            return root / entry
    return root / name


def _int(path: Path) -> int:
    return int(path.read_text().strip() or 0)


def _keyed(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file ("name value" per line)."""
    values = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[name] = int(value)
    return values
