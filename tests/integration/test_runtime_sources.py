"""Source uploads through runtime's UploadSource (real gRPC, identity, project and billing
behind it, a real artifact store directory): concurrent uploads of the same bytes make one
source and one stored file; a refused archive, an oversized one or a broken stream store
nothing, not even a staging file; another organization's member can neither upload nor list.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from hangar.runtime.v1 import runtime_pb2 as pb
from tests.support import runtime as runtime_fixtures
from tests.support.project import Tenant
from tests.support.runtime import Neighbours, Runtime, launch_runtime

neighbours = runtime_fixtures.neighbours

MAX_BYTES = 256 * 1024


@pytest.fixture
async def runtime(neighbours: Neighbours, tmp_path: Path) -> AsyncIterator[Runtime]:
    started = await launch_runtime(
        neighbours, artifacts_dir=str(tmp_path / "artifacts"), max_source_bytes=MAX_BYTES
    )
    yield started
    await started.stop()


def _archive(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _messages(project_id: str, data: bytes, piece: int = 4096) -> list[pb.UploadSourceRequest]:
    chunks = [data[i : i + piece] for i in range(0, len(data), piece)] or [b""]
    return [
        pb.UploadSourceRequest(project_id=project_id if i == 0 else "", chunk=chunk)
        for i, chunk in enumerate(chunks)
    ]


async def _upload(runtime: Runtime, tenant: Tenant, project_id: str, data: bytes) -> pb.Source:
    source: pb.Source = await runtime.stub.UploadSource(
        iter(_messages(project_id, data)), metadata=tenant.owner.md, timeout=60
    )
    return source


def _stored(root: Path) -> list[Path]:
    """Every file in the store, staging area included."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def test_concurrent_uploads_of_the_same_bytes_make_one_source(
    runtime: Runtime, neighbours: Neighbours, tmp_path: Path
) -> None:
    tenant = await neighbours.tenant()
    project = await neighbours.project(tenant)
    data = _archive({"Procfile": b"web: python3 -m http.server $PORT\n", "big": b"x" * 50_000})
    sources = await asyncio.gather(*(_upload(runtime, tenant, project, data) for _ in range(8)))
    digest = hashlib.sha256(data).hexdigest()
    assert {s.sha256 for s in sources} == {digest}
    listed = await runtime.stub.ListSources(
        pb.ListSourcesRequest(project_id=project), metadata=tenant.owner.md
    )
    assert [s.sha256 for s in listed.sources] == [digest]
    assert [p.name for p in _stored(tmp_path / "artifacts")] == [digest]

    # Different bytes, at once: each its own source, newest first.
    others = [_archive({"Procfile": f"web: echo {i}\n".encode()}) for i in range(4)]
    await asyncio.gather(*(_upload(runtime, tenant, project, o) for o in others))
    listed = await runtime.stub.ListSources(
        pb.ListSourcesRequest(project_id=project, page_size=3), metadata=tenant.owner.md
    )
    assert len(listed.sources) == 3 and listed.next_page_token
    rest = await runtime.stub.ListSources(
        pb.ListSourcesRequest(project_id=project, page_token=listed.next_page_token),
        metadata=tenant.owner.md,
    )
    everything = [s.sha256 for s in [*listed.sources, *rest.sources]]
    assert sorted(everything) == sorted({digest, *(hashlib.sha256(o).hexdigest() for o in others)})


@pytest.mark.parametrize(
    "case",
    ["escaping member", "not gzip", "truncated", "too large", "another project named later"],
)
async def test_a_refused_upload_stores_nothing(
    runtime: Runtime, neighbours: Neighbours, tmp_path: Path, case: str
) -> None:
    tenant = await neighbours.tenant()
    project = await neighbours.project(tenant)
    good = _archive({"Procfile": b"web: true\n"})
    messages = {
        "escaping member": _messages(project, _archive({"../up": b"x"})),
        "not gzip": _messages(project, b"plain text, not an archive"),
        "truncated": _messages(project, good[:-12]),
        "too large": _messages(project, _archive({"f": os.urandom(MAX_BYTES + 1)})),
        "another project named later": [
            pb.UploadSourceRequest(project_id=project, chunk=good[:10]),
            pb.UploadSourceRequest(project_id="someone-else", chunk=good[10:]),
        ],
    }[case]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runtime.stub.UploadSource(iter(messages), metadata=tenant.owner.md, timeout=60)
    expected = (
        grpc.StatusCode.OUT_OF_RANGE if case == "too large" else grpc.StatusCode.INVALID_ARGUMENT
    )
    assert caught.value.code() == expected, caught.value.details()
    assert _stored(tmp_path / "artifacts") == []
    listed = await runtime.stub.ListSources(
        pb.ListSourcesRequest(project_id=project), metadata=tenant.owner.md
    )
    assert list(listed.sources) == []


async def test_another_organization_can_neither_upload_nor_list(
    runtime: Runtime, neighbours: Neighbours, tmp_path: Path
) -> None:
    tenant, stranger = await neighbours.tenant("viewer"), await neighbours.tenant()
    project = await neighbours.project(tenant)
    data = _archive({"Procfile": b"web: true\n"})
    for md in (stranger.owner.md, tenant.members["viewer"].md):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await runtime.stub.UploadSource(iter(_messages(project, data)), metadata=md)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runtime.stub.ListSources(
            pb.ListSourcesRequest(project_id=project), metadata=stranger.owner.md
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _stored(tmp_path / "artifacts") == []
