"""A real container registry (the reference `docker-registry`) on loopback, and real images
built with umoci from the host's static busybox, for the agent's image tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from tests.support.procs import free_port

BUSYBOX = Path("/bin/busybox")
BUSYBOX_LINKS = ("sh", "httpd", "echo", "cat", "sleep", "id")
IMAGE_CMD = (
    # "started" only once /tmp is writable (a tmpfs, the root being read-only)
    'echo ok > /tmp/written && echo started $MARKER_NAME as "$(id -u):$(id -g)"; '
    'exec httpd -f -p "$PORT" -h /www'
)
IMAGE_UID = 1000  # the user of an image built with `user`
FIXED_TIME = 946684800  # 2000-01-01T00:00:00Z
TOOLS = ("skopeo", "umoci", "docker-registry")


def missing_tools() -> list[str]:
    """What the image tests need and this host lacks (an empty list: all there)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not BUSYBOX.exists():
        missing.append(str(BUSYBOX))
    return missing


@dataclass
class Registry:
    address: str  # "127.0.0.1:PORT"
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _answers(url: str, accepted: tuple[int, ...]) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status) in accepted
    except urllib.error.HTTPError as error:
        return error.code in accepted
    except OSError:
        return False


@contextmanager
def running_registry(
    tmp: Path, *, users: dict[str, str] | None = None, timeout: float = 20
) -> Iterator[Registry]:
    """`docker-registry serve` on a free loopback port, storing under `tmp`; with `users`,
    every request needs HTTP basic auth (htpasswd, bcrypt). Stopped on exit."""
    tmp.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(tmp / "storage")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": address},
    }
    if users:
        htpasswd = tmp / "htpasswd"
        htpasswd.write_text(
            "".join(
                f"{name}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}\n"
                for name, password in users.items()
            )
        )
        config["auth"] = {"htpasswd": {"realm": "hangar-tests", "path": str(htpasswd)}}
    # JSON is YAML: no YAML writer needed.
    config_path = tmp / "config.yml"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = tmp / "registry.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
        )
    registry = Registry(address, proc, log_path)
    try:
        accepted = (200, 401) if users else (200,)
        deadline = time.monotonic() + timeout
        while not _answers(f"{registry.url}/v2/", accepted):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"docker-registry did not start: {log_path.read_text(errors='replace')}"
                )
            time.sleep(0.05)
        yield registry
    finally:
        registry.stop()


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip() or done.stdout}")
    return done.stdout


def _fix_times(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        os.utime(path, (FIXED_TIME, FIXED_TIME), follow_symlinks=False)


def build_image(
    tmp: Path,
    registry: Registry,
    repository: str,
    tag: str,
    *,
    marker: str,
    auth: tuple[str, str] | None = None,
    architecture: str = "amd64",
    payload_mb: int = 0,
    user: str = "",
) -> str:
    """Build a busybox image serving `marker` as /www/index.html, push it to
    `registry`/`repository`:`tag`; the pushed manifest's digest ("sha256:..."). With
    `payload_mb`, /www also holds that many MB of incompressible bytes (an image of a
    realistic size, for benchmarks). With `user` (a name), the image runs as that user,
    uid:gid 1000:1000 in its /etc/passwd, who alone may read /www (0700)."""
    work = tmp / f"build-{repository.replace('/', '_')}-{tag}-{time.monotonic_ns()}"
    work.mkdir(parents=True)
    layout = work / "layout"
    image = f"{layout}:{tag}"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", image)
    bundle = work / "bundle"
    _run("umoci", "unpack", "--image", image, str(bundle))
    rootfs = bundle / "rootfs"
    # Two layers, each the same bytes for the same content (fixed times): busybox, shared by
    # every image built here, then /www with the marker.
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for name in BUSYBOX_LINKS:
        (rootfs / "bin" / name).symlink_to("busybox")
    _fix_times(rootfs)
    _run("umoci", "repack", "--image", image, str(bundle))
    bundle = work / "bundle2"  # a repack diffs against its bundle's unpack: unpack again
    _run("umoci", "unpack", "--image", image, str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "www").mkdir(exist_ok=True)
    (rootfs / "www" / "index.html").write_text(marker)
    if payload_mb:
        (rootfs / "www" / "payload.bin").write_bytes(os.urandom(payload_mb * 1024 * 1024))
    if user:
        (rootfs / "etc").mkdir(exist_ok=True)
        (rootfs / "etc" / "passwd").write_text(
            f"root:x:0:0:root:/root:/bin/sh\n{user}:x:{IMAGE_UID}:{IMAGE_UID}::/www:/bin/sh\n"
        )
        (rootfs / "etc" / "group").write_text(f"root:x:0:\n{user}:x:{IMAGE_UID}:\n")
        for path in (rootfs / "www", *(rootfs / "www").iterdir()):
            os.chown(path, IMAGE_UID, IMAGE_UID)
        os.chmod(rootfs / "www", 0o700)
    _fix_times(rootfs)
    _run("umoci", "repack", "--image", image, str(bundle))
    _run(
        "umoci",
        "config",
        "--image",
        image,
        "--config.cmd=/bin/sh",
        "--config.cmd=-c",
        f"--config.cmd={IMAGE_CMD}",
        "--config.env=MARKER_NAME=from-image",
        "--config.env=PATH=/bin",
        "--config.workingdir=/www",
        "--config.exposedports=8080/tcp",
        *([f"--config.user={user}"] if user else []),
        f"--architecture={architecture}",
        "--os=linux",
    )
    digestfile = work / "digest"
    push = [
        "skopeo",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        f"--digestfile={digestfile}",
    ]
    if auth is not None:
        push.append(f"--dest-creds={auth[0]}:{auth[1]}")
    push += [f"oci:{image}", f"docker://{registry.address}/{repository}:{tag}"]
    _run(*push)
    digest = digestfile.read_text().strip()
    shutil.rmtree(work, ignore_errors=True)
    return digest
