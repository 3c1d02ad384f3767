"""`ContainerDriver`: each app in an OCI container run by runc, isolated and limited.

What a container gets (services/agent/oci.py writes its bundle):
- a read-only root made of the shared stack (the host's /usr, a few /etc entries) and its
  own /etc files; private tmpfs /tmp and $HOME with a size cap;
- its own PID, mount, IPC, UTS, cgroup and network namespaces; its project's own uid
  (services/agent/uids.py), never 0; no capabilities, no new privileges, the default
  seccomp profile of container engines, /proc and /sys paths masked as engines do;
- memory (no swap), CPU quota and pids limits from its allocation, enforced by the kernel;
- a network of its own (services/agent/netns.py): egress through slirp4netns without the
  host's loopback; ingress only through the agent's proxy, which connects from inside.

The lifecycle is the process driver's (health checks, logs, stop, sleep and wake, and the
shim that owns each run so that apps outlive the agent: see drivers.py and runs.py); this
driver only changes how a run is launched, signalled, reaped and read. A run is
`runc run --keep` in the foreground under its shim: runc's stdout and stderr are the app's
(files the agent tails), its exit status is the app's (which the shim writes down), and its
cgroup outlives the run until the agent has read what the kernel accounted (CPU, peak
memory, OOM kills) and deletes it, even when the run ended while no agent was there.

An agent that starts again adopts the containers of its state directory (`adopt`): the
runc container, its network namespace and slirp4netns, its bundle; a frozen one stays
frozen. What no record explains (a runc container, a namespace, a bundle) is removed.

Sleep first freezes the container (cgroup freezer through `runc pause`): memory kept, no
CPU, woken by `runc resume` in milliseconds. Frozen for `freeze_seconds`, it is stopped
for good; the next connection then starts it again, as the process driver does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.agent import cgroups, netns, oci, runs, seccomp
from services.agent.builds import Builder, Sandboxing
from services.agent.domain import LogStream, ResourceSample, SleepState, utcnow
from services.agent.driver_base import LOST_RUN, Reaped, _Container
from services.agent.driver_builds import BuildMixin
from services.agent.drivers import ProcessDriver
from services.agent.images import ImageStore
from services.agent.netns import NetworkNamespace
from services.agent.proxy import CHUNK_BYTES, IngressProxy
from services.agent.runs import AppRun
from services.agent.uids import UidTable
from shared.errors import Unavailable

log = logging.getLogger("hangar.agent.containers")

OOM_KILLED = "OOM_KILLED"


def images_unavailable_reason() -> str | None:
    """Why this server cannot run container images (in containers), or None when it can."""
    for tool in ("skopeo", "umoci"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access(oci.TINI_STATIC, os.X_OK):
        return "tini-static is not installed"
    return None


def unavailable_reason(runc: str = "runc") -> str | None:
    """Why containers cannot run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "the agent is not root (runc, network namespaces and cgroups need it)"
    if shutil.which(runc) is None:
        return f"{runc} is not installed"
    if not oci.tini_available():
        return "tini is not installed"
    if (why := netns.available()) is not None:
        return why
    if not (cgroups.unified() or (cgroups.ROOT / "memory").is_dir()):
        return "no memory cgroup controller is mounted"
    return None


@dataclass
class _Sandbox:
    """What one container holds on this server besides its process: bundle and network."""

    bundle: Path
    network: NetworkNamespace
    cgroup: cgroups.Cgroup
    ram_mb: int
    pid: int = 0  # the container's init (tini), in the host's PID namespace
    frozen: bool = False
    frozen_at: float = 0.0  # wall-clock time it was frozen (a later agent counts from it)
    thawed: asyncio.Event = field(default_factory=asyncio.Event)  # set when resumed
    cpu_base: float = 0.0  # the cgroup's CPU seconds when the current run began (a thaw)
    oom_kills: int = 0  # OOM kills already told to the app's logs
    tap: netns.TapCounters | None = None  # egress counters, last read
    deep_sleep: asyncio.Task[None] | None = None
    thawing: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


