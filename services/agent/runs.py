"""Runs that outlive the agent: each container's files under the agent's state directory,
the shim that owns each run of its app (shim.py), and the output files the agent tails.

    <state dir>/apps/<container id>/      0700
        container.json   what a later agent needs to adopt the container (0600: it holds the
                         app's secrets, as a runc bundle does)
        stdout, stderr   the app's output, appended by the app itself; read from a cursor
        shim.json        the current run's shim and app (pid and start time), by the shim
        exit.json        how the current run ended, by the shim, atomically

The agent reads the output files into the container's LogBuffer as lines, and remembers in
container.json how far the lines are settled (runtime acknowledged them, or the buffer let
them go): a later agent resumes there, with sequences past any the earlier one could have
issued (it reserves them ahead), so runtime never takes a new line for one it stored. Bytes
before the settled cursor are given back to the file system (a hole punched in the file),
so a long-lived app's output takes no more disk than what is not yet settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.agent import shim
from services.agent.domain import AGENT_NOTICE, LogBuffer, LogStream

log = logging.getLogger("hangar.agent.runs")

APPS_DIR = "apps"
RECORD_FILE = "container.json"
SHIM_PATH = str(Path(shim.__file__).resolve())
# Sequences a container's lines may take before the agent writes a new reservation down.
RESERVED_SEQUENCES = 1_000_000
# Output an app wrote while no agent read it, beyond which only the newest is read.
MAX_CATCH_UP_BYTES = 16 << 20
READ_CHUNK = 64 * 1024
PUNCH_EVERY_BYTES = 1 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)


class AppHome:
    """One container's directory under the state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.record = directory / RECORD_FILE
        self.output = {
            LogStream.STDOUT: directory / "stdout",
            LogStream.STDERR: directory / "stderr",
        }
        self.shim_file = directory / shim.SHIM_FILE
        self.exit_file = directory / shim.EXIT_FILE

    @property
    def container_id(self) -> str:
        return self.directory.name

    def create(self) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        for path in self.output.values():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))

    def save(self, content: dict[str, Any]) -> None:
        """Replaces container.json atomically (a later agent reads the old or the new)."""
        shim.write_atomically(str(self.record), content)

    def load(self) -> dict[str, Any]:
        content = json.loads(self.record.read_text())
        if not isinstance(content, dict):
            raise ValueError("not a container record")
        return content

    def clear_run(self) -> None:
        """Forgets the last run's files: the next launch writes its own."""
        self.shim_file.unlink(missing_ok=True)
        self.exit_file.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# ---------------------------------------------------------------------- runs and the shim


