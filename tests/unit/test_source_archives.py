"""shared.archives: what a source archive may hold, safe extraction, reproducible packing."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from shared.archives import (
    ArchiveCheck,
    ArchiveLimits,
    ArchiveSummary,
    check_source_archive,
    extract_archive,
    pack_directory,
)
from shared.errors import InvalidArgument

Member = tuple[tarfile.TarInfo, bytes | None]


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _dir(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info, None


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE, mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    info.mode = mode  # a hard link carries its file's mode, as tar writes it
    return info, None


def _special(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3
    return info, None


def _archive(path: Path, members: Iterable[Member]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _refusal(path: Path, limits: ArchiveLimits | None = None) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        check_source_archive(path, limits or ArchiveLimits())
    error = caught.value
    assert error.reason == "INVALID_ARCHIVE"
    assert [v.field for v in error.violations] == ["archive"]
    return error


REFUSED: dict[str, tuple[list[Member], str]] = {
    "absolute path": ([_file("/etc/passwd")], "'/etc/passwd'"),
    "dot-dot path": ([_file("a/../../evil")], "'a/../../evil'"),
    "character device": ([_special("null", tarfile.CHRTYPE)], "'null'"),
    "block device": ([_special("sda", tarfile.BLKTYPE)], "'sda'"),
    "fifo": ([_special("pipe", tarfile.FIFOTYPE)], "'pipe'"),
    "escaping symlink": ([_dir("a"), _link("a/up", "../../etc")], "'a/up'"),
    "absolute symlink": ([_link("passwd", "/etc/passwd")], "'passwd'"),
    "escaping hardlink": ([_link("h", "../../etc/passwd", tarfile.LNKTYPE)], "'h'"),
    "absolute hardlink": ([_link("h", "/etc/passwd", tarfile.LNKTYPE)], "'h'"),
    "hardlink to nothing seen": ([_link("h", "later", tarfile.LNKTYPE), _file("later")], "'h'"),
    "hardlink to a symlink": (
        [_link("s", "f"), _file("f"), _link("h", "s", tarfile.LNKTYPE)],
        "'h'",
    ),
    "member under a symlink": ([_dir("d"), _link("s", "d"), _file("s/f")], "'s/f'"),
    "link chain escaping": ([_link("a", "."), _link("s", "a/..")], "'s'"),
    "link made later on a path an earlier link goes through": (
        [_link("s", "a/.."), _link("a", ".")],
        "'a'",
    ),
    "duplicate file": ([_file("f"), _file("f")], "'f'"),
    "file replacing a directory": ([_file("d/f"), _file("d")], "'d'"),
    "root that is not a directory": ([_link(".", "x")], "'.'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_members(case: str, tmp_path: Path) -> None:
    members, named = REFUSED[case]
    path = _archive(tmp_path / "a.tgz", members)
    assert named in _refusal(path).message
    # extraction refuses too, and never writes outside its directory
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InvalidArgument) as caught:
        extract_archive(path, dest)
    assert named in caught.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tgz", "dest"]


def test_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "a.tgz"
    path.write_bytes(b"just text, not an archive\n" * 10)
    assert "gzip" in _refusal(path).message


def test_gzip_but_not_tar(tmp_path: Path) -> None:
    path = tmp_path / "a.tgz"
    path.write_bytes(gzip.compress(b"no tar header here\n" * 100))
    _refusal(path)


def test_plain_tar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("f")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    assert "gzip" in _refusal(path).message


def test_truncated_gzip_trailer(tmp_path: Path) -> None:
    full = _archive(tmp_path / "full.tgz", [_file("f", b"complete tar, cut gzip trailer")])
    path = tmp_path / "a.tgz"
    path.write_bytes(full.read_bytes()[:-4])
    _refusal(path)


def test_truncated(tmp_path: Path) -> None:
    full = _archive(tmp_path / "full.tgz", [_file("big", os.urandom(200_000))])
    path = tmp_path / "a.tgz"
    path.write_bytes(full.read_bytes()[:50_000])
    _refusal(path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InvalidArgument):
        extract_archive(path, dest)


def test_too_many_members(tmp_path: Path) -> None:
    path = _archive(tmp_path / "a.tgz", [_file(f"f{i}") for i in range(4)])
    error = _refusal(path, ArchiveLimits(max_members=3))
    assert "'f3'" in error.message and "3 members" in error.message
    assert check_source_archive(path, ArchiveLimits(max_members=4)).members == 4


def test_too_many_bytes(tmp_path: Path) -> None:
    path = _archive(tmp_path / "a.tgz", [_file("a", b"1" * 60), _file("b", b"2" * 60)])
    error = _refusal(path, ArchiveLimits(max_unpacked_bytes=100))
    assert "'b'" in error.message and "100 bytes" in error.message
    assert check_source_archive(path, ArchiveLimits(max_unpacked_bytes=120)).unpacked_bytes == 120


def _good_members() -> list[Member]:
    return [
        _dir("./"),
        _dir("./app", 0o7777),
        _file("./app/main.py", b"print('hi')\n", 0o4777),
        _file("./app/run.sh", b"#!/bin/sh\n", 0o755),
        _file("./app/data.txt", b"data", 0o600),
        _link("./app/current", "main.py"),
        _link("./app/lib64", "../lib"),
        _dir("./lib"),
        _link("./app/same.txt", "app/data.txt", tarfile.LNKTYPE, 0o600),
    ]


def test_good_archive_extracts_with_content_and_safe_modes(tmp_path: Path) -> None:
    path = _archive(tmp_path / "a.tgz", _good_members())
    summary = check_source_archive(path)
    assert (summary.members, summary.unpacked_bytes) == (9, 26)
    dest = tmp_path / "dest"
    dest.mkdir()
    assert extract_archive(path, dest) == summary
    app = dest / "app"
    assert (app / "main.py").read_text() == "print('hi')\n"
    assert os.readlink(app / "current") == "main.py"
    assert os.readlink(app / "lib64") == "../lib"
    assert (app / "same.txt").read_bytes() == b"data"
    assert os.stat(app / "same.txt").st_ino == os.stat(app / "data.txt").st_ino

    def mode(name: str) -> int:
        return stat.S_IMODE(os.lstat(app / name).st_mode)

    assert mode("main.py") == 0o755  # no setuid, no group/other write
    assert mode("run.sh") == 0o755
    assert mode("data.txt") == 0o600
    assert stat.S_IMODE(os.stat(app).st_mode) & 0o7022 == 0  # no sticky/setgid/setuid kept


def test_extract_needs_an_empty_directory(tmp_path: Path) -> None:
    path = _archive(tmp_path / "a.tgz", [_file("f")])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "already").write_text("x")
    with pytest.raises(ValueError):
        extract_archive(path, dest)


def _tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "sub" / "mod.py").write_text("x = 1\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "bin" / "python").symlink_to("python3")
    (root / "bin" / "python3").symlink_to("tool")
    (root / "lib64").symlink_to("pkg")
    (root / "empty").mkdir()


def _set_mtimes(root: Path, when: int) -> None:
    for path in [root, *root.rglob("*")]:
        os.utime(path, (when, when), follow_symlinks=False)


def test_pack_directory_is_reproducible(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    for root, when in ((first, 1_000_000), (second, 2_000_000)):
        root.mkdir()
        _tree(root)
        _set_mtimes(root, when)
    pack_directory(first, tmp_path / "one.tgz")
    pack_directory(second, tmp_path / "two.tgz")
    one, two = (tmp_path / "one.tgz").read_bytes(), (tmp_path / "two.tgz").read_bytes()
    assert hashlib.sha256(one).hexdigest() == hashlib.sha256(two).hexdigest()
    with tarfile.open(tmp_path / "one.tgz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:4] == ["bin", "bin/python", "bin/python3", "bin/tool"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)


def test_pack_round_trips_through_extract(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _tree(src)
    pack_directory(src, tmp_path / "a.tgz")
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_archive(tmp_path / "a.tgz", dest)

    def listing(root: Path, read: Callable[[Path], object]) -> dict[str, object]:
        return {str(p.relative_to(root)): read(p) for p in sorted(root.rglob("*"))}

    def describe(p: Path) -> object:
        if p.is_symlink():
            return ("link", os.readlink(p))
        if p.is_dir():
            return "dir"
        return ("file", p.read_bytes(), stat.S_IMODE(p.stat().st_mode) & 0o100)

    assert listing(dest, describe) == listing(src, describe)
    assert (dest / "bin" / "python").is_symlink()
    assert (dest / "bin" / "python").read_text() == "#!/bin/sh\necho hi\n"


async def _check_streamed(path: Path, piece: int = 7) -> ArchiveSummary:
    """ArchiveCheck fed the file in small pieces, as an upload arrives."""
    check = ArchiveCheck()
    data = await asyncio.to_thread(path.read_bytes)
    for start in range(0, len(data), piece):
        await check.feed(data[start : start + piece])
    return await check.finish()


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_a_streamed_check_refuses_what_the_file_check_refuses(
    case: str, tmp_path: Path
) -> None:
    members, named = REFUSED[case]
    path = _archive(tmp_path / "a.tgz", members)
    with pytest.raises(InvalidArgument) as caught:
        await _check_streamed(path)
    assert named in caught.value.message
    assert caught.value.message == _refusal(path).message


async def test_a_streamed_check_of_a_good_archive_says_what_the_file_check_says(
    tmp_path: Path,
) -> None:
    path = _archive(tmp_path / "a.tgz", _good_members())
    assert await _check_streamed(path, piece=1000) == check_source_archive(path)
    truncated = tmp_path / "cut.tgz"
    truncated.write_bytes((await asyncio.to_thread(path.read_bytes))[:-9])
    with pytest.raises(InvalidArgument):
        await _check_streamed(truncated)


async def test_an_aborted_streamed_check_ends_its_thread(tmp_path: Path) -> None:
    path = _archive(tmp_path / "a.tgz", _good_members())
    check = ArchiveCheck()
    await check.feed((await asyncio.to_thread(path.read_bytes))[:100])
    check.abort()
    with pytest.raises(Exception):  # noqa: B017 - whatever it was: it ended
        await asyncio.wait_for(check._done, 10)
