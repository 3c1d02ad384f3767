"""GetProject (with its Authorize) throughput and latency next to the bare floor, and
ResolveSecrets for a project with 100 secrets.

identity, billing and project run as real service processes (`hangar serve ...`) against one
PostgreSQL (DATABASE_URL if set, else an embedded pgserver); the floor is the Identity
benchmark's bare grpc.aio server (bench/bench_authorize.py --floor: one asyncpg lookup per
call, no interceptor, no auth), driven by its own client. The load comes from this process
(uvloop, one channel, N calls in flight); floor and GetProject rounds alternate.

Run: .venv/bin/python bench/bench_get_project.py [--seconds 5] [--inflight 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from bench.bench_authorize import closed_loop, median_run, wait_ready
from bench.bench_authorize import drive as drive_floor
from hangar.identity.v1 import identity_pb2 as ipb
from hangar.identity.v1 import identity_pb2_grpc
from hangar.project.v1 import project_pb2 as pb
from hangar.project.v1 import project_pb2_grpc
from hangar.type.v1 import resources_pb2

FLOOR_SCRIPT = Path(__file__).resolve().parent / "bench_authorize.py"


async def drive_get(
    address: str, project_id: str, metadata: tuple, seconds: float, inflight: int
) -> tuple[float, float, float]:
    """GetProject calls per second, p50 and p99 latency in milliseconds."""
    request = pb.GetProjectRequest(id=project_id)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = project_pb2_grpc.ProjectServiceStub(channel)

        async def get() -> None:
            assert (await stub.GetProject(request, metadata=metadata)).id == project_id

        # The warm-up also fills the token and Authorize caches.
        return await closed_loop(get, seconds, inflight, warm_up=200)


async def resolves(
    address: str, project_id: str, metadata: tuple, seconds: float, inflight: int
) -> tuple[float, int]:
    request = pb.ResolveSecretsRequest(project_id=project_id)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = project_pb2_grpc.ProjectServiceStub(channel)
        size = len((await stub.ResolveSecrets(request, metadata=metadata)).env)
        rps = (
            await closed_loop(
                lambda: stub.ResolveSecrets(request, metadata=metadata), seconds, inflight
            )
        )[0]
        return rps, size


async def bench(args: argparse.Namespace) -> None:
    from shared.auth import generate_signing_key
    from shared.migrate import migrate_async
    from shared.pg import create_database, provision
    from shared.settings import role_name, url_with_credentials
    from tests.support.identity import identity_process_env, identity_settings
    from tests.support.procs import ServiceProcess, free_port

    tmp = Path(tempfile.mkdtemp(prefix="hangar-bench-"))
    pg = provision(tmp / "pgdata", ephemeral=True)
    services: list[ServiceProcess] = []
    floor = None
    try:
        url = await create_database(pg.url, f"bench_{secrets.token_hex(4)}")
        passwords = {
            s: secrets.token_urlsafe(12) for s in ("identity", "project", "runtime", "billing")
        }
        await migrate_async(url, passwords)
        addresses = {
            name: f"127.0.0.1:{free_port()}" for name in ("identity", "billing", "project")
        }
        settings = identity_settings(
            url, passwords, address=addresses["identity"], signing_keys=(generate_signing_key(),)
        )
        env = identity_process_env(settings)
        for name, address in addresses.items():
            env[f"HANGAR_{name.upper()}_ADDR"] = address
        env["HANGAR_LOG_LEVEL"] = "WARNING"
        env["HANGAR_PROJECT_MASTER_KEYS"] = json.dumps(
            {"mk-bench": base64.b64encode(os.urandom(32)).decode()}
        )
        for name in ("identity", "billing", "project"):
            services.append(ServiceProcess.start(name, addresses[name], env))

        async with (
            grpc.aio.insecure_channel(addresses["identity"]) as ichannel,
            grpc.aio.insecure_channel(addresses["project"]) as pchannel,
        ):
            identity = identity_pb2_grpc.IdentityServiceStub(ichannel)
            project = project_pb2_grpc.ProjectServiceStub(pchannel)
            user = await identity.SignUp(
                ipb.SignUpRequest(
                    email="bench@example.com", password="bench password of decent length"
                )
            )
            md = (("authorization", f"Bearer {user.access_token}"),)
            org = await identity.CreateOrganization(
                ipb.CreateOrganizationRequest(
                    organization=ipb.Organization(name="b", slug="bench")
                ),
                metadata=md,
            )
            runtime = (
                await identity.IssueServiceToken(
                    ipb.IssueServiceTokenRequest(
                        service="runtime", secret=settings.service_secrets["runtime"]
                    )
                )
            ).token
            created = []
            for slug in ("bench-get", "bench-secrets"):
                for _ in range(100):  # billing subscribes the org from identity's event
                    try:
                        created.append(
                            await project.CreateProject(
                                pb.CreateProjectRequest(
                                    organization_id=org.id,
                                    project=pb.Project(
                                        name=slug,
                                        slug=slug,
                                        resources=resources_pb2.Resources(
                                            ram_mb=128, cpu_millis=100
                                        ),
                                        region="local",
                                    ),
                                ),
                                metadata=md,
                            )
                        )
                        break
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                            raise
                        await asyncio.sleep(0.1)
            target, with_secrets = created
            for i in range(100):
                await project.SetSecret(
                    pb.SetSecretRequest(
                        project_id=with_secrets.id,
                        name=f"SECRET_{i:03d}",
                        value=secrets.token_urlsafe(48),
                    ),
                    metadata=md,
                )

        floor_port = free_port()
        floor_dsn = url_with_credentials(url, role_name("identity"), passwords["identity"])
        floor = subprocess.Popen(  # noqa: ASYNC220 - start-up only, not on the measured path
            [sys.executable, str(FLOOR_SCRIPT), "--floor", str(floor_port), floor_dsn],
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        wait_ready(floor)
        floor_request = ipb.AuthorizeRequest(
            user_id=user.user.id, organization_id=org.id, permission="projects.get"
        )

        floor_runs, get_runs = [], []
        get_md = (*md, ("x-request-id", "bench"))
        for _ in range(args.rounds):
            floor_runs.append(
                await drive_floor(
                    f"127.0.0.1:{floor_port}", floor_request, (), args.seconds, args.inflight
                )
            )
            get_runs.append(
                await drive_get(
                    addresses["project"], target.id, get_md, args.seconds, args.inflight
                )
            )
        floor.terminate()
        floor.wait()
        floor_rps, floor_p50, floor_p99 = median_run(floor_runs)
        get_rps, get_p50, get_p99 = median_run(get_runs)
        runtime_md = (("authorization", f"Bearer {runtime}"),)
        resolve_rps, size = await resolves(
            addresses["project"], with_secrets.id, runtime_md, args.seconds, 16
        )

        print(
            f"{args.inflight} calls in flight, {args.rounds} alternating rounds of"
            f" {args.seconds:.0f}s (median round shown), {os.cpu_count()} CPUs,"
            f" PostgreSQL {pg.kind}; identity, billing, project are subprocesses"
        )
        print(f"{'':<30}{'rps':>10}{'p50 ms':>10}{'p99 ms':>10}")
        print(
            f"{'floor (asyncpg lookup)':<30}{floor_rps:>10.0f}{floor_p50:>10.2f}{floor_p99:>10.2f}"
        )
        print(
            f"{'project.GetProject+Authorize':<30}{get_rps:>10.0f}{get_p50:>10.2f}{get_p99:>10.2f}"
        )
        print(f"GetProject / floor = {get_rps / floor_rps:.2f}  (aim >= 0.70)")
        print(f"ResolveSecrets ({size} secrets, 16 in flight): {resolve_rps:.0f} calls per second")
    finally:
        if floor is not None and floor.poll() is None:
            floor.terminate()
            floor.wait()
        for proc in reversed(services):
            proc.stop()
        pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import uvloop

    uvloop.run(bench(args))


if __name__ == "__main__":
    main()
