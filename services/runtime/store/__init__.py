"""Runtime's tables and queries: the only SQL in runtime, one module per concern.

records      the rows as Python (Server, Deployment, Container, ...)
servers      registration, liveness, the reconciler's books
placement    reserving and releasing capacity; placing or creating a deployment in one statement
deployments  deployment rows, status moves, listings, advisory locks
containers   container rows and what their agents report
sleep        activity, idle containers, projects' sleep settings
sources      uploaded sources, the slugs built from them
routes       the edge's routes: projects' hostnames and their serving containers

Statements are SQL text (asyncpg `$n` parameters), as in billing: the capacity arithmetic is
a handful of single statements whose exact shape (row locks, conditional updates, CTEs) is
the point, and they read more plainly as SQL than as expression trees.

Lock order, so that nothing deadlocks: project advisory lock (mark_running only) ->
deployment rows -> one server row. The reconciler locks servers only, in id order.

Callers use the package (`from services.runtime import store; store.get_deployment(...)`):
this module re-exports every name the single-file store had.
"""

from __future__ import annotations

from services.runtime.store.containers import (
    ContainerClaim,
    container_claims,
    container_of,
    container_statuses,
    containers_to_stop,
    deployments_on_agents,
    get_container,
    insert_container,
    list_containers,
    lock_container,
    newest_containers,
    update_container,
)
from services.runtime.store.deployments import (
    advisory_xact_lock,
    claim_queued,
    deployment_ids,
    deployments_on_down_servers,
    get_deployment,
    insert_deployment,
    last_successful_before,
    list_deployments,
    lock_deployment,
    lock_replica_set,
    lock_serving_of_project,
    newer_set_exists,
    project_organization,
    rolling_sets_with_held,
    set_env_version,
    try_advisory_xact_lock,
    unhold,
    update_deployment,
)
from services.runtime.store.placement import (
    Placement,
    create_deployment,
    place_deployment,
    release_capacity,
    reserve_capacity,
    set_waiting_reason,
)
from services.runtime.store.records import (
    CONTAINER_LIVE,
    Container,
    Deployment,
    DeploymentSpec,
    RestartState,
    S,
    Server,
    Source,
)
from services.runtime.store.routes import (
    RouteRow,
    delete_routes,
    list_routes,
    set_domains,
    set_hostnames,
)
from services.runtime.store.servers import (
    Reservations,
    agents_heard_from,
    any_active_sandbox_server,
    find_server,
    get_server,
    insert_server,
    list_servers,
    lock_servers,
    mark_silent_servers_down,
    record_heartbeat,
    reservations,
    set_reserved,
    set_server_status,
    set_tenant,
    upsert_local_server,
)
from services.runtime.store.sleep import (
    IdleContainer,
    SleepingContainer,
    idle_containers,
    record_activity,
    set_sleep_after,
    sleeping_containers,
)
from services.runtime.store.sources import (
    artifact_known,
    decided_in_set,
    find_source,
    list_sources,
    record_built,
    record_source,
)

__all__ = [
    "CONTAINER_LIVE",
    "Container",
    "ContainerClaim",
    "Deployment",
    "DeploymentSpec",
    "IdleContainer",
    "Placement",
    "Reservations",
    "RestartState",
    "RouteRow",
    "S",
    "Server",
    "SleepingContainer",
    "Source",
    "advisory_xact_lock",
    "agents_heard_from",
    "any_active_sandbox_server",
    "artifact_known",
    "claim_queued",
    "container_claims",
    "container_of",
    "container_statuses",
    "containers_to_stop",
    "create_deployment",
    "decided_in_set",
    "delete_routes",
    "deployment_ids",
    "deployments_on_agents",
    "deployments_on_down_servers",
    "find_server",
    "find_source",
    "get_container",
    "get_deployment",
    "get_server",
    "idle_containers",
    "insert_container",
    "insert_deployment",
    "insert_server",
    "last_successful_before",
    "list_containers",
    "list_deployments",
    "list_routes",
    "list_servers",
    "list_sources",
    "lock_container",
    "lock_deployment",
    "lock_replica_set",
    "lock_servers",
    "lock_serving_of_project",
    "mark_silent_servers_down",
    "newer_set_exists",
    "newest_containers",
    "place_deployment",
    "project_organization",
    "record_activity",
    "record_built",
    "record_heartbeat",
    "record_source",
    "release_capacity",
    "reservations",
    "reserve_capacity",
    "rolling_sets_with_held",
    "set_domains",
    "set_env_version",
    "set_hostnames",
    "set_reserved",
    "set_server_status",
    "set_sleep_after",
    "set_tenant",
    "set_waiting_reason",
    "sleeping_containers",
    "try_advisory_xact_lock",
    "unhold",
    "update_container",
    "update_deployment",
    "upsert_local_server",
]
