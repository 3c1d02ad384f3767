"""A container's network: a network namespace of its own, with user-mode networking for
egress (slirp4netns) and nothing else.

- `ip netns add` makes the namespace (a file under /run/netns), which runc joins
  (linux.namespaces path) and which outlives a stop for sleep, so the app's network does.
- slirp4netns gives it a tap device with a default route through a user-mode TCP/IP stack
  in the host's namespace: the app reaches the internet as the agent would, but
  `--disable-host-loopback` keeps it off the host's 127.0.0.1 (PostgreSQL, the internal
  gRPC ports, the agent, other apps' private ports). It outlives the agent, as the app does:
  the next agent of the same state directory re-attaches to it (by pid and start time), or
  starts a new one for the namespace if it is gone; `destroy` ends it.
- Ingress never goes through slirp4netns: the agent's proxy opens its connection to the
  app from inside the namespace (`connect`), to the app's own loopback, so clients reach
  the app only through the proxy that counts their bytes; other apps cannot reach it.
- Egress bytes are the tap device's counters, read from /proc/PID/net/dev of a process in
  the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from services.agent.shim import start_ticks

log = logging.getLogger("hangar.agent.netns")

NETNS_DIR = Path("/run/netns")
TAP = "tap0"
CLONE_NEWNET = 0x40000000
# slirp4netns's fixed addresses (its default 10.0.2.0/24): the gateway, and its DNS forwarder.
GATEWAY = "10.0.2.2"
NAMESERVER = "10.0.2.3"


class NetworkError(Exception):
    """The namespace or its user-mode network could not be set up."""


@dataclass(frozen=True)
class TapCounters:
    rx_bytes: int  # received from the internet
    tx_bytes: int  # sent to the internet


def available() -> str | None:
    """Why containers cannot have a network here, or None when they can."""
    for tool in ("ip", "slirp4netns"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@dataclass
class NetworkNamespace:
    name: str
    path: Path
    slirp: subprocess.Popen[bytes] | None = None  # when this agent started it
    slirp_pid: int = 0
    slirp_start: int = 0  # its start time (clock ticks since boot): a recycled pid is not it
    _fd: int = -1  # the namespace, held open for connects
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, name: str, *, ready_timeout: float = 10.0) -> NetworkNamespace:
        """Makes the namespace and starts its user-mode network (blocking: call in a thread)."""
        path = NETNS_DIR / name
        _run("ip", "netns", "add", name)
        netns = cls(name, path)
        try:
            netns._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            netns._start_slirp(ready_timeout)
        except BaseException:
            netns.destroy()
            raise
        return netns

    @classmethod
    def attach(
        cls, name: str, slirp_pid: int, slirp_start: int, *, ready_timeout: float = 10.0
    ) -> NetworkNamespace:
        """The namespace an earlier agent made, with its slirp4netns if that still runs, or
        a new one (blocking: call in a thread). NetworkError if the namespace is gone."""
        path = NETNS_DIR / name
        netns = cls(name, path, slirp_pid=slirp_pid, slirp_start=slirp_start)
        try:
            netns._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkError(f"the network namespace {name} is gone") from exc
        try:
            if not netns.slirp_alive():
                log.warning("slirp4netns of an adopted container is gone; starting it again")
                netns._start_slirp(ready_timeout)
        except BaseException:
            netns.destroy()
            raise
        return netns

    def slirp_alive(self) -> bool:
        return self.slirp_pid > 0 and start_ticks(self.slirp_pid) == self.slirp_start

    def _start_slirp(self, ready_timeout: float) -> None:
        ready_r, ready_w = os.pipe()
        try:
            self.slirp = subprocess.Popen(
                [
                    "slirp4netns",
                    "--configure",  # tap0 10.0.2.100/24, default route, lo up
                    "--mtu=65520",
                    "--disable-host-loopback",
                    f"--ready-fd={ready_w}",
                    "--netns-type=path",
                    str(self.path),
                    TAP,
                ],
                pass_fds=(ready_w,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # the agent's own signals are not its
            )
        finally:
            os.close(ready_w)
        self.slirp_pid, self.slirp_start = self.slirp.pid, start_ticks(self.slirp.pid)
        try:
            ready = _read_with_timeout(ready_r, ready_timeout)
        finally:
            os.close(ready_r)
        if ready != b"1":
            stderr = b""
            if self.slirp.poll() is not None and self.slirp.stderr is not None:
                stderr = self.slirp.stderr.read()
            raise NetworkError(
                "slirp4netns did not configure the network: "
                + (stderr.decode(errors="replace").strip() or "no answer")
            )
        if self.slirp.stderr is not None:
            self.slirp.stderr.close()

    def destroy(self) -> None:
        """Stops slirp4netns and removes the namespace (blocking; idempotent)."""
        with self._lock:
            if self.slirp is not None:
                self.slirp.terminate()
                try:
                    self.slirp.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.slirp.kill()
                    self.slirp.wait()
                self.slirp = None
            elif self.slirp_alive():  # an earlier agent's: not this one's child
                _end(self.slirp_pid)
            self.slirp_pid = 0
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            # Its file cannot be unlinked while a mount namespace being made at that moment
            # (a container starting) holds a copy of its mount: try again shortly.
            for attempt in range(20):
                if not self.path.exists():
                    break
                try:
                    _run("ip", "netns", "delete", self.name)
                except NetworkError as exc:
                    if attempt == 19:
                        log.warning("network namespace not removed", extra={"error": str(exc)})
                    time.sleep(0.1)

    async def connect(
        self, port: int, limit: int = 64 * 1024
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to 127.0.0.1:port inside the namespace."""
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(_dialer(), _socket_in, self._fd)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=limit)

    @staticmethod
    def counters(pid: int) -> TapCounters | None:
        """The tap device's bytes, read through a process inside the namespace."""
        try:
            text = Path(f"/proc/{pid}/net/dev").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            name, _, values = line.partition(":")
            if name.strip() == TAP:
                fields = values.split()
                return TapCounters(rx_bytes=int(fields[0]), tx_bytes=int(fields[8]))
        return None


