"""The OCI runtime bundle of one container: its root filesystem and its config.json.

Pure functions of what the container is (its command, environment, uid and limits); the
runc driver writes them and runc does the rest (namespaces, mounts, cgroups, seccomp).

The root filesystem is read-only and holds nothing of the host's but the *stack*, bound
read-only: the host's /usr (interpreters, libraries, tini) and the few /etc entries an app
needs (CA certificates, the alternatives links of /usr/bin). The rest of /etc is written
for the container: its own user, hosts, hostname, resolv.conf. /tmp and $HOME are private
tmpfs with a size cap (their pages count against the memory limit too).
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.agent.image_users import ImageUser
from shared.resources import Resources

USER = "app"
HOME = "/home/app"
# Inside the container's own network namespace every app can have the same port.
APP_PORT = 8080
CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel's floor
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

# What container engines mask and make read-only by default (runc spec, moby, containerd).
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
NO_CAPABILITIES: dict[str, list[str]] = {
    kind: [] for kind in ("bounding", "effective", "inheritable", "permitted", "ambient")
}


@dataclass(frozen=True)
class Stack:
    """The read-only base every container shares: host paths bound into it."""

    usr: str = "/usr"
    etc: tuple[str, ...] = ("/etc/ssl/certs", "/etc/alternatives", "/etc/ca-certificates")

    def binds(self) -> list[tuple[str, str]]:
        """(source, destination) pairs that exist on this host."""
        pairs = [(self.usr, "/usr")]
        pairs += [(path, path) for path in self.etc if os.path.isdir(path)]
        return pairs


@dataclass(frozen=True)
class Limits:
    # RAM: memory and memory + swap (no swap); CPU: 1000 = one core. 0: no limit.
    resources: Resources
    pids: int
    tmpfs_mb: int  # each of /tmp, $HOME and /dev/shm


@dataclass(frozen=True)
class Bind:
    """A host directory bound into the container (the app's slug, a build's directories)."""

    source: str
    destination: str
    readonly: bool = True


APP_DIR = "/app"  # where a built app (its slug) is, and where builds build it
CACHE_DIR = "/cache"  # a build's dependency cache, kept per project between builds


@dataclass(frozen=True)
class Bundle:
    """Everything config.json says about one container."""

    container_id: str
    command: str
    uid: int
    env: Mapping[str, str] = field(repr=False)
    limits: Limits
    netns_path: str
    cgroups_path: str
    hostname: str = "app"
    stack: Stack = field(default_factory=Stack)
    binds: tuple[Bind, ...] = ()
    cwd: str = HOME
    # A container image's unpacked root filesystem (read-only, shared by the containers of
    # that image) instead of the stack; `args` is then its argv (entrypoint and command).
    image_root: str = ""
    args: tuple[str, ...] = ()
    # An image's own non-root user: run as it in a user namespace mapping it to `uid`.
    image_user: ImageUser | None = None


def runtime_spec(
    bundle: Bundle, seccomp_profile: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The OCI runtime spec (config.json) of the bundle."""
    uid, limits = bundle.uid, bundle.limits
    # The container process cannot raise its hard limit past the agent's (no capabilities).
    nofile = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    size = f"size={limits.tmpfs_mb}m"
    home = "/tmp" if bundle.image_root else HOME
    env = {"PATH": DEFAULT_PATH, "HOME": home, "LANG": "C.UTF-8", "TZ": "UTC", **bundle.env}
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", size],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        _sys_mount(bundle),
        *(_image_mounts(bundle) if bundle.image_root else _stack_mounts(bundle, size)),
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", size],
        },
        *(
            {
                "destination": bind.destination,
                "type": "bind",
                "source": bind.source,
                "options": ["rbind", "ro" if bind.readonly else "rw", "nosuid", "nodev"],
            }
            for bind in bundle.binds
        ),
    ]
    resources: dict[str, Any] = {
        "devices": [{"allow": False, "access": "rwm"}],
        "pids": {"limit": limits.pids},
    }
    if limits.resources.ram_mb > 0:
        memory = limits.resources.ram_mb * 1024 * 1024
        resources["memory"] = {"limit": memory, "swap": memory}  # memory + swap: no swap
    if limits.resources.cpu_millis > 0:
        quota = max(MIN_CPU_QUOTA_US, limits.resources.cpu_millis * CPU_PERIOD_US // 1000)
        resources["cpu"] = {"quota": quota, "period": CPU_PERIOD_US}
    linux: dict[str, Any] = {
        "cgroupsPath": bundle.cgroups_path,
        "resources": resources,
        "namespaces": [
            {"type": "pid"},
            {"type": "network", "path": bundle.netns_path},
            {"type": "ipc"},
            {"type": "uts"},
            {"type": "mount"},
            {"type": "cgroup"},
        ],
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if seccomp_profile is not None:
        linux["seccomp"] = dict(seccomp_profile)
    user = {"uid": uid, "gid": uid, "additionalGids": []}
    if bundle.image_user is not None:
        linux["namespaces"].append({"type": "user"})
        linux["uidMappings"] = _id_map(bundle.image_user.uid, uid)
        linux["gidMappings"] = _id_map(bundle.image_user.gid, uid)
        user = {"uid": bundle.image_user.uid, "gid": bundle.image_user.gid, "additionalGids": []}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": user,
            # tini as PID 1: it reaps orphans and passes SIGTERM to the app's whole process
            # group (an app as PID 1 would ignore SIGTERM it has no handler for). In an
            # image, the host's static tini, bound in (images need not have one).
            "args": (
                [IMAGE_INIT, "-g", "--", *bundle.args]
                if bundle.image_root
                else ["/usr/bin/tini", "-g", "--", "/bin/sh", "-c", bundle.command]
            ),
            "env": [f"{name}={value}" for name, value in env.items()],
            "cwd": bundle.cwd,
            "capabilities": NO_CAPABILITIES,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": True,
            "oomScoreAdj": 500,  # the kernel's OOM killer takes apps before the platform
        },
        "root": {"path": bundle.image_root or "rootfs", "readonly": True},
        "hostname": bundle.hostname,
        "mounts": mounts,
        "linux": linux,
    }


