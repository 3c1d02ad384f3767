"""`hangar deploy`, `logs`, `releases`, `rollback`, `open`: shipping and watching an app.

`deploy` packs a directory (hangar_cli.user.pack), uploads it, creates a deployment of it and
follows it: the deployment's log lines live from `logs:tail` (build lines as they are, app
lines prefixed with their container) while it polls the deployment until it runs (then
prints the app's address) or fails (then prints why and exits 1).
"""

from __future__ import annotations

import json
import queue
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from hangar_cli.user.client import EXIT_ERROR, EXIT_INVALID, EXIT_NOT_FOUND, Client, CliError
from hangar_cli.user.common import (
    JsonOpt,
    ProjectOpt,
    console,
    emit_json,
    err_console,
    now_utc,
    resolve_project,
    short_enum,
    when,
)
from hangar_cli.user.pack import pack

RUNNING = "DEPLOYMENT_STATUS_RUNNING"
ENDED = {
    "DEPLOYMENT_STATUS_FAILED",
    "DEPLOYMENT_STATUS_CANCELLED",
    "DEPLOYMENT_STATUS_SUPERSEDED",
    "DEPLOYMENT_STATUS_ROLLED_BACK",
    "DEPLOYMENT_STATUS_CRASH_LOOP",
}
CHUNK = 256 * 1024


def format_entry(entry: dict[str, Any], *, with_time: bool = False) -> str:
    """One log line for a terminal: a build line as it is, an app line prefixed with its
    stream and container (`app[ab12cd] | ...`)."""
    line = str(entry.get("line", ""))
    stamp = f"{when(entry.get('emittedAt'))} " if with_time else ""
    if entry.get("stream") == "LOG_STREAM_BUILD":
        return f"{stamp}{line}" if not with_time else f"{stamp}build | {line}"
    container = str(entry.get("containerId") or "")[:6] or "-"
    err = " err" if entry.get("stream") == "LOG_STREAM_STDERR" else ""
    return f"{stamp}app[{container}]{err} | {line}"


def _entry_key(entry: dict[str, Any]) -> tuple[str, str, str, str]:
    return (
        str(entry.get("emittedAt")),
        str(entry.get("containerId")),
        str(entry.get("stream")),
        str(entry.get("line")),
    )


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class _Tail(threading.Thread):
    """Reads a project's `logs:tail` stream into a queue (daemon: it dies with the command)."""

    def __init__(self, project_id: str) -> None:
        super().__init__(daemon=True)
        self.project_id = project_id
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.connected = threading.Event()

    def run(self) -> None:
        while True:
            try:
                with Client() as client:
                    stream = client.ndjson(
                        f"/v1/projects/{self.project_id}/logs:tail", {"tailLines": 0}
                    )
                    self.connected.set()
                    for entry in stream:
                        self.lines.put(entry)
            except CliError:
                self.connected.set()
                time.sleep(1)  # the stream ended or broke: open it again


