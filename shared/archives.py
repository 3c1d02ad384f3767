"""Source archives: checking, extracting and packing gzip-compressed tarballs safely.

An uploaded archive is untrusted. `check_source_archive` reads one without writing anything
and refuses it (`InvalidArgument` on the field `archive`, reason `INVALID_ARCHIVE`, the
description naming the offending member) when it is not a readable gzip tar, or when any
member:

- has an absolute name, or a `..` component;
- is a character or block device, a FIFO, or any type other than a regular file, a
  directory, a symbolic link or a hard link;
- is a symbolic link whose target is absolute or, resolved from the link's own directory
  (following the archive's earlier links, textually), leaves the root;
- is a hard link whose target is not an earlier regular file of the archive;
- lies under an earlier symbolic link or under an earlier non-directory, appears twice (a
  directory may repeat), or is a symbolic link at a path an earlier link's target goes
  through (the order tricks that turn an inside link into an outside one);
- takes the archive past `ArchiveLimits.max_members` members or past
  `ArchiveLimits.max_unpacked_bytes` bytes of file content.

The root itself (an empty name, `.` or `./`, as `tar -C dir -czf x.tgz .` writes) may appear
as a directory.

`extract_archive` applies the same rules member by member while it extracts, and also hands
every member to `tarfile`'s `data` filter, which checks the real paths on disk, drops owners,
and keeps only permission bits (no setuid, setgid or sticky bit, no group or other write).

`pack_directory` writes a reproducible archive: the same tree always gives the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import os
import queue
import stat
import tarfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from isal import igzip, isal_zlib

from shared.errors import FieldViolation, InvalidArgument

ARCHIVE_FIELD = "archive"
INVALID_ARCHIVE = "INVALID_ARCHIVE"
_MAX_LINK_HOPS = 40  # as many symbolic links as Linux follows in one path lookup


@dataclass(frozen=True)
class ArchiveLimits:
    """How big an archive may be once unpacked."""

    max_members: int = 100_000
    max_unpacked_bytes: int = 2 * 1024**3


@dataclass
class ArchiveSummary:
    """What an accepted archive holds: its member count and its file content in bytes."""

    members: int
    unpacked_bytes: int


def _refuse(description: str) -> InvalidArgument:
    """The error every refusal of this module raises."""
    return InvalidArgument([FieldViolation(ARCHIVE_FIELD, description)], reason=INVALID_ARCHIVE)


# The archive errors that mean "this is not a readable gzip tar" (as opposed to a failure of
# the local disk, which stays an OSError).
_ISAL_ERROR = cast(type[Exception], isal_zlib.error)  # typed as an instance by isal
_UNREADABLE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, _ISAL_ERROR)


@dataclass
class _Checker:
    """The rules, applied one member at a time in archive order."""

    limits: ArchiveLimits
    # A slug's symbolic links may name absolute paths (a virtualenv's interpreter is
    # /usr/bin/python3): such a link is kept as it is, and nothing may lie under it or be
    # reached through it; it is never followed while unpacking.
    allow_absolute_links: bool = False
    members: int = 0
    unpacked_bytes: int = 0
    # normalized path -> "dir" | "file" | "symlink"; parents of members count as "dir"
    kinds: dict[str, str] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    traversed: set[str] = field(default_factory=set)

    def check(self, member: tarfile.TarInfo) -> None:
        name = member.name
        self.members += 1
        if self.members > self.limits.max_members:
            raise _refuse(
                f"member {name!r}: more than {self.limits.max_members} members in the archive"
            )
        if name.startswith("/"):
            raise _refuse(f"member {name!r}: absolute path")
        parts = _parts(name)
        if ".." in parts:
            raise _refuse(f"member {name!r}: path contains '..'")
        path = "/".join(parts)
        if member.ischr() or member.isblk():
            raise _refuse(f"member {name!r}: device files are not allowed")
        if member.isfifo():
            raise _refuse(f"member {name!r}: FIFOs are not allowed")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise _refuse(f"member {name!r}: unsupported member type {member.type!r}")
        if not path:
            if not member.isdir():
                raise _refuse(f"member {name!r}: the archive root must be a directory")
            return
        self._check_place(name, parts, member.isdir())
        if member.isreg():
            self._count_bytes(name, member.size)
            self.kinds[path] = "file"
        elif member.isdir():
            self.kinds[path] = "dir"
        elif member.issym():
            self._check_symlink(name, path, member.linkname)
            self.symlinks[path] = member.linkname
            self.kinds[path] = "symlink"
        else:
            self._check_hardlink(name, member.linkname)
            self._count_bytes(name, member.size)
            self.kinds[path] = "file"

    def summary(self) -> ArchiveSummary:
        return ArchiveSummary(members=self.members, unpacked_bytes=self.unpacked_bytes)

    def _count_bytes(self, name: str, size: int) -> None:
        self.unpacked_bytes += size
        if self.unpacked_bytes > self.limits.max_unpacked_bytes:
            raise _refuse(
                f"member {name!r}: the archive unpacks to more than "
                f"{self.limits.max_unpacked_bytes} bytes"
            )

    def _check_place(self, name: str, parts: list[str], is_dir: bool) -> None:
        """Every parent must be a directory (or not yet seen); no path may come twice."""
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            kind = self.kinds.get(parent)
            if kind == "symlink":
                raise _refuse(f"member {name!r}: lies under the symbolic link {parent!r}")
            if kind == "file":
                raise _refuse(f"member {name!r}: lies under the file {parent!r}")
            self.kinds[parent] = "dir"
        path = "/".join(parts)
        if path in self.kinds and not (self.kinds[path] == "dir" and is_dir):
            raise _refuse(f"member {name!r}: appears more than once in the archive")

    def _check_symlink(self, name: str, path: str, target: str) -> None:
        if not target:
            raise _refuse(f"member {name!r}: symbolic link with an empty target")
        if target.startswith("/"):
            if self.allow_absolute_links and path not in self.traversed:
                return
            raise _refuse(f"member {name!r}: symbolic link to the absolute path {target!r}")
        if path in self.traversed:
            raise _refuse(
                f"member {name!r}: symbolic link at a path an earlier link's target goes through"
            )
        directory = path.rpartition("/")[0]
        resolved = self._resolve(name, directory, target)
        if resolved is None:
            raise _refuse(
                f"member {name!r}: symbolic link target {target!r} points outside the archive"
            )

    def _check_hardlink(self, name: str, target: str) -> None:
        if target.startswith("/"):
            raise _refuse(f"member {name!r}: hard link to the absolute path {target!r}")
        parts = _parts(target)
        if ".." in parts:
            raise _refuse(f"member {name!r}: hard link target {target!r} contains '..'")
        if self.kinds.get("/".join(parts)) != "file":
            raise _refuse(
                f"member {name!r}: hard link target {target!r} is not an earlier regular file"
            )

    def _resolve(self, name: str, directory: str, target: str) -> str | None:
        """Where `target`, read from `directory`, lands (None: outside the root).

        Follows the archive's earlier symbolic links; every path it goes through is recorded,
        so a later member cannot turn one of them into a link (a link's last component may
        become a link later: that link's own target is checked when it comes)."""
        out = _parts(directory)
        pending = _parts(target)
        pending.reverse()
        hops = 0
        while pending:
            part = pending.pop()
            if part == "..":
                if not out:
                    return None
                out.pop()
                continue
            out.append(part)
            current = "/".join(out)
            if pending:  # a directory on the way, not where the link ends
                self.traversed.add(current)
            link = self.symlinks.get(current)
            if link is None:
                continue
            hops += 1
            if hops > _MAX_LINK_HOPS:
                raise _refuse(f"member {name!r}: too many levels of symbolic links")
            if link.startswith("/"):  # only in a slug: a link to the system, made as is
                return link if self.allow_absolute_links else None
            out.pop()
            pending.extend(reversed(_parts(link)))
        return "/".join(out)


def _parts(name: str) -> list[str]:
    """The components of a relative name, without empty and `.` ones."""
    return [part for part in name.split("/") if part not in ("", ".")]


@contextmanager
def _open(path: Path) -> Iterator[tarfile.TarFile]:
    """The archive as a forward-only tar stream, for reading it once."""
    with open(path, "rb") as raw, _open_stream(raw) as tar:
        yield tar


@contextmanager
def _open_stream(raw: BinaryIO | io.RawIOBase) -> Iterator[tarfile.TarFile]:
    """`raw` (gzip bytes) as a forward-only tar stream.

    Decompressed by `gzip.GzipFile` rather than tarfile's own stream, and read to the end
    of the gzip data on a clean exit, so a cut or corrupt gzip trailer (CRC, length) is
    refused too."""
    # ISA-L's inflate (isal.igzip, gzip's interface): about 3.5 times zlib's speed here,
    # and decompressing is most of what checking an upload costs.
    with igzip.GzipFile(fileobj=raw, mode="rb") as gz:  # type: ignore[no-untyped-call]
        try:
            with tarfile.open(fileobj=gz, mode="r|") as tar:
                yield tar
            while gz.read(1024 * 1024):
                pass
        except _UNREADABLE as exc:
            raise _refuse(f"not a complete gzip-compressed tar archive ({exc})") from exc


def _check_all(tar: tarfile.TarFile, checker: _Checker) -> ArchiveSummary:
    for member in tar:
        checker.check(member)
        if member.isreg():
            _drain(tar, member)
    return checker.summary()


class ArchiveCheck:
    """`check_source_archive` of an archive as it arrives: `feed`
    it the bytes in order, then `finish` for the summary (or the refusal). The checking runs
    in a thread of its own while the caller receives the rest, so a check costs the upload
    little more than its receiving; `abort` ends it early. Must be made in an event loop."""

    _ABORT = b"abort"

    def __init__(
        self, limits: ArchiveLimits = ArchiveLimits(), *, allow_absolute_links: bool = False
    ) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        checker = _Checker(limits, allow_absolute_links=allow_absolute_links)
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[ArchiveSummary] = loop.create_future()
        # A thread of its own, not the loop's shared pool: a check waits for bytes, and the
        # bytes come through that pool (feed), so checks in the pool could starve their feeds.
        threading.Thread(
            target=self._run, args=(loop, checker), name="archive-check", daemon=True
        ).start()

    def _run(self, loop: asyncio.AbstractEventLoop, checker: _Checker) -> None:
        try:
            with _open_stream(_QueueReader(self._queue, self._ABORT)) as tar:
                summary = _check_all(tar, checker)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, self._done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, self._done, summary, None)

    async def feed(self, chunk: bytes) -> None:
        if chunk:
            await asyncio.to_thread(self._put, chunk)

    async def finish(self) -> ArchiveSummary:
        """The archive's summary; InvalidArgument if it broke a rule or was incomplete."""
        await asyncio.to_thread(self._put, None)
        return await self._done

    def abort(self) -> None:
        """Stop checking (the upload failed); what it found is of no interest."""
        self._done.add_done_callback(lambda done: done.exception())  # never "unretrieved"
        while True:  # never blocks the loop: make room by dropping bytes nobody will check
            try:
                self._queue.put_nowait(self._ABORT)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()

    def _put(self, item: bytes | None) -> None:
        """Into the queue, unless the check already ended (a refusal: nothing reads)."""
        while not self._done.done():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue


