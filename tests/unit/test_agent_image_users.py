"""An image's `User`: looked up in the image's own files, never through a link out of it;
run in a user namespace mapping it (and only it, besides nobody for the namespace's root)
to the project's uid; the image's files of that user given to that uid when unpacked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.agent import oci
from services.agent.image_refs import ImageFailed
from services.agent.image_users import (
    IMAGE_USER_UNKNOWN,
    IMAGE_USER_UNREACHABLE,
    ImageUser,
    check_reachable,
    resolve_user,
)
from services.agent.images import _owned_by
from shared.resources import Resources

PROJECT_UID = 2_000_007


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        "# users\nroot:x:0:0:root:/root:/bin/sh\nnode:x:1000:1001::/home/node:/bin/sh\n"
        "broken:x:abc:1::/:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnode:x:1001:\nstaff:x:50:\n")
    return root


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", None),
        ("root", None),  # root images run as the project's uid, never as root
        ("0", None),
        ("0:50", None),
        ("node", ImageUser(1000, 1001)),
        ("1000", ImageUser(1000, 1001)),  # a uid in passwd: its group
        ("1234", ImageUser(1234, 0)),  # a uid not in passwd: group 0, as container engines do
        ("node:staff", ImageUser(1000, 50)),
        ("node:77", ImageUser(1000, 77)),
        ("1234:1234", ImageUser(1234, 1234)),
    ],
)
def test_users_as_images_name_them(rootfs: Path, user: str, expected: ImageUser | None) -> None:
    assert resolve_user(user, rootfs) == expected


@pytest.mark.parametrize(
    ("user", "named"),
    [("nobody-here", "user 'nobody-here'"), ("broken", "user 'broken'"), ("node:nope", "group")],
)
def test_names_the_image_does_not_define_fail_saying_which(
    rootfs: Path, user: str, named: str
) -> None:
    with pytest.raises(ImageFailed) as failed:
        resolve_user(user, rootfs)
    assert failed.value.code == IMAGE_USER_UNKNOWN
    assert named in failed.value.reason


def test_ids_past_what_a_map_can_hold_are_refused(rootfs: Path) -> None:
    with pytest.raises(ImageFailed, match="past"):
        resolve_user("4294967294", rootfs)


def test_the_image_s_files_are_never_read_through_a_link(tmp_path: Path, rootfs: Path) -> None:
    outside = tmp_path / "host-passwd"
    outside.write_text("app:x:4242:4242::/:/bin/sh\n")
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc" / "passwd").symlink_to(outside)
    with pytest.raises(ImageFailed):  # the host's file is never read: no such user
        resolve_user("app", rootfs)
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc").rename(tmp_path / "etc-elsewhere")
    (rootfs / "etc").symlink_to(tmp_path / "etc-elsewhere")
    with pytest.raises(ImageFailed):
        resolve_user("node", rootfs)
    assert resolve_user("1000", rootfs) == ImageUser(1000, 0)  # by uid: no lookup needed


def test_unpacking_gives_the_user_s_files_to_the_project_and_keeps_the_rest() -> None:
    assert _owned_by(1000, PROJECT_UID) == [
        "0:0:1000",
        f"1000:{PROJECT_UID}:1",
        f"1001:1001:{2**32 - 2 - 1000}",
    ]
    assert _owned_by(0, PROJECT_UID) == [f"0:{PROJECT_UID}:1", f"1:1:{2**32 - 2}"]


def _bundle(user: ImageUser | None) -> oci.Bundle:
    return oci.Bundle(
        container_id="c1",
        command="",
        uid=PROJECT_UID,
        env={},
        limits=oci.Limits(resources=Resources(64, 100), pids=64, tmpfs_mb=16),
        netns_path="/run/netns/x",
        cgroups_path="/hangar/c1",
        image_root="/images/rootfs/abc",
        args=("/bin/app",),
        cwd="/",
        image_user=user,
    )


def test_an_image_user_runs_in_its_own_user_namespace_as_the_project_s_uid() -> None:
    spec = oci.runtime_spec(_bundle(ImageUser(1000, 1001)))
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1001, "additionalGids": []}
    linux = spec["linux"]
    assert {"type": "user"} in linux["namespaces"]
    assert linux["uidMappings"] == [
        {"containerID": 1000, "hostID": PROJECT_UID, "size": 1},
        {"containerID": 0, "hostID": oci.NOBODY, "size": 1},
    ]
    assert linux["gidMappings"][0] == {"containerID": 1001, "hostID": PROJECT_UID, "size": 1}
    assert spec["process"]["capabilities"] == oci.NO_CAPABILITIES
    assert spec["process"]["noNewPrivileges"] is True
    (sys_mount,) = [m for m in spec["mounts"] if m["destination"] == "/sys"]
    assert sys_mount["type"] == "tmpfs" and "ro" in sys_mount["options"]


def test_a_group_0_user_maps_the_namespace_s_root_group_to_the_project() -> None:
    linux = oci.runtime_spec(_bundle(ImageUser(1000, 0)))["linux"]
    assert linux["gidMappings"] == [{"containerID": 0, "hostID": PROJECT_UID, "size": 1}]


def test_without_an_image_user_nothing_changes() -> None:
    spec = oci.runtime_spec(_bundle(None))
    assert spec["process"]["user"]["uid"] == PROJECT_UID
    assert {"type": "user"} not in spec["linux"]["namespaces"]
    assert "uidMappings" not in spec["linux"]
    (sys_mount,) = [m for m in spec["mounts"] if m["destination"] == "/sys"]
    assert sys_mount["type"] == "sysfs"


def test_a_root_closed_to_others_is_refused_saying_where(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    os.chmod(closed, 0o700)
    with pytest.raises(ImageFailed) as failed:
        check_reachable(closed / "images" / "rootfs" / "abc-as-1")
    assert failed.value.code == IMAGE_USER_UNREACHABLE
    # The first closed directory on the way (pytest's own may come before `closed`).
    named = failed.value.reason.split("`chmod o+x ", 1)[1].split("`", 1)[0]
    assert Path(named) in (closed, *closed.parents)
    assert not Path(named).stat().st_mode & 0o001
