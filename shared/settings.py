"""Typed settings, read once from the environment at process start."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

SERVICES = ("identity", "project", "runtime", "billing")

DEFAULT_PORTS = {
    "identity": 50051,
    "project": 50052,
    "runtime": 50053,
    "billing": 50054,
    "agent": 50060,
    "gateway": 8080,
    "edge": 8000,  # apps' public HTTP: http://<project>-<org>.localhost:8000
}


def role_name(service: str) -> str:
    """The PostgreSQL login role of a service: it may touch only its own schema."""
    return f"hangar_{service}"


MIGRATOR_ROLE = "hangar_migrator"


def url_with_credentials(url: str, user: str, password: str) -> str:
    """The same database URL, logging in as another role."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    return urlunsplit((parts.scheme, f"{auth}@{host}", parts.path, parts.query, parts.fragment))


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 key that signs (or, once retired, only verifies) access tokens."""

    kid: str
    private_key_pem: str = field(repr=False)


@dataclass(frozen=True)
class OAuthProvider:
    """An OpenID Connect provider: whose id_tokens LoginWithOAuth accepts."""

    issuer: str
    client_id: str
    jwks_url: str = ""  # fetched over HTTP(S) and cached ...
    jwks: dict[str, object] | None = None  # ... or given inline (local test issuers)
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    # Where a browser is sent to sign in (the dashboard's button); empty: not listed there.
    authorization_endpoint: str = ""
    label: str = ""  # the button's name for it; empty: the provider's key
    scopes: tuple[str, ...] = ("openid", "email")


def default_data_dir(name: str) -> str:
    """/var/lib/hangar/<name> for root; the user's own state directory otherwise."""
    if os.geteuid() == 0:
        return f"/var/lib/hangar/{name}"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local/state")
    return os.path.join(base, "hangar", name)


def default_agent_state_dir() -> str:
    """/var/lib/hangar/agent for root (the container driver needs root); a user's own state
    directory otherwise, so an agent started without HANGAR_AGENT_STATE_DIR can write it."""
    return default_data_dir("agent")


def _signing_keys(text: str) -> tuple[SigningKey, ...]:
    """HANGAR_JWT_SIGNING_KEYS: JSON [{"kid", "private_key_pem"}]; the first one signs."""
    if not text:
        return ()
    return tuple(SigningKey(k["kid"], k["private_key_pem"]) for k in json.loads(text))


def _oauth_providers(text: str) -> dict[str, OAuthProvider]:
    """HANGAR_OAUTH_PROVIDERS: JSON {"google": {"issuer", "client_id", "jwks_url"|"jwks"}},
    optionally "algorithms", "authorization_endpoint", "label" and "scopes" too."""
    if not text:
        return {}
    providers = {}
    for name, spec in json.loads(text).items():
        algorithms = tuple(spec.get("algorithms") or OAuthProvider.algorithms)
        providers[name] = OAuthProvider(
            issuer=spec["issuer"],
            client_id=spec["client_id"],
            jwks_url=spec.get("jwks_url", ""),
            jwks=spec.get("jwks"),
            algorithms=algorithms,
            authorization_endpoint=spec.get("authorization_endpoint", ""),
            label=spec.get("label", ""),
            scopes=tuple(_words(spec.get("scopes")) or OAuthProvider.scopes),
        )
    return providers


def _words(value: object) -> list[str]:
    """A list of strings, or one string of space-separated words (as OAuth writes scopes)."""
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value] if isinstance(value, list) else []


def _master_keys(text: str) -> dict[str, bytes]:
    """HANGAR_PROJECT_MASTER_KEYS: JSON {"key id": "<base64 of 32 bytes>"} (project secrets)."""
    if not text:
        return {}
    keys = {kid: base64.b64decode(value) for kid, value in json.loads(text).items()}
    for kid, key in keys.items():
        if len(key) != 32:
            raise ValueError(f"master key {kid!r} must be 32 bytes, not {len(key)}")
    return keys