class _Aborted(Exception):
    pass


def _settle(
    future: asyncio.Future[ArchiveSummary],
    summary: ArchiveSummary | None,
    error: BaseException | None,
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert summary is not None
        future.set_result(summary)


class _QueueReader(io.RawIOBase):
    """A readable stream of the byte strings put into a queue; None ends it."""

    def __init__(self, chunks: queue.Queue[bytes | None], abort: bytes) -> None:
        self._chunks = chunks
        self._abort = abort
        self._pending = memoryview(b"")
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            if self._ended:
                return 0
            chunk = self._chunks.get()
            if chunk is None:
                self._ended = True
                return 0
            if chunk is self._abort:
                raise _Aborted
            self._pending = memoryview(chunk)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def check_source_archive(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> ArchiveSummary:
    """Read the archive at `path` through, writing nothing, and say what it holds.

    Raises `InvalidArgument` (field `archive`, reason `INVALID_ARCHIVE`) for the first member
    that breaks a rule (see the module docstring), or when the file is not a complete gzip
    tar. Reads the archive as a stream, once."""
    with _open(path) as tar:
        return _check_all(tar, _Checker(limits))


def _drain(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    """Read a member's content, so a truncated archive is found here and not later."""
    source = tar.extractfile(member)
    if source is None:
        return
    while source.read(1024 * 1024):
        pass


def extract_archive(
    path: Path,
    dest: Path,
    limits: ArchiveLimits = ArchiveLimits(),
    *,
    allow_absolute_links: bool = False,
) -> ArchiveSummary:
    """Check and extract the archive at `path` into `dest`, an existing empty directory.

    Each member is checked (the rules of `check_source_archive`) before it is written, and
    extracted through `tarfile`'s `data` filter: nothing is written or linked outside `dest`,
    no symbolic link is followed out of it, owners are not restored, modes keep at most
    0o755 (files keep their executable bit, setuid, setgid and sticky bits are dropped), and
    no device node is made.

    On `InvalidArgument` (or any other error) the members before the refused one are already
    in `dest`: the caller must remove `dest` (e.g. `shutil.rmtree`) and not use its content.
    With `allow_absolute_links` (a slug, whose virtualenv links to /usr/bin/python3) a
    symbolic link to an absolute path is made as it is, through the `tar` filter (the member
    itself must still land inside `dest`); the checks refuse anything under such a link.
    Needs Python 3.11.4 or later (`tarfile.data_filter`)."""
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("extracting untrusted archives needs Python 3.11.4 or later")
    if not dest.is_dir() or any(dest.iterdir()):
        raise ValueError(f"{dest} must be an existing empty directory")
    checker = _Checker(limits, allow_absolute_links=allow_absolute_links)

    def keep(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo | None:
        if allow_absolute_links and member.issym():
            # Its target may lead to the system through another link (python3.11 ->
            # python3 -> /usr/bin/python3), which the data filter would refuse; the checks
            # above already refuse any member under or through a link.
            return tarfile.tar_filter(member, dest_path)
        return tarfile.data_filter(member, dest_path)

    with _open(path) as tar:
        for member in tar:
            checker.check(member)
            if not _parts(member.name):
                continue  # the root: dest itself
            try:
                tar.extract(member, dest, set_attrs=True, filter=keep)
            except tarfile.FilterError as exc:
                raise _refuse(f"member {member.name!r}: {exc}") from exc
    return checker.summary()


def pack_directory(src: Path, dest: Path, compresslevel: int = 6) -> None:
    """Write the content of `src` to `dest` as a reproducible gzip-compressed tar.

    Names are relative to `src` (no root entry), in sorted depth-first order; owners are
    0/0 with empty names, every mtime is 0 (the gzip header's too) and modes keep their
    permission bits only, so the same tree always gives the same bytes (and sha256).
    Directories, regular files, hard links between them and symbolic links (kept as links,
    never followed) are packed; any other file type raises `ValueError`. The same tree
    and `compresslevel` give the same bytes."""
    with open(dest, "wb") as raw:
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=compresslevel
        ) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                _pack_tree(tar, src, "")
        raw.flush()
        os.fsync(raw.fileno())


def _pack_tree(tar: tarfile.TarFile, directory: Path, prefix: str) -> None:
    with os.scandir(directory) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        arcname = prefix + entry.name
        info = tar.gettarinfo(entry.path, arcname)
        if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
            raise ValueError(f"{entry.path}: cannot pack this file type")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = stat.S_IMODE(info.mode) & 0o777
        if info.isreg():
            with open(entry.path, "rb") as content:
                tar.addfile(info, content)
        else:
            tar.addfile(info)
        if info.isdir():
            _pack_tree(tar, Path(entry.path), arcname + "/")
