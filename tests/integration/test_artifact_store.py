"""The artifact store contract, against the local directory store and against S3 (moto)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.runtime.artifacts import (
    Artifact,
    ArtifactStore,
    ArtifactTooLarge,
    LocalArtifactStore,
    S3ArtifactStore,
    artifact_store_from_settings,
)
from shared.errors import InvalidArgument, NotFound
from shared.settings import Settings
from tests.support.procs import free_port

CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"moto[server] is not installed ({exc}): no S3 to test against")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


class Fixture:
    """A store, and how to list what it holds (stored objects and staged leftovers)."""

    def __init__(self, store: ArtifactStore, stored: Any, staged: Any) -> None:
        self.store = store
        self.stored = stored
        self.staged = staged


@pytest.fixture(params=["local", "s3"])
def fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Fixture:
    if request.param == "local":
        local = LocalArtifactStore(tmp_path / "artifacts")
        return Fixture(
            local,
            lambda: sorted(p.name for p in local.objects_dir.rglob("*") if p.is_file()),
            lambda: sorted(p.name for p in local.tmp_dir.iterdir()),
        )
    import boto3

    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"artifacts-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, **CREDENTIALS)
    client.create_bucket(Bucket=bucket)
    spool = tmp_path / "spool"
    s3 = S3ArtifactStore(
        bucket, "hangar/", {"endpoint_url": endpoint, **CREDENTIALS}, spool_dir=spool
    )

    def objects() -> list[str]:
        listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return sorted(item["Key"].rsplit("/", 1)[1] for item in listed)

    return Fixture(s3, objects, lambda: sorted(p.name for p in spool.iterdir()))


async def _put(store: ArtifactStore, chunks: list[bytes], max_bytes: int = 10**8) -> Artifact:
    async with store.stage(max_bytes) as staged:
        for chunk in chunks:
            await staged.write(chunk)
        finished = await staged.finish()
        assert (staged.sha256, staged.size_bytes) == (finished.sha256, finished.size_bytes)
        assert staged.path.exists()
        return await store.commit(staged)


async def _read(store: ArtifactStore, sha256: str, chunk_bytes: int = 256 * 1024) -> bytes:
    return b"".join([chunk async for chunk in store.read(sha256, chunk_bytes)])


async def test_put_read_exists_delete(fixture: Fixture) -> None:
    store = fixture.store
    chunks = [os.urandom(700_000) for _ in range(4)] + [b"tail"]
    data = b"".join(chunks)
    artifact = await _put(store, chunks)
    assert artifact == Artifact(hashlib.sha256(data).hexdigest(), len(data))
    assert await store.exists(artifact.sha256)
    assert await _read(store, artifact.sha256) == data
    assert await _read(store, artifact.sha256, chunk_bytes=1000) == data
    assert fixture.stored() == [artifact.sha256]
    assert fixture.staged() == []
    await store.delete(artifact.sha256)
    assert not await store.exists(artifact.sha256)
    await store.delete(artifact.sha256)  # deleting what is gone is fine


async def test_commit_is_idempotent(fixture: Fixture) -> None:
    store = fixture.store
    async with store.stage(1000) as staged:
        await staged.write(b"same bytes")
        await staged.finish()
        first = await store.commit(staged)
        again = await store.commit(staged)
    later = await _put(store, [b"same ", b"bytes"])
    assert first == again == later
    assert fixture.stored() == [first.sha256]
    assert await _read(store, first.sha256) == b"same bytes"


async def test_concurrent_commits_of_the_same_content(fixture: Fixture) -> None:
    data = os.urandom(300_000)
    results = await asyncio.gather(
        *(_put(fixture.store, [data[:1000], data[1000:]]) for _ in range(5))
    )
    assert {r.sha256 for r in results} == {hashlib.sha256(data).hexdigest()}
    assert fixture.stored() == [results[0].sha256]
    assert await _read(fixture.store, results[0].sha256) == data
    assert fixture.staged() == []


async def test_size_limit(fixture: Fixture) -> None:
    store = fixture.store
    with pytest.raises(ArtifactTooLarge) as caught:
        async with store.stage(1024 * 1024) as staged:
            await staged.write(b"x" * 1024 * 1024)  # exactly the limit: accepted
            await staged.write(b"y")
    assert caught.value.code.name == "OUT_OF_RANGE"
    assert caught.value.reason == "ARTIFACT_TOO_LARGE"
    assert "1 MB" in caught.value.message
    with pytest.raises(RuntimeError):
        await staged.write(b"more")
    assert fixture.stored() == []
    assert fixture.staged() == []


@pytest.mark.parametrize("digest", ["", "abc", "A" * 64, "g" * 64, "../" + "a" * 61])
async def test_bad_digest_is_refused(fixture: Fixture, digest: str) -> None:
    store = fixture.store
    for call in (store.exists(digest), store.delete(digest), _read(store, digest)):
        with pytest.raises(InvalidArgument) as caught:
            await call
        assert [v.field for v in caught.value.violations] == ["sha256"]


async def test_missing_digest_is_not_found(fixture: Fixture) -> None:
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert not await fixture.store.exists(missing)
    with pytest.raises(NotFound):
        await _read(fixture.store, missing)


async def test_local_store_layout_and_modes(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    artifact = await _put(store, [b"content"])
    path = store.path_of(artifact.sha256)
    assert path == tmp_path / "artifacts" / "sha256" / artifact.sha256[:2] / artifact.sha256
    assert path.stat().st_mode & 0o777 == 0o600
    for directory in (path.parent, store.objects_dir, store.tmp_dir):
        assert directory.stat().st_mode & 0o777 == 0o700


async def test_store_from_settings(tmp_path: Path) -> None:
    local = artifact_store_from_settings(
        Settings("runtime", artifacts_dir=str(tmp_path / "artifacts"))
    )
    assert isinstance(local, LocalArtifactStore)
    assert local.root == tmp_path / "artifacts"
    s3 = artifact_store_from_settings(
        Settings(
            "runtime", artifacts_s3_bucket="bucket", artifacts_s3_endpoint="http://127.0.0.1:9"
        )
    )
    assert isinstance(s3, S3ArtifactStore)
    assert s3.bucket == "bucket"
