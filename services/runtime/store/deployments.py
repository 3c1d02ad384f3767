"""Deployments: their rows, status moves, listings, and the advisory locks around them."""

from __future__ import annotations

from datetime import datetime

from services.runtime.domain import DeploymentState
from services.runtime.store.records import Deployment, DeploymentSpec, S
from shared.db import Session
from shared.errors import NotFound
from shared.ids import new_id
from shared.pagination import Page, decode_page_token, encode_page_token

# ------------------------------------------------------------------------ deployments


async def insert_deployment(
    tx: Session, spec: DeploymentSpec, schedule_deadline: datetime, *, held: bool = False
) -> Deployment:
    """One deployment row: replica `spec.replica_index` of `spec.replica_set_id`, or (no
    set given) the first replica of a new set named by its own id; `held` for a rolling
    rollout to place."""
    deployment_id = new_id()
    row = await tx.fetchrow(
        f"""INSERT INTO {S}.deployments (id, project_id, organization_id, image, command,
                ram_mb, cpu_millis, region, health_check_path, rolled_back_from,
                schedule_deadline, sleep_after_seconds, restart_policy, liveness_check_path,
                liveness_period_seconds, liveness_failure_threshold, source_sha256, slug_sha256,
                process_type, release_reason, created_by, processes, image_command,
                replica_set_id, replica_index, replicas, max_surge, max_unavailable, held)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULLIF($9, ''), NULLIF($10, ''), $11, $12,
                    $13, NULLIF($14, ''), $15, $16, $17, NULLIF($18, ''), $19, $20, $21, $22,
                    NULLIF($23, ''), $24, $25, $26, $27, $28, $29)
            RETURNING *""",
        deployment_id,
        spec.project_id,
        spec.organization_id,
        spec.image,
        spec.command,
        spec.resources.ram_mb,
        spec.resources.cpu_millis,
        spec.region,
        spec.health_check_path,
        spec.rolled_back_from,
        schedule_deadline,
        spec.sleep_after_seconds,
        spec.restart_policy,
        spec.liveness_check_path,
        spec.liveness_period_seconds,
        spec.liveness_failure_threshold,
        spec.source_sha256,
        spec.slug_sha256,
        spec.process_type,
        spec.release_reason.value,
        spec.created_by,
        spec.processes_json,
        spec.image_command,
        spec.replica_set_id or deployment_id,
        spec.replica_index,
        spec.replicas,
        spec.replicas if spec.max_surge is None else spec.max_surge,
        spec.max_unavailable,
        held,
    )
    assert row is not None
    return Deployment.from_row(row)


async def get_deployment(s: Session, deployment_id: str) -> Deployment:
    row = await s.fetchrow(f"SELECT * FROM {S}.deployments WHERE id = $1", deployment_id)
    if row is None:
        raise NotFound(f"deployment {deployment_id!r} does not exist")
    return Deployment.from_row(row)


async def lock_deployment(tx: Session, deployment_id: str) -> Deployment:
    row = await tx.fetchrow(
        f"SELECT * FROM {S}.deployments WHERE id = $1 FOR UPDATE", deployment_id
    )
    if row is None:
        raise NotFound(f"deployment {deployment_id!r} does not exist")
    return Deployment.from_row(row)


async def claim_queued(tx: Session, after: tuple[datetime, str] | None) -> Deployment | None:
    """The oldest queued deployment after `after` that no other replica is working on."""
    row = await tx.fetchrow(
        f"""SELECT * FROM {S}.deployments
             WHERE status = 'queued' AND NOT held
               AND ($1::timestamptz IS NULL OR (created_at, id) > ($1, $2))
             ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED""",
        after[0] if after else None,
        after[1] if after else "",
    )
    return Deployment.from_row(row) if row else None


async def lock_serving_of_project(
    tx: Session, project_id: str, *, excluding_set: str = "", sets_before: datetime | None = None
) -> list[Deployment]:
    """The project's serving deployments (running or crash-looping: at most one per replica
    index) outside `excluding_set` (and of sets created before `sets_before`, if given),
    locked in id order."""
    rows = await tx.fetch(
        f"""SELECT * FROM {S}.deployments d
             WHERE project_id = $1 AND status IN ('running', 'crash_loop')
               AND replica_set_id <> $2
               AND ($3::timestamptz IS NULL
                    OR (SELECT f.created_at FROM {S}.deployments f
                         WHERE f.id = d.replica_set_id) < $3)
             ORDER BY id FOR UPDATE""",
        project_id,
        excluding_set,
        sets_before,
    )
    return [Deployment.from_row(r) for r in rows]


async def newer_set_exists(
    tx: Session, project_id: str, replica_set_id: str, since: datetime
) -> bool:
    """Has a release of the project been created after `since` (another set's first row)?"""
    return bool(
        await tx.fetchval(
            f"""SELECT EXISTS (SELECT 1 FROM {S}.deployments
                                WHERE project_id = $1 AND id = replica_set_id
                                  AND replica_set_id <> $2 AND created_at > $3)""",
            project_id,
            replica_set_id,
            since,
        )
    )


async def unhold(tx: Session, deployment_id: str) -> Deployment:
    """A held replica, now the rollout's to place."""
    row = await tx.fetchrow(
        f"UPDATE {S}.deployments SET held = false WHERE id = $1 RETURNING *", deployment_id
    )
    if row is None:
        raise NotFound(f"deployment {deployment_id!r} does not exist")
    return Deployment.from_row(row)


