"""The container driver's builds: a container of an uploaded source (or of a slug) gets its
app before its first run (services/agent/builds.py does the work, in the sandbox).

`start` answers at once, as for any container (STARTING; `building` while the source is
built); the build runs in a task of the container's, then the Procfile's release command,
then the app's first run, from the slug bound read-only at /app. A failed build, an unknown
process type or a failed release command ends the container FAILED with a reason that says
which (BUILD_FAILED / RELEASE_FAILED, with the last lines of the output); a stop during the
build ends it at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import shlex
import time

from services.agent.builds import Builder, BuildFailed
from services.agent.domain import ContainerState, LogStream, utcnow
from services.agent.driver_base import DriverBase, _Container
from services.agent.image_refs import ImageFailed, RegistryAuth
from services.agent.image_users import check_reachable, resolve_user
from services.agent.images import ImageStore
from services.agent.uids import UidTable

log = logging.getLogger("hangar.agent.builds")


class BuildMixin(DriverBase):
    """Builds before the first run (see the module's docstring)."""

    builder: Builder
    images: ImageStore
    uids: UidTable
    _collecting: asyncio.Future[None] | None = None
    keep_unused_seconds: float = 3600.0
    _last_used: dict[str, float]  # image digests and slugs -> when their last container went
    _closing: bool

    async def _spawn(self, record: _Container) -> None:
        spec = record.spec
        if spec.image and not spec.image_root:
            self._set(record, building=True)
            record.build = asyncio.get_running_loop().create_task(
                self._pull_then_spawn(record), context=contextvars.Context()
            )
            record.tasks.append(record.build)
            return
        if (spec.source_sha256 or spec.slug_sha256) and not spec.app_dir:
            self._set(record, building=not spec.slug_sha256)
            # A fresh context: the build outlives StartContainer, and must not carry its
            # caller or deadline into the calls it makes to runtime.
            record.build = asyncio.get_running_loop().create_task(
                self._build_then_spawn(record), context=contextvars.Context()
            )
            record.tasks.append(record.build)
            return
        await super()._spawn(record)

    async def _build_then_spawn(self, record: _Container) -> None:
        spec = record.spec
        try:
            if spec.slug_sha256:
                app = await self.builder.unpack(spec.slug_sha256)
            else:
                app = await self.builder.build(spec, record.logs)
            self._set(record, building=False, slug_sha256=app.slug_sha256)
            command = app.command_for(spec)
            await self.builder.release(spec, app, record.logs)
        except BuildFailed as exc:
            self._fail_build(record, exc.reason)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, or the disk: the container fails, the agent lives
            log.exception("build failed", extra={"container_id": spec.container_id})
            self._fail_build(record, f"BUILD_FAILED: the agent could not build it: {exc}")
            return
        if record.stop_requested or record.info.state.ended:
            return
        record.spec = dataclasses.replace(
            spec,
            command=command,
            slug_sha256=app.slug_sha256,
            app_dir=str(app.directory),
            env={**app.env(), **spec.env},  # the project's own variables win
        )
        await super()._spawn(record)

    async def _pull_then_spawn(self, record: _Container) -> None:
        spec = record.spec
        auth = (
            RegistryAuth(spec.registry_username, spec.registry_password)
            if spec.registry_username
            else None
        )
        try:
            image = await self.images.pull(spec.image, record.logs, auth)
        except ImageFailed as exc:
            self._fail_build(record, exc.reason)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, or the disk: the container fails, the agent lives
            log.exception("pull failed", extra={"container_id": spec.container_id})
            self._fail_build(record, f"IMAGE_PULL_FAILED: the agent could not pull it: {exc}")
            return
        config = image.config
        try:
            cmd = shlex.split(spec.image_command) if spec.image_command else list(config.cmd)
        except ValueError as exc:
            self._fail_build(record, f"IMAGE_COMMAND_INVALID: {exc}")
            return
        args = (*config.entrypoint, *cmd)
        if not args:
            self._fail_build(
                record,
                "IMAGE_NO_COMMAND: the image has no Entrypoint or Cmd, and the deployment no "
                "command",
            )
            return
        try:
            user = await asyncio.to_thread(resolve_user, config.user, image.rootfs)
            rootfs = image.rootfs
            if user is not None:
                host_uid = self.uids.uid_of(spec.project_id or f"container:{spec.container_id}")
                check_reachable(self.images.rootfs_as(image.digest, host_uid))
                rootfs = await self.images.as_user(image, user, host_uid)
                record.logs.append(
                    LogStream.BUILD,
                    f"-----> Running as the image's user {config.user} ({user}), in a user "
                    "namespace of its own",
                )
        except ImageFailed as exc:
            self._fail_build(record, exc.reason)
            return
        self._set(record, building=False, image_digest=image.digest)
        if record.stop_requested or record.info.state.ended:
            return
        record.spec = dataclasses.replace(
            spec,
            image=image.pinned,  # a restart runs what ran: the digest, never the tag again
            image_root=str(rootfs),
            image_user=user,
            args=args,
            workdir=config.working_dir or "/",
            env={**config.env, **spec.env},  # the project's own variables win
            registry_username="",  # the pull is done: the credentials are not kept
            registry_password="",
        )
        await super()._spawn(record)

    def _fail_build(self, record: _Container, reason: str) -> None:
        log.info("build failed", extra={"container_id": record.info.container_id})
        self._release(record)
        self._close_proxy(record)
        self._set(
            record, state=ContainerState.FAILED, building=False, reason=reason, ended_at=utcnow()
        )
        record.ended.set()
        self._forget_old_ended()

    def _release(self, record: _Container) -> None:
        super()._release(record)  # type: ignore[misc]  # LifecycleMixin's, after this mixin
        now = time.monotonic()
        if record.info.image_digest:
            self._last_used[record.info.image_digest] = now
        if record.spec.slug_sha256:
            self._last_used[record.spec.slug_sha256] = now
        # Not while the agent stops: its images serve the next agent of this directory.
        if (record.spec.image_root or record.spec.app_dir) and not self._closing:
            self._collect_soon()

    def _collect_soon(self) -> None:
        """Once a container of an image or a slug is gone: drop the images (their layers no
        kept image shares) and the slugs that no container here runs, and none ran for
        `keep_unused_seconds` (a rollback, a redeploy soon after finds them here)."""
        if self._collecting is not None and not self._collecting.done():
            return
        now = time.monotonic()
        self._last_used = {
            d: at for d, at in self._last_used.items() if now - at < self.keep_unused_seconds
        }
        live = [c for c in self._containers.values() if not c.info.state.ended]
        images = set(self._last_used) | {c.info.image_digest for c in live if c.info.image_digest}
        # A live container's slug: the one it started from, or the one its build made (in
        # its info until its spec takes it, after the release command).
        slugs = set(self._last_used) | {c.spec.slug_sha256 or c.info.slug_sha256 for c in live}
        # A build under way may store a slug no set here names yet: slugs wait for the next
        # collection then (images are guarded by the image store's own busy marks).
        collect_slugs = not any(c.info.building for c in live)

        def collect() -> None:
            dropped = self.images.collect_garbage(images)
            if collect_slugs:
                dropped += self.builder.collect_slugs(slugs)
            if dropped:
                log.info("collected unused images and slugs", extra={"removed": dropped})

        self._collecting = asyncio.ensure_future(asyncio.to_thread(collect))

    async def _stop(self, record: _Container, grace: float) -> None:
        build = record.build
        if build is not None and not build.done() and build is not asyncio.current_task():
            build.cancel()
            await asyncio.gather(build, return_exceptions=True)
        await super()._stop(record, grace)
