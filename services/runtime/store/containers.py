"""Containers: their rows, the moves their agents report, and what runtime wants of them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.runtime.domain import DeploymentState
from services.runtime.store.records import (
    CONTAINER_LIVE,
    Container,
    Deployment,
    RestartState,
    S,
)
from shared.db import Session
from shared.ids import new_id
from shared.pagination import Page, decode_page_token, encode_page_token

# Database container states; "stopped" and "failed" are ends.
_CONTAINER_RANK = {"starting": 0, "running": 1, "stopping": 2, "stopped": 3, "failed": 3}


async def container_of(
    s: Session, deployment_id: str, process_type: str | None = None
) -> Container | None:
    """The deployment's newest container (of one process type, when given): the one that
    counts; an older one is a leftover to stop."""
    row = await s.fetchrow(
        f"""SELECT * FROM {S}.containers
             WHERE deployment_id = $1 AND ($2::text IS NULL OR process_type = $2)
             ORDER BY created_at DESC, id DESC LIMIT 1""",
        deployment_id,
        process_type,
    )
    return Container.from_row(row) if row else None


async def newest_containers(s: Session, deployment_id: str) -> dict[str, Container]:
    """The deployment's newest container of each process type it has one of."""
    rows = await s.fetch(
        f"""SELECT DISTINCT ON (process_type) * FROM {S}.containers
             WHERE deployment_id = $1
             ORDER BY process_type, created_at DESC, id DESC""",
        deployment_id,
    )
    return {r["process_type"]: Container.from_row(r) for r in rows}


async def insert_container(
    tx: Session, deployment: Deployment, process_type: str = "web"
) -> Container:
    row = await tx.fetchrow(
        f"""INSERT INTO {S}.containers (id, project_id, deployment_id, server_id, process_type)
            VALUES ($1, $2, $3, $4, $5) RETURNING *""",
        new_id(),
        deployment.project_id,
        deployment.id,
        deployment.server_id,
        process_type,
    )
    assert row is not None
    return Container.from_row(row)


async def get_container(s: Session, container_id: str) -> Container | None:
    row = await s.fetchrow(f"SELECT * FROM {S}.containers WHERE id = $1", container_id)
    return Container.from_row(row) if row else None


async def lock_container(tx: Session, container_id: str) -> Container | None:
    row = await tx.fetchrow(f"SELECT * FROM {S}.containers WHERE id = $1 FOR UPDATE", container_id)
    return Container.from_row(row) if row else None


async def update_container(
    tx: Session,
    container_id: str,
    *,
    status: str | None = None,
    address: str | None = None,
    pid: int | None = None,
    exit_code: int | None = None,
    started_at: datetime | None = None,
    last_request_at: datetime | None = None,
    sleep_status: str | None = None,
    restarts: RestartState | None = None,
) -> Container | None:
    """Move a container forward; a report older than what is recorded changes no status.
    A restart (a higher restart count) starts its life over: starting again after running."""
    current = await lock_container(tx, container_id)
    if current is None:
        return None
    new_status = current.status
    restarted = restarts is not None and restarts.count > current.restart_count
    if status is not None and (
        _CONTAINER_RANK[status] > _CONTAINER_RANK[current.status]
        or (restarted and current.live and status in CONTAINER_LIVE)
    ):
        new_status = status
    if restarts is not None and restarts.count < current.restart_count:
        restarts = None  # an older report: what is recorded stands
    ended_now = new_status in ("stopped", "failed") and current.live
    row = await tx.fetchrow(
        f"""UPDATE {S}.containers
               SET status = $2,
                   address = COALESCE($3, address),
                   pid = COALESCE($4, pid),
                   exit_code = COALESCE($5, exit_code),
                   started_at = COALESCE(started_at, $6),
                   last_request_at = GREATEST(last_request_at, $7),
                   stopped_at = CASE WHEN $8 THEN now() ELSE stopped_at END,
                   sleep_status = COALESCE($9, sleep_status),
                   restart_count = COALESCE($10, restart_count),
                   crash_loop = COALESCE($11, crash_loop),
                   last_exit_reason = COALESCE(NULLIF($12, ''), last_exit_reason),
                   updated_at = now()
             WHERE id = $1 RETURNING *""",
        container_id,
        new_status,
        address,
        pid,
        exit_code,
        started_at,
        last_request_at,
        ended_now,
        sleep_status,
        restarts.count if restarts is not None else None,
        restarts.crash_loop if restarts is not None else None,
        restarts.last_exit_reason if restarts is not None else None,
    )
    assert row is not None
    return Container.from_row(row)


