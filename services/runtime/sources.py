"""Sources and slugs: what users upload and what agents build from it.

An upload is received into a staging file of the artifact store while its sha256 is
computed; it is checked as a source archive (a gzip-compressed tar with nothing that could
escape the directory it is unpacked into) and only then committed under its digest and
recorded for the project. A refused or oversized upload leaves nothing behind.

Agents reach artifacts only through runtime (FetchArtifact, PutArtifact), never through a
shared disk, so servers need no storage in common with the control plane.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.runtime import store
from services.runtime.artifacts import Artifact, ArtifactStore
from services.runtime.domain import is_sha256, required
from services.runtime.service import ProjectAccess
from services.runtime.store import Source
from shared import pagination
from shared.archives import ArchiveCheck
from shared.audit import current_actor, record_audit
from shared.auth import require_caller, require_service
from shared.db import Database
from shared.errors import InvalidArgument, NotFound

AGENT = "agent"
MAX_PAGE_SIZE = 500
# A slug holds the app's dependencies (a virtualenv, node_modules): larger than its source.
MAX_SLUG_BYTES = 2 * 1024 * 1024 * 1024

# (project_id, chunk) of each message of a streamed upload; project_id only in the first.
Chunks = AsyncIterator[tuple[str, bytes]]


class Sources:
    """A project's uploaded sources, as its organization's members upload and list them."""

    def __init__(
        self, db: Database, access: ProjectAccess, artifacts: ArtifactStore, max_bytes: int
    ) -> None:
        self.db = db
        self.access = access
        self.artifacts = artifacts
        self.max_bytes = max_bytes

    async def upload(self, chunks: Chunks) -> Source:
        """Receive, check, store and record one source archive."""
        require_caller()
        first = await anext(chunks, None)
        if first is None:
            raise InvalidArgument.field("project_id", "required")
        project_id = await self.access.authorize_project(first[0], "deployments.create")

        async def named_once() -> AsyncIterator[bytes]:
            yield first[1]
            async for named, chunk in chunks:
                if named and named != project_id:
                    raise InvalidArgument.field(
                        "project_id", "only the first message names the project"
                    )
                yield chunk

        artifact = await receive(self.artifacts, self.max_bytes, named_once(), ArchiveCheck())
        actor = current_actor() or ""
        async with self.db.transaction() as tx:
            source = await store.record_source(
                tx, project_id, artifact.sha256, artifact.size_bytes, actor
            )
            await record_audit(
                tx,
                "runtime",
                organization_id=await self.access.projects.organization_of(project_id),
                action="source.uploaded",
                target_type="project",
                target_id=project_id,
                metadata={"sha256": artifact.sha256, "size_bytes": artifact.size_bytes},
            )
        return source

    async def list_sources(
        self, project_id: str, page_size: int, page_token: str
    ) -> pagination.Page[Source]:
        project_id = await self.access.authorize_project(project_id, "deployments.list")
        size = pagination.page_size(page_size, maximum=MAX_PAGE_SIZE)
        async with self.db.session() as s:
            return await store.list_sources(s, project_id, size, page_token)


class AgentArtifacts:
    """Artifacts as agents fetch and store them (the agent's own service token only)."""

    def __init__(self, db: Database, artifacts: ArtifactStore, max_bytes: int) -> None:
        self.db = db
        self.artifacts = artifacts
        self.max_bytes = max_bytes

    async def fetch(self, sha256: str) -> AsyncIterator[bytes]:
        """The bytes of an uploaded source or a recorded slug."""
        require_service(AGENT)
        digest = required(sha256, "sha256").lower()
        if not is_sha256(digest):
            raise InvalidArgument.field("sha256", "must be 64 hex digits")
        async with self.db.session() as s:
            if not await store.artifact_known(s, digest):
                raise NotFound(f"no artifact {digest}", reason="ARTIFACT_NOT_FOUND")
        return self.artifacts.read(digest)

    async def put_slug(self, chunks: Chunks) -> Artifact:
        """Store a slug an agent built; recorded against its deployment when the agent
        reports it (the deployment's row is the slug's owner)."""
        require_service(AGENT)
        first = await anext(chunks, None)
        if first is None:
            raise InvalidArgument.field("project_id", "required")

        async def data() -> AsyncIterator[bytes]:
            yield first[1]
            async for _, chunk in chunks:
                yield chunk

        check = ArchiveCheck(allow_absolute_links=True)  # a slug's links may be absolute
        return await receive(self.artifacts, self.max_bytes, data(), check)


async def receive(
    artifacts: ArtifactStore, max_bytes: int, data: AsyncIterator[bytes], check: ArchiveCheck
) -> Artifact:
    """Stage `data`, checked as an archive while it arrives, then commit it under its
    digest; on any error (a refused archive, too many bytes) nothing is kept."""
    try:
        async with artifacts.stage(max_bytes) as staged:
            async for chunk in data:
                await staged.write(chunk)
                await check.feed(chunk)
            await staged.finish()
            await check.finish()
            return await artifacts.commit(staged)
    except BaseException:
        check.abort()
        raise
