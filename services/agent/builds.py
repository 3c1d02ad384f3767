"""Builds: an uploaded source made into a slug, inside the container sandbox.

A container whose spec names a source is built before it first starts:

1. its source archive is fetched from runtime (cached on this server by digest) and checked
   and unpacked into a fresh build directory owned by the project's uid;
2. buildpacks.py reads it (a Procfile, requirements.txt / pyproject.toml, package.json) and
   writes the build script;
3. the script runs in a runc container of its own: the same read-only stack, no
   capabilities, the project's uid, the deployment's memory and CPU limits, its own network
   namespace (egress through slirp4netns, for package indexes), the build directory
   read-write at /app and the project's dependency cache read-write at /cache, and a time
   limit. Its output is the container's log, stream BUILD;
4. the build directory is packed reproducibly (the slug), stored with runtime, and unpacked
   root-owned into `slugs/<sha256>/`, which every container of that slug on this server
   binds read-only at /app.

A container started from a slug (a rollback, a restart with new config) skips 1-3: the slug
is fetched (or found in the cache) and unpacked. Before a `web` process starts, the
Procfile's `release` command (if any) runs once in the same kind of sandbox over the slug;
if it fails, the container fails and the release does not roll out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.agent import buildpacks, oci
from services.agent.artifacts import ArtifactError, ArtifactSource
from services.agent.domain import ContainerSpec, LogBuffer, LogStream
from services.agent.netns import NetworkError, NetworkNamespace
from services.agent.uids import UidTable
from shared.archives import extract_archive, pack_directory
from shared.errors import DomainError

log = logging.getLogger("hangar.agent.builds")

BUILD_FAILED = "BUILD_FAILED"
RELEASE_FAILED = "RELEASE_FAILED"
WEB = "web"
RELEASE = "release"
LAST_LINES = 20  # of a failed build's output, in the container's reason


class BuildFailed(Exception):
    """The build (or the release command) failed; `reason` is what the deployment shows."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class BuiltApp:
    """A slug unpacked on this server, and what its Procfile declares."""

    slug_sha256: str
    directory: Path
    process_types: Mapping[str, str]
    kinds: tuple[str, ...]

    def command_for(self, spec: ContainerSpec) -> str:
        """What the container runs: its own command, else its process type's."""
        if spec.command:
            return spec.command
        process_type = spec.process_type or WEB
        command = self.process_types.get(process_type)
        if not command:
            declared = ", ".join(sorted(self.process_types)) or "none"
            raise BuildFailed(
                f"{BUILD_FAILED}: the Procfile declares no {process_type!r} process type "
                f"(declared: {declared})"
            )
        return command

    def env(self) -> dict[str, str]:
        return buildpacks.run_env(oci.APP_DIR, self.kinds or None)


@dataclass
class Sandboxing:
    """How the container driver makes its sandboxes; builds use the same."""

    runc: str
    runc_root: Path
    uids: UidTable
    stack: oci.Stack
    seccomp: Mapping[str, Any] | None
    cgroup_parent: str
    netns_prefix: str
    pids_limit: int
    tmpfs_mb: int