def remove_stale(prefix: str, keep: frozenset[str] = frozenset()) -> int:
    """Deletes namespaces named `prefix`* that an earlier agent left (blocking), but those
    in `keep` (adopted), and ends their slirp4netns."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] != "slirp4netns" or not cmdline:
            continue
        name = Path(cmdline[-2]).name if len(cmdline) >= 2 else ""
        if name.startswith(prefix) and name not in keep:
            _end(proc.pid)
    removed = 0
    if not NETNS_DIR.is_dir():
        return 0
    for entry in NETNS_DIR.iterdir():
        if entry.name.startswith(prefix) and entry.name not in keep:
            with contextlib.suppress(NetworkError):
                _run("ip", "netns", "delete", entry.name)
                removed += 1
    return removed


# ---------------------------------------------------------------------- sockets in a namespace

_libc = ctypes.CDLL(None, use_errno=True)
_local = threading.local()
_executor: ThreadPoolExecutor | None = None


def _dialer() -> ThreadPoolExecutor:
    """One thread that makes sockets in other namespaces (setns is per thread: never the
    event loop's, whose listening sockets must stay in the host's namespace)."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns-dialer")
    return _executor


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _socket_in(netns_fd: int) -> socket.socket:
    """A TCP socket created inside the namespace: it stays there whatever thread uses it."""
    home = getattr(_local, "home", None)
    if home is None:
        home = _local.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    _setns(netns_fd)
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    finally:
        _setns(home)


def _end(pid: int, within: float = 5.0) -> None:
    """SIGTERM, and SIGKILL if it is still there after `within` (blocking; it need not be
    a child of this process, so it is polled)."""
    started = start_ticks(pid)
    if not started:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + within
    while start_ticks(pid) == started:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.02)


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise NetworkError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")


def _read_with_timeout(fd: int, timeout: float) -> bytes:
    readable, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 1) if readable else b""
