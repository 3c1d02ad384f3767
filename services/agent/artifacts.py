"""Artifacts (source archives, slugs) as an agent gets and gives them: through runtime's
FetchArtifact and PutArtifact, streamed, never through a disk shared with the control plane.

A fetched artifact is checked against its digest before anything uses it, and kept in the
agent's cache (`artifacts/` in its state directory) so that a restart, a second container of
the same slug or a rollback fetches nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from hangar.runtime.v1 import runtime_pb2 as rpb
from hangar.runtime.v1 import runtime_pb2_grpc
from shared.clients import Clients

RUNTIME_SERVICE = rpb.DESCRIPTOR.services_by_name["RuntimeService"]
CHUNK_BYTES = 256 * 1024
# A transfer's deadline: generous (a slug may be hundreds of MB) but never unbounded.
TRANSFER_TIMEOUT_SECONDS = 900.0


class ArtifactError(Exception):
    """An artifact could not be fetched or stored; the message says why."""


class ArtifactSource(Protocol):
    async def fetch(self, sha256: str) -> Path:
        """The artifact's file on this server (fetched once, then cached)."""
        ...

    async def put(self, project_id: str, deployment_id: str, path: Path) -> str:
        """Store a slug with runtime; its sha256."""
        ...


class RuntimeArtifacts:
    """ArtifactSource through runtime, with a local cache in `directory`."""

    def __init__(self, clients: Clients, directory: Path) -> None:
        self.clients = clients
        self.directory = directory
        self._fetching: dict[str, asyncio.Task[Path]] = {}

    def _stub(self) -> runtime_pb2_grpc.RuntimeServiceStub:
        return self.clients.stub("runtime", runtime_pb2_grpc.RuntimeServiceStub, RUNTIME_SERVICE)

    def path_of(self, sha256: str) -> Path:
        return self.directory / sha256

    async def fetch(self, sha256: str) -> Path:
        path = self.path_of(sha256)
        if path.exists():
            return path
        task = self._fetching.get(sha256)
        if task is None:  # one transfer per digest, however many containers want it
            task = asyncio.ensure_future(self._download(sha256, path))
            self._fetching[sha256] = task
            task.add_done_callback(lambda _: self._fetching.pop(sha256, None))
        return await asyncio.shield(task)

    async def _download(self, sha256: str, path: Path) -> Path:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.part")
        digest = hashlib.sha256()
        call = self._stub().FetchArtifact(
            rpb.FetchArtifactRequest(sha256=sha256), timeout=TRANSFER_TIMEOUT_SECONDS
        )
        try:
            with partial.open("wb") as file:
                async for message in call:
                    digest.update(message.chunk)
                    await asyncio.to_thread(file.write, message.chunk)
                await asyncio.to_thread(os.fsync, file.fileno())
            if digest.hexdigest() != sha256:
                raise ArtifactError(f"artifact {sha256} arrived with another digest")
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return path

    async def put(self, project_id: str, deployment_id: str, path: Path) -> str:
        async def messages() -> AsyncIterator[rpb.PutArtifactRequest]:
            # The first message names the owner (an empty file still sends that one).
            message = rpb.PutArtifactRequest(project_id=project_id, deployment_id=deployment_id)
            with path.open("rb") as file:
                while chunk := await asyncio.to_thread(file.read, CHUNK_BYTES):
                    message.chunk = chunk
                    yield message
                    message = rpb.PutArtifactRequest()
            if message.project_id:
                yield message

        reply: rpb.Artifact = await self._stub().PutArtifact(
            messages(), timeout=TRANSFER_TIMEOUT_SECONDS
        )
        # Keep it: the container that built it runs it next.
        cached = self.path_of(reply.sha256)
        if not cached.exists():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                os.link(path, cached)
            except FileExistsError:
                pass
            except OSError:  # another filesystem
                await asyncio.to_thread(shutil.copyfile, path, cached)
        return reply.sha256
