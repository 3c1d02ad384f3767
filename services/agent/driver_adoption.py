"""`ProcessDriver`'s records and adoption: each container's record written down in the state
directory (services/agent/adoption.py, runs.py), and the next agent of that directory taking
over what the earlier one left."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from services.agent import adoption, runs
from services.agent.domain import (
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    LogBuffer,
    SleepState,
    utcnow,
)
from services.agent.driver_base import DriverBase, _Container
from services.agent.runs import AppHome, LogTail
from shared.errors import NotFound, Unavailable

log = logging.getLogger("hangar.agent")


class AdoptionMixin(DriverBase):
    """Writes each container's record down; adopts what an earlier agent left."""

    def _home_of(self, record: _Container) -> AppHome:
        """The container's directory (made at its first run), its record written down:
        both exist before the shim that writes its run there."""
        if record.home is None:
            home = AppHome(self._apps / record.info.container_id)
            home.create()
            record.home, record.tail = home, LogTail(home)
            record.tail.reserve(record.logs)
        self._save(record)
        return record.home

    def _saved(self, record: _Container) -> dict[str, Any]:
        """What a later agent needs to adopt the container (the container driver adds its
        sandbox's)."""
        assert record.tail is not None
        return adoption.container_record(
            self.isolation,
            record.spec,
            self._view(record),
            private_port=record.private_port,
            workdir=str(record.workdir or ""),
            ever_up=record.ever_up,
            logs=record.tail.saved(),
        )

    def _save(self, record: _Container) -> None:
        """Writes the container's record down (not once it has ended: its files go)."""
        if record.home is None or record.tail is None or record.info.state.ended:
            return
        try:
            record.home.save(self._saved(record))
        except OSError as exc:
            log.warning(
                "cannot write the container's record",
                extra={"container_id": record.info.container_id, "error": str(exc)},
            )
            return
        record.tail.saved_at = time.monotonic()
        record.tail.dirty = False

    def _save_on_change(self, info: ContainerInfo) -> None:
        record = self._containers.get(info.container_id)
        if record is not None:
            self._save(record)

    async def adopt(self) -> None:
        """Takes over what an earlier agent of this state directory left (call once, before
        serving): a run still going is watched again where it was (logs from where they were
        settled, health, its public port if free), a run that ended meanwhile ends the
        container with its exit status (or restarts it, per its policy), a sleeping one
        sleeps on. What cannot be adopted is ended and removed."""
        if self._adopted:
            return
        self._adopted = True
        self._lock_state_dir()
        homes = [AppHome(d) for d in sorted(self._apps.iterdir()) if d.is_dir()]
        for home in homes:
            saved: dict[str, Any] = {}
            try:
                saved = home.load()
                spec, info = adoption.spec_and_info(saved, self.isolation)
                if info.state.ended or spec.container_id != home.container_id:
                    raise ValueError("not a live container of this directory")
                await self._adopt(home, saved, spec, info)
            except (OSError, ValueError, KeyError, TypeError, Unavailable) as exc:
                log.warning(
                    "cannot adopt a container an earlier agent left; ending it",
                    extra={"container_id": home.container_id, "error": str(exc)},
                )
                failed = self._containers.pop(home.container_id, None)
                if failed is not None and failed.proxy is not None:
                    await failed.proxy.close()
                self._discard(home, saved)
        await self._clear_leftovers()

    async def _adopt(
        self, home: AppHome, saved: dict[str, Any], spec: ContainerSpec, info: ContainerInfo
    ) -> None:
        tail = LogTail(home, saved.get("logs"))
        record = _Container(
            spec=spec,
            info=info,
            logs=LogBuffer(self.log_lines, self.max_line_chars),
            private_port=int(saved["private_port"]),
            workdir=Path(saved["workdir"]) if saved.get("workdir") else None,
            home=home,
            tail=tail,
            ever_up=bool(saved.get("ever_up")),
        )
        # Lines go on past every sequence the earlier agent could have issued.
        record.logs.resume_after(tail.issued_upto)
        tail.reserve(record.logs)
        tail.catch_up(record.logs)
        await self._restore_sandbox(record, saved)
        proxy = await self._relisten(record, info.port)
        proxy.last_request_at = info.last_request_at
        proxy.before_connect = functools.partial(self._wake, record)
        proxy.open_app = functools.partial(self.open_app, record)
        record.proxy = proxy
        self._containers[spec.container_id] = record
        changes: dict[str, Any] = {
            "port": proxy.port,
            "address": f"{self.advertise_host}:{proxy.port}",
        }
        spawn = False
        run = runs.find_run(home)
        if run is not None and run.shim_alive():  # still running: watched again
            record.info = record.info.with_changes(pid=run.pid)
            changes.update(pid=run.pid, started_at=utcnow())  # metered from here
            self._meter_from_now(record, live=True)
            self._track(record, run)
        elif run is not None and run.pid == info.pid:  # it ended while no agent watched
            self._meter_from_now(record, live=False)
            self._track(record, run)
        elif info.sleep is not SleepState.AWAKE:  # asleep: the next connection wakes it
            changes.update(sleep=SleepState.SLEEPING, pid=0)
        elif record.ever_up and info.next_restart_at is not None:  # in a restart's back-off
            delay = max(0.0, (info.next_restart_at - utcnow()).total_seconds())
            record.restart_due = time.monotonic() + delay
            record.restart = asyncio.create_task(self._restart_after(record, delay))
            record.tasks.append(record.restart)
        else:  # taken but never started (the earlier agent ended in between): start it
            spawn = True
        self._set(record, **changes)
        log.info(
            "container adopted",
            extra={"container_id": spec.container_id, "pid": record.info.pid, "port": proxy.port},
        )
        if spawn:
            await self._spawn(record)
        if info.state is ContainerState.STOPPING:  # the earlier agent was stopping it
            record.tasks.append(asyncio.create_task(self._stop_adopted(spec.container_id)))

    async def _stop_adopted(self, container_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.stop(container_id)

    def _meter_from_now(self, record: _Container, *, live: bool) -> None:
        """An adopted run is metered from now on (what it used while no agent watched is
        not): its CPU so far is the base of its readings."""
        reading = self._read(record) if live else None
        record.cpu_base = reading.cpu_seconds if reading is not None else math.inf

    async def _restore_sandbox(self, record: _Container, saved: dict[str, Any]) -> None:
        """What else an adopted container holds (the container driver's network, bundle)."""

    def _discard(self, home: AppHome, saved: dict[str, Any]) -> None:
        """Ends and removes a container that cannot be adopted: its run, its files."""
        run = runs.find_run(home)
        if run is not None:
            runs.kill_run(run)
        workdir = str(saved.get("workdir") or "")
        if Path(workdir).name.startswith("hangar-"):
            shutil.rmtree(workdir, ignore_errors=True)
        home.remove()

    async def _clear_leftovers(self) -> None:
        """After adoption: removes what an earlier agent left that no container holds (the
        container driver's runc containers, namespaces and bundles)."""

    def _lock_state_dir(self) -> None:
        """One agent per state directory: a second one would take the first one's apps."""
        fd = os.open(self.state_dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another agent uses the state directory {self.state_dir}") from None
        self._state_lock = fd

    def _leave_state_dir(self) -> None:
        if self._state_lock >= 0:
            os.close(self._state_lock)
            self._state_lock = -1
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
