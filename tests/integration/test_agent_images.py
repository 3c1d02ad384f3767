"""The agent's image store (services/agent/images.py) against a real registry on loopback
(the reference docker-registry) with real images built by umoci from the host's busybox:
pulls by tag and by digest, shared layers, a tag moving, private registries, every failure
a deployment can show, concurrent pulls and garbage collection."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.agent.domain import LogBuffer
from services.agent.image_refs import (
    IMAGE_ARCHITECTURE,
    IMAGE_AUTH_FAILED,
    IMAGE_NOT_FOUND,
    IMAGE_PULL_FAILED,
    IMAGE_REFERENCE_INVALID,
    MOUNT_DIRECTORIES,
    MOUNT_FILES,
    ImageFailed,
    ImageReference,
    RegistryAuth,
    choose_manifest,
    parse_reference,
)
from services.agent.images import ImageStore
from tests.support.procs import free_port
from tests.support.registry import IMAGE_CMD, Registry, build_image, missing_tools, running_registry

if os.geteuid() != 0:
    pytest.skip("unpacking images keeps their owners: needs root", allow_module_level=True)
if missing_tools():
    pytest.skip(f"not installed: {', '.join(missing_tools())}", allow_module_level=True)

USERS = {"ada": "secret"}
NOT_A_TOOL = "/nonexistent/skopeo"  # a store with it fails if it ever runs skopeo


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def registry(work: Path) -> Iterator[Registry]:
    with running_registry(work / "public") as started:
        yield started


@pytest.fixture(scope="module")
def private(work: Path) -> Iterator[Registry]:
    with running_registry(work / "private", users=USERS) as started:
        yield started


def store_for(directory: Path, *registries: Registry, **options: object) -> ImageStore:
    insecure = frozenset(r.address for r in registries)
    return ImageStore(directory, insecure_registries=insecure, **options)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path, registry: Registry, private: Registry) -> ImageStore:
    return store_for(tmp_path / "store", registry, private)


def blobs(store: ImageStore) -> set[str]:
    return {path.name for path in (store.layout / "blobs" / "sha256").iterdir()}


def layers_of(store: ImageStore, digest: str) -> list[str]:
    meta = json.loads((store.rootfs_dir / f"{digest.removeprefix('sha256:')}.json").read_text())
    manifest = json.loads((store.layout / "blobs" / meta["manifest"].replace(":", "/")).read_text())
    return [layer["digest"].removeprefix("sha256:") for layer in manifest["layers"]]


def unpacked_dirs(store: ImageStore) -> list[Path]:
    return [path for path in store.rootfs_dir.iterdir() if path.is_dir()]


async def test_pull_by_tag_then_pinned_without_network(
    store: ImageStore, registry: Registry, work: Path
) -> None:
    digest = build_image(work, registry, "app", "v1", marker="first image")
    logs = LogBuffer()
    started = time.monotonic()
    image = await store.pull(f"{registry.address}/app:v1", logs)
    first_pull = time.monotonic() - started

    assert image.reference == f"{registry.address}/app:v1"
    assert image.digest == digest
    assert image.pinned == f"{registry.address}/app@{digest}"
    config = image.config
    assert config.entrypoint == ()
    assert config.cmd == ("/bin/sh", "-c", IMAGE_CMD)
    assert config.env == {"MARKER_NAME": "from-image", "PATH": "/bin"}
    assert config.working_dir == "/www"
    assert config.user == ""
    assert config.exposed_ports == (8080,)
    assert (config.architecture, config.os) == ("amd64", "linux")

    root = image.rootfs
    assert root == store.rootfs_dir / digest.removeprefix("sha256:")
    assert (root / "bin" / "busybox").is_file()
    assert os.readlink(root / "bin" / "sh") == "busybox"
    assert (root / "www" / "index.html").read_text() == "first image"
    for name in MOUNT_DIRECTORIES:
        assert (root / name).is_dir() and not (root / name).is_symlink(), name
    for name in MOUNT_FILES:
        assert (root / name).is_file(), name
    info = root.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o755)

    text = logs.text()
    assert f"-----> Pulling {registry.address}/app:v1" in text
    assert "Copying blob sha256:" in text and "Writing manifest" in text  # skopeo's own
    assert f"-----> Image {digest} (1.1 MB)" in text
    assert "Using the image already" not in text

    # The same image pinned: no skopeo at all (it could not run), the rootfs as it is.
    store.skopeo = NOT_A_TOOL
    again = LogBuffer()
    started = time.monotonic()
    pinned = await store.pull(image.pinned, again)
    pinned_pull = time.monotonic() - started
    assert (pinned.digest, pinned.rootfs, pinned.config) == (digest, root, config)
    assert pinned.pinned == image.pinned
    assert "-----> Using the image already on this server" in again.text()
    assert "Pulling" not in again.text()
    assert pinned_pull < 0.5
    print(f"first pull {first_pull * 1000:.0f} ms, pinned pull {pinned_pull * 1000:.1f} ms")


async def test_a_tag_already_here_is_one_manifest_request(
    store: ImageStore, registry: Registry, work: Path
) -> None:
    digest = build_image(work, registry, "again", "v1", marker="again")
    await store.pull(f"{registry.address}/again:v1", LogBuffer())
    logs = LogBuffer()
    image = await store.pull(f"{registry.address}/again:v1", logs)
    assert image.digest == digest
    assert "-----> Using the image already on this server" in logs.text()
    assert "Copying blob" not in logs.text()


async def test_images_share_their_layers(store: ImageStore, registry: Registry, work: Path) -> None:
    build_image(work, registry, "one", "v1", marker="same content")
    build_image(work, registry, "two", "v1", marker="same content")
    build_image(work, registry, "three", "v1", marker="other content")
    one = await store.pull(f"{registry.address}/one:v1", LogBuffer())
    assert len(blobs(store)) == 4  # 2 layers, config, manifest
    two = await store.pull(f"{registry.address}/two:v1", LogBuffer())
    assert one.digest != two.digest  # configs differ (creation times)
    assert layers_of(store, one.digest) == layers_of(store, two.digest)
    assert len(blobs(store)) == 6  # only its config and manifest are new
    three = await store.pull(f"{registry.address}/three:v1", LogBuffer())
    assert layers_of(store, three.digest)[0] == layers_of(store, one.digest)[0]  # busybox
    assert len(blobs(store)) == 9  # its /www layer, config and manifest


async def test_a_moved_tag_and_garbage_collection(
    store: ImageStore, registry: Registry, work: Path, tmp_path: Path
) -> None:
    old = build_image(work, registry, "moving", "live", marker="old")
    old_image = await store.pull(f"{registry.address}/moving:live", LogBuffer())
    assert old_image.digest == old
    new = build_image(work, registry, "moving", "live", marker="new")
    assert new != old

    again = await store.pull(f"{registry.address}/moving@{old}", LogBuffer())
    assert (again.rootfs / "www" / "index.html").read_text() == "old"
    # The old digest from the registry itself, into another store: the manifest is still there.
    elsewhere = store_for(tmp_path / "elsewhere", registry)
    fetched = await elsewhere.pull(old_image.pinned, LogBuffer())
    assert (fetched.digest, (fetched.rootfs / "www" / "index.html").read_text()) == (old, "old")

    new_image = await store.pull(f"{registry.address}/moving:live", LogBuffer())
    assert new_image.digest == new
    assert (new_image.rootfs / "www" / "index.html").read_text() == "new"
    assert old_image.rootfs.exists()

    old_layers, new_layers = layers_of(store, old), layers_of(store, new)
    assert old_layers[0] == new_layers[0] and old_layers[1] != new_layers[1]
    assert store.collect_garbage(keep={new}) == 1
    assert not old_image.rootfs.exists()
    assert unpacked_dirs(store) == [new_image.rootfs]
    left = blobs(store)
    assert old_layers[1] not in left and old.removeprefix("sha256:") not in left
    assert new_layers[0] in left and new_layers[1] in left
    assert len(left) == 4
    assert store.collect_garbage(keep={new}) == 0

    # The kept image: its layout is whole (umoci unpacks it again), and pulls need nothing.
    check = tmp_path / "check"
    image_name = f"{store.layout}:{new.replace(':', '-')}"
    unpack = ["umoci", "raw", "unpack", "--image", image_name, str(check)]
    await asyncio.to_thread(subprocess.run, unpack, check=True, capture_output=True)
    assert (check / "www" / "index.html").read_text() == "new"
    store.skopeo = NOT_A_TOOL
    logs = LogBuffer()
    kept = await store.pull(new_image.pinned, logs)
    assert kept.rootfs == new_image.rootfs
    assert "Using the image already on this server" in logs.text()


async def test_private_registry(store: ImageStore, private: Registry, work: Path) -> None:
    auth = ("ada", USERS["ada"])
    digest = build_image(work, private, "private/app", "v1", marker="private", auth=auth)
    reference = f"{private.address}/private/app:v1"
    logs = LogBuffer()

    with pytest.raises(ImageFailed) as no_creds:
        await store.pull(reference, logs)
    assert no_creds.value.reason.startswith(f"{IMAGE_AUTH_FAILED}: ")
    assert "needs credentials" in no_creds.value.reason

    with pytest.raises(ImageFailed) as wrong:
        await store.pull(reference, logs, RegistryAuth("ada", "not-the-password"))
    assert wrong.value.reason.startswith(f"{IMAGE_AUTH_FAILED}: ")
    assert "'ada'" in wrong.value.reason

    image = await store.pull(reference, logs, RegistryAuth(*auth))
    assert image.digest == digest
    assert (image.rootfs / "www" / "index.html").read_text() == "private"
    assert USERS["ada"] not in logs.text() and "not-the-password" not in logs.text()
    assert USERS["ada"] not in repr(RegistryAuth(*auth))
    assert list(store.tmp.iterdir()) == []  # no credentials file left behind


async def test_what_cannot_be_found(store: ImageStore, registry: Registry, work: Path) -> None:
    build_image(work, registry, "present", "v1", marker="present")
    for reference in (
        f"{registry.address}/absent:v1",
        f"{registry.address}/present:absent",
        f"{registry.address}/present@sha256:{'0' * 64}",
    ):
        with pytest.raises(ImageFailed) as failed:
            await store.pull(reference, LogBuffer())
        assert failed.value.reason.startswith(f"{IMAGE_NOT_FOUND}: "), failed.value.reason


async def test_invalid_references_run_nothing(store: ImageStore) -> None:
    store.skopeo = NOT_A_TOOL
    for reference in ("UPPER/Case!!", "", "app:bad tag", "app@sha256:123", "docker://app"):
        with pytest.raises(ImageFailed) as failed:
            await store.pull(reference, LogBuffer())
        assert failed.value.reason.startswith(f"{IMAGE_REFERENCE_INVALID}: "), reference


async def test_another_architecture(store: ImageStore, registry: Registry, work: Path) -> None:
    build_image(work, registry, "armonly", "v1", marker="arm", architecture="arm64")
    with pytest.raises(ImageFailed) as failed:
        await store.pull(f"{registry.address}/armonly:v1", LogBuffer())
    reason = failed.value.reason
    assert reason.startswith(f"{IMAGE_ARCHITECTURE}: ") and "linux/arm64" in reason, reason
    assert "linux/amd64" in reason
    assert unpacked_dirs(store) == []


async def test_registry_down(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    store = ImageStore(tmp_path / "store", insecure_registries=frozenset({address}))
    with pytest.raises(ImageFailed) as failed:
        await store.pull(f"{address}/app:v1", LogBuffer())
    assert failed.value.reason.startswith(f"{IMAGE_PULL_FAILED}: cannot reach the registry")
    assert "connection refused" in failed.value.reason


async def test_a_pull_past_its_time_is_killed(tmp_path: Path) -> None:
    slow = tmp_path / "slow-skopeo"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    store = ImageStore(tmp_path / "store", skopeo=str(slow), timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(ImageFailed) as failed:
        await store.pull("127.0.0.1:1/app:v1", LogBuffer())
    assert time.monotonic() - started < 5
    assert failed.value.reason.startswith(f"{IMAGE_PULL_FAILED}: ")
    assert "did not finish within 0.5 seconds" in failed.value.reason


async def test_concurrent_pulls_of_one_image(
    store: ImageStore, registry: Registry, work: Path
) -> None:
    digest = build_image(work, registry, "popular", "v1", marker="popular")
    logs = [LogBuffer() for _ in range(3)]
    images = await asyncio.gather(
        *(store.pull(f"{registry.address}/popular:v1", buffer) for buffer in logs)
    )
    assert {image.digest for image in images} == {digest}
    assert unpacked_dirs(store) == [images[0].rootfs]
    texts = [buffer.text() for buffer in logs]
    assert sum("Copying blob" in text for text in texts) == 1
    assert sum("Using the image already on this server" in text for text in texts) == 2
    assert [p.name for p in store.tmp.iterdir()] == []


def test_references_are_normalized() -> None:
    digest = "sha256:" + "a" * 64
    cases = {
        "busybox": "docker.io/library/busybox:latest",
        "docker.io/library/busybox:latest": "docker.io/library/busybox:latest",
        "index.docker.io/team/app:v2": "docker.io/team/app:v2",
        "127.0.0.1:5000/app:v1": "127.0.0.1:5000/app:v1",
        "localhost/a/b": "localhost/a/b:latest",
        f"ghcr.io/org/app:v1@{digest}": f"ghcr.io/org/app@{digest}",
        f"app@{digest}": f"docker.io/library/app@{digest}",
    }
    for given, expected in cases.items():
        assert str(parse_reference(given)) == expected, given
    assert parse_reference("app:v1").pinned(digest) == f"docker.io/library/app@{digest}"


def test_a_multi_platform_index_gives_this_servers_image() -> None:
    ref = ImageReference("example.com", "app", "v1", "")
    amd64, arm64, attestation = ("sha256:" + c * 64 for c in "abc")
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"digest": attestation, "platform": {"architecture": "unknown", "os": "unknown"}},
            {
                "digest": arm64,
                "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
            },
            {"digest": amd64, "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }
    assert choose_manifest(index, "sha256:" + "f" * 64, ref, "amd64", "linux") == amd64
    assert choose_manifest(index, "sha256:" + "f" * 64, ref, "arm64", "linux") == arm64
    with pytest.raises(ImageFailed) as failed:
        choose_manifest(index, "sha256:" + "f" * 64, ref, "riscv64", "linux")
    assert failed.value.reason.startswith(f"{IMAGE_ARCHITECTURE}: ")
    assert "linux/amd64, linux/arm64/v8" in failed.value.reason
