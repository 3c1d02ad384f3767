"""Uploaded sources (their bytes are in the artifact store) and the slugs built from them."""

from __future__ import annotations

from datetime import datetime

from services.runtime.store.records import Deployment, S, Source
from shared.db import Session
from shared.pagination import Page, decode_page_token, page_of


async def record_source(
    tx: Session, project_id: str, sha256: str, size_bytes: int, created_by: str
) -> Source:
    """The project's source of these bytes: recorded now, or as first uploaded."""
    row = await tx.fetchrow(
        f"""INSERT INTO {S}.sources (project_id, sha256, size_bytes, created_by)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (project_id, sha256) DO UPDATE SET sha256 = EXCLUDED.sha256
            RETURNING *""",
        project_id,
        sha256,
        size_bytes,
        created_by,
    )
    assert row is not None
    return Source.from_row(row)


async def find_source(s: Session, project_id: str, sha256: str) -> Source | None:
    """One of the project's sources; `latest`: its newest upload."""
    if sha256 == "latest":
        row = await s.fetchrow(
            f"""SELECT * FROM {S}.sources WHERE project_id = $1
                 ORDER BY created_at DESC, sha256 DESC LIMIT 1""",
            project_id,
        )
    else:
        row = await s.fetchrow(
            f"SELECT * FROM {S}.sources WHERE project_id = $1 AND sha256 = $2",
            project_id,
            sha256,
        )
    return Source.from_row(row) if row else None


async def list_sources(s: Session, project_id: str, size: int, token: str) -> Page[Source]:
    """Newest first; keyset on (created_at, sha256)."""
    key = decode_page_token(token, (str, str))
    rows = await s.fetch(
        f"""SELECT * FROM {S}.sources
             WHERE project_id = $1
               AND ($2::timestamptz IS NULL OR (created_at, sha256) < ($2, $3))
             ORDER BY created_at DESC, sha256 DESC LIMIT $4""",
        project_id,
        datetime.fromisoformat(key[0]) if key else None,
        key[1] if key else "",
        size + 1,
    )
    return page_of(
        [Source.from_row(r) for r in rows], size, lambda r: [r.created_at.isoformat(), r.sha256]
    )


async def record_built(
    tx: Session, deployment: Deployment, *, slug_sha256: str = "", image_digest: str = ""
) -> Deployment:
    """Record what a deployment's agent reported it runs: the slug its build produced, the
    digest its image's tag resolved to. Each is set once (a later report changes nothing);
    the deployment as it is now."""
    row = await tx.fetchrow(
        f"""UPDATE {S}.deployments
               SET slug_sha256 = CASE WHEN slug_sha256 IS NULL AND source_sha256 IS NOT NULL
                                      THEN NULLIF($2, '') ELSE slug_sha256 END,
                   image_digest = CASE WHEN image_digest IS NULL AND image IS NOT NULL
                                       THEN NULLIF($3, '') ELSE image_digest END
             WHERE id = $1 RETURNING *""",
        deployment.id,
        slug_sha256,
        image_digest,
    )
    return Deployment.from_row(row) if row is not None else deployment


async def decided_in_set(s: Session, replica_set_id: str) -> tuple[str, str] | None:
    """What a replica set's first replica runs once its agent said: (slug, image digest),
    None until then (its siblings run the same, never a build or a tag of their own)."""
    row = await s.fetchrow(
        f"""SELECT COALESCE(slug_sha256, '') AS slug, COALESCE(image_digest, '') AS digest
              FROM {S}.deployments
             WHERE replica_set_id = $1 AND replica_index = 0
               AND (slug_sha256 IS NOT NULL OR image_digest IS NOT NULL)
             ORDER BY created_at DESC LIMIT 1""",
        replica_set_id,
    )
    return (row["slug"], row["digest"]) if row is not None else None


async def artifact_known(s: Session, sha256: str) -> bool:
    """Is this digest an uploaded source or a recorded slug (what agents may fetch)?"""
    return bool(
        await s.fetchval(
            f"""SELECT EXISTS (SELECT 1 FROM {S}.sources WHERE sha256 = $1)
                    OR EXISTS (SELECT 1 FROM {S}.deployments WHERE slug_sha256 = $1)""",
            sha256,
        )
    )