@dataclass
class AppRun:
    """One run: the shim, and the process it runs (the app, or runc for a container)."""

    pid: int  # the shim's child, leader of the app's process group
    shim_pid: int
    shim_start: int = 0  # start times (clock ticks since boot): a recycled pid is not it
    child_start: int = 0
    popen: subprocess.Popen[bytes] | None = None  # the shim, when this agent started it

    @property
    def pgid(self) -> int:
        return self.pid

    def shim_alive(self) -> bool:
        return shim.start_ticks(self.shim_pid) == self.shim_start != 0

    def child_alive(self) -> bool:
        return shim.start_ticks(self.pid) == self.child_start != 0


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: as the shim recorded it (wait4's status and usage), or unknown when
    the shim itself was killed (the app's group is killed then)."""

    returncode: int  # as Popen: negative for a signal
    cpu_seconds: float = 0.0
    max_rss_bytes: int = 0
    known: bool = True


async def launch(
    home: AppHome,
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    ready_timeout: float = 30.0,
) -> AppRun:
    """Starts a shim running `argv` with its output on the container's files; returns once
    the app's process exists (OSError: it could not be started)."""
    home.clear_run()
    ready_r, ready_w = os.pipe()
    try:
        process = _start_shim(home, argv, env, cwd, ready_w)
    except BaseException:
        os.close(ready_r)
        raise
    finally:
        os.close(ready_w)
    try:
        message = await _read_ready(ready_r, ready_timeout)
        if "child" not in message:
            raise OSError(str(message.get("error") or "the shim ended before the app started"))
        run = find_run(home)
        if run is None or run.pid != message["child"]:
            raise OSError("the shim did not record its run")
    except BaseException:
        _kill(process.pid)
        await _wait_child(process)
        raise
    run.popen = process
    return run


def _shim_command(home: AppHome, ready_w: int) -> list[str]:
    # -I -S: nothing of the environment's or the virtual environment's reaches the shim.
    return [sys.executable, "-I", "-S", SHIM_PATH, str(home.directory), str(ready_w)]


def _start_shim(
    home: AppHome, argv: list[str], env: dict[str, str], cwd: Path, ready_w: int
) -> subprocess.Popen[bytes]:
    """The shim, in a session of its own, its output (and the app's) on the output files.

    Popen, not the loop's subprocess API: CPython spawns with vfork, while uvloop forks and
    gRPC's fork handlers then crash the child now and then (SIGSEGV).
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    stdout = os.open(home.output[LogStream.STDOUT], flags)
    try:
        stderr = os.open(home.output[LogStream.STDERR], flags)
        try:
            return subprocess.Popen(
                [*_shim_command(home, ready_w), "--", *argv],
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                pass_fds=(ready_w,),
                start_new_session=True,  # the agent's signals (a terminal's) are not its
            )
        finally:
            os.close(stderr)
    finally:
        os.close(stdout)


async def _read_ready(fd: int, within: float) -> dict[str, Any]:
    """The shim's one line on its ready pipe (closes `fd`)."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        received.extend(chunk)
        if not chunk or b"\n" in received:
            if not done.done():
                done.set_result(None)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(done, within)
    except TimeoutError:
        raise OSError("the shim did not start the app in time") from None
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    line = bytes(received).split(b"\n", 1)[0]
    try:
        message = json.loads(line) if line else {}
    except ValueError:
        message = {}
    return message if isinstance(message, dict) else {}


def find_run(home: AppHome) -> AppRun | None:
    """The run shim.json names (alive or not), or None if no shim recorded one."""
    try:
        found = json.loads(home.shim_file.read_text())
        return AppRun(
            pid=int(found["child"]),
            shim_pid=int(found["shim"]),
            shim_start=int(found["shim_start"]),
            child_start=int(found["child_start"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_end(home: AppHome) -> RunEnd | None:
    try:
        found = json.loads(home.exit_file.read_text())
        return RunEnd(
            int(found["returncode"]), float(found["cpu_seconds"]), int(found["max_rss_bytes"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def wait_end(run: AppRun, home: AppHome) -> RunEnd:
    """Waits until the run's shim has ended (reaping it when this agent started it); how
    the app ended. A shim gone without a word (killed) takes the app's group with it."""
    await _wait_gone(run)
    end = read_end(home)
    if end is not None:
        return end
    if run.child_alive():  # the app outlived its shim: it cannot be watched any more
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pgid, signal.SIGKILL)
    return RunEnd(-signal.SIGKILL, known=False)


async def _wait_gone(run: AppRun) -> None:
    if run.popen is not None:
        await _wait_child(run.popen)
    else:
        await _wait_adopted(run)


async def _wait_child(process: subprocess.Popen[bytes]) -> None:
    """Waits for a shim this agent started, and reaps it (Popen knows it is reaped)."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): a thread waits
        await asyncio.to_thread(process.wait)
        return
    await _readable(pidfd)
    process.wait()  # it has ended: reaps at once


async def _wait_adopted(run: AppRun) -> None:
    """Waits for a shim an earlier agent started (not this one's child to reap)."""
    try:
        pidfd = os.pidfd_open(run.shim_pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd: polled
        while run.shim_alive():  # noqa: ASYNC110 - nothing to wait on but the process table
            await asyncio.sleep(0.1)
        return
    if not run.shim_alive():  # ended (its pid perhaps recycled) before it was opened
        os.close(pidfd)
        return
    await _readable(pidfd)


async def _readable(pidfd: int) -> None:
    """Until the process of `pidfd` ends (its pidfd turns readable); closes it."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def resolve() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(pidfd, resolve)
    try:
        await ended
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def kill_run(run: AppRun) -> None:
    """Ends a run that cannot be adopted: its app's group, then its shim."""
    if run.child_alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pgid, signal.SIGKILL)
    if run.shim_alive():
        _kill(run.shim_pid)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------- the output files


@dataclass
class _Mark:
    """Where one stream's cursor stands once `sequence` is settled."""

    sequence: int
    stream: LogStream
    offset: int
    skipping: bool


class _OutputFile:
    """One output file of a container, split into lines from `offset`.

    A line longer than the buffer's limit is cut there and the rest of it skipped, as the
    agent has always done with its apps' output.
    """

    def __init__(self, path: Path, stream: LogStream, offset: int, skipping: bool) -> None:
        self.path = path
        self.stream = stream
        self.offset = offset  # where `pending` begins
        self.skipping = skipping
        self.pending = bytearray()
        self.fd = -1
        self.punched = 0

    def open(self) -> None:
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, logs: LogBuffer, marks: deque[_Mark], budget: int) -> int:
        """Reads up to `budget` bytes of new output into `logs`; the bytes read."""
        total = 0
        while total < budget:
            chunk = os.pread(self.fd, READ_CHUNK, self.offset + len(self.pending))
            if not chunk:
                break
            total += len(chunk)
            self._split(chunk, logs, marks)
        return total

    def _split(self, chunk: bytes, logs: LogBuffer, marks: deque[_Mark]) -> None:
        limit = logs.max_line_chars
        pending = self.pending
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            line = bytes(pending[start:end])
            start = end + 1
            if self.skipping:
                self.skipping = False
                continue
            appended = logs.append(self.stream, _decode(line))
            marks.append(_Mark(appended.sequence, self.stream, self.offset + start, False))
        del pending[:start]
        self.offset += start
        if len(pending) > limit:
            if not self.skipping:
                appended = logs.append(self.stream, _decode(bytes(pending[:limit])))
                logs.trimmed += 1
                self.skipping = True
                marks.append(
                    _Mark(appended.sequence, self.stream, self.offset + len(pending), True)
                )
            self.offset += len(pending)
            pending.clear()

    def finish(self, logs: LogBuffer, marks: deque[_Mark]) -> None:
        """The run ended: what is left is its last line; the next run starts a new one."""
        if self.pending and not self.skipping:
            logs.append(self.stream, _decode(bytes(self.pending)))
        self.offset += len(self.pending)
        self.pending.clear()
        self.skipping = False
        marks.append(_Mark(logs.last_sequence, self.stream, self.offset, False))

    def punch(self, upto: int) -> None:
        """Gives the bytes before `upto` back to the file system (they read as zeros)."""
        upto -= upto % 4096
        if self.fd < 0 or upto - self.punched < PUNCH_EVERY_BYTES:
            return
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self.fd, mode, ctypes.c_long(0), ctypes.c_long(upto)) != 0:
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("cannot free read output", extra={"path": str(self.path)})
        self.punched = upto


class LogTail:
    """A container's output files read into its LogBuffer, and the cursor a later agent
    resumes from: past every line runtime acknowledged or the buffer dropped."""

    def __init__(self, home: AppHome, saved: dict[str, Any] | None = None) -> None:
        saved = saved or {}
        self.issued_upto = int(saved.get("issued_upto", 0))
        self.files: dict[LogStream, _OutputFile] = {}
        self.settled: dict[LogStream, tuple[int, bool]] = {}
        for stream, path in home.output.items():
            offset, skipping = saved.get(stream.value, (0, False))
            self.files[stream] = _OutputFile(path, stream, int(offset), bool(skipping))
            self.settled[stream] = (int(offset), bool(skipping))
        self.marks: deque[_Mark] = deque()
        self.saved_at = 0.0  # monotonic time it was last written down
        self.dirty = False  # moved since
        self.reader = 0  # the run reading the files now (see `open`)

    def open(self) -> int:
        """Opens the files for a run's reader; the token to close them with (a reader of an
        earlier run, cancelled late, must not close the next run's)."""
        for file in self.files.values():
            file.open()
        self.reader += 1
        return self.reader

    def close(self, reader: int | None = None) -> None:
        """Closes the files (for `reader`, if it is still the one reading them)."""
        if reader is not None and reader != self.reader:
            return
        for file in self.files.values():
            file.close()

    def catch_up(self, logs: LogBuffer) -> None:
        """After an agent restart: output beyond MAX_CATCH_UP_BYTES is skipped, said so."""
        for file in self.files.values():
            try:
                behind = file.path.stat().st_size - file.offset
            except FileNotFoundError:
                continue
            if behind > MAX_CATCH_UP_BYTES:
                file.offset += behind - MAX_CATCH_UP_BYTES
                file.skipping = True  # from the middle of a line: up to its end
                logs.append(
                    LogStream.STDERR,
                    f"{AGENT_NOTICE} {behind - MAX_CATCH_UP_BYTES} bytes of this app's "
                    f"{file.stream} written while no agent read them were skipped",
                )

    def read(self, logs: LogBuffer, budget: int = 1 << 20) -> int:
        return sum(file.read(logs, self.marks, budget) for file in self.files.values())

    def finish(self, logs: LogBuffer) -> None:
        for file in self.files.values():
            file.finish(logs, self.marks)

    def reserve(self, logs: LogBuffer) -> bool:
        """Reserves sequences ahead when the buffer nears the reservation; True if it moved
        (to be written down before lines past it are shipped)."""
        if logs.last_sequence + RESERVED_SEQUENCES // 2 < self.issued_upto:
            return False
        self.issued_upto = logs.last_sequence + RESERVED_SEQUENCES
        return True

    def settle(self, logs: LogBuffer) -> bool:
        """Moves the cursor past lines runtime acknowledged or the buffer let go; True if it
        moved."""
        settled = max(logs.acknowledged, logs.first_sequence - 1)
        moved = False
        while self.marks and self.marks[0].sequence <= settled:
            mark = self.marks.popleft()
            self.settled[mark.stream] = (mark.offset, mark.skipping)
            moved = True
        if moved:
            for stream, file in self.files.items():
                file.punch(self.settled[stream][0])
        return moved

    def saved(self) -> dict[str, Any]:
        return {
            "issued_upto": self.issued_upto,
            **{stream.value: list(cursor) for stream, cursor in self.settled.items()},
        }


def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\r").decode("utf-8", errors="replace")
