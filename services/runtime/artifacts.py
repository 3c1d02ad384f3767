"""Content-addressed artifact storage: source archives and built slugs, named by sha256.

An upload is received into a `Staged` temporary file on local disk (so it can be checked,
e.g. with `shared.archives.check_source_archive`, before anything keeps it), then
committed under its digest. The same content always gets the same name, so a commit is
idempotent and concurrent commits of the same bytes are safe.

Two stores implement `ArtifactStore`: `LocalArtifactStore` (a directory on the runtime's
disk) and `S3ArtifactStore` (any S3-compatible bucket, through boto3).
`artifact_store_from_settings` picks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import grpc

from shared.errors import DomainError, InvalidArgument, NotFound
from shared.settings import Settings

_FLUSH_BYTES = 1024 * 1024  # writes are buffered and handed to a thread per this much
_DIGEST = re.compile(r"[0-9a-f]{64}")


class ArtifactTooLarge(DomainError):
    """An upload went past the size allowed for it."""

    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "ARTIFACT_TOO_LARGE"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        super().__init__(
            f"the artifact is larger than the limit of {max_bytes / 1024**2:g} MB",
            metadata={"max_bytes": str(max_bytes)},
        )


@dataclass(frozen=True)
class Artifact:
    """A stored artifact: its content's sha256 (64 lowercase hex digits) and its size."""

    sha256: str
    size_bytes: int


def check_digest(sha256: str) -> str:
    """`sha256` if it is 64 lowercase hex digits, else InvalidArgument on the field `sha256`."""
    if not _DIGEST.fullmatch(sha256):
        raise InvalidArgument.field("sha256", "must be 64 lowercase hexadecimal digits")
    return sha256