NOBODY = 65534  # the host's overflow id: what the namespace's root maps to, running nothing


def _id_map(inside: int, host: int) -> list[dict[str, int]]:
    """A user namespace's map: the image's id to the project's uid, and nothing else of the
    host's but `nobody` for the namespace's root (runc needs root mapped to set the
    container up; no process of the app runs as it: no capabilities, no new privileges)."""
    mapping = [{"containerID": inside, "hostID": host, "size": 1}]
    if inside != 0:
        mapping.append({"containerID": 0, "hostID": NOBODY, "size": 1})
    return mapping


def _sys_mount(bundle: Bundle) -> dict[str, Any]:
    """sysfs, read-only; in a user namespace an empty read-only tmpfs instead: sysfs can only
    be mounted by the user namespace that owns the network namespace, and the agent's is
    made outside it."""
    if bundle.image_user is not None:
        return {
            "destination": "/sys",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "noexec", "nodev", "ro", "size=4k"],
        }
    return {
        "destination": "/sys",
        "type": "sysfs",
        "source": "sysfs",
        "options": ["nosuid", "noexec", "nodev", "ro"],
    }


IMAGE_INIT = "/dev/.hangar-init"  # where the host's static tini is bound in an image
TINI_STATIC = "/usr/bin/tini-static"
IMAGE_ETC = ("hosts", "hostname", "resolv.conf")  # the container's own, over the image's


def _stack_mounts(bundle: Bundle, size: str) -> list[dict[str, Any]]:
    """The shared stack, read-only, and the app's private $HOME."""
    return [
        *(
            {
                "destination": destination,
                "type": "bind",
                "source": source,
                "options": ["rbind", "ro", "nosuid", "nodev"],
            }
            for source, destination in bundle.stack.binds()
        ),
        {
            "destination": HOME,
            "type": "tmpfs",
            "source": "tmpfs",
            "options": [
                "nosuid",
                "nodev",
                "mode=0700",
                size,
                f"uid={bundle.uid}",
                f"gid={bundle.uid}",
            ],
        },
    ]


def _image_mounts(bundle: Bundle) -> list[dict[str, Any]]:
    """The container's own /etc files over the image's (bound from the bundle: a relative
    source is the bundle's), and tini to run it under."""
    return [
        *(
            {
                "destination": f"/etc/{name}",
                "type": "bind",
                "source": f"etc/{name}",
                "options": ["bind", "ro", "nosuid", "nodev"],
            }
            for name in IMAGE_ETC
        ),
        {
            "destination": IMAGE_INIT,
            "type": "bind",
            "source": TINI_STATIC,
            "options": ["bind", "ro", "nosuid", "nodev"],
        },
    ]


def write_bundle(
    directory: Path, bundle: Bundle, seccomp_profile: Mapping[str, Any] | None
) -> None:
    """Writes config.json and the root filesystem's skeleton into `directory`."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if bundle.image_root:  # the image is the root; only the container's own /etc files
        write_etc(directory / "etc", bundle.uid, bundle.hostname)
    else:
        write_rootfs(directory / "rootfs", bundle.uid, bundle.hostname, bundle.stack)
    for bind in bundle.binds:
        (directory / "rootfs" / bind.destination.lstrip("/")).mkdir(
            mode=0o755, parents=True, exist_ok=True
        )
    spec = runtime_spec(bundle, seccomp_profile)
    path = directory / "config.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the secrets
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump(spec, file)


def write_rootfs(rootfs: Path, uid: int, hostname: str, stack: Stack) -> None:
    """Mount points, the /usr-merged links, and the container's own /etc files."""
    rootfs.mkdir(mode=0o755, exist_ok=True)
    os.chmod(rootfs, 0o755)  # the app's uid walks it
    for name in ("usr", "tmp", "proc", "dev", "sys", "etc", "home", HOME.lstrip("/")):
        (rootfs / name).mkdir(mode=0o755, parents=True, exist_ok=True)
    # runc gives a tmpfs the mode of the directory it is mounted on.
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / HOME.lstrip("/"), 0o700)
    for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.lexists(Path(stack.usr) / link) and not os.path.lexists(rootfs / link):
            (rootfs / link).symlink_to(f"usr/{link}")
    for _, destination in stack.binds():
        (rootfs / destination.lstrip("/")).mkdir(mode=0o755, parents=True, exist_ok=True)
    write_etc(rootfs / "etc", uid, hostname)


def write_etc(etc: Path, uid: int, hostname: str) -> None:
    """The container's own /etc files: its user, hosts, hostname, resolver."""
    etc.mkdir(mode=0o755, parents=True, exist_ok=True)
    files = {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"{USER}:x:{uid}:{uid}:{USER}:{HOME}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\n{USER}:x:{uid}:\nnogroup:x:65534:\n",
        "hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n",
        "hostname": f"{hostname}\n",
        "resolv.conf": "nameserver 10.0.2.3\n",  # slirp4netns's DNS forwarder
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    }
    for name, text in files.items():
        (etc / name).write_text(text)
        os.chmod(etc / name, 0o644)


def tini_available(usr: str = "/usr") -> bool:
    return os.access(os.path.join(usr, "bin", "tini"), os.X_OK)
