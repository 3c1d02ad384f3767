"""Sleep: the activity heartbeats report, idle containers, projects' sleep settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.runtime.store.records import CONTAINER_LIVE, Container, S
from services.runtime.store.routes import SERVING
from shared.db import Session


async def record_activity(
    s: Session, server_id: str, seen: list[tuple[str, datetime | None, str | None]]
) -> int:
    """What a heartbeat says of its live containers: (id, last request, sleep status), in
    one statement; only rows it changes are written. How many changed."""
    if not seen:
        return 0
    ids, requests, sleeps = (list(column) for column in zip(*seen, strict=True))
    result = await s.execute(
        f"""UPDATE {S}.containers c
               SET last_request_at = GREATEST(c.last_request_at, r.last_request_at),
                   sleep_status = COALESCE(r.sleep_status, c.sleep_status),
                   updated_at = now()
              FROM unnest($2::text[], $3::timestamptz[], $4::text[])
                   AS r(id, last_request_at, sleep_status)
             WHERE c.id = r.id AND c.server_id = $1 AND c.status = ANY($5::text[])
               AND (r.last_request_at > c.last_request_at
                    OR (c.last_request_at IS NULL AND r.last_request_at IS NOT NULL)
                    OR r.sleep_status <> c.sleep_status)""",
        server_id,
        ids,
        requests,
        sleeps,
        list(CONTAINER_LIVE),
    )
    return int(result.split()[-1])


@dataclass(frozen=True)
class IdleContainer:
    container: Container
    agent_address: str
    idle_since: datetime  # its last request, else its start
    organization_id: str = ""


async def idle_containers(s: Session, now: datetime, limit: int) -> list[IdleContainer]:
    """Awake running containers of running deployments with sleep on, idle past their
    deployment's sleep_after_seconds at `now`, longest idle first."""
    rows = await s.fetch(
        f"""SELECT c.*, s.agent_address, i.idle_since, d.organization_id
              FROM {S}.containers c
              JOIN {S}.deployments d ON d.id = c.deployment_id
              JOIN {S}.servers s ON s.id = c.server_id
             CROSS JOIN LATERAL (SELECT COALESCE(c.last_request_at, c.started_at, c.created_at)
                                        AS idle_since) i
             WHERE c.sleep_status = 'awake' AND c.status = 'running' AND c.process_type = 'web'
               AND d.status = 'running' AND d.sleep_after_seconds IS NOT NULL
               AND s.status <> 'down'
               AND i.idle_since < $1::timestamptz - make_interval(secs => d.sleep_after_seconds)
             ORDER BY i.idle_since
             LIMIT $2""",
        now,
        limit,
    )
    return [
        IdleContainer(
            Container.from_row(r), r["agent_address"], r["idle_since"], r["organization_id"]
        )
        for r in rows
    ]


async def set_sleep_after(tx: Session, project_id: str, sleep_after_seconds: int | None) -> int:
    """A project's sleep setting changed: its deployments that have not ended follow it."""
    result = await tx.execute(
        f"""UPDATE {S}.deployments SET sleep_after_seconds = $2, updated_at = now()
             WHERE project_id = $1 AND sleep_after_seconds IS DISTINCT FROM $2
               -- a worker never sleeps for want of requests (only web containers do)
               AND (process_type = 'web' OR processes <> '[]')
               AND status NOT IN ('superseded', 'failed', 'cancelled', 'rolled_back')""",
        project_id,
        sleep_after_seconds,
    )
    return int(result.split()[-1])


@dataclass(frozen=True)
class SleepingContainer:
    container: Container
    agent_address: str
    organization_id: str


async def sleeping_containers(s: Session, project_id: str) -> list[SleepingContainer]:
    """The project's sleeping web containers of the releases that serve it (the routes'
    `sleeping_upstreams`), on servers not down, by id (the order rows are locked in)."""
    rows = await s.fetch(
        f"""SELECT c.*, s.agent_address, d.organization_id
              FROM {S}.containers c
              JOIN {S}.deployments d ON d.id = c.deployment_id
              JOIN {S}.servers s ON s.id = c.server_id
             WHERE d.project_id = $1 AND d.status = ANY($2::text[])
               AND c.process_type = 'web' AND c.status = 'running'
               AND c.sleep_status = 'sleeping' AND s.status <> 'down'
             ORDER BY c.id""",
        project_id,
        list(SERVING),
    )
    return [
        SleepingContainer(Container.from_row(r), r["agent_address"], r["organization_id"])
        for r in rows
    ]
