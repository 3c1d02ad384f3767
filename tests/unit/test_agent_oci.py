"""The container driver's pure parts: the OCI spec it writes, the cgroup files it reads (v1
and v2 layouts, built in a temporary directory), and the per-project uid table."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from services.agent.cgroups import Cgroup
from services.agent.oci import Bundle, Limits, Stack, runtime_spec, write_bundle
from services.agent.uids import FIRST_UID, UidTable
from shared.resources import Resources


def bundle(**limits: int) -> Bundle:
    return Bundle(
        container_id="c-1",
        command="exec app",
        uid=FIRST_UID + 7,
        env={"PORT": "8080", "SECRET": "s3cret"},
        limits=Limits(
            resources=Resources(limits.get("ram_mb", 64), limits.get("cpu_millis", 250)),
            pids=limits.get("pids", 100),
            tmpfs_mb=limits.get("tmpfs_mb", 16),
        ),
        netns_path="/run/netns/hangar-x-c-1",
        cgroups_path="/hangar/x/c-1",
    )


def test_limits_come_from_the_allocation() -> None:
    resources = runtime_spec(bundle())["linux"]["resources"]
    assert resources["memory"] == {"limit": 64 << 20, "swap": 64 << 20}  # no swap
    assert resources["cpu"] == {"quota": 25_000, "period": 100_000}  # a quarter of a core
    assert resources["pids"] == {"limit": 100}
    unlimited = runtime_spec(bundle(ram_mb=0, cpu_millis=0))["linux"]["resources"]
    assert "memory" not in unlimited and "cpu" not in unlimited
    assert runtime_spec(bundle(cpu_millis=1))["linux"]["resources"]["cpu"]["quota"] == 1_000


def test_the_process_is_unprivileged_and_sees_only_its_own_environment() -> None:
    spec = runtime_spec(bundle(), {"defaultAction": "SCMP_ACT_ERRNO"})
    process = spec["process"]
    assert process["user"]["uid"] == process["user"]["gid"] == FIRST_UID + 7
    assert all(caps == [] for caps in process["capabilities"].values())
    assert process["noNewPrivileges"] is True
    assert process["args"][:3] == ["/usr/bin/tini", "-g", "--"]
    names = {entry.split("=", 1)[0] for entry in process["env"]}
    assert names == {"PATH", "HOME", "LANG", "TZ", "PORT", "SECRET"}
    assert spec["root"] == {"path": "rootfs", "readonly": True}
    assert spec["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_ERRNO"}
    kinds = {ns["type"] for ns in spec["linux"]["namespaces"]}
    assert kinds == {"pid", "network", "ipc", "uts", "mount", "cgroup"}
    assert {"/proc/kcore", "/sys/firmware"} <= set(spec["linux"]["maskedPaths"])
    binds = {m["destination"]: m for m in spec["mounts"] if m["type"] == "bind"}
    assert all("ro" in m["options"] for m in binds.values()) and "/usr" in binds
    tmpfs = {m["destination"]: m["options"] for m in spec["mounts"] if m["type"] == "tmpfs"}
    assert "size=16m" in tmpfs["/tmp"] and "size=16m" in tmpfs["/home/app"]


def test_the_bundle_keeps_its_secrets_to_root(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", bundle(), None)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "b" / "config.json").stat().st_mode & 0o777 == 0o600
    assert "s3cret" in (tmp_path / "b" / "config.json").read_text()
    rootfs = tmp_path / "b" / "rootfs"
    passwd = (rootfs / "etc" / "passwd").read_text()
    assert f"app:x:{FIRST_UID + 7}:{FIRST_UID + 7}:" in passwd
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777  # runc keeps it for the tmpfs
    assert os.readlink(rootfs / "bin") == "usr/bin"


def test_the_stack_binds_only_what_the_host_has(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    stack = Stack(usr="/usr", etc=(str(tmp_path / "certs"), str(tmp_path / "missing")))
    assert stack.binds() == [("/usr", "/usr"), (str(tmp_path / "certs"),) * 2]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_cgroup_v2_reading(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "cgroup.controllers": "cpu memory pids",
            "hangar/x/c-1/memory.current": "50000000\n",
            "hangar/x/c-1/memory.peak": "60000000\n",
            "hangar/x/c-1/memory.stat": "anon 40000000\ninactive_file 10000000\n",
            "hangar/x/c-1/memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
            "hangar/x/c-1/cpu.stat": "usage_usec 2500000\nuser_usec 2000000\n",
        },
    )
    reading = Cgroup("/hangar/x/c-1", root=tmp_path).read()
    assert reading is not None
    assert (reading.memory_bytes, reading.memory_peak_bytes) == (40_000_000, 60_000_000)
    assert (reading.cpu_seconds, reading.oom_kills) == (2.5, 1)


def test_cgroup_v1_reading_with_a_comounted_cpuacct(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "memory/hangar/x/c-1/memory.usage_in_bytes": "30000000\n",
            "memory/hangar/x/c-1/memory.max_usage_in_bytes": "70000000\n",
            "memory/hangar/x/c-1/memory.stat": "cache 5\ntotal_inactive_file 5000000\n",
            "memory/hangar/x/c-1/memory.oom_control": "oom_kill_disable 0\noom_kill 2\n",
            "cpu,cpuacct/hangar/x/c-1/cpuacct.usage": "1500000000\n",
        },
    )
    reading = Cgroup("/hangar/x/c-1", root=tmp_path).read()
    assert reading is not None
    assert (reading.memory_bytes, reading.memory_peak_bytes) == (25_000_000, 70_000_000)
    assert (reading.cpu_seconds, reading.oom_kills) == (1.5, 2)
    assert Cgroup("/hangar/x/gone", root=tmp_path).read() is None


def test_each_project_has_its_own_uid_kept_across_agents(tmp_path: Path) -> None:
    path = tmp_path / "uids.json"
    results: dict[str, int] = {}

    def allocate(project: str) -> None:
        results[project] = UidTable(path).uid_of(project)  # a table per thread: the file decides

    threads = [threading.Thread(target=allocate, args=(f"p-{n}",)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results.values()) == list(range(FIRST_UID, FIRST_UID + 20))
    again = UidTable(path)
    assert all(again.uid_of(project) == uid for project, uid in results.items())
    assert json.loads(path.read_text()) == results
    with pytest.raises(ValueError):
        again.uid_of("")
