"""The edge's routes: each project's hostnames (kept from project's events) and the
addresses of the running web containers of its serving deployments (every replica of the
one release that serves: a newer set supersedes them all at once), the sleeping ones apart."""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.store.records import S
from shared.db import Session

# Deployments that serve: the project's in these states (the replicas of one set).
SERVING = ("running", "crash_loop")
# What the newest deployment's status says when nothing serves.
_STARTING = ("queued", "scheduling", "building", "starting")


@dataclass(frozen=True)
class RouteRow:
    project_id: str
    hostnames: tuple[str, ...]  # its generated one, then its verified custom domains
    upstreams: tuple[str, ...]  # awake (or waking: the agent's proxy holds meanwhile)
    unavailable_reason: str  # "" when upstreams or sleeping_upstreams is not empty
    challenges: tuple[tuple[str, str], ...] = ()  # (hostname, token) of pending domains
    sleeping_upstreams: tuple[str, ...] = ()  # asleep: the edge holds and asks WakeRoute
    sleep_enabled: bool = False  # the serving release sleeps when idle


async def set_hostnames(tx: Session, project_id: str, hostnames: list[str]) -> bool:
    """The project's hostnames, as project's newest event says; False when unchanged."""
    row = await tx.fetchrow(
        f"""INSERT INTO {S}.project_routes AS r (project_id, hostnames) VALUES ($1, $2)
            ON CONFLICT (project_id) DO UPDATE SET hostnames = EXCLUDED.hostnames,
                claimed_at = now()
             WHERE r.hostnames IS DISTINCT FROM EXCLUDED.hostnames
            RETURNING project_id""",
        project_id,
        hostnames,
    )
    return row is not None


async def set_domains(
    tx: Session, project_id: str, domains: list[str], challenges: list[dict[str, str]]
) -> None:
    """The project's custom domains, as project's newest project.domains_changed says."""
    await tx.execute(
        f"""INSERT INTO {S}.project_routes AS r (project_id, hostnames, domains, challenges)
            VALUES ($1, '{{}}', $2, $3)
            ON CONFLICT (project_id) DO UPDATE
               SET domains = EXCLUDED.domains, challenges = EXCLUDED.challenges""",
        project_id,
        domains,
        challenges,
    )


async def delete_routes(tx: Session, project_id: str) -> None:
    await tx.execute(f"DELETE FROM {S}.project_routes WHERE project_id = $1", project_id)


async def list_routes(s: Session) -> list[RouteRow]:
    """Every project's route. A hostname two projects claim goes to the earlier claim."""
    rows = await s.fetch(
        f"""SELECT r.project_id, r.hostnames || r.domains AS hostnames, r.challenges,
                   r.claimed_at, newest.status,
                   COALESCE(serving.upstreams, '{{}}') AS upstreams,
                   COALESCE(serving.sleeping, '{{}}') AS sleeping,
                   COALESCE(serving.sleep_enabled, false) AS sleep_enabled
              FROM {S}.project_routes r
              LEFT JOIN LATERAL (
                    SELECT d.status FROM {S}.deployments d
                     WHERE d.project_id = r.project_id
                     ORDER BY d.created_at DESC, d.id DESC LIMIT 1) newest ON true
              LEFT JOIN LATERAL (
                    SELECT array_agg(c.address ORDER BY c.address)
                             FILTER (WHERE c.sleep_status <> 'sleeping') AS upstreams,
                           array_agg(c.address ORDER BY c.address)
                             FILTER (WHERE c.sleep_status = 'sleeping') AS sleeping,
                           -- sleep on, or turned off while a container still sleeps
                           bool_or(d.sleep_after_seconds IS NOT NULL
                                   OR c.sleep_status = 'sleeping') AS sleep_enabled
                      FROM {S}.deployments d
                      JOIN {S}.containers c ON c.deployment_id = d.id
                     WHERE d.project_id = r.project_id AND d.status = ANY($1::text[])
                       AND c.process_type = 'web' AND c.status = 'running'
                       AND c.address <> '') serving ON true
             ORDER BY r.claimed_at, r.project_id""",
        list(SERVING),
    )
    taken: set[str] = set()
    routes = []
    for row in rows:
        hostnames = tuple(h for h in dict.fromkeys(row["hostnames"]) if h not in taken)
        taken.update(hostnames)
        upstreams = tuple(row["upstreams"])
        sleeping = tuple(row["sleeping"])
        challenges = tuple(
            (str(c["hostname"]), str(c["token"]))
            for c in row["challenges"] or ()
            if c.get("hostname") not in taken
        )
        routes.append(
            RouteRow(
                project_id=row["project_id"],
                hostnames=hostnames,
                upstreams=upstreams,
                unavailable_reason="" if upstreams or sleeping else _reason(row["status"]),
                challenges=challenges,
                sleeping_upstreams=sleeping,
                sleep_enabled=row["sleep_enabled"],
            )
        )
    return routes


def _reason(status: str | None) -> str:
    if status is None:
        return "no_deployment"
    if status in _STARTING:
        return "starting"
    if status in SERVING:
        return "no_container"  # it serves, yet no web container is running (restarting)
    return "failed" if status == "failed" else "stopped"