async def list_containers(s: Session, project_id: str, size: int, token: str) -> Page[Container]:
    """A project's live containers (starting, running, stopping; awake or asleep), by id."""
    key = decode_page_token(token, (str,))
    after = key[0] if key else ""
    rows = await s.fetch(
        f"""SELECT * FROM {S}.containers
             WHERE project_id = $1 AND status = ANY($2::text[]) AND id > $3
             ORDER BY id LIMIT $4""",
        project_id,
        list(CONTAINER_LIVE),
        after,
        size + 1,
    )
    items = [Container.from_row(r) for r in rows[:size]]
    return Page(items, encode_page_token([items[-1].id]) if len(rows) > size else "")


# A replaced deployment (superseded, rolled back) drains: it ended when its successor took
# over, and its containers serve what is in flight for the drain time before they stop.
REPLACED = ("superseded", "rolled_back")


def _draining(statuses: str, seconds: str) -> str:
    """SQL: deployment d was replaced (its status among the $`statuses` parameter) less
    than the $`seconds` parameter ago."""
    return f"""(d.status = ANY({statuses}::text[])
               AND d.updated_at > now() - make_interval(secs => {seconds}))"""


async def containers_to_stop(
    s: Session, drain_seconds: float = 0.0, limit: int = 200
) -> list[tuple[Container, str]]:
    """Live containers whose deployment has ended (a replaced one: `drain_seconds` ago),
    with their agent's address; none on a server marked down (its agent does not answer;
    they are stopped once it beats again)."""
    rows = await s.fetch(
        f"""SELECT c.*, s.agent_address FROM {S}.containers c
              JOIN {S}.deployments d ON d.id = c.deployment_id
              JOIN {S}.servers s ON s.id = c.server_id
             WHERE c.status = ANY($1::text[]) AND s.status <> 'down'
               AND d.status IN ('superseded', 'failed', 'cancelled', 'rolled_back')
               AND NOT {_draining("$3", "$4")}
             ORDER BY c.created_at LIMIT $2""",
        list(CONTAINER_LIVE),
        limit,
        list(REPLACED),
        drain_seconds,
    )
    return [(Container.from_row(r), r["agent_address"]) for r in rows]


async def deployments_on_agents(
    s: Session, statuses: tuple[DeploymentState, ...], settled_seconds: float
) -> list[tuple[str, str, str, str]]:
    """(deployment id, container id, server id, agent address) of deployments in these states
    unchanged for `settled_seconds`, on servers that are not down."""
    rows = await s.fetch(
        f"""SELECT d.id, c.id AS container_id, d.server_id, s.agent_address
              FROM {S}.deployments d
              JOIN {S}.servers s ON s.id = d.server_id
              LEFT JOIN LATERAL (SELECT DISTINCT ON (process_type) id FROM {S}.containers
                                  WHERE deployment_id = d.id
                                  ORDER BY process_type, created_at DESC, id DESC) c ON true
             WHERE d.status = ANY($1::text[]) AND s.status <> 'down'
               AND d.updated_at < now() - make_interval(secs => $2)
             ORDER BY d.server_id, d.id""",
        [state.value for state in statuses],
        settled_seconds,
    )
    return [(r["id"], r["container_id"] or "", r["server_id"], r["agent_address"]) for r in rows]


async def container_statuses(
    s: Session, container_ids: list[str]
) -> dict[str, tuple[str, RestartState]]:
    """What is recorded of these containers: status, and restarts as last reported."""
    rows = await s.fetch(
        f"""SELECT id, status, restart_count, crash_loop, last_exit_reason
              FROM {S}.containers WHERE id = ANY($1::text[])""",
        container_ids,
    )
    return {
        r["id"]: (
            r["status"],
            RestartState(r["restart_count"], r["crash_loop"], r["last_exit_reason"] or ""),
        )
        for r in rows
    }


@dataclass(frozen=True)
class ContainerClaim:
    """What runtime wants of a container an agent runs: its row, its deployment's status,
    and whether it is that deployment's newest container."""

    container: Container
    deployment_status: DeploymentState
    newest: bool
    draining: bool = False  # its deployment was replaced less than the drain time ago


async def container_claims(
    s: Session, container_ids: list[str], drain_seconds: float = 0.0
) -> dict[str, ContainerClaim]:
    """The claims on these containers; an id runtime has no row for is absent."""
    rows = await s.fetch(
        f"""SELECT c.*, d.status AS deployment_status,
                   c.id = (SELECT n.id FROM {S}.containers n
                            WHERE n.deployment_id = d.id AND n.process_type = c.process_type
                            ORDER BY n.created_at DESC, n.id DESC LIMIT 1) AS newest,
                   {_draining("$2", "$3")} AS draining
              FROM {S}.containers c
              JOIN {S}.deployments d ON d.id = c.deployment_id
             WHERE c.id = ANY($1::text[])""",
        container_ids,
        list(REPLACED),
        drain_seconds,
    )
    return {
        r["id"]: ContainerClaim(
            Container.from_row(r),
            DeploymentState(r["deployment_status"]),
            bool(r["newest"]),
            bool(r["draining"]),
        )
        for r in rows
    }