def _string_map(text: str, name: str) -> dict[str, str]:
    """A JSON object of strings, e.g. HANGAR_STRIPE_PRICES={"pro": "price_123"}."""
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
    ):
        raise ValueError(f"{name} must be a JSON object of non-empty strings")
    return dict(value)


@dataclass(frozen=True)
class TlsFiles:
    """Where a process finds its mutual-TLS files (shared.tls): the CA bundle it trusts, its
    certificate chain and its key. All empty: plaintext. HANGAR_TLS_DIR names a directory in
    the kubernetes.io/tls layout (ca.crt, tls.crt, tls.key); HANGAR_TLS_*_FILE override it."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_env(cls) -> TlsFiles:
        directory = _env("HANGAR_TLS_DIR")

        def inside(name: str) -> str:
            return os.path.join(directory, name) if directory else ""

        return cls(
            ca_file=_env("HANGAR_TLS_CA_FILE") or inside("ca.crt"),
            cert_file=_env("HANGAR_TLS_CERT_FILE") or inside("tls.crt"),
            key_file=_env("HANGAR_TLS_KEY_FILE") or inside("tls.key"),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file)


@dataclass(frozen=True)
class Settings:
    """Everything a Hangar process reads from its environment, in one place."""

    service: str
    database_url: str = ""  # the admin URL; services log in with their own role (below)
    db_passwords: dict[str, str] = field(default_factory=dict, repr=False)
    # Where this process reaches each process: HANGAR_<NAME>_TARGETS when set (a service's
    # replicas, "127.0.0.1:50052,127.0.0.1:50062": shared.clients balances over them), else
    # HANGAR_<NAME>_ADDR.
    addresses: dict[str, str] = field(default_factory=dict)
    # Where this process listens when HANGAR_<SERVICE>_TARGETS lists its service's replicas
    # for clients: its own HANGAR_<SERVICE>_ADDR. Empty: addresses[service], as without.
    own_address: str = ""
    log_level: str = "INFO"
    # GET /metrics (Prometheus) on this "host:port" (HANGAR_<PROCESS>_METRICS_ADDR); empty: off.
    metrics_address: str = ""
    grace_seconds: float = 5.0
    call_timeout_seconds: float = 5.0
    # Mutual TLS on every gRPC server and channel of this process (shared.tls); off: plaintext.
    tls: TlsFiles = field(default_factory=TlsFiles)
    service_secrets: dict[str, str] = field(default_factory=dict, repr=False)
    # Tokens (identity signs; every service verifies against identity's JWKS).
    jwt_issuer: str = "hangar-identity"
    jwt_audience: str = "hangar"
    jwt_signing_keys: tuple[SigningKey, ...] = field(default=(), repr=False)
    access_token_ttl_seconds: int = 900
    refresh_token_ttl_seconds: int = 30 * 86400
    # How often identity deletes dead refresh-token families and stale login-throttle rows.
    identity_cleanup_seconds: float = 3600.0
    service_token_ttl_seconds: int = 600
    oauth_providers: dict[str, OAuthProvider] = field(default_factory=dict)
    # argon2id cost; never below the floor (19 MiB, t=2, p=1), see identity.passwords.
    argon2_time_cost: int = 2
    argon2_memory_kib: int = 19456
    argon2_parallelism: int = 1
    # The hashing pool: threads (0: one per CPU), how many may wait for one (0: 64 a thread),
    # and how long a request may wait before it is refused with RESOURCE_EXHAUSTED.
    identity_hash_workers: int = 0
    identity_hash_queue: int = 0
    identity_hash_wait_seconds: float = 2.0
    # WatchAccess: a watcher's lease on its caches, and how long a change waits for every
    # watcher to acknowledge before cutting a laggard off (then waiting out its lease).
    access_lease_seconds: float = 3.0
    access_ack_timeout_seconds: float = 2.0
    # Stripe (billing): without an API key invoices are computed and stored, not sent.
    stripe_api_key: str = field(default="", repr=False)
    stripe_api_base: str = ""  # empty: Stripe's own; tests point it at localstripe
    stripe_webhook_secret: str = field(default="", repr=False)
    billing_cycle_seconds: float = 60.0
    # Hangar plan id -> Stripe Price id (HANGAR_STRIPE_PRICES, JSON). A plan not listed gets
    # a Stripe Product + Plan created at billing's start, idempotently (deterministic ids).
    stripe_prices: dict[str, str] = field(default_factory=dict)
    # A failed invoice send is retried after base x 2^(attempts-1) seconds, at most max.
    billing_send_retry_base_seconds: float = 60.0
    billing_send_retry_max_seconds: float = 6 * 3600.0
    # Runtime: how long a deployment may wait queued for room, how often queued ones are
    # retried, and how often the reconciler checks the reserved counters.
    runtime_schedule_timeout_seconds: float = 600.0
    runtime_schedule_retry_seconds: float = 2.0
    runtime_reconcile_seconds: float = 30.0
    # Runtime <-> agents: how often the deploy sweep retries starts and stops, how long a
    # placed deployment may wait for its agent to take it, and silence before a server is down.
    runtime_agent_sweep_seconds: float = 5.0
    runtime_start_timeout_seconds: float = 120.0
    runtime_heartbeat_timeout_seconds: float = 30.0
    # A replaced deployment's containers keep serving this long after the new one took over
    # (the edge has switched by then; requests in flight finish), then they are stopped.
    runtime_drain_seconds: float = 10.0
    # How often the sleep controller looks for idle containers of projects with sleep on.
    runtime_sleep_check_seconds: float = 10.0
    # Agent (runs apps on one server): the host apps are reached on, how long an app has
    # to answer its health check, SIGTERM -> SIGKILL grace, log lines kept per container.
    agent_app_host: str = "127.0.0.1"
    agent_start_timeout_seconds: float = 30.0
    agent_stop_grace_seconds: float = 10.0
    agent_log_buffer_lines: int = 5000
    # The server this agent is registered as in runtime (id or name; empty: the hostname),
    # and how often it heartbeats.
    agent_server: str = ""
    agent_heartbeat_seconds: float = 5.0
    # How the agent runs apps: "container" (runc: isolated, limits enforced), "process"
    # (plain processes: development machines only, nothing isolated), or "auto" (container
    # wherever runc, slirp4netns and tini can run, else process, said loudly at start).
    agent_driver: str = "auto"
    # Container driver: bundles, network namespaces and the per-project uid table live here.
    agent_state_dir: str = "/var/lib/hangar/agent"
    agent_pids_limit: int = 256
    agent_tmpfs_mb: int = 64  # each of /tmp and $HOME
    # A sleeping container is first frozen (memory kept, woken in milliseconds); frozen this
    # long, it is stopped for good (woken by starting it again). 0: stop at once.
    agent_freeze_seconds: float = 600.0
    # An app that ends on its own after it was healthy is started again (per its project's
    # restart policy) after a back-off that doubles from the first to the max; a run healthy
    # for `stable` seconds resets it. This many quick crashes in a row make a crash loop.
    agent_restart_backoff_seconds: float = 1.0
    agent_restart_max_backoff_seconds: float = 60.0
    agent_restart_stable_seconds: float = 30.0
    agent_crash_loop_restarts: int = 5
    # Runtime places one organization's apps on a server without isolation only if it runs
    # no other organization's app, unless the whole platform is one tenant's (development).
    single_tenant: bool = False
    # The edge (its HTTP listener is addresses["edge"]): the domain projects' generated
    # hostnames are under, its HTTPS port (Caddy's local CA for localhost names, ACME
    # otherwise), and Caddy's admin API (loopback).
    apps_domain: str = "localhost"
    edge_https_port: int = 8443
    edge_admin_address: str = "127.0.0.1:2019"
    # Where a custom domain's check connects ("host:port"), instead of the name itself on port
    # 80: a private edge, or the tests' loopback one. Empty: the name, public addresses only.
    domain_check_address: str = ""
    # Telemetry. Agent: metric sampling interval, lines per ShipLogs batch, metric samples
    # kept while runtime is away. Runtime: days of logs/metrics kept and partitions made
    # ahead, how often partitions roll, the usage window, how late samples may arrive
    # before their window is billed, and how often usage is computed and sent.
    telemetry_sample_seconds: float = 5.0
    telemetry_ship_batch_lines: int = 2000
    telemetry_metric_buffer_samples: int = 20_000
    telemetry_retention_days: int = 7
    telemetry_partitions_ahead_days: int = 7
    telemetry_maintenance_seconds: float = 600.0
    telemetry_usage_window_seconds: float = 60.0
    telemetry_usage_lateness_seconds: float = 60.0
    telemetry_usage_seconds: float = 15.0
    # Project secrets: master keys (key id -> 32 bytes) wrap each project's data key; new
    # data keys are wrapped under the active id (default: the first key listed).
    project_master_keys: dict[str, bytes] = field(default_factory=dict, repr=False)
    project_master_key_id: str = ""
    project_reconcile_seconds: float = 30.0
    # Uploaded sources and built slugs, by sha256: a local directory unless an S3 bucket is
    # set (an S3-compatible server's URL in artifacts_s3_endpoint). The largest upload taken.
    artifacts_dir: str = field(default_factory=lambda: default_data_dir("artifacts"))
    artifacts_s3_bucket: str = ""
    artifacts_s3_endpoint: str = ""
    max_source_bytes: int = 200 * 1024 * 1024
    # How long a build (or an image's pull) may take before it is stopped (and its
    # deployment fails).
    agent_build_timeout_seconds: float = 900.0
    # Registries ("host:port") the agent pulls images from over plain HTTP (or without
    # checking their TLS certificate): a registry of one's own on a private network.
    agent_insecure_registries: tuple[str, ...] = ()
    # Images and slugs no container runs stay on the server this long (a rollback or a
    # redeploy soon after starts at once), then are removed.
    agent_keep_unused_images_seconds: float = 3600.0

    @classmethod
    def from_env(cls, service: str) -> Settings:
        own = {
            name: _env(f"HANGAR_{name.upper()}_ADDR", f"127.0.0.1:{port}")
            for name, port in DEFAULT_PORTS.items()
        }
        addresses = {name: _env(f"HANGAR_{name.upper()}_TARGETS") or own[name] for name in own}
        return cls(
            service=service,
            database_url=_env("DATABASE_URL"),
            db_passwords={s: _env(f"HANGAR_{s.upper()}_DB_PASSWORD") for s in SERVICES},
            addresses=addresses,
            own_address=own.get(service, "") if _env(f"HANGAR_{service.upper()}_TARGETS") else "",
            log_level=_env("HANGAR_LOG_LEVEL", "INFO"),
            metrics_address=_env(f"HANGAR_{service.upper()}_METRICS_ADDR"),
            grace_seconds=float(_env("HANGAR_GRACE_SECONDS", "5")),
            call_timeout_seconds=float(_env("HANGAR_CALL_TIMEOUT_SECONDS", "5")),
            tls=TlsFiles.from_env(),
            service_secrets={
                s: _env(f"HANGAR_{s.upper()}_SERVICE_SECRET") for s in (*SERVICES, "agent", "edge")
            },
            stripe_api_key=_env("STRIPE_API_KEY"),
            stripe_api_base=_env("STRIPE_API_BASE"),
            stripe_webhook_secret=_env("STRIPE_WEBHOOK_SECRET"),
            billing_cycle_seconds=float(_env("HANGAR_BILLING_CYCLE_SECONDS", "60")),
            stripe_prices=_string_map(_env("HANGAR_STRIPE_PRICES"), "HANGAR_STRIPE_PRICES"),
            billing_send_retry_base_seconds=float(
                _env("HANGAR_BILLING_SEND_RETRY_BASE_SECONDS", "60")
            ),
            billing_send_retry_max_seconds=float(
                _env("HANGAR_BILLING_SEND_RETRY_MAX_SECONDS", str(6 * 3600))
            ),
            runtime_schedule_timeout_seconds=float(
                _env("HANGAR_RUNTIME_SCHEDULE_TIMEOUT_SECONDS", "600")
            ),
            runtime_schedule_retry_seconds=float(
                _env("HANGAR_RUNTIME_SCHEDULE_RETRY_SECONDS", "2")
            ),
            runtime_reconcile_seconds=float(_env("HANGAR_RUNTIME_RECONCILE_SECONDS", "30")),
            runtime_agent_sweep_seconds=float(_env("HANGAR_RUNTIME_AGENT_SWEEP_SECONDS", "5")),
            runtime_start_timeout_seconds=float(
                _env("HANGAR_RUNTIME_START_TIMEOUT_SECONDS", "120")
            ),
            runtime_drain_seconds=float(_env("HANGAR_RUNTIME_DRAIN_SECONDS", "10")),
            runtime_heartbeat_timeout_seconds=float(
                _env("HANGAR_RUNTIME_HEARTBEAT_TIMEOUT_SECONDS", "30")
            ),
            runtime_sleep_check_seconds=float(_env("HANGAR_RUNTIME_SLEEP_CHECK_SECONDS", "10")),
            agent_app_host=_env("HANGAR_AGENT_APP_HOST", "127.0.0.1"),
            agent_start_timeout_seconds=float(_env("HANGAR_AGENT_START_TIMEOUT_SECONDS", "30")),
            agent_stop_grace_seconds=float(_env("HANGAR_AGENT_STOP_GRACE_SECONDS", "10")),
            agent_log_buffer_lines=int(_env("HANGAR_AGENT_LOG_BUFFER_LINES", "5000")),
            agent_server=_env("HANGAR_AGENT_SERVER"),
            agent_heartbeat_seconds=float(_env("HANGAR_AGENT_HEARTBEAT_SECONDS", "5")),
            agent_driver=_env("HANGAR_AGENT_DRIVER", "auto"),
            agent_state_dir=_env("HANGAR_AGENT_STATE_DIR", default_agent_state_dir()),
            agent_pids_limit=int(_env("HANGAR_AGENT_PIDS_LIMIT", "256")),
            agent_tmpfs_mb=int(_env("HANGAR_AGENT_TMPFS_MB", "64")),
            agent_freeze_seconds=float(_env("HANGAR_AGENT_FREEZE_SECONDS", "600")),
            agent_restart_backoff_seconds=float(_env("HANGAR_AGENT_RESTART_BACKOFF_SECONDS", "1")),
            agent_restart_max_backoff_seconds=float(
                _env("HANGAR_AGENT_RESTART_MAX_BACKOFF_SECONDS", "60")
            ),
            agent_restart_stable_seconds=float(_env("HANGAR_AGENT_RESTART_STABLE_SECONDS", "30")),
            agent_crash_loop_restarts=int(_env("HANGAR_AGENT_CRASH_LOOP_RESTARTS", "5")),
            agent_build_timeout_seconds=float(_env("HANGAR_AGENT_BUILD_TIMEOUT_SECONDS", "900")),
            agent_keep_unused_images_seconds=float(
                _env("HANGAR_AGENT_KEEP_UNUSED_IMAGES_SECONDS", "3600")
            ),
            agent_insecure_registries=tuple(
                r.strip() for r in _env("HANGAR_AGENT_INSECURE_REGISTRIES").split(",") if r.strip()
            ),
            artifacts_dir=_env("HANGAR_ARTIFACTS_DIR", default_data_dir("artifacts")),
            artifacts_s3_bucket=_env("HANGAR_ARTIFACTS_S3_BUCKET"),
            artifacts_s3_endpoint=_env("HANGAR_ARTIFACTS_S3_ENDPOINT"),
            max_source_bytes=int(_env("HANGAR_MAX_SOURCE_BYTES", str(200 * 1024 * 1024))),
            single_tenant=_env("HANGAR_SINGLE_TENANT").lower() in ("1", "true", "yes"),
            apps_domain=_env("HANGAR_APPS_DOMAIN", "localhost").strip(".").lower(),
            edge_https_port=int(_env("HANGAR_EDGE_HTTPS_PORT", "8443")),
            edge_admin_address=_env("HANGAR_EDGE_ADMIN_ADDRESS", "127.0.0.1:2019"),
            domain_check_address=_env("HANGAR_DOMAIN_CHECK_ADDRESS"),
            telemetry_sample_seconds=float(_env("HANGAR_TELEMETRY_SAMPLE_SECONDS", "5")),
            telemetry_ship_batch_lines=int(_env("HANGAR_TELEMETRY_SHIP_BATCH_LINES", "2000")),
            telemetry_metric_buffer_samples=int(
                _env("HANGAR_TELEMETRY_METRIC_BUFFER_SAMPLES", "20000")
            ),
            telemetry_retention_days=int(_env("HANGAR_TELEMETRY_RETENTION_DAYS", "7")),
            telemetry_partitions_ahead_days=int(
                _env("HANGAR_TELEMETRY_PARTITIONS_AHEAD_DAYS", "7")
            ),
            telemetry_maintenance_seconds=float(
                _env("HANGAR_TELEMETRY_MAINTENANCE_SECONDS", "600")
            ),
            telemetry_usage_window_seconds=float(
                _env("HANGAR_TELEMETRY_USAGE_WINDOW_SECONDS", "60")
            ),
            telemetry_usage_lateness_seconds=float(
                _env("HANGAR_TELEMETRY_USAGE_LATENESS_SECONDS", "60")
            ),
            telemetry_usage_seconds=float(_env("HANGAR_TELEMETRY_USAGE_SECONDS", "15")),
            project_master_keys=_master_keys(_env("HANGAR_PROJECT_MASTER_KEYS")),
            project_master_key_id=_env("HANGAR_PROJECT_MASTER_KEY_ID"),
            project_reconcile_seconds=float(_env("HANGAR_PROJECT_RECONCILE_SECONDS", "30")),
            jwt_issuer=_env("HANGAR_JWT_ISSUER", "hangar-identity"),
            jwt_audience=_env("HANGAR_JWT_AUDIENCE", "hangar"),
            jwt_signing_keys=_signing_keys(_env("HANGAR_JWT_SIGNING_KEYS")),
            access_token_ttl_seconds=int(_env("HANGAR_ACCESS_TOKEN_TTL_SECONDS", "900")),
            refresh_token_ttl_seconds=int(
                _env("HANGAR_REFRESH_TOKEN_TTL_SECONDS", str(30 * 86400))
            ),
            identity_cleanup_seconds=float(_env("HANGAR_IDENTITY_CLEANUP_SECONDS", "3600")),
            service_token_ttl_seconds=int(_env("HANGAR_SERVICE_TOKEN_TTL_SECONDS", "600")),
            oauth_providers=_oauth_providers(_env("HANGAR_OAUTH_PROVIDERS")),
            argon2_time_cost=int(_env("HANGAR_ARGON2_TIME_COST", "2")),
            argon2_memory_kib=int(_env("HANGAR_ARGON2_MEMORY_KIB", "19456")),
            argon2_parallelism=int(_env("HANGAR_ARGON2_PARALLELISM", "1")),
            identity_hash_workers=int(_env("HANGAR_IDENTITY_HASH_WORKERS", "0")),
            identity_hash_queue=int(_env("HANGAR_IDENTITY_HASH_QUEUE", "0")),
            identity_hash_wait_seconds=float(_env("HANGAR_IDENTITY_HASH_WAIT_SECONDS", "2")),
            access_lease_seconds=float(_env("HANGAR_ACCESS_LEASE_SECONDS", "3")),
            access_ack_timeout_seconds=float(_env("HANGAR_ACCESS_ACK_TIMEOUT_SECONDS", "2")),
        )

    @property
    def listen_address(self) -> str:
        """One "host:port": several replicas of a service each listen on their own."""
        address = self.own_address or self.addresses[self.service]
        if "," in address:
            raise ValueError(
                f"HANGAR_{self.service.upper()}_ADDR={address!r}: a process listens on one"
                f" address; list a service's replicas for its clients in"
                f" HANGAR_{self.service.upper()}_TARGETS"
            )
        return address

    def service_database_url(self, service: str | None = None) -> str:
        """The URL a service connects with: its own login role, never the admin one."""
        svc = service or self.service
        return url_with_credentials(
            self.database_url, role_name(svc), self.db_passwords.get(svc, "")
        )
