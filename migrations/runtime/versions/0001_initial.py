"""runtime: servers, deployments, containers, partitioned logs and metrics, outbox

Revision ID: runtime_0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from shared.migrate import execute_all, outbox_ddl, outbox_drop_ddl

revision = "runtime_0001"
down_revision = None
branch_labels = None
depends_on = None

DEPLOYMENT_STATES = (
    "'queued', 'scheduling', 'starting', 'running', "
    "'superseded', 'failed', 'cancelled', 'rolled_back'"
)

UPGRADE = [
    # Capacity and reserved counters: the scheduler reserves with one conditional UPDATE;
    # the CHECKs make over-commit impossible even for a buggy caller.
    """CREATE TABLE runtime.servers (
        id                  text PRIMARY KEY,
        name                text NOT NULL,
        region              text NOT NULL,
        agent_address       text NOT NULL,
        drivers             text[] NOT NULL DEFAULT ARRAY['process']::text[],
        ram_mb              integer NOT NULL,
        cpu_millis          integer NOT NULL,
        ram_mb_reserved     integer NOT NULL DEFAULT 0,
        cpu_millis_reserved integer NOT NULL DEFAULT 0,
        status              text NOT NULL DEFAULT 'active',
        last_heartbeat_at   timestamptz,
        created_at          timestamptz NOT NULL DEFAULT now(),
        updated_at          timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_servers_status CHECK (status IN ('active', 'draining', 'down')),
        CONSTRAINT ck_servers_capacity CHECK (ram_mb > 0 AND cpu_millis > 0),
        CONSTRAINT ck_servers_ram_mb_reserved CHECK (ram_mb_reserved BETWEEN 0 AND ram_mb),
        CONSTRAINT ck_servers_cpu_millis_reserved
            CHECK (cpu_millis_reserved BETWEEN 0 AND cpu_millis),
        CONSTRAINT uq_servers_name UNIQUE (name)
    )""",
    "CREATE INDEX ix_servers_status_region ON runtime.servers (status, region)",
    # project_id / organization_id are plain ids (project's and identity's). The spec
    # (image or command, resources, region, health check) is copied from the project at
    # creation so that a rollback can re-run it. capacity_reserved flips in the same
    # transaction as the server's counters: invariant, per server,
    # reserved counters = sum over its deployments WHERE capacity_reserved.
    f"""CREATE TABLE runtime.deployments (
        id                text PRIMARY KEY,
        project_id        text NOT NULL,
        organization_id   text NOT NULL,
        server_id         text REFERENCES runtime.servers (id),
        status            text NOT NULL DEFAULT 'queued',
        capacity_reserved boolean NOT NULL DEFAULT false,
        image             text,
        command           text,
        ram_mb            integer NOT NULL,
        cpu_millis        integer NOT NULL,
        region            text NOT NULL,
        health_check_path text,
        env_version       text,               -- ResolveSecrets' version hash, never values
        exit_code         integer,
        status_reason     text,
        rolled_back_from  text REFERENCES runtime.deployments (id) ON DELETE SET NULL,
        schedule_deadline timestamptz,        -- queued until then, then failed
        created_at        timestamptz NOT NULL DEFAULT now(),
        updated_at        timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_deployments_status CHECK (status IN ({DEPLOYMENT_STATES})),
        CONSTRAINT ck_deployments_image_or_command CHECK (num_nonnulls(image, command) = 1),
        CONSTRAINT ck_deployments_resources CHECK (ram_mb > 0 AND cpu_millis > 0),
        CONSTRAINT ck_deployments_reserved_has_server
            CHECK (NOT capacity_reserved OR server_id IS NOT NULL)
    )""",
    """CREATE INDEX ix_deployments_project_id_created_at
        ON runtime.deployments (project_id, created_at)""",
    "CREATE INDEX ix_deployments_server_id_status ON runtime.deployments (server_id, status)",
    "CREATE INDEX ix_deployments_status_created_at ON runtime.deployments (status, created_at)",
    # At most one running deployment per project: supersede the old one first.
    """CREATE UNIQUE INDEX uq_deployments_project_id_running
        ON runtime.deployments (project_id) WHERE status = 'running'""",
    """CREATE TABLE runtime.containers (
        id              text PRIMARY KEY,
        project_id      text NOT NULL,
        deployment_id   text NOT NULL REFERENCES runtime.deployments (id) ON DELETE CASCADE,
        server_id       text NOT NULL REFERENCES runtime.servers (id),
        status          text NOT NULL DEFAULT 'starting',
        sleep_status    text NOT NULL DEFAULT 'awake',
        address         text,                 -- host:port the app listens on
        pid             integer,
        exit_code       integer,
        last_request_at timestamptz,
        started_at      timestamptz,
        stopped_at      timestamptz,
        created_at      timestamptz NOT NULL DEFAULT now(),
        updated_at      timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_containers_status
            CHECK (status IN ('starting', 'running', 'stopping', 'stopped', 'failed')),
        CONSTRAINT ck_containers_sleep_status
            CHECK (sleep_status IN ('awake', 'sleeping', 'waking'))
    )""",
    "CREATE INDEX ix_containers_project_id_status ON runtime.containers (project_id, status)",
    "CREATE INDEX ix_containers_server_id_status ON runtime.containers (server_id, status)",
    """CREATE INDEX ix_containers_sleep_status_last_request_at
        ON runtime.containers (sleep_status, last_request_at)""",
    "CREATE INDEX ix_containers_deployment_id ON runtime.containers (deployment_id)",
    # Telemetry: daily range partitions (UTC), created ahead and dropped past retention by
    # the functions below. No default partition: a row outside every partition is refused.
    # No foreign keys (retention drops whole partitions); ids link to the rows above.
    """CREATE TABLE runtime.logs (
        project_id    text NOT NULL,
        deployment_id text NOT NULL,
        container_id  text NOT NULL,
        stream        text NOT NULL,
        line          text NOT NULL,
        emitted_at    timestamptz NOT NULL,
        received_at   timestamptz NOT NULL DEFAULT now(),
        sequence      bigint NOT NULL,        -- per container, from the agent
        CONSTRAINT ck_logs_stream CHECK (stream IN ('stdout', 'stderr', 'system'))
    ) PARTITION BY RANGE (emitted_at)""",
    "CREATE INDEX ix_logs_project_id_emitted_at ON runtime.logs (project_id, emitted_at)",
    # Container samples carry project/deployment/container; server totals only server_id.
    """CREATE TABLE runtime.metrics (
        project_id    text,
        deployment_id text,
        container_id  text,
        server_id     text NOT NULL,
        metric        text NOT NULL,
        value         double precision NOT NULL,
        sampled_at    timestamptz NOT NULL,
        CONSTRAINT ck_metrics_container_has_project
            CHECK (container_id IS NULL OR project_id IS NOT NULL)
    ) PARTITION BY RANGE (sampled_at)""",
    """CREATE INDEX ix_metrics_project_id_metric_sampled_at
        ON runtime.metrics (project_id, metric, sampled_at)""",
    """CREATE INDEX ix_metrics_server_id_metric_sampled_at
        ON runtime.metrics (server_id, metric, sampled_at)""",
    # SECURITY DEFINER: they run as hangar_migrator, the owner, so the runtime role can roll
    # partitions without owning (or being able to alter) the tables. New partitions get the
    # schema's default privileges. An advisory lock serializes replicas.
    """CREATE FUNCTION runtime.ensure_partitions(days_ahead integer DEFAULT 7)
        RETURNS SETOF text
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO'
    AS $$
    DECLARE
        day    date;
        parent text;
        part   text;
    BEGIN
        IF days_ahead IS NULL OR days_ahead < 0 OR days_ahead > 366 THEN
            RAISE EXCEPTION 'days_ahead must be between 0 and 366, not %', days_ahead;
        END IF;
        PERFORM pg_advisory_xact_lock(hashtext('runtime.partitions'));
        FOR offset_days IN -1 .. days_ahead LOOP
            day := current_date + offset_days;          -- the UTC date (TimeZone above)
            FOREACH parent IN ARRAY ARRAY['logs', 'metrics'] LOOP
                part := parent || '_p' || to_char(day, 'YYYYMMDD');
                IF to_regclass('runtime.' || part) IS NULL THEN
                    EXECUTE format('CREATE TABLE runtime.%I PARTITION OF runtime.%I '
                                   'FOR VALUES FROM (%L) TO (%L)',
                                   part, parent, day::timestamptz, (day + 1)::timestamptz);
                    RETURN NEXT part;
                END IF;
            END LOOP;
        END LOOP;
    END $$""",
    """CREATE FUNCTION runtime.drop_partitions_before(cutoff date)
        RETURNS SETOF text
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        part text;
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtext('runtime.partitions'));
        FOR part IN
            SELECT c.relname::text
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent IN ('runtime.logs'::regclass, 'runtime.metrics'::regclass)
              AND c.relname ~ '^(logs|metrics)_p[0-9]{8}$'
              AND to_date(right(c.relname, 8), 'YYYYMMDD') < cutoff
            ORDER BY c.relname
        LOOP
            EXECUTE format('DROP TABLE runtime.%I', part);
            RETURN NEXT part;
        END LOOP;
    END $$""",
    "REVOKE EXECUTE ON FUNCTION runtime.ensure_partitions(integer) FROM PUBLIC",
    "REVOKE EXECUTE ON FUNCTION runtime.drop_partitions_before(date) FROM PUBLIC",
    "GRANT EXECUTE ON FUNCTION runtime.ensure_partitions(integer) TO hangar_runtime",
    "GRANT EXECUTE ON FUNCTION runtime.drop_partitions_before(date) TO hangar_runtime",
    "SELECT count(*) FROM runtime.ensure_partitions(7)",
    *outbox_ddl("runtime"),
]

DOWNGRADE = [
    *outbox_drop_ddl("runtime"),
    "DROP FUNCTION runtime.drop_partitions_before(date)",
    "DROP FUNCTION runtime.ensure_partitions(integer)",
    "DROP TABLE runtime.metrics",  # with its partitions
    "DROP TABLE runtime.logs",
    "DROP TABLE runtime.containers",
    "DROP TABLE runtime.deployments",
    "DROP TABLE runtime.servers",
]


upgrade = execute_all(UPGRADE)
downgrade = execute_all(DOWNGRADE)
