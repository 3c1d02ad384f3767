"""Source upload throughput through the gateway, next to writing the same bytes to disk, in
one run on one machine.

The platform runs as real processes (tests/support/stack.py: identity, billing, project,
runtime, gateway; no agent) against one PostgreSQL (embedded pgserver). Each round uploads
one gzip-compressed tar of incompressible content (so its size is its size on the wire)
with `POST /v1/projects/{id}/sources`, streamed by httpx from a file: the gateway streams
it into runtime's UploadSource, which hashes it into a staging file, reads the archive
through (the checks) and commits it under its digest. Every round's archive is a new one (a
different seed), so nothing is deduplicated.

The baseline writes the same bytes to a file on the same disk and fsyncs it, as the
artifact store does: the floor of "receive N bytes and keep them". Rounds alternate and the
median of each is shown, with the ratio (aim >= 0.5).

Run: .venv/bin/python bench/bench_upload.py [--mb 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import secrets
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx


def make_archive(path: Path, megabytes: int) -> int:
    """A source archive of one incompressible file of `megabytes`; its size in bytes."""
    data = os.urandom(megabytes * 1024 * 1024)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        procfile = b"web: python3 -m http.server $PORT\n"
        info = tarfile.TarInfo("Procfile")
        info.size = len(procfile)
        tar.addfile(info, io.BytesIO(procfile))
        info = tarfile.TarInfo("static/blob.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


def upload(base: str, project_id: str, token: str, archive: Path) -> float:
    """Seconds for one upload, streamed from the file."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/gzip"}
    with archive.open("rb") as body, httpx.Client(base_url=base, timeout=600) as http:
        started = time.perf_counter()
        response = http.post(f"/v1/projects/{project_id}/sources", headers=headers, content=body)
        elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def write_to_disk(archive: Path, directory: Path) -> float:
    """Seconds to copy the bytes to a new file in 1 MiB writes and fsync it."""
    target = directory / f"copy-{secrets.token_hex(4)}"
    started = time.perf_counter()
    with archive.open("rb") as source, target.open("wb") as sink:
        while chunk := source.read(1 << 20):
            sink.write(chunk)
        sink.flush()
        os.fsync(sink.fileno())
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def set_up(tmp: Path, pg: Any) -> tuple[Any, str, str]:
    from shared.migrate import migrate
    from shared.pg import create_database
    from tests.support.stack import owner_with_project, start_stack

    url = asyncio.run(create_database(pg.url, f"bench_{secrets.token_hex(4)}"))
    passwords = {
        s: secrets.token_urlsafe(12) for s in ("identity", "project", "runtime", "billing")
    }
    migrate(url, passwords)
    stack = start_stack(
        url,
        passwords,
        tmp / "stack",
        agent=False,
        extra_env={"HANGAR_MAX_SOURCE_BYTES": str(4 * 1024**3), "HANGAR_LOG_LEVEL": "WARNING"},
    )
    try:
        owner, project = owner_with_project(stack, "bench-up")
    except BaseException:
        stack.stop()
        raise
    return stack, project["id"], owner.token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=64, help="size of each archive")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from shared.pg import provision

    tmp = Path(tempfile.mkdtemp(prefix="hangar-bench-upload-"))
    pg = provision(tmp / "pgdata", ephemeral=True)
    stack = None
    try:
        stack, project_id, token = set_up(tmp, pg)
        uploads, writes = [], []
        size = 0
        for round_ in range(args.rounds):
            archive = tmp / f"source-{round_}.tar.gz"
            size = make_archive(archive, args.mb)
            writes.append(write_to_disk(archive, tmp))
            uploads.append(upload(stack.url, project_id, token, archive))
            archive.unlink()
        stack.check_alive()
    finally:
        if stack is not None:
            stack.stop()
        pg.stop()
    mb = size / 1e6
    up, disk = statistics.median(uploads), statistics.median(writes)
    print(
        f"{args.rounds} rounds of a {mb:.0f} MB source archive (incompressible), "
        f"{os.cpu_count()} CPUs, PostgreSQL {pg.kind}; median round shown"
    )
    print(f"{'':<34}{'seconds':>9}{'MB/s':>9}")
    print(f"{'upload through the gateway':<34}{up:>9.2f}{mb / up:>9.0f}")
    print(f"{'write + fsync to disk (baseline)':<34}{disk:>9.2f}{mb / disk:>9.0f}")
    print(f"upload / disk throughput = {disk / up:.2f}  (aim >= 0.5)")
    print(
        "all rounds (s): upload",
        [round(u, 2) for u in uploads],
        "disk",
        [round(w, 2) for w in writes],
    )


if __name__ == "__main__":
    main()
