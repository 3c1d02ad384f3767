"""An image's `User`, as the container runs it.

An image that names a user other than root runs as that user *inside* a user namespace
(`id` says what the image says) that maps it to the project's uid on the host, so no two
tenants ever share a host uid however their images name their users. The image's files
owned by that user are owned by the project's uid in the project's copy of the root
filesystem (images.py: `ImageStore.as_user`). An image running as root (or naming none)
runs as the project's uid with no user namespace, as before: never as uid 0.

Names are looked up in the image's own /etc/passwd and /etc/group, read without following
a symbolic link (one could point at the host's files), as a container engine does:
`name`, `uid`, `name:group`, `uid:gid`; a uid with no passwd entry gets gid 0.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from services.agent.image_refs import ImageFailed

IMAGE_USER_UNKNOWN = "IMAGE_USER_UNKNOWN"
IMAGE_USER_UNREACHABLE = "IMAGE_USER_UNREACHABLE"
MAX_ID = 2**31 - 1  # what a 32-bit id map can map one-to-one past the image's own
MAX_DATABASE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ImageUser:
    """The non-root user an image runs as: its uid and gid inside the container."""

    uid: int
    gid: int

    def __str__(self) -> str:
        return f"{self.uid}:{self.gid}"


def resolve_user(user: str, rootfs: Path) -> ImageUser | None:
    """The image's user (its config's `User`) in `rootfs`; None for root or none named.
    Raises ImageFailed (IMAGE_USER_UNKNOWN) for a name the image does not define."""
    name, _, group = user.strip().partition(":")
    if not name:
        return None
    passwd = _entries(rootfs, "passwd")
    uid, gid = _lookup_user(name, passwd)
    if group:
        gid = _lookup_group(group, _entries(rootfs, "group"))
    if uid == 0:
        return None  # root images run as the project's uid, never as root
    return ImageUser(uid, gid)


def check_reachable(rootfs: Path) -> None:
    """Raises ImageFailed (IMAGE_USER_UNREACHABLE) unless every directory above `rootfs`
    lets others search it: runc sets the root up from inside the user namespace, as its
    root (the host's nobody), which must reach it."""
    for directory in reversed(rootfs.parents):
        try:
            mode = directory.stat().st_mode
        except OSError:
            continue  # not there yet: the agent makes it
        if not mode & stat.S_IXOTH:
            raise ImageFailed(
                IMAGE_USER_UNREACHABLE,
                f"this server cannot run an image as its own user: {directory} is closed to "
                "other users, and the container's user namespace must reach the image under "
                f"it (its operator can `chmod o+x {directory}`); or run the image as root",
            )


def _lookup_user(name: str, passwd: list[list[str]]) -> tuple[int, int]:
    for fields in passwd:
        if len(fields) >= 4 and (fields[0] == name or (name.isdigit() and fields[2] == name)):
            if fields[2].isdigit() and fields[3].isdigit():
                return _id(fields[2], name), _id(fields[3], name)
    if name.isdigit():
        return _id(name, name), 0
    raise ImageFailed(
        IMAGE_USER_UNKNOWN,
        f"the image runs as user {name!r}, which its /etc/passwd does not define: add the "
        "user to the image, or name it by uid",
    )


def _lookup_group(group: str, groups: list[list[str]]) -> int:
    if group.isdigit():
        return _id(group, group)
    for fields in groups:
        if len(fields) >= 3 and fields[0] == group and fields[2].isdigit():
            return _id(fields[2], group)
    raise ImageFailed(
        IMAGE_USER_UNKNOWN,
        f"the image runs as group {group!r}, which its /etc/group does not define: add the "
        "group to the image, or name it by gid",
    )


def _id(text: str, named: str) -> int:
    value = int(text)
    if value > MAX_ID:
        raise ImageFailed(
            IMAGE_USER_UNKNOWN, f"the image's user {named!r} has id {value}: past {MAX_ID}"
        )
    return value


def _entries(rootfs: Path, database: str) -> list[list[str]]:
    """The lines of the image's /etc/<database>, split on ':'; none when it is missing, not
    a regular file, or reached through a symbolic link."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        root = os.open(rootfs, flags | os.O_DIRECTORY)
    except OSError:
        return []
    try:
        etc = os.open("etc", flags | os.O_DIRECTORY, dir_fd=root)
        try:
            fd = os.open(database, flags | os.O_NONBLOCK, dir_fd=etc)
        finally:
            os.close(etc)
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return []
            data = file.read(MAX_DATABASE_BYTES)
    except OSError:
        return []
    finally:
        os.close(root)
    text = data.decode("utf-8", errors="replace")
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]
