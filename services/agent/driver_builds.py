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

from services.agent.builds import Builder, BuildFailed
from services.agent.domain import ContainerState, utcnow
from services.agent.driver_base import DriverBase, _Container

log = logging.getLogger("hangar.agent.builds")


class BuildMixin(DriverBase):
    """Builds before the first run (see the module's docstring)."""

    builder: Builder

    async def _spawn(self, record: _Container) -> None:
        spec = record.spec
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

    def _fail_build(self, record: _Container, reason: str) -> None:
        log.info("build failed", extra={"container_id": record.info.container_id})
        self._release(record)  # type: ignore[attr-defined]
        self._close_proxy(record)
        self._set(
            record, state=ContainerState.FAILED, building=False, reason=reason, ended_at=utcnow()
        )
        record.ended.set()
        self._forget_old_ended()

    async def _stop(self, record: _Container, grace: float) -> None:
        build = record.build
        if build is not None and not build.done() and build is not asyncio.current_task():
            build.cancel()
            await asyncio.gather(build, return_exceptions=True)
        await super()._stop(record, grace)
