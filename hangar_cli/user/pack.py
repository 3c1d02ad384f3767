"""Packing a directory for `hangar deploy`: a gzip-compressed tar of its files, leaving out
what `.gitignore` and `.hangarignore` files ignore (git's wildmatch rules, as the pathspec
package's GitIgnoreSpec implements them) and always `.git/`.

Ignore files are read wherever they are in the tree, and their patterns apply below their own
directory, as git does; `.hangarignore` patterns come after `.gitignore` ones of the same
directory (so `!pattern` there can bring back what `.gitignore` ignored). Symbolic links are
stored as links; anything that is neither a file, a directory nor a link is skipped.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pathspec

IGNORE_FILES = (".gitignore", ".hangarignore")
ALWAYS_SKIPPED = {".git"}


@dataclass(frozen=True)
class _Rules:
    """The patterns of one directory's ignore files, relative to that directory."""

    base: str  # "" for the root, else "sub/dir" (POSIX)
    spec: pathspec.GitIgnoreSpec


def _read_rules(directory: Path, base: str) -> _Rules | None:
    lines: list[str] = []
    for name in IGNORE_FILES:
        path = directory / name
        if path.is_file():
            lines.extend(path.read_text(errors="replace").splitlines())
    if not lines:
        return None
    return _Rules(base, pathspec.GitIgnoreSpec.from_lines(lines))


def _ignored(rules: list[_Rules], relative: str, is_dir: bool) -> bool:
    """Whether `relative` (POSIX, from the root) is ignored: the last matching pattern wins,
    the deepest directory's rules last."""
    verdict = False
    for rule in rules:
        sub = relative[len(rule.base) + 1 :] if rule.base else relative
        candidate = sub + "/" if is_dir else sub
        result = rule.spec.check_file(candidate)
        if result.include is not None:
            verdict = result.include
    return verdict


def iter_files(root: Path) -> Iterator[str]:
    """Every path under `root` that would be packed (POSIX, relative to `root`), sorted:
    directories before what they hold; ignored directories are not entered."""
    root = root.resolve()

    def walk(directory: Path, base: str, rules: list[_Rules]) -> Iterator[str]:
        own = _read_rules(directory, base)
        active = [*rules, own] if own else rules
        with os.scandir(directory) as entries:
            listing = sorted(entries, key=lambda entry: entry.name)
        for entry in listing:
            if entry.name in ALWAYS_SKIPPED:
                continue
            relative = f"{base}/{entry.name}" if base else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if _ignored(active, relative, is_dir):
                continue
            if is_dir:
                yield relative
                yield from walk(Path(entry.path), relative, active)
            elif entry.is_file(follow_symlinks=False) or entry.is_symlink():
                yield relative

    yield from walk(root, "", [])


@dataclass(frozen=True)
class Packed:
    """An archive written by `pack`: its sha256 (what the upload is stored as), size and
    the paths it holds."""

    sha256: str
    size_bytes: int
    members: tuple[str, ...]


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def pack(root: Path, out: IO[bytes]) -> Packed:
    """Write `root` (minus ignored paths) to `out` as a gzip tar, members named relative to
    `root`; owners are cleared so the archive says nothing about the local machine."""
    root = root.resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    writer = _HashingWriter(out)
    members = tuple(iter_files(root))
    with tarfile.open(fileobj=writer, mode="w:gz") as tar:  # type: ignore[call-overload]
        for relative in members:
            info = tar.gettarinfo(str(root / relative), arcname=relative)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isreg():
                with (root / relative).open("rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)
    writer.flush()
    return Packed(writer.digest.hexdigest(), writer.size, members)