class ContainerDriver(BuildMixin, ProcessDriver):
    """Runs each container with runc (see the module's docstring)."""

    isolation = "container"
    builds = True

    def __init__(
        self,
        *,
        state_dir: str | Path,
        pids_limit: int = 256,
        tmpfs_mb: int = 64,
        freeze_seconds: float = 600.0,
        build_timeout: float = 900.0,
        insecure_registries: Sequence[str] = (),
        keep_unused_seconds: float = 3600.0,
        runc: str = "runc",
        stack: oci.Stack | None = None,
        **kwargs: Any,
    ) -> None:
        # Nothing of the host's environment reaches apps.
        super().__init__(base_env={}, state_dir=state_dir, **kwargs)
        self.pids_limit = pids_limit
        self.tmpfs_mb = tmpfs_mb
        self.freeze_seconds = freeze_seconds
        self.runc = runc
        self.stack = stack or oci.Stack()
        # Names under /run/netns and /sys/fs/cgroup are host-wide: this agent's carry a tag
        # of its state directory, so agents sharing a host never touch each other's.
        self.netns_prefix = netns_prefix(self.state_dir)
        self._cgroup_parent = "/hangar/" + self.netns_prefix.removeprefix("hangar-").strip("-")
        self._runc_root = self.state_dir / "runc"
        self._bundles = self.state_dir / "bundles"
        self.uids = UidTable(self.state_dir / "uids.json")
        self._seccomp = seccomp.default_profile()
        self.builder = Builder(
            self.state_dir,
            Sandboxing(
                runc=runc,
                runc_root=self._runc_root,
                uids=self.uids,
                stack=self.stack,
                seccomp=self._seccomp,
                cgroup_parent=self._cgroup_parent,
                netns_prefix=self.netns_prefix,
                pids_limit=pids_limit,
                tmpfs_mb=tmpfs_mb,
            ),
            artifacts=None,  # the agent gives it its way to runtime (AgentApp)
            timeout_seconds=build_timeout,
        )
        self.images = ImageStore(
            self.state_dir / "images",
            insecure_registries=frozenset(insecure_registries),
            timeout_seconds=build_timeout,
        )
        self.keep_unused_seconds = keep_unused_seconds
        self._last_used = {}
        # Images run here when the tools that pull and unpack them are installed.
        self.runs_images = images_unavailable_reason() is None
        self._sandboxes: dict[str, _Sandbox] = {}
        self._teardowns: set[asyncio.Future[None]] = set()
        self._prepare_state_dir()

    def _prepare_state_dir(self) -> None:
        """Makes runc's and the bundles' directories (0700), in a state directory others may
        search (0711). What an earlier agent left there
        is adopted or removed by `adopt`."""
        for path in (self._runc_root, self._bundles):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        # Others may search it (not list it): a user namespace's root reaches images under it.
        os.chmod(self.state_dir, 0o711)

    # ------------------------------------------------------------------ launching a run

    async def _listen(self) -> tuple[IngressProxy, int]:
        """The public port; the app's own is the same in every container (APP_PORT)."""
        proxy = IngressProxy(self.listen_host)
        try:
            await proxy.start(0, oci.APP_PORT)
        except OSError as exc:
            raise Unavailable(
                f"cannot listen for the container: {exc.strerror or exc}", reason="NO_FREE_PORT"
            ) from exc
        return proxy, oci.APP_PORT

    async def _launch(self, record: _Container) -> AppRun:
        container_id = record.info.container_id
        home = self._home_of(record)
        sandbox = self._sandboxes.get(container_id)
        if sandbox is None:
            try:
                sandbox = await asyncio.to_thread(self._prepare, record)
            except (netns.NetworkError, subprocess.SubprocessError, ValueError) as exc:
                raise OSError(str(exc)) from exc
            self._sandboxes[container_id] = sandbox
            self._save(record)  # its network's slirp4netns, for a later agent
        sandbox.pid, sandbox.cpu_base, sandbox.oom_kills = 0, 0.0, 0
        pid_file = sandbox.bundle / "pid"
        pid_file.unlink(missing_ok=True)
        return await runs.launch(
            home,
            [
                self.runc,
                "--root",
                str(self._runc_root),
                "run",
                "--keep",  # the cgroup stays until the agent read it (see _reap)
                "--pid-file",
                str(pid_file),
                "--bundle",
                str(sandbox.bundle),
                container_id,
            ],
            env={"PATH": os.environ.get("PATH", oci.DEFAULT_PATH)},
            cwd=sandbox.bundle,
        )

    def _prepare(self, record: _Container) -> _Sandbox:
        """The container's network namespace and bundle (blocking: runs in a thread)."""
        spec = record.spec
        container_id = spec.container_id
        network = NetworkNamespace.create(self.netns_prefix + container_id)
        try:
            directory = self._bundles / container_id
            cgroup_path = f"{self._cgroup_parent}/{container_id}"
            bundle = oci.Bundle(
                container_id=container_id,
                command=spec.command,
                # A container of no project (runtime always names one) shares no uid.
                uid=self.uids.uid_of(spec.project_id or f"container:{container_id}"),
                env=self.app_env(record),
                limits=oci.Limits(
                    resources=spec.resources,
                    pids=self.pids_limit,
                    tmpfs_mb=self.tmpfs_mb,
                ),
                netns_path=str(network.path),
                cgroups_path=cgroup_path,
                hostname=_hostname(container_id),
                stack=self.stack,
                # A built app: its slug, read-only, where it was built.
                binds=(oci.Bind(spec.app_dir, oci.APP_DIR),) if spec.app_dir else (),
                cwd=spec.workdir or (oci.APP_DIR if spec.app_dir else oci.HOME),
                image_root=spec.image_root,
                args=spec.args,
                image_user=spec.image_user,
            )
            oci.write_bundle(directory, bundle, self._seccomp)
        except BaseException:
            network.destroy()
            raise
        return _Sandbox(directory, network, cgroups.Cgroup(cgroup_path), spec.resources.ram_mb)

    async def open_app(
        self, record: _Container
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sandbox = self._sandboxes.get(record.info.container_id)
        if sandbox is None:
            raise ConnectionRefusedError("the container has no network")
        return await sandbox.network.connect(record.private_port, limit=CHUNK_BYTES)

    def _warn_if_exposed(self, record: _Container) -> None:
        """Nothing to warn of: the app's ports are inside its own network namespace."""

    # ------------------------------------------------------------------ signals and ends

    async def _signal(self, record: _Container, sig: signal.Signals) -> None:
        """Through runc, to the container's init (tini passes it to the app's process
        group; SIGKILL of the init ends the whole PID namespace). A frozen container is
        thawed first: it could not act on the signal."""
        sandbox = self._sandboxes.get(record.info.container_id)
        if sandbox is not None and sandbox.frozen:
            await self._resume(record, sandbox)
        killed = await self._runc_async("kill", record.info.container_id, sig.name, check=False)
        if killed is None and record.process is not None:  # not created yet: runc itself
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.process.pgid, sig)

    async def _reap(self, record: _Container, run: AppRun) -> int:
        assert record.home is not None
        end = await runs.wait_end(run, record.home)
        if not end.known:
            record.failure = record.failure or LOST_RUN
        returncode = _as_signal(end.returncode)
        reaped = Reaped(returncode, end.cpu_seconds, end.max_rss_bytes)
        sandbox = self._sandboxes.get(record.info.container_id)
        if sandbox is not None:
            reading = sandbox.cgroup.read()  # kept by --keep: what the kernel accounted
            if reading is not None:
                self._tell_oom(record, sandbox, reading.oom_kills)
                if reading.oom_kills and returncode == -signal.SIGKILL:
                    record.kernel_reason = (
                        f"{OOM_KILLED}: the app reached its memory limit of "
                        f"{sandbox.ram_mb} MiB and the kernel killed it"
                    )
                reaped = Reaped(
                    returncode,
                    max(0.0, reading.cpu_seconds - sandbox.cpu_base),
                    reading.memory_peak_bytes or reaped.max_rss_bytes,
                )
            sandbox.pid = 0
            await self._runc_async("delete", "--force", record.info.container_id, check=False)
        record.reaped = Reaped(returncode, reaped.cpu_seconds, reaped.max_rss_bytes)
        return returncode

    def _tell_oom(self, record: _Container, sandbox: _Sandbox, oom_kills: int) -> None:
        """The app's own logs say when the kernel killed one of its processes for memory."""
        if oom_kills <= sandbox.oom_kills:
            return
        sandbox.oom_kills = oom_kills
        record.logs.append(
            LogStream.STDERR,
            f"[hangar agent] {OOM_KILLED}: a process of this app was killed by the kernel: "
            f"the app reached its memory limit of {sandbox.ram_mb} MiB",
        )
        log.warning(
            "container OOM-killed",
            extra={"container_id": record.info.container_id, "limit_mb": sandbox.ram_mb},
        )

    def _release(self, record: _Container) -> None:
        super()._release(record)
        sandbox = self._sandboxes.pop(record.info.container_id, None)
        if sandbox is None:
            return
        if sandbox.deep_sleep is not None:
            sandbox.deep_sleep.cancel()
        teardown = asyncio.ensure_future(
            asyncio.to_thread(self._teardown, record.info.container_id, sandbox)
        )
        self._teardowns.add(teardown)
        teardown.add_done_callback(self._teardowns.discard)

    def _teardown(self, container_id: str, sandbox: _Sandbox) -> None:
        self._runc_sync("delete", "--force", container_id, check=False)
        sandbox.network.destroy()
        shutil.rmtree(sandbox.bundle, ignore_errors=True)

    async def close(self) -> None:
        await super().close()
        if self._teardowns:
            await asyncio.gather(*self._teardowns, return_exceptions=True)
        # runc removed each container's cgroup; the agent's own parent goes with the agent.
        relative = self._cgroup_parent.strip("/")
        for hierarchy in (cgroups.ROOT, *cgroups.ROOT.iterdir()):
            with contextlib.suppress(OSError):
                (hierarchy / relative).rmdir()

    # ------------------------------------------------------------------ adoption

    def _saved(self, record: _Container) -> dict[str, Any]:
        saved = super()._saved(record)
        sandbox = self._sandboxes.get(record.info.container_id)
        if sandbox is not None:
            saved["sandbox"] = {
                "slirp_pid": sandbox.network.slirp_pid,
                "slirp_start": sandbox.network.slirp_start,
                "frozen": sandbox.frozen,
                "frozen_at": sandbox.frozen_at,
                "oom_kills": sandbox.oom_kills,
            }
        return saved

    async def _restore_sandbox(self, record: _Container, saved: dict[str, Any]) -> None:
        """An adopted container's bundle, cgroup and network (its slirp4netns re-attached,
        or started again); a frozen one stays frozen, its deep sleep due when it was."""
        found = saved.get("sandbox")
        if found is None:
            return  # never launched: its sandbox is made at its first run
        container_id = record.info.container_id
        bundle = self._bundles / container_id
        if not (bundle / "config.json").is_file():
            raise ValueError("its bundle is gone")
        try:
            network = await asyncio.to_thread(
                NetworkNamespace.attach,
                self.netns_prefix + container_id,
                int(found["slirp_pid"]),
                int(found["slirp_start"]),
            )
        except netns.NetworkError as exc:
            raise OSError(str(exc)) from exc
        sandbox = _Sandbox(
            bundle,
            network,
            cgroups.Cgroup(f"{self._cgroup_parent}/{container_id}"),
            record.spec.resources.ram_mb,
            oom_kills=int(found.get("oom_kills", 0)),
        )
        self._sandboxes[container_id] = sandbox
        if found.get("frozen") and await self._runc_status(container_id) == "paused":
            sandbox.frozen, sandbox.frozen_at = True, float(found.get("frozen_at") or time.time())
            left = max(0.0, self.freeze_seconds - (time.time() - sandbox.frozen_at))
            sandbox.deep_sleep = asyncio.create_task(
                self._stop_when_frozen_long(record, sandbox, left)
            )

    def _meter_from_now(self, record: _Container, *, live: bool) -> None:
        sandbox = self._sandboxes.get(record.info.container_id)
        reading = sandbox.cgroup.read() if sandbox is not None else None
        if sandbox is not None and reading is not None:  # kept by --keep if it ended
            sandbox.cpu_base = reading.cpu_seconds

    def _supervision(
        self, record: _Container, readers: Sequence[asyncio.Task[None]]
    ) -> Coroutine[Any, Any, None]:
        sandbox = self._sandboxes.get(record.info.container_id)
        if sandbox is None or not sandbox.frozen:
            return super()._supervision(record, readers)
        return self._supervise_once_thawed(record, sandbox, readers)

    async def _supervise_once_thawed(
        self, record: _Container, sandbox: _Sandbox, readers: Sequence[asyncio.Task[None]]
    ) -> None:
        """An adopted frozen app is checked once it runs again (a connection or a stop
        thawed it, or it went on to a deep sleep): frozen, it could not answer."""
        exited = record.exited
        assert exited is not None
        thawed: asyncio.Future[Any] = asyncio.ensure_future(sandbox.thawed.wait())
        try:
            await asyncio.wait([thawed, exited], return_when=asyncio.FIRST_COMPLETED)
        finally:
            thawed.cancel()
        await self._supervise(record, readers)

    def _discard(self, home: runs.AppHome, saved: dict[str, Any]) -> None:
        super()._discard(home, saved)
        sandbox = self._sandboxes.pop(home.container_id, None)
        if sandbox is not None:
            if sandbox.deep_sleep is not None:
                sandbox.deep_sleep.cancel()
            self._teardown(home.container_id, sandbox)

    async def _clear_leftovers(self) -> None:
        await asyncio.to_thread(self._clear_unadopted, frozenset(self._sandboxes))

    def _clear_unadopted(self, kept: frozenset[str]) -> None:
        """Removes what an earlier agent of this state directory left that no adopted
        container holds: runc containers, network namespaces (and their slirp4netns),
        bundles."""
        listed = self._runc_sync("list", "--quiet", check=False).split()
        stale = [c for c in listed if c not in kept]
        for container_id in stale:
            self._runc_sync("delete", "--force", container_id, check=False)
        keep = frozenset(self.netns_prefix + c for c in kept)
        removed = netns.remove_stale(self.netns_prefix, keep)
        for bundle in self._bundles.iterdir():
            if bundle.name not in kept:
                shutil.rmtree(bundle, ignore_errors=True)
        if stale or removed:
            log.warning(
                "removed containers an earlier agent left",
                extra={"containers": len(stale), "namespaces": removed},
            )

    async def _runc_status(self, container_id: str) -> str:
        """runc's status of the container ("running", "paused", "stopped"), "" if none."""
        found = await self._runc_async("state", container_id, check=False)
        try:
            return str(json.loads(found or "{}").get("status", ""))
        except ValueError:
            return ""

    # ------------------------------------------------------------------ readings

    def _read(self, record: _Container) -> ResourceSample | None:
        """The cgroup's memory and CPU; bytes through the proxy plus the app's egress."""
        sandbox = self._sandboxes.get(record.info.container_id)
        if sandbox is None:
            return None
        reading = sandbox.cgroup.read()
        if reading is None:
            return None
        self._tell_oom(record, sandbox, reading.oom_kills)
        rx, tx = self._network_bytes(record)
        return ResourceSample(
            record.info.container_id,
            reading.memory_bytes,
            max(0.0, reading.cpu_seconds - sandbox.cpu_base),
            utcnow(),
            rx_bytes=rx,
            tx_bytes=tx,
            run=record.info.run,
        )

    def _network_bytes(self, record: _Container) -> tuple[int | None, int | None]:
        rx, tx = super()._network_bytes(record)
        sandbox = self._sandboxes.get(record.info.container_id)
        if sandbox is None:
            return rx, tx
        if pid := self._init_pid(sandbox):
            sandbox.tap = NetworkNamespace.counters(pid) or sandbox.tap
        if sandbox.tap is not None:
            rx = (rx or 0) + sandbox.tap.rx_bytes
            tx = (tx or 0) + sandbox.tap.tx_bytes
        return rx, tx

    @staticmethod
    def _init_pid(sandbox: _Sandbox) -> int:
        if not sandbox.pid:
            with contextlib.suppress(OSError, ValueError):
                sandbox.pid = int((sandbox.bundle / "pid").read_text().strip())
        return sandbox.pid

    # ------------------------------------------------------------------ sleep: freeze first

    async def _rest(self, record: _Container, grace: float) -> None:
        sandbox = self._sandboxes.get(record.info.container_id)
        if self.freeze_seconds <= 0 or sandbox is None:
            await super()._rest(record, grace)
            return
        final = self._read(record)
        await self._runc_async("pause", record.info.container_id)
        sandbox.frozen, sandbox.frozen_at = True, time.time()
        sandbox.thawed = asyncio.Event()
        record.final = final
        self._set(record, sleep=SleepState.SLEEPING)
        sandbox.deep_sleep = asyncio.create_task(self._stop_when_frozen_long(record, sandbox))
        log.info("container frozen", extra={"container_id": record.info.container_id})

    async def _stop_when_frozen_long(
        self, record: _Container, sandbox: _Sandbox, after: float | None = None
    ) -> None:
        await asyncio.sleep(self.freeze_seconds if after is None else after)
        if not sandbox.frozen or record.stop_requested:
            return
        sandbox.deep_sleep = None
        await self._runc_async("resume", record.info.container_id)
        sandbox.frozen = False
        await super()._rest(record, self.stop_grace)  # dozing from here: no await before

    async def _wake(self, record: _Container) -> None:
        sandbox = self._sandboxes.get(record.info.container_id)
        if sandbox is None or not sandbox.frozen:
            await super()._wake(record)
            return
        if sandbox.thawing is None or sandbox.thawing.done():
            sandbox.thawing = asyncio.ensure_future(self._thaw(record, sandbox))
        await asyncio.shield(sandbox.thawing)

    async def _thaw(self, record: _Container, sandbox: _Sandbox) -> None:
        """A connection for a frozen app: it runs again, as a new run for the meters."""
        log.info("thawing container", extra={"container_id": record.info.container_id})
        await self._resume(record, sandbox)
        self._set(record, sleep=SleepState.AWAKE, run=record.info.run + 1, started_at=utcnow())

    async def _resume(self, record: _Container, sandbox: _Sandbox) -> None:
        if sandbox.deep_sleep is not None:
            sandbox.deep_sleep.cancel()
            sandbox.deep_sleep = None
        cpu = sandbox.cgroup.read()
        await self._runc_async("resume", record.info.container_id)
        sandbox.frozen = False
        sandbox.thawed.set()
        if cpu is not None:  # the next run's CPU counts from here
            sandbox.cpu_base = cpu.cpu_seconds

    # ------------------------------------------------------------------ runc's CLI

    def _runc_sync(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            [self.runc, "--root", str(self._runc_root), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
            env={"PATH": os.environ.get("PATH", oci.DEFAULT_PATH)},
        )
        if done.returncode != 0:
            if check:
                raise subprocess.SubprocessError(
                    f"runc {args[0]}: {done.stderr.strip() or done.returncode}"
                )
            return ""
        return done.stdout

    async def _runc_async(self, *args: str, check: bool = True) -> str | None:
        """runc's CLI in a thread (the loop's own subprocesses fork: see drivers._popen);
        None when it failed and `check` is off."""
        try:
            return await asyncio.to_thread(self._runc_sync, *args, check=True)
        except subprocess.SubprocessError:
            if check:
                raise
            return None


def netns_prefix(state_dir: str | Path) -> str:
    """The names of the network namespaces of the agent with this state directory."""
    tag = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:8]
    return f"hangar-{tag}-"


def _as_signal(returncode: int) -> int:
    """runc (and tini) report an app killed by signal N as exit code 128 + N: as Popen
    would, -N."""
    if returncode > 128:
        with contextlib.suppress(ValueError):
            return -signal.Signals(returncode - 128).value
    return returncode


def _hostname(container_id: str) -> str:
    return container_id[:63].strip("-.") or "app"
