"""The agent's local store of container images: pulled with skopeo into one OCI image layout
(so layers shared between images are stored and downloaded once), each image unpacked once,
by manifest digest, into a root filesystem with umoci.

Layout of the store's directory:

    layout/               the one OCI image layout; each image is named "sha256-<hex>" after
                          the registry's manifest digest
    rootfs/<hex>/         an image's unpacked root filesystem (never changed once there)
    rootfs/<hex>.json     what the image is: its manifest in the layout, config and size
    rootfs/<hex>-as-<uid> the root of an image naming a non-root user, its files of that user
                          owned by a project's uid (unpacked again, for that project only)
    tmp/                  skopeo's temporary files, credentials files, unpacks in progress

No registry protocol is spoken here: skopeo does every network request. A pull first asks the
registry for the reference's manifest (`skopeo inspect --raw`), chooses this server's platform
from a multi-platform index, then copies the image by that digest, so a tag that moves while
a pull runs cannot mix two images, and a tag whose image is already here costs one request.
The digest reported is the registry's, so the pinned reference it gives pulls the same image
again anywhere (skopeo may rewrite a Docker manifest as an OCI one in the layout, whose digest
then differs: the layout's own digest is only kept in `rootfs/<hex>.json`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from services.agent.domain import LogBuffer, LogStream
from services.agent.image_refs import (
    DIGEST,
    IMAGE_ARCHITECTURE,
    IMAGE_PULL_FAILED,
    STREAM_LIMIT,
    ImageConfig,
    ImageFailed,
    ImageReference,
    PulledImage,
    RegistryAuth,
    choose_manifest,
    classify,
    host_platform,
    last_message,
    parse_reference,
    prepare_mount_points,
    readable,
    write_atomically,
)
from services.agent.image_users import ImageUser

log = logging.getLogger("hangar.agent.images")
AS_UID = "-as-"  # rootfs/<hex>-as-<uid>: an image's root as a project's uid (as_user)
LAST_ID = 2**32 - 2  # the last id a file can have (2**32 - 1 is "no id")


def _owned_by(image_id: int, host_id: int) -> list[str]:
    """umoci's id maps (container:host:size) giving `image_id`'s files to `host_id` and
    keeping every other id as it is."""
    maps = [f"0:0:{image_id}"] if image_id > 0 else []
    maps.append(f"{image_id}:{host_id}:1")
    if image_id < LAST_ID:
        maps.append(f"{image_id + 1}:{image_id + 1}:{LAST_ID - image_id}")
    return maps


class ImageStore:
    """One server's images: see the module's docstring for the directory's layout."""

    def __init__(
        self,
        directory: Path,
        *,
        skopeo: str = "skopeo",
        umoci: str = "umoci",
        insecure_registries: frozenset[str] = frozenset(),
        timeout_seconds: float = 900.0,
    ) -> None:
        self.directory = directory
        self.layout = directory / "layout"
        self.rootfs_dir = directory / "rootfs"
        self.tmp = directory / "tmp"
        self.skopeo = skopeo
        self.umoci = umoci
        self.insecure_registries = insecure_registries
        self.timeout_seconds = timeout_seconds
        self.architecture, self.os = host_platform()
        # skopeo rewrites the layout's index.json as a whole: one copy into it at a time.
        self._layout_lock = asyncio.Lock()
        self._digest_locks: dict[str, asyncio.Lock] = {}
        # Pulls against collect_garbage, which may run in another thread: a collection only
        # touches the layout while no pull runs, and pulls wait for a collection to end.
        self._state = threading.Lock()
        self._pulling = 0
        self._collecting = False
        self._busy: dict[str, int] = {}  # digest hex -> pulls working on it

    # -- paths ---------------------------------------------------------------------------

    def rootfs_of(self, digest: str) -> Path:
        return self.rootfs_dir / digest.removeprefix("sha256:")

    def rootfs_as(self, digest: str, host_uid: int) -> Path:
        """Where the copy of an image's root for a project's uid is (see `as_user`)."""
        return self.rootfs_dir / f"{digest.removeprefix('sha256:')}{AS_UID}{host_uid}"

    def _meta_of(self, digest: str) -> Path:
        return self.rootfs_dir / f"{digest.removeprefix('sha256:')}.json"

    @staticmethod
    def _layout_name(digest: str) -> str:
        return digest.replace(":", "-")

    def _blob(self, digest: str) -> Path:
        if not DIGEST.match(digest):
            raise ImageFailed(IMAGE_PULL_FAILED, f"the image names a blob {digest!r}: not sha256")
        return self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def _prepare(self) -> None:
        for path in (self.directory, self.rootfs_dir, self.tmp):
            path.mkdir(mode=0o755 if path != self.tmp else 0o700, parents=True, exist_ok=True)
        if not (self.layout / "index.json").exists():
            self.layout.mkdir(mode=0o755, exist_ok=True)
            (self.layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            write_atomically(
                self.layout / "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()
            )
            write_atomically(
                self.layout / "index.json",
                json.dumps({"schemaVersion": 2, "manifests": []}).encode(),
            )

    # -- pulling -------------------------------------------------------------------------

    async def pull(
        self, reference: str, logs: LogBuffer, auth: RegistryAuth | None = None
    ) -> PulledImage:
        """The image `reference` names, pulled (unless already here) and unpacked; its
        progress goes to `logs`. Raises ImageFailed."""
        ref = parse_reference(reference)
        async with self._working():
            await asyncio.to_thread(self._prepare)
            if ref.digest:
                here = await asyncio.to_thread(self._unpacked, reference, ref, ref.digest)
                if here is not None:
                    self._log_here(logs, here)
                    return here
            logs.append(LogStream.BUILD, f"-----> Pulling {ref}")
            with self._credentials(ref, auth) as authfile:
                digest = await self._resolve(ref, logs, auth, authfile)
                async with self._holding(digest):
                    here = await asyncio.to_thread(self._unpacked, reference, ref, digest)
                    if here is not None:
                        self._log_here(logs, here)
                        return here
                    return await self._fetch(reference, ref, digest, logs, auth, authfile)

    @contextlib.asynccontextmanager
    async def _working(self) -> AsyncIterator[None]:
        """A pull or an unpack under way: a collection leaves the layout alone meanwhile
        (and one under way is waited for first)."""
        while True:
            with self._state:
                if not self._collecting:
                    self._pulling += 1
                    break
            await asyncio.sleep(0.05)
        try:
            yield
        finally:
            with self._state:
                self._pulling -= 1

    @contextlib.asynccontextmanager
    async def _holding(self, digest: str) -> AsyncIterator[None]:
        """The digest's lock, and the digest marked busy (never collected) meanwhile."""
        async with self._digest_lock(digest):
            self._mark_busy(digest, +1)
            try:
                yield
            finally:
                self._mark_busy(digest, -1)

    def _mark_busy(self, digest: str, delta: int) -> None:
        key = digest.removeprefix("sha256:")
        with self._state:
            count = self._busy.get(key, 0) + delta
            if count > 0:
                self._busy[key] = count
            else:
                self._busy.pop(key, None)

    def _digest_lock(self, digest: str) -> asyncio.Lock:
        lock = self._digest_locks.get(digest)
        if lock is None:
            lock = self._digest_locks[digest] = asyncio.Lock()
        return lock

    @staticmethod
    def _log_here(logs: LogBuffer, image: PulledImage) -> None:
        logs.append(LogStream.BUILD, f"-----> Image {image.digest}")
        logs.append(LogStream.BUILD, "-----> Using the image already on this server")

    def _unpacked(self, reference: str, ref: ImageReference, digest: str) -> PulledImage | None:
        """The image of manifest `digest` if it is unpacked here, else None."""
        root = self.rootfs_of(digest)
        try:
            meta = json.loads(self._meta_of(digest).read_bytes())
        except (OSError, ValueError):
            return None
        if not root.is_dir() or not isinstance(meta, dict):
            return None
        return PulledImage(
            reference=reference,
            digest=digest,
            pinned=ref.pinned(digest),
            config=ImageConfig.parse(meta.get("config")),
            rootfs=root,
        )

    @contextlib.contextmanager
    def _credentials(self, ref: ImageReference, auth: RegistryAuth | None) -> Iterator[Path | None]:
        """A 0600 auth file for skopeo with `auth` for the reference's registry, removed after."""
        if auth is None:
            yield None
            return
        self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.tmp / f"auth-{uuid.uuid4().hex}.json"
        token = base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()
        content = json.dumps({"auths": {ref.registry: {"auth": token}}}).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(content)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _skopeo_base(self) -> list[str]:
        args = [self.skopeo, "--tmpdir", str(self.tmp)]
        if not Path("/etc/containers/policy.json").exists():
            args.append("--insecure-policy")  # no trust policy on this host: trust by digest
        return args

    def _tls(self, ref: ImageReference) -> bool:
        return ref.registry not in self.insecure_registries

    async def _resolve(
        self, ref: ImageReference, logs: LogBuffer, auth: RegistryAuth | None, authfile: Path | None
    ) -> str:
        """The digest of this server's platform's manifest for `ref` (one manifest request)."""
        args = [*self._skopeo_base(), "inspect", "--raw", f"--tls-verify={self._tls(ref)}"]
        args += [f"--authfile={authfile}"] if authfile else ["--no-creds"]
        args.append(f"docker://{ref}")
        code, raw, errors = await self._run(args, logs, capture=True)
        if code != 0:
            raise classify(errors, ref, auth)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if ref.digest and digest != ref.digest:
            raise ImageFailed(
                IMAGE_PULL_FAILED,
                f"{ref.registry} answered {ref} with a manifest of digest {digest}",
            )
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise ImageFailed(
                IMAGE_PULL_FAILED, f"{ref.registry} answered {ref} with something not JSON"
            ) from None
        return choose_manifest(manifest, digest, ref, self.architecture, self.os)

    async def _fetch(
        self,
        reference: str,
        ref: ImageReference,
        digest: str,
        logs: LogBuffer,
        auth: RegistryAuth | None,
        authfile: Path | None,
    ) -> PulledImage:
        digestfile = self.tmp / f"digest-{uuid.uuid4().hex}"
        args = [
            *self._skopeo_base(),
            "--override-arch",
            self.architecture,
            "--override-os",
            self.os,
            "copy",
            f"--src-tls-verify={self._tls(ref)}",
            f"--digestfile={digestfile}",
        ]
        args += [f"--src-authfile={authfile}"] if authfile else ["--src-no-creds"]
        args += [f"docker://{ref.pinned(digest)}", f"oci:{self.layout}:{self._layout_name(digest)}"]
        try:
            async with self._layout_lock:
                code, _, errors = await self._run(args, logs)
            if code != 0:
                raise classify(errors, ref, auth)
            local = digestfile.read_text().strip()
        finally:
            digestfile.unlink(missing_ok=True)
        manifest, config_document, size = await asyncio.to_thread(self._read_image, local)
        config = ImageConfig.parse(config_document)
        if (config.architecture and config.architecture != self.architecture) or (
            config.os and config.os != self.os
        ):
            raise ImageFailed(
                IMAGE_ARCHITECTURE,
                f"{ref} is built for {config.os}/{config.architecture} but this server runs "
                f"{self.os}/{self.architecture}: build or push the image for "
                f"{self.os}/{self.architecture} (a multi-platform image including it works)",
            )
        logs.append(LogStream.BUILD, f"-----> Image {digest} ({size / 1_000_000:.1f} MB)")
        await self._unpack(digest, local, manifest, config_document, size)
        return PulledImage(
            reference=reference,
            digest=digest,
            pinned=ref.pinned(digest),
            config=config,
            rootfs=self.rootfs_of(digest),
        )

    def _read_image(self, manifest_digest: str) -> tuple[dict[str, Any], Any, int]:
        """The layout's manifest, the image config and the image's size (compressed)."""
        try:
            manifest = json.loads(self._blob(manifest_digest).read_bytes())
            config_digest = manifest["config"]["digest"]
            config = json.loads(self._blob(config_digest).read_bytes())
            layers = manifest.get("layers") or []
            size = sum(int(layer.get("size", 0)) for layer in layers)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ImageFailed(
                IMAGE_PULL_FAILED, f"the pulled image could not be read ({exc}); pull it again"
            ) from exc
        if not isinstance(manifest, dict):
            raise ImageFailed(IMAGE_PULL_FAILED, "the pulled manifest is not a JSON object")
        return manifest, config, size

    async def _unpack(
        self, digest: str, local: str, manifest: dict[str, Any], config: Any, size: int
    ) -> None:
        """Unpacks the image into rootfs/<hex> (atomically: into tmp/, then renamed).

        umoci reads a private layout of hard links to the image's blobs, so a copy rewriting
        the shared layout's index.json meanwhile cannot disturb it."""
        async with self._unpacking(local, manifest) as rootfs:
            await asyncio.to_thread(self._install, rootfs, digest, local, config, size)

    @contextlib.asynccontextmanager
    async def _unpacking(
        self, local: str, manifest: dict[str, Any], id_maps: Sequence[str] = ()
    ) -> AsyncIterator[Path]:
        """The image of layout manifest `local` unpacked into a directory under tmp/ (gone
        after), with umoci's `id_maps` (--uid-map and --gid-map arguments) if any."""
        work = self.tmp / f"unpack-{uuid.uuid4().hex}"
        try:
            private = work / "layout"
            await asyncio.to_thread(self._link_image, private, local, manifest)
            rootfs = work / "rootfs"
            code, _, errors = await self._run(
                [
                    self.umoci,
                    "raw",
                    "unpack",
                    *id_maps,
                    "--image",
                    f"{private}:image",
                    str(rootfs),
                ],
                None,
            )
            if code != 0:
                raise ImageFailed(
                    IMAGE_PULL_FAILED,
                    f"unpacking the image failed: {last_message(errors) or 'umoci failed'}",
                )
            yield rootfs
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def as_user(self, image: PulledImage, user: ImageUser, host_uid: int) -> Path:
        """The root filesystem of `image` (pulled) whose files owned by `user` (its uid, and
        its gid) are owned by `host_uid` instead: the project's own copy, unpacked once from
        the layers here, then reused by every container of that project and image."""
        target = self.rootfs_as(image.digest, host_uid)
        if target.is_dir():
            return target
        async with self._working(), self._holding(image.digest):
            if not target.is_dir():
                await self._unpack_as(image.digest, user, host_uid, target)
        return target

    async def _unpack_as(self, digest: str, user: ImageUser, host_uid: int, target: Path) -> None:
        try:
            local = str(json.loads(self._meta_of(digest).read_bytes())["manifest"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ImageFailed(
                IMAGE_PULL_FAILED, f"the pulled image could not be read ({exc}); pull it again"
            ) from exc
        manifest, _, _ = await asyncio.to_thread(self._read_image, local)
        id_maps = [
            *(f"--uid-map={m}" for m in _owned_by(user.uid, host_uid)),
            *(f"--gid-map={m}" for m in _owned_by(user.gid, host_uid)),
        ]
        async with self._unpacking(local, manifest, id_maps) as rootfs:

            def install() -> None:
                prepare_mount_points(rootfs)
                os.chmod(rootfs, 0o755)
                if os.geteuid() == 0:
                    os.chown(rootfs, 0, 0)
                rootfs.rename(target)

            await asyncio.to_thread(install)

    def _link_image(self, private: Path, local: str, manifest: dict[str, Any]) -> None:
        blobs = [local, manifest["config"]["digest"]]
        blobs += [layer["digest"] for layer in manifest.get("layers") or []]
        (private / "blobs" / "sha256").mkdir(parents=True)
        for blob in blobs:
            source = self._blob(str(blob))
            target = private / "blobs" / "sha256" / source.name
            if not target.exists():
                os.link(source, target)
        (private / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        descriptor = {
            "mediaType": manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json"),
            "digest": local,
            "size": self._blob(local).stat().st_size,
            "annotations": {"org.opencontainers.image.ref.name": "image"},
        }
        (private / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": [descriptor]})
        )

    def _install(self, rootfs: Path, digest: str, local: str, config: Any, size: int) -> None:
        prepare_mount_points(rootfs)
        os.chmod(rootfs, 0o755)
        if os.geteuid() == 0:
            os.chown(rootfs, 0, 0)
        meta = {"manifest": local, "size": size, "config": config}
        write_atomically(self._meta_of(digest), json.dumps(meta).encode())
        target = self.rootfs_of(digest)
        if target.exists():  # left by an interrupted pull without its .json: replace it
            stale = self.tmp / f"stale-{uuid.uuid4().hex}"
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        rootfs.rename(target)

    async def _run(
        self, args: Sequence[str], logs: LogBuffer | None, *, capture: bool = False
    ) -> tuple[int, bytes, list[str]]:
        """Runs a tool within timeout_seconds: (exit code, stdout when `capture`, stderr
        lines). Output lines go to `logs` (stdout's only when not captured). Killed when
        too slow or cancelled."""
        env = {
            name: value
            for name, value in os.environ.items()
            if name not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR")
        }
        env["HOME"] = str(self.tmp)  # never a user's registry credentials
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            limit=STREAM_LIMIT,
        )
        assert proc.stdout is not None and proc.stderr is not None
        out = bytearray()
        errors: list[str] = []

        async def read_stdout(stream: asyncio.StreamReader) -> None:
            if capture:
                out.extend(await stream.read())
                return
            async for line in stream:
                text = line.decode(errors="replace").rstrip()
                if text and logs is not None:
                    logs.append(LogStream.BUILD, text)

        async def read_stderr(stream: asyncio.StreamReader) -> None:
            async for line in stream:
                text = line.decode(errors="replace").rstrip()
                if text:
                    errors.append(text)
                    if logs is not None:
                        logs.append(LogStream.BUILD, readable(text))

        try:
            async with asyncio.timeout(self.timeout_seconds):
                await asyncio.gather(read_stdout(proc.stdout), read_stderr(proc.stderr))
                code = await proc.wait()
        except TimeoutError:
            raise ImageFailed(
                IMAGE_PULL_FAILED,
                f"{Path(args[0]).name} did not finish within {self.timeout_seconds:g} seconds; "
                "check the registry's speed and the image's size, then deploy again",
            ) from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        return code, bytes(out), errors

    # -- garbage -------------------------------------------------------------------------

    def collect_garbage(self, keep: set[str]) -> int:
        """Removes every image whose digest ("sha256:...") is not in `keep`: its root
        filesystem, its name in the layout, then (umoci gc) the blobs no kept image uses
        (layers shared with a kept image stay). The number of images removed.

        Images a pull is working on are never removed; while any pull runs, the layout is
        left alone (the next collection does it). Safe to call from a thread."""
        kept = {digest.removeprefix("sha256:") for digest in keep}
        with self._state:
            busy = set(self._busy)
            quiet = self._pulling == 0
            if quiet:
                self._collecting = True
        try:
            removed = self._remove_unpacked(kept | busy, quiet)
            if quiet and (self.layout / "index.json").exists():
                removed |= self._remove_names(kept)
                self._clear_tmp()
                done = subprocess.run(
                    [self.umoci, "gc", "--layout", str(self.layout)],
                    capture_output=True,
                    text=True,
                    timeout=self.timeout_seconds,
                    check=False,
                )
                if done.returncode != 0:
                    log.warning("umoci gc failed: %s", done.stderr.strip()[-2000:])
        finally:
            if quiet:
                with self._state:
                    self._collecting = False
        return len(removed)

    def _remove_unpacked(self, kept: set[str], quiet: bool) -> set[str]:
        removed: set[str] = set()
        if not self.rootfs_dir.is_dir():
            return removed
        for entry in list(self.rootfs_dir.iterdir()):
            if entry.name.startswith("."):  # a pull's file being written (or left by one)
                if quiet:
                    entry.unlink(missing_ok=True)
                continue
            hexdigest = entry.name.removesuffix(".json").partition(AS_UID)[0]
            if hexdigest in kept:
                continue
            if entry.name.endswith(".json"):
                entry.unlink(missing_ok=True)
            else:
                doomed = self.tmp / f"removed-{uuid.uuid4().hex}"
                self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
                entry.rename(doomed)  # gone at once for readers; deleted after
                shutil.rmtree(doomed, ignore_errors=True)
            removed.add(hexdigest)
        return removed

    def _remove_names(self, kept: set[str]) -> set[str]:
        """Drops the layout's names of images not kept; the digests (hex) dropped."""
        index_path = self.layout / "index.json"
        index = json.loads(index_path.read_bytes())
        manifests = index.get("manifests") or []
        keep_entries, removed = [], set()
        for entry in manifests:
            name = (entry.get("annotations") or {}).get("org.opencontainers.image.ref.name", "")
            hexdigest = str(name).removeprefix("sha256-")
            if hexdigest in kept:
                keep_entries.append(entry)
            else:
                removed.add(hexdigest)
        if removed:
            index["manifests"] = keep_entries
            write_atomically(index_path, json.dumps(index).encode())
        return removed

    def _clear_tmp(self) -> None:
        """What interrupted pulls left in tmp/ (no pull runs now)."""
        if self.tmp.is_dir():
            for entry in self.tmp.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