class Staged:
    """One upload being received into a temporary file.

    `write` the chunks in order, then `finish`; the store's `stage` context creates it and
    removes the file on exit, whatever happened. Not for concurrent writers."""

    def __init__(self, path: Path, file: BinaryIO, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._file: BinaryIO | None = file
        self._hash = hashlib.sha256()
        self._pending: list[bytes] = []  # chunks not written yet (joined once, not copied
        self._pending_bytes = 0  # chunk by chunk into a buffer)
        self._received = 0
        self._failed = False
        self._artifact: Artifact | None = None

    async def write(self, chunk: bytes) -> None:
        """Append `chunk`; past `max_bytes` raise ArtifactTooLarge, and refuse any more."""
        if self._file is None or self._failed:
            raise RuntimeError("this upload is finished or was refused")
        self._received += len(chunk)
        if self._received > self.max_bytes:
            self._failed = True
            self._pending.clear()
            raise ArtifactTooLarge(self.max_bytes)
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes >= _FLUSH_BYTES:
            await self._flush()

    async def finish(self) -> Artifact:
        """Write what is buffered, fsync and close the file; the digest and size of it all."""
        if self._artifact is not None:
            return self._artifact
        if self._file is None or self._failed:
            raise RuntimeError("this upload was refused or abandoned")
        await self._flush()
        file = self._file
        await asyncio.to_thread(_sync_and_close, file)
        self._file = None
        self._artifact = Artifact(self._hash.hexdigest(), self._received)
        return self._artifact

    @property
    def artifact(self) -> Artifact:
        """What `finish` returned (RuntimeError before)."""
        if self._artifact is None:
            raise RuntimeError("the upload is not finished")
        return self._artifact

    @property
    def sha256(self) -> str:
        return self.artifact.sha256

    @property
    def size_bytes(self) -> int:
        return self.artifact.size_bytes

    async def _flush(self) -> None:
        if not self._pending or self._file is None:
            return
        # One chunk of 1 MiB (what the gateway sends) is written as it is, uncopied.
        data = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        await asyncio.to_thread(self._write_sync, self._file, data)

    def _write_sync(self, file: BinaryIO, data: bytes) -> None:
        file.write(data)
        self._hash.update(data)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _sync_and_close(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()


@asynccontextmanager
async def _staging(directory: Path, max_bytes: int) -> AsyncIterator[Staged]:
    """A `Staged` upload in a new 0600 file under `directory`, removed on exit."""

    def create() -> tuple[Path, BinaryIO]:
        fd, name = tempfile.mkstemp(prefix="upload-", dir=directory)
        return Path(name), os.fdopen(fd, "wb")

    path, file = await asyncio.to_thread(create)
    staged = Staged(path, file, max_bytes)
    try:
        yield staged
    finally:
        await asyncio.to_thread(_discard, staged)


def _discard(staged: Staged) -> None:
    staged._close()
    staged.path.unlink(missing_ok=True)


class ArtifactStore(Protocol):
    """Where artifacts live, named by the sha256 of their content."""

    def stage(self, max_bytes: int) -> AbstractAsyncContextManager[Staged]:
        """A new upload of at most `max_bytes`, its temporary file removed on exit."""
        ...

    async def commit(self, staged: Staged) -> Artifact:
        """Keep a finished upload under its digest; an artifact already there is kept as is."""
        ...

    async def exists(self, sha256: str) -> bool:
        """Whether an artifact with this digest is stored."""
        ...

    def read(self, sha256: str, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
        """The artifact's content in chunks; NotFound (raised on iteration) if missing."""
        ...

    async def delete(self, sha256: str) -> None:
        """Remove the artifact; nothing happens when it is not there."""
        ...


class LocalArtifactStore:
    """Artifacts as files under `root`: `root/sha256/<first two hex digits>/<digest>`.

    Uploads are staged in `root/tmp/` (the same filesystem), fsynced and moved into place
    with `os.replace`, which is atomic: a reader sees the whole file or nothing, and
    concurrent commits of one digest each move identical bytes. Directories are 0700,
    files 0600. Staged files a crashed process left in `root/tmp/` are not swept here."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.objects_dir = root / "sha256"

    def path_of(self, sha256: str) -> Path:
        check_digest(sha256)
        return self.objects_dir / sha256[:2] / sha256

    @asynccontextmanager
    async def stage(self, max_bytes: int) -> AsyncIterator[Staged]:
        await asyncio.to_thread(_make_dirs, self.tmp_dir)
        async with _staging(self.tmp_dir, max_bytes) as staged:
            yield staged

    async def commit(self, staged: Staged) -> Artifact:
        artifact = staged.artifact
        target = self.path_of(artifact.sha256)
        await asyncio.to_thread(self._commit_sync, staged.path, target)
        return artifact

    def _commit_sync(self, source: Path, target: Path) -> None:
        if target.exists():
            return
        _make_dirs(target.parent)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            if target.exists():  # committed already (the staged file was moved away)
                return
            raise
        _fsync_dir(target.parent)

    async def exists(self, sha256: str) -> bool:
        return await asyncio.to_thread(self.path_of(sha256).is_file)

    async def read(self, sha256: str, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
        path = self.path_of(sha256)
        try:
            file = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise NotFound(f"artifact {sha256} not found", reason="ARTIFACT_NOT_FOUND") from None
        try:
            while chunk := await asyncio.to_thread(file.read, chunk_bytes):
                yield chunk
        finally:
            file.close()

    async def delete(self, sha256: str) -> None:
        path = self.path_of(sha256)
        await asyncio.to_thread(path.unlink, missing_ok=True)


def _make_dirs(path: Path) -> None:
    """Create `path` and its missing parents, each 0700 (`mkdir(parents=True)` would give
    the parents the default mode)."""
    if path.is_dir():
        return
    _make_dirs(path.parent)
    with contextlib.suppress(FileExistsError):  # a concurrent commit made it
        path.mkdir(mode=0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3ArtifactStore:
    """Artifacts as objects of an S3 (or S3-compatible) bucket: `<prefix>sha256/<digest>`.

    `client_kwargs` go to `boto3.client("s3", ...)`: `endpoint_url` for an S3-compatible
    server, credentials and `region_name` when the environment does not give them. The
    blocking client runs in threads. Uploads are staged in `spool_dir` (the system's
    temporary directory by default), then sent with `upload_file` (multipart when large).
    S3 writes are atomic per object, so concurrent commits of one digest are safe."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client_kwargs: dict[str, Any] | None = None,
        *,
        spool_dir: Path | None = None,
    ) -> None:
        import boto3  # imported here: only deployments with a bucket need it

        self.bucket = bucket
        self.prefix = prefix
        self.spool_dir = spool_dir or Path(tempfile.gettempdir())
        self._client: Any = boto3.client("s3", **(client_kwargs or {}))

    def key_of(self, sha256: str) -> str:
        return f"{self.prefix}sha256/{check_digest(sha256)}"

    @asynccontextmanager
    async def stage(self, max_bytes: int) -> AsyncIterator[Staged]:
        await asyncio.to_thread(_make_dirs, self.spool_dir)
        async with _staging(self.spool_dir, max_bytes) as staged:
            yield staged

    async def commit(self, staged: Staged) -> Artifact:
        artifact = staged.artifact
        key = self.key_of(artifact.sha256)
        if not await self.exists(artifact.sha256):
            await asyncio.to_thread(
                self._client.upload_file,
                str(staged.path),
                self.bucket,
                key,
                ExtraArgs={"ContentType": "application/octet-stream"},
            )
        return artifact

    async def exists(self, sha256: str) -> bool:
        key = self.key_of(sha256)
        try:
            await asyncio.to_thread(self._client.head_object, Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _is_missing(exc):
                return False
            raise
        return True

    async def read(self, sha256: str, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
        key = self.key_of(sha256)
        try:
            response = await asyncio.to_thread(self._client.get_object, Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _is_missing(exc):
                raise NotFound(
                    f"artifact {sha256} not found", reason="ARTIFACT_NOT_FOUND"
                ) from None
            raise
        body = response["Body"]
        try:
            while True:
                chunk: bytes = await asyncio.to_thread(body.read, chunk_bytes)
                if not chunk:
                    break
                yield chunk
        finally:
            body.close()

    async def delete(self, sha256: str) -> None:
        key = self.key_of(sha256)
        await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=key)


def _is_missing(exc: Exception) -> bool:
    """Whether a botocore ClientError says the object (or key) does not exist."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


def artifact_store_from_settings(settings: Settings) -> ArtifactStore:
    """The store a runtime process uses: the S3 bucket when one is configured (at the
    configured endpoint, an S3-compatible server, when given; else AWS), else files under
    `artifacts_dir`."""
    if settings.artifacts_s3_bucket:
        endpoint = settings.artifacts_s3_endpoint
        kwargs: dict[str, Any] = {"endpoint_url": endpoint} if endpoint else {}
        return S3ArtifactStore(settings.artifacts_s3_bucket, client_kwargs=kwargs)
    return LocalArtifactStore(Path(settings.artifacts_dir))