class Builder:
    """Builds sources and unpacks slugs for the container driver (see the module)."""

    def __init__(
        self,
        state_dir: Path,
        sandboxing: Sandboxing,
        artifacts: ArtifactSource | None,
        *,
        timeout_seconds: float = 900.0,
    ) -> None:
        self.sandboxing = sandboxing
        self.artifacts = artifacts
        self.timeout_seconds = timeout_seconds
        self.builds = state_dir / "builds"
        self.caches = state_dir / "build-cache"
        self.slugs = state_dir / "slugs"
        for path in (self.builds, self.caches, self.slugs):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.slugs, 0o711)  # apps' uids reach their slug, never list the others
        self._unpacking: dict[str, asyncio.Lock] = {}

    def _source(self) -> ArtifactSource:
        if self.artifacts is None:
            raise BuildFailed(
                f"{BUILD_FAILED}: this agent cannot fetch sources (it has no service secret "
                "to call runtime with)"
            )
        return self.artifacts

    # --------------------------------------------------------------------- building

    async def build(self, spec: ContainerSpec, logs: LogBuffer) -> BuiltApp:
        """Build the spec's source into a slug, store it with runtime, unpack it here."""
        say = _sayer(logs)
        source = spec.source_sha256
        work = self.builds / spec.container_id
        shutil.rmtree(work, ignore_errors=True)
        app_dir = work / "app"
        app_dir.mkdir(parents=True, mode=0o700)
        uid = self.sandboxing.uids.uid_of(spec.project_id)
        try:
            say(f"-----> Fetching source {source[:12]}")
            archive = await self._fetch(source)
            try:
                await asyncio.to_thread(extract_archive, archive, app_dir)
            except DomainError as exc:
                raise BuildFailed(f"{BUILD_FAILED}: the source archive: {exc.message}") from exc
            try:
                plan = buildpacks.plan_build(app_dir, oci.APP_DIR, oci.CACHE_DIR)
            except buildpacks.BuildError as exc:
                raise BuildFailed(f"{BUILD_FAILED}: {exc}") from exc
            cache = self.caches / spec.project_id
            cache.mkdir(mode=0o700, exist_ok=True)
            await asyncio.to_thread(_chown_tree, app_dir, uid)
            await asyncio.to_thread(_chown_tree, cache, uid)
            os.chown(work, uid, uid)
            code = await self._sandboxed(
                f"{spec.container_id}-build",
                spec,
                plan.script,
                binds=(
                    oci.Bind(str(app_dir), oci.APP_DIR, readonly=False),
                    oci.Bind(str(cache), oci.CACHE_DIR, readonly=False),
                ),
                env={},
                logs=logs,
                stream=LogStream.BUILD,
                what="the build",
            )
            if code != 0:
                raise BuildFailed(
                    f"{BUILD_FAILED}: the build exited with code {code}"
                    + _last_lines(logs, LogStream.BUILD)
                )
            say("-----> Compressing the slug")
            slug_file = work / "slug.tar.gz"
            # Level 1: a slug is compressed on every build and read on every new server;
            # level 9 took 6x the time for 13% fewer bytes (a virtualenv, measured).
            await asyncio.to_thread(pack_directory, app_dir, slug_file, 1)
            digest = await self._source().put(spec.project_id, spec.deployment_id, slug_file)
            size_mb = slug_file.stat().st_size / 1e6
            say(f"-----> Slug {digest[:12]} ({size_mb:.1f} MB) stored")
            return await self.unpack(digest)
        except ArtifactError as exc:
            raise BuildFailed(f"{BUILD_FAILED}: {exc}") from exc
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _fetch(self, sha256: str) -> Path:
        try:
            return await self._source().fetch(sha256)
        except (grpc.aio.AioRpcError, OSError) as exc:  # runtime unreachable, unknown, disk
            details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            raise ArtifactError(f"could not fetch artifact {sha256[:12]}: {details}") from exc

    # -------------------------------------------------------------------- slugs

    async def unpack(self, slug_sha256: str) -> BuiltApp:
        """The slug unpacked (root-owned, read-only to apps) on this server."""
        directory = self.slugs / slug_sha256
        lock = self._unpacking.setdefault(slug_sha256, asyncio.Lock())
        async with lock:
            if not directory.is_dir():
                archive = await self._fetch(slug_sha256)
                partial = self.slugs / f".{slug_sha256}.part"
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(mode=0o755)
                try:
                    await asyncio.to_thread(
                        extract_archive, archive, partial, allow_absolute_links=True
                    )
                    os.replace(partial, directory)
                except BaseException:
                    shutil.rmtree(partial, ignore_errors=True)
                    raise
        procfile = directory / buildpacks.PROCFILE
        try:
            types = buildpacks.parse_procfile(procfile.read_text()) if procfile.is_file() else {}
            kinds = buildpacks.detect(directory)
        except buildpacks.BuildError as exc:
            raise BuildFailed(f"{BUILD_FAILED}: {exc}") from exc
        return BuiltApp(slug_sha256, directory, types, kinds)

    async def release(self, spec: ContainerSpec, app: BuiltApp, logs: LogBuffer) -> None:
        """The Procfile's release command, once, before a web process of the slug starts."""
        command = app.process_types.get(RELEASE)
        if not command or (spec.process_type or WEB) != WEB:
            return
        _sayer(logs)(f"-----> Running the release command: {command}")
        code = await self._sandboxed(
            f"{spec.container_id}-release",
            spec,
            command,
            binds=(oci.Bind(str(app.directory), oci.APP_DIR),),
            env={**spec.env, **app.env()},
            logs=logs,
            stream=LogStream.BUILD,
            what="the release command",
        )
        if code != 0:
            raise BuildFailed(
                f"{RELEASE_FAILED}: the release command exited with code {code}"
                + _last_lines(logs, LogStream.BUILD)
            )

    # ------------------------------------------------------------------ sandboxes

    async def _sandboxed(
        self,
        name: str,
        spec: ContainerSpec,
        command: str,
        *,
        binds: tuple[oci.Bind, ...],
        env: Mapping[str, str],
        logs: LogBuffer,
        stream: LogStream,
        what: str,
    ) -> int:
        """Run `command` in a one-off sandbox; its exit code (its output into `logs`)."""
        box = self.sandboxing
        bundle_dir = self.builds / f"{name}.bundle"
        try:
            network = await asyncio.to_thread(NetworkNamespace.create, box.netns_prefix + name)
        except (NetworkError, subprocess.SubprocessError) as exc:
            raise BuildFailed(f"{BUILD_FAILED}: no network for {what}: {exc}") from exc
        try:
            bundle = oci.Bundle(
                container_id=name,
                command=command,
                uid=box.uids.uid_of(spec.project_id),
                env={**env, "HANGAR_PROJECT_ID": spec.project_id, "CI": "true"},
                limits=oci.Limits(
                    resources=spec.resources,
                    pids=box.pids_limit,
                    tmpfs_mb=box.tmpfs_mb,
                ),
                netns_path=str(network.path),
                cgroups_path=f"{box.cgroup_parent}/{name}",
                hostname="build",
                stack=box.stack,
                binds=binds,
                cwd=oci.APP_DIR,
            )
            await asyncio.to_thread(oci.write_bundle, bundle_dir, bundle, box.seccomp)
            return await self._run(name, bundle_dir, logs, stream, what)
        finally:
            await self._runc("delete", "--force", name)
            await asyncio.to_thread(network.destroy)
            await asyncio.to_thread(shutil.rmtree, bundle_dir, True)

    async def _run(
        self, name: str, bundle_dir: Path, logs: LogBuffer, stream: LogStream, what: str
    ) -> int:
        box = self.sandboxing
        process = await asyncio.create_subprocess_exec(
            box.runc,
            "--root",
            str(box.runc_root),
            "run",
            "--bundle",
            str(bundle_dir),
            name,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert process.stdout is not None

        async def copy() -> None:
            assert process.stdout is not None
            while line := await process.stdout.readline():
                logs.append(stream, line.decode("utf-8", "replace").rstrip("\r\n"))

        reader = asyncio.create_task(copy())
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), self.timeout_seconds)
        except TimeoutError:
            await self._runc("kill", name, "KILL")
            await process.wait()
            await reader
            raise BuildFailed(
                f"{BUILD_FAILED}: {what} took longer than {self.timeout_seconds:g} s"
                + _last_lines(logs, stream)
            ) from None
        except asyncio.CancelledError:  # the container was stopped meanwhile
            await self._runc("kill", name, "KILL")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.wait(), 10)
            reader.cancel()
            raise
        await reader
        return process.returncode if process.returncode is not None else -1

    async def _runc(self, *args: str) -> None:
        box = self.sandboxing
        process = await asyncio.create_subprocess_exec(
            box.runc,
            "--root",
            str(box.runc_root),
            *args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await process.wait()

    def collect_slugs(self, keep: set[str]) -> int:
        """Remove the unpacked slugs no container here runs (`keep`: the digests in use);
        a later start of one unpacks it again. The number removed. Safe from a thread."""
        removed = 0
        for path in self.slugs.iterdir():
            name = path.name
            lock = self._unpacking.get(name)
            if name.startswith(".") or name in keep or (lock is not None and lock.locked()):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        return removed

    def forget(self, container_id: str) -> None:
        """What a build of this container left (an agent that died mid-build)."""
        for path in (
            self.builds / container_id,
            *(self.builds / f"{container_id}-{n}.bundle" for n in ("build", "release")),
        ):
            shutil.rmtree(path, ignore_errors=True)


def _sayer(logs: LogBuffer) -> Any:
    def say(text: str) -> None:
        logs.append(LogStream.BUILD, text)

    return say


def _last_lines(logs: LogBuffer, stream: LogStream) -> str:
    lines = [line.text for line in logs.since(0) if line.stream is stream][-LAST_LINES:]
    return ("\nlast log lines:\n" + "\n".join(lines)) if lines else ""


def _chown_tree(root: Path, uid: int) -> None:
    """Give a tree to the project's uid (links themselves, never what they point to)."""
    os.lchown(root, uid, uid)
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(directory, name), uid, uid)
