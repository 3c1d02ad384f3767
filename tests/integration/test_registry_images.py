"""Container images, as a user deploys them over HTTP through the gateway, every service its
own process (tests/support/stack.py) with the agent's container driver, from real registries
on loopback ports (the reference registry, `docker-registry`; one of them private, with
basic auth) holding small images built in the test with umoci (tests/support/registry.py):

the image answers HTTP; the release records the digest its tag resolved to; a new image
pushed under the same tag does not change what a rollback runs; a private image fails
without credentials and runs with the project's registry secrets, which never reach the
app; a missing image fails saying so.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.agent.containers import images_unavailable_reason, netns_prefix, unavailable_reason
from tests.support.registry import IMAGE_UID, Registry, build_image, running_registry
from tests.support.stack import Account, Stack, migrated_database, sign_up, start_stack, wait_for

_why_not = unavailable_reason() or images_unavailable_reason()
if _why_not is None and shutil.which("docker-registry") is None:
    _why_not = "docker-registry is not installed"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_why_not is not None, reason=f"images need the sandbox: {_why_not}"),
]

RUNNING = "DEPLOYMENT_STATUS_RUNNING"
FAILED = "DEPLOYMENT_STATUS_FAILED"
USER, PASSWORD = "ada", "s3cret-" + secrets.token_hex(6)


@dataclass
class World:
    stack: Stack
    public: Registry
    private: Registry
    workdir: Path
    http: httpx.Client
    owner: Account | None = None
    project_url: str = ""
    digests: dict[str, str] = field(default_factory=dict)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        assert self.owner is not None
        return self.owner.auth


@pytest.fixture(scope="module")
def world(
    create_database: Callable[[str], str],
    db_passwords: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("images")
    with (
        running_registry(tmp / "public") as public,
        running_registry(tmp / "private", users={USER: PASSWORD}) as private,
    ):
        url = migrated_database(create_database, db_passwords)
        stack = start_stack(
            url,
            db_passwords,
            tmp / "stack",
            extra_env={
                "HANGAR_AGENT_INSECURE_REGISTRIES": f"{public.address},{private.address}",
                "HANGAR_AGENT_START_TIMEOUT_SECONDS": "60",
                # Images no container runs go at once (the default keeps them an hour).
                "HANGAR_AGENT_KEEP_UNUSED_IMAGES_SECONDS": "0",
            },
        )
        try:
            with stack.client(timeout=60) as http:
                yield World(stack, public, private, tmp, http)
        finally:
            stack.stop()


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.request.url}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def _deploy(w: World, **deployment: Any) -> dict[str, Any]:
    return _ok(w.http.post(f"{w.project_url}/deployments", headers=w.auth, json=deployment))


def _wait(w: World, deployment_id: str, status: str, within: float = 120) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        current = _ok(w.http.get(f"/v1/deployments/{deployment_id}", headers=w.auth))
        if current["status"] == status:
            return current
        if current["status"] in (FAILED, "DEPLOYMENT_STATUS_CANCELLED"):
            pytest.fail(f"deployment ended {current['status']}: {current.get('statusReason')}")
        return None

    result: dict[str, Any] = wait_for(probe, f"deployment {deployment_id} {status}", within, 0.5)
    return result


def _answer(w: World, deployment_id: str) -> str:
    def probe() -> str | None:
        for c in _ok(w.http.get(f"{w.project_url}/containers", headers=w.auth))["containers"]:
            if c["deploymentId"] == deployment_id and c["status"].endswith("RUNNING"):
                try:
                    reply = httpx.get(f"http://{c['address']}/", timeout=5)
                except httpx.HTTPError:
                    return None
                return reply.text if reply.status_code == 200 else None
        return None

    text: str = wait_for(probe, f"deployment {deployment_id} to answer HTTP", 60)
    return text


def _lines(w: World, deployment_id: str) -> list[dict[str, Any]]:
    entries = _ok(w.http.get(f"{w.project_url}/logs", headers=w.auth, params={"pageSize": 1000}))
    return [e for e in entries["entries"] if e["deploymentId"] == deployment_id]


def test_a_project_to_deploy_images_to(world: World) -> None:
    w = world
    w.owner = sign_up(w.http, "imager")
    slug = f"img-{secrets.token_hex(3)}"
    org = _ok(w.http.post("/v1/organizations", headers=w.auth, json={"name": "I", "slug": slug}))
    spec = {
        "name": "Img",
        "slug": slug,
        "resources": {"ramMb": 256, "cpuMillis": 250, "bandwidthGb": 1},
    }

    def create() -> dict[str, Any] | None:
        response = w.http.post(f"/v1/organizations/{org['id']}/projects", headers=w.auth, json=spec)
        return response.json() if response.status_code == 200 else None

    project = wait_for(create, "the project (once the organization's pool exists)")
    w.project_url = f"/v1/projects/{project['id']}"
    admin = {"Authorization": f"Bearer {w.stack.admin_token}"}
    wait_for(
        lambda: (
            w.http.get(f"/v1/servers/{w.stack.server_id}", headers=admin).json()["isolation"]
            == "SERVER_ISOLATION_CONTAINER"
        ),
        "the agent's first heartbeat (its container sandbox)",
    )


def test_an_image_is_pulled_and_answers_and_its_digest_is_recorded(world: World) -> None:
    w = world
    w.digests["one"] = build_image(w.workdir / "one", w.public, "app", "v1", marker="one")
    created = _deploy(w, image=f"{w.public.address}/app:v1")
    running = _wait(w, created["id"], RUNNING)
    assert running["imageDigest"] == w.digests["one"]
    assert running["image"] == f"{w.public.address}/app:v1"  # as asked; the digest beside it
    assert _answer(w, created["id"]).strip() == "one"

    def lines() -> list[dict[str, Any]] | None:
        found = _lines(w, created["id"])
        return found if any("started from-image" in e["line"] for e in found) else None

    found = wait_for(lines, "the image's Env reached the app (its Cmd echoes it)", 30)
    pulls = [e["line"] for e in found if e["stream"] == "LOG_STREAM_BUILD"]
    assert any(w.digests["one"][7:19] in line for line in pulls), pulls
    w.deployments["one"] = running


def test_a_new_image_under_the_same_tag_does_not_change_a_rollback(world: World) -> None:
    w = world
    w.digests["two"] = build_image(w.workdir / "two", w.public, "app", "v1", marker="two")
    assert w.digests["two"] != w.digests["one"]
    second = _wait(w, _deploy(w, image=f"{w.public.address}/app:v1")["id"], RUNNING)
    assert second["imageDigest"] == w.digests["two"]
    assert _answer(w, second["id"]).strip() == "two"

    rollback = _ok(w.http.post(f"/v1/deployments/{second['id']}:rollback", headers=w.auth))
    assert rollback["image"] == f"{w.public.address}/app@{w.digests['one']}"
    running = _wait(w, rollback["id"], RUNNING)
    assert running["imageDigest"] == w.digests["one"]
    assert _answer(w, rollback["id"]).strip() == "one"

    # The rolled-back release's image goes from the server once nothing there runs it; the
    # one running stays (with the layer the two share).
    unpacked = w.stack.home / "agent" / "images" / "rootfs"
    wait_for(
        lambda: not (unpacked / w.digests["two"].removeprefix("sha256:")).exists(),
        "the unused image to be collected",
        30,
    )
    assert (unpacked / w.digests["one"].removeprefix("sha256:")).is_dir()


def test_a_private_image_needs_the_project_s_registry_secrets(world: World) -> None:
    w = world
    digest = build_image(
        w.workdir / "private",
        w.private,
        "secret-app",
        "v1",
        marker="private",
        auth=(USER, PASSWORD),
    )
    image = f"{w.private.address}/secret-app:v1"
    refused = _wait(w, _deploy(w, image=image)["id"], FAILED)
    assert refused["statusReason"].startswith("IMAGE_AUTH_FAILED"), refused["statusReason"]

    for name, value in (
        ("HANGAR_REGISTRY_USERNAME", USER),
        ("HANGAR_REGISTRY_PASSWORD", PASSWORD),
        ("MARKER_NAME", "from-secret"),  # over the image's own Env
    ):
        _ok(
            w.http.put(
                f"{w.project_url}/secrets/{name}",
                headers=w.auth,
                json={"value": value, "restart": False},
            )
        )
    # The deployment's command replaces the image's Cmd: it prints the app's environment.
    created = _deploy(w, image=image, imageCommand='sh -c "env; exec httpd -f -p $PORT -h /www"')
    running = _wait(w, created["id"], RUNNING)
    assert running["imageDigest"] == digest
    assert _answer(w, created["id"]).strip() == "private"

    def env_lines() -> list[str] | None:
        found = [e["line"] for e in _lines(w, created["id"]) if e["stream"] == "LOG_STREAM_STDOUT"]
        return found if any(line.startswith("PORT=") for line in found) else None

    env = wait_for(env_lines, "the app's environment in its logs", 30)
    assert not any("HANGAR_REGISTRY" in line or PASSWORD in line for line in env), env
    assert "MARKER_NAME=from-secret" in env, env  # the project's secret wins
    assert "PWD=/www" in env, env  # the image's WorkingDir
    everything = [e["line"] for e in _lines(w, created["id"])]
    assert not any(PASSWORD in line for line in everything)


def test_an_image_s_own_user_runs_it_as_the_project_s_uid(world: World) -> None:
    w = world
    digest = build_image(w.workdir / "user", w.public, "web-user", "v1", marker="its", user="web")
    created = _deploy(w, image=f"{w.public.address}/web-user:v1")
    running = _wait(w, created["id"], RUNNING)
    assert running["imageDigest"] == digest
    # /www is the image's user's alone (0700): httpd serves it as that user.
    assert _answer(w, created["id"]).strip() == "its"

    def started() -> list[str] | None:
        found = [e["line"] for e in _lines(w, created["id"])]
        return found if any(line.startswith("started") for line in found) else None

    lines = wait_for(started, "the app's first line", 30)
    assert f"started from-secret as {IMAGE_UID}:{IMAGE_UID}" in lines, lines  # `id` inside
    assert any("Running as the image's user web (1000:1000)" in line for line in lines), lines

    # On the host, its processes hold the project's own uid (never 1000, which any tenant's
    # image may name), in a user namespace mapping the image's user to it and nothing else
    # of the host's but nobody; the project's copy of the image gives /www to that uid.
    project_id = w.project_url.rsplit("/", 1)[1]
    table = json.loads((w.stack.home / "agent" / "uids.json").read_text())
    host_uid = table[project_id]
    assert host_uid >= 2_000_000
    # Only this stack's containers: another Hangar on the machine (a `make run`, another
    # test run) numbers its projects' uids from the same base.
    cgroup_parent = "/hangar/" + netns_prefix(w.stack.home / "agent").removeprefix("hangar-")
    cgroup_parent = cgroup_parent.rstrip("-") + "/"
    maps = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            ours = cgroup_parent in (status.parent / "cgroup").read_text()
            if ours and "\nUid:\t" + "\t".join([str(host_uid)] * 4) in text:
                maps.append((status.parent / "uid_map").read_text().split())
        except OSError:
            continue  # a process that ended meanwhile
    assert maps, "no process runs as the project's uid"
    assert all(m == [str(IMAGE_UID), str(host_uid), "1", "0", "65534", "1"] for m in maps), maps
    copy = w.stack.home / "agent" / "images" / "rootfs" / f"{digest[7:]}-as-{host_uid}"
    assert copy.joinpath("www").stat().st_uid == host_uid
    assert copy.joinpath("bin", "busybox").stat().st_uid == 0


def test_a_missing_image_fails_saying_so(world: World) -> None:
    w = world
    for image, reason in (
        (f"{w.public.address}/no-such-app:v1", "IMAGE_NOT_FOUND"),
        (f"{w.public.address}/app:no-such-tag", "IMAGE_NOT_FOUND"),
    ):
        failed = _wait(w, _deploy(w, image=image)["id"], FAILED)
        assert failed["statusReason"].startswith(reason), failed["statusReason"]