def _upload(client: Client, project_id: str, archive: IO[bytes], size: int) -> dict[str, Any]:
    """POST the archive (streamed from its file) as the project's source; a progress bar on
    stderr's terminal when stdout is one."""
    progress: Progress | None = None
    if sys.stdout.isatty():
        progress = Progress(
            TextColumn("Uploading"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            transient=False,
        )
    task = progress.add_task("upload", total=size) if progress else None

    def body() -> Iterator[bytes]:
        archive.seek(0)
        if progress is not None and task is not None:
            progress.reset(task, total=size)
        while chunk := archive.read(CHUNK):
            if progress is not None and task is not None:
                progress.advance(task, len(chunk))
            yield chunk

    if progress is not None:
        progress.start()
    try:
        source: dict[str, Any] = client.call(
            "POST",
            f"/v1/projects/{project_id}/sources",
            content=body,
            headers={"Content-Type": "application/gzip", "Content-Length": str(size)},
            timeout=600,
        )
    finally:
        if progress is not None:
            progress.stop()
    return source


def app_address(client: Client, project_id: str, deployment_id: str = "") -> str:
    """host:port of the project's running web container (of `deployment_id` if given), or
    "" when none runs."""
    containers = client.list_all(f"/v1/projects/{project_id}/containers", "containers")
    running = [
        container
        for container in containers
        if container.get("status") == "CONTAINER_STATUS_RUNNING"
        and (not deployment_id or container.get("deploymentId") == deployment_id)
        and container.get("address")
    ]
    running.sort(key=lambda c: (c.get("processType") not in ("", None, "web"),))
    return str(running[0]["address"]) if running else ""


def _follow_deployment(
    client: Client,
    project_id: str,
    deployment: dict[str, Any],
    tail: _Tail | None,
    timeout: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Poll the deployment until it runs or ends, printing its log lines and status changes;
    its last state."""
    deployment_id = deployment["id"]
    seen: set[tuple[str, str, str, str]] = set()
    status = ""
    deadline = time.monotonic() + timeout

    def drain() -> None:
        if tail is None:
            return
        while True:
            try:
                entry = tail.lines.get_nowait()
            except queue.Empty:
                return
            if entry.get("deploymentId") == deployment_id and _entry_key(entry) not in seen:
                seen.add(_entry_key(entry))
                say(format_entry(entry))

    while True:
        drain()
        if deployment.get("status") != status:
            status = str(deployment.get("status"))
            say(f"==> {short_enum(status, 'DEPLOYMENT_STATUS_')}")
        if status == RUNNING or status in ENDED:
            break
        if time.monotonic() > deadline:
            raise CliError(f"deployment {deployment_id} did not finish within {timeout:.0f}s")
        time.sleep(0.5)
        deployment = client.get(f"/v1/deployments/{deployment_id}")
    time.sleep(0.3)  # lines still in flight
    drain()
    if tail is not None:  # whatever the live stream missed (before it connected, say)
        missed = (
            client.get(
                f"/v1/projects/{project_id}/logs",
                params={"deploymentId": deployment_id, "pageSize": 1000},
            ).get("entries")
            or []
        )
        for entry in reversed(missed):
            if _entry_key(entry) not in seen:
                seen.add(_entry_key(entry))
                say(format_entry(entry))
    return deployment


def deploy(
    directory: Annotated[
        Path, typer.Argument(help="The app's directory (default: here).", file_okay=False)
    ] = Path("."),
    project: ProjectOpt = None,
    image: Annotated[str | None, typer.Option(help="Deploy this container image instead.")] = None,
    process: Annotated[
        str | None, typer.Option("--process", help="Procfile process type (default: web).")
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=20,
            help="Run this many replicas, each with an equal share of the project's RAM "
            "and CPU, spread over servers (default: 1).",
        ),
    ] = None,
    max_surge: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Roll replicas out a few at a time: at most this many beyond --replicas "
            "hold capacity (default: all at once, then switch).",
        ),
    ] = None,
    max_unavailable: Annotated[
        int | None,
        typer.Option(min=0, help="During a rolling rollout, at most this many fewer serve."),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not follow the deploy.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for it to run.")] = 900,
    json_output: JsonOpt = False,
) -> None:
    """Ship a directory (or an --image) and follow it until the app runs.

    DIR is packed as a gzip tar, leaving out what .gitignore and .hangarignore ignore and
    .git/, uploaded, and deployed; the build's and the app's lines are printed live, then
    the app's address (exit 0), or why the release failed (exit 1)."""
    result: dict[str, Any] = {}
    say: Callable[[str], None] = (lambda _text: None) if json_output else _write
    with Client() as client:
        found = resolve_project(client, project)
        project_id = found["id"]
        body: dict[str, Any] = {}
        if image:
            body["image"] = image
        else:
            if not directory.is_dir():
                raise CliError(f"{directory} is not a directory", EXIT_INVALID)
            with tempfile.TemporaryFile(prefix="hangar-source-") as archive:
                packed = pack(directory, archive)
                say(
                    f"Packed {len(packed.members)} paths of {directory.resolve()} "
                    f"({packed.size_bytes} bytes)."
                )
                source = _upload(client, project_id, archive, packed.size_bytes)
            result["source"] = source
            result["packedFiles"] = list(packed.members)
            body["sourceSha256"] = source.get("sha256", packed.sha256)
        if process:
            body["processType"] = process
        if replicas:
            body["replicas"] = replicas
        if max_surge is not None:
            body["maxSurge"] = max_surge
        if max_unavailable is not None:
            body["maxUnavailable"] = max_unavailable
        tail: _Tail | None = None
        if not no_wait and not json_output:
            tail = _Tail(project_id)
            tail.start()
            tail.connected.wait(3)
        deployment = client.post(f"/v1/projects/{project_id}/deployments", body)
        result["deployment"] = deployment
        say(f"Deploying {found.get('slug')}: release {deployment.get('id')}.")
        if no_wait:
            if json_output:
                emit_json(result)
            return
        deployment = _follow_deployment(client, project_id, deployment, tail, timeout, say)
        result["deployment"] = deployment
        if deployment.get("status") != RUNNING:
            if json_output:
                emit_json(result)
            reason = deployment.get("statusReason") or "no reason given"
            raise CliError(
                f"release {deployment.get('id')} "
                f"{short_enum(deployment.get('status'), 'DEPLOYMENT_STATUS_')}: {reason}",
                EXIT_ERROR,
            )
        address = ""
        deadline = time.monotonic() + 30
        while not address and time.monotonic() < deadline:
            address = app_address(client, project_id, deployment["id"])
            if not address:
                time.sleep(0.5)
        result["address"] = f"http://{address}" if address else ""
        result["url"] = str(found.get("url") or "")
    if json_output:
        emit_json(result)
        return
    if address:
        url = found.get("url")
        console.print(f"Running at [bold]{url or f'http://{address}'}[/bold]")
        if url:
            console.print(f"[dim]this release: http://{address}[/dim]")
    else:
        console.print("Running (no web process answers HTTP).")


def parse_since(text: str) -> timedelta:
    """`90s`, `10m`, `2h`, `1d` (or a bare number of seconds) as a timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration like 10m", param_hint="--since")
    amount = float(match.group(1))
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return timedelta(seconds=amount * unit)


def logs(
    project: ProjectOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    since: Annotated[str, typer.Option(help="How far back, e.g. 90s, 10m, 2h, 1d.")] = "1h",
    process_type: Annotated[
        str | None, typer.Option("--type", help="Only this process type's lines, e.g. web.")
    ] = None,
    release: Annotated[str | None, typer.Option(help="Only this release's lines.")] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", help="At most this many lines.")] = 500,
    json_output: JsonOpt = False,
) -> None:
    """Print the project's logs, oldest first (build output included); -f keeps following."""
    start = now_utc() - parse_since(since)
    with Client() as client:
        found = resolve_project(client, project)
        project_id = found["id"]
        containers: set[str] | None = None
        if process_type:
            containers = {
                str(container.get("id"))
                for container in client.list_all(
                    f"/v1/projects/{project_id}/containers", "containers"
                )
                if (container.get("processType") or "web") == process_type
            }

        def wanted(entry: dict[str, Any]) -> bool:
            if release and entry.get("deploymentId") != release:
                return False
            return containers is None or entry.get("containerId") in containers

        entries: list[dict[str, Any]] = []
        token = ""
        while len(entries) < lines:
            page = client.get(
                f"/v1/projects/{project_id}/logs",
                params={
                    "startTime": start.isoformat().replace("+00:00", "Z"),
                    "deploymentId": release,
                    "pageSize": min(1000, lines),
                    "pageToken": token or None,
                },
            )
            entries.extend(entry for entry in page.get("entries") or [] if wanted(entry))
            token = page.get("nextPageToken") or ""
            if not token:
                break
        entries = list(reversed(entries[:lines]))
        show: Callable[[dict[str, Any]], None] = (
            (lambda e: _write(json.dumps(e)))
            if json_output
            else (lambda e: _write(format_entry(e, with_time=True)))
        )
        if json_output and not follow:
            emit_json({"entries": entries})
            return
        for entry in entries:
            show(entry)
        if not follow:
            return
        seen = {_entry_key(entry) for entry in entries}
        while True:  # the gateway ends long streams: open it again
            try:
                for entry in client.ndjson(
                    f"/v1/projects/{project_id}/logs:tail", {"tailLines": 0}
                ):
                    if wanted(entry) and _entry_key(entry) not in seen:
                        show(entry)
            except CliError as exc:
                err_console.print(f"(log stream: {exc.message}; reconnecting)")
                time.sleep(1)


def _who(client: Client, project: dict[str, Any]) -> dict[str, str]:
    """user id -> email of the project's organization's members ({} if not allowed)."""
    try:
        members = client.list_all(
            f"/v1/organizations/{project.get('organizationId')}/members", "members"
        )
    except CliError:
        return {}
    return {str(m.get("userId")): str(m.get("email")) for m in members}


def _what(deployment: dict[str, Any]) -> str:
    if deployment.get("slugSha256"):
        return f"slug {str(deployment['slugSha256'])[:12]}"
    if deployment.get("sourceSha256"):
        return f"source {str(deployment['sourceSha256'])[:12]}"
    if deployment.get("imageDigest"):
        return f"image {str(deployment['imageDigest']).removeprefix('sha256:')[:12]}"
    if deployment.get("image"):
        return f"image {deployment['image']}"
    command = str(deployment.get("command") or "")
    return f"command {command[:30]}" if command else "-"


def releases(
    project: ProjectOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 20,
    json_output: JsonOpt = False,
) -> None:
    """The release history: every deployment of the project, newest first."""
    with Client() as client:
        found = resolve_project(client, project)
        page = client.get(
            f"/v1/projects/{found['id']}/deployments", params={"pageSize": max(1, limit)}
        )
        deployments = (page.get("deployments") or [])[:limit]
        if json_output:
            emit_json({"deployments": deployments})
            return
        who = _who(client, found)
    table = Table("RELEASE", "REPLICA", "STATUS", "REASON", "WHAT", "BY", "CREATED")
    for deployment in deployments:
        table.add_row(
            deployment.get("id"),
            f"{int(deployment.get('replicaIndex') or 0) + 1}/{deployment.get('replicas') or 1}",
            short_enum(deployment.get("status"), "DEPLOYMENT_STATUS_"),
            short_enum(deployment.get("releaseReason"), "RELEASE_REASON_"),
            _what(deployment),
            who.get(str(deployment.get("createdBy")), str(deployment.get("createdBy") or "-")),
            when(deployment.get("createdAt")),
        )
    console.print(table)


def rollback(
    release: Annotated[
        str | None, typer.Argument(help="Release to roll back (default: the running one).")
    ] = None,
    project: ProjectOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Roll back RELEASE: a new release runs the one before it again (no build)."""
    with Client() as client:
        if not release:
            found = resolve_project(client, project)
            deployments = (
                client.get(f"/v1/projects/{found['id']}/deployments", params={"pageSize": 100}).get(
                    "deployments"
                )
                or []
            )
            running = [d for d in deployments if d.get("status") == RUNNING]
            if not running:
                raise CliError("no release is running: name the one to roll back", EXIT_NOT_FOUND)
            release = str(running[0]["id"])
        created = client.post(f"/v1/deployments/{release}:rollback", {})
    if json_output:
        emit_json(created)
        return
    console.print(
        f"Rolling back {release}: new release {created.get('id')} runs "
        f"{created.get('rolledBackFrom') or 'the release before it'} again."
    )


def open_app(project: ProjectOpt = None, json_output: JsonOpt = False) -> None:
    """Print the app's public URL (its name through the edge), once a web process runs."""
    with Client() as client:
        found = resolve_project(client, project)
        address = app_address(client, found["id"])
    if not address:
        raise CliError(f"{found.get('slug')} has no running web process", EXIT_NOT_FOUND)
    url = str(found.get("url") or f"http://{address}")
    if json_output:
        emit_json({"url": url, "address": f"http://{address}"})
        return
    _write(url)