async def rolling_sets_with_held(s: Session, limit: int = 100) -> list[tuple[str, str]]:
    """(project, replica set) of rolling rollouts with replicas still held, oldest first."""
    rows = await s.fetch(
        f"""SELECT project_id, replica_set_id, min(created_at) AS since
              FROM {S}.deployments WHERE held AND status = 'queued'
             GROUP BY project_id, replica_set_id ORDER BY since LIMIT $1""",
        limit,
    )
    return [(r["project_id"], r["replica_set_id"]) for r in rows]


async def lock_replica_set(tx: Session, replica_set_id: str) -> list[Deployment]:
    """Every deployment of a replica set (replacements included), locked in id order."""
    rows = await tx.fetch(
        f"""SELECT * FROM {S}.deployments WHERE replica_set_id = $1
             ORDER BY id FOR UPDATE""",
        replica_set_id,
    )
    return [Deployment.from_row(r) for r in rows]


async def update_deployment(
    tx: Session,
    deployment_id: str,
    status: DeploymentState,
    *,
    reason: str | None = None,
    exit_code: int | None = None,
    server_id: str | None = None,
    capacity_reserved: bool | None = None,
    env_version: str | None = None,
) -> Deployment:
    """Set the status (and what changes with it); the caller checked the transition."""
    row = await tx.fetchrow(
        f"""UPDATE {S}.deployments
               SET status = $2,
                   status_reason = COALESCE($3, status_reason),
                   exit_code = COALESCE($4, exit_code),
                   server_id = COALESCE($5, server_id),
                   capacity_reserved = COALESCE($6, capacity_reserved),
                   env_version = COALESCE($7, env_version),
                   updated_at = now()
             WHERE id = $1 RETURNING *""",
        deployment_id,
        status.value,
        reason,
        exit_code,
        server_id,
        capacity_reserved,
        env_version,
    )
    if row is None:
        raise NotFound(f"deployment {deployment_id!r} does not exist")
    return Deployment.from_row(row)


async def list_deployments(s: Session, project_id: str, size: int, token: str) -> Page[Deployment]:
    """Newest first; keyset on (created_at, id)."""
    key = decode_page_token(token, (str, str))
    if key:
        created, last_id = key
        after: tuple[datetime | None, str] = (datetime.fromisoformat(created), last_id)
    else:
        after = (None, "")
    rows = await s.fetch(
        f"""SELECT * FROM {S}.deployments
             WHERE project_id = $1
               AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
             ORDER BY created_at DESC, id DESC LIMIT $4""",
        project_id,
        after[0],
        after[1],
        size + 1,
    )
    items = [Deployment.from_row(r) for r in rows[:size]]
    more = len(rows) > size
    token_out = encode_page_token([items[-1].created_at.isoformat(), items[-1].id]) if more else ""
    return Page(items, token_out)


async def project_organization(s: Session, project_id: str) -> str | None:
    """The organization a project's deployments were made in, if it has any."""
    value = await s.fetchval(
        f"SELECT organization_id FROM {S}.deployments WHERE project_id = $1 LIMIT 1", project_id
    )
    return str(value) if value is not None else None


async def last_successful_before(s: Session, current: Deployment) -> Deployment | None:
    """The newest earlier deployment of the project that ran and was replaced normally."""
    row = await s.fetchrow(
        f"""SELECT * FROM {S}.deployments
             WHERE project_id = $1 AND status = 'superseded' AND id <> $2
               AND created_at <= $3
             ORDER BY created_at DESC, id DESC LIMIT 1""",
        current.project_id,
        current.id,
        current.created_at,
    )
    return Deployment.from_row(row) if row else None


async def set_env_version(tx: Session, deployment_id: str, env_version: str) -> None:
    # updated_at stays: it dates the placement, which the start timeout counts from.
    await tx.execute(
        f"UPDATE {S}.deployments SET env_version = $2 WHERE id = $1",
        deployment_id,
        env_version,
    )


async def deployment_ids(
    s: Session, statuses: tuple[DeploymentState, ...], *, project_id: str = "", limit: int = 500
) -> list[str]:
    """Deployments in these states (of one project, if given), oldest first."""
    rows = await s.fetch(
        f"""SELECT id FROM {S}.deployments
             WHERE status = ANY($1::text[]) AND ($2 = '' OR project_id = $2)
             ORDER BY created_at, id LIMIT $3""",
        [state.value for state in statuses],
        project_id,
        limit,
    )
    return [r["id"] for r in rows]


async def deployments_on_down_servers(
    s: Session, statuses: tuple[DeploymentState, ...], limit: int = 500
) -> list[str]:
    """Deployments in these states placed on a server marked down, oldest first."""
    rows = await s.fetch(
        f"""SELECT d.id FROM {S}.deployments d JOIN {S}.servers v ON v.id = d.server_id
             WHERE d.status = ANY($1::text[]) AND v.status = 'down'
             ORDER BY d.created_at, d.id LIMIT $2""",
        [state.value for state in statuses],
        limit,
    )
    return [r["id"] for r in rows]


# ------------------------------------------------------------------ advisory locks


async def try_advisory_xact_lock(tx: Session, key: str) -> bool:
    return bool(await tx.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", key))


async def advisory_xact_lock(tx: Session, key: str) -> None:
    await tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)
