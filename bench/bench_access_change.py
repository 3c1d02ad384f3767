"""The round trip of an access change: RemoveMember then AddMember through identity's RPC,
with one identity replica or two, a watcher (shared.auth.AccessWatch, as a service holds it)
on every replica.

Identity runs as real processes (`hangar serve identity`) on one PostgreSQL (an embedded
pgserver); the watchers and the client run in this process. Each change returns only once
every watcher (on every replica) has dropped what it made stale, so its latency is what the
access-at-once guarantee costs a user's request.

Run: .venv/bin/python bench/bench_access_change.py [--replicas 1] [--changes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from hangar.identity.v1 import identity_pb2 as pb
from hangar.identity.v1 import identity_pb2_grpc


async def bench(args: argparse.Namespace) -> None:
    from shared.auth import AccessWatch, ServiceTokenSource, generate_signing_key
    from shared.clients import Clients
    from shared.loops import cancel_and_wait
    from shared.migrate import migrate_async
    from shared.pg import create_database, provision
    from tests.support.identity import identity_process_env, identity_settings
    from tests.support.procs import ServiceProcess, free_port

    tmp = Path(tempfile.mkdtemp(prefix="hangar-bench-"))
    pg = provision(tmp / "pgdata", ephemeral=True)
    procs: list[ServiceProcess] = []
    closers = []
    tasks: list[asyncio.Task[None]] = []
    try:
        url = await create_database(pg.url, f"bench_{secrets.token_hex(4)}")
        passwords = {
            s: secrets.token_urlsafe(12) for s in ("identity", "project", "runtime", "billing")
        }
        await migrate_async(url, passwords)
        keys = (generate_signing_key(),)
        settings_of = []
        for _ in range(args.replicas):
            address = f"127.0.0.1:{free_port()}"
            settings = identity_settings(url, passwords, address=address, signing_keys=keys)
            env = identity_process_env(settings)
            env["HANGAR_LOG_LEVEL"] = "WARNING"
            procs.append(ServiceProcess.start("identity", address, env))
            settings_of.append(settings)

        watches = []
        for settings in settings_of:
            as_project = replace(settings, service="project")
            source = ServiceTokenSource(as_project)
            clients = Clients(as_project.addresses, token_provider=source)
            watch = AccessWatch(clients)
            watches.append(watch)
            tasks.append(asyncio.create_task(watch.run()))
            closers += [clients.close, source.close]
        async with asyncio.timeout(60):
            for watch in watches:
                await watch.wait_live()
        await asyncio.sleep(4.0)  # past every replica's restart grace (one lease)

        address = settings_of[0].addresses["identity"]
        async with grpc.aio.insecure_channel(address) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            password = "bench password of decent length"
            owner = await stub.SignUp(pb.SignUpRequest(email="o@example.com", password=password))
            member = await stub.SignUp(pb.SignUpRequest(email="m@example.com", password=password))
            md = (("authorization", f"Bearer {owner.access_token}"),)
            org = await stub.CreateOrganization(
                pb.CreateOrganizationRequest(organization=pb.Organization(name="b", slug="bench")),
                metadata=md,
            )
            add = pb.AddMemberRequest(
                organization_id=org.id, email="m@example.com", role=pb.ROLE_VIEWER
            )
            remove = pb.RemoveMemberRequest(organization_id=org.id, user_id=member.user.id)
            await stub.AddMember(add, metadata=md)
            generations = [w.generation for w in watches]
            removals = []
            for _ in range(args.changes):
                started = time.perf_counter()
                await stub.RemoveMember(remove, metadata=md)
                removals.append(time.perf_counter() - started)
                await stub.AddMember(add, metadata=md)
            reached = [w.generation - g for w, g in zip(watches, generations, strict=True)]
        removals.sort()
        ms = [r * 1000 for r in removals]
        print(
            f"replicas={args.replicas} RemoveMember round trip over {len(ms)} changes:"
            f" median {statistics.median(ms):.2f} ms, p90 {ms[int(len(ms) * 0.9)]:.2f} ms,"
            f" max {ms[-1]:.2f} ms; invalidations per watcher {reached}"
        )
    finally:
        for task in tasks:
            task.cancel()
        await cancel_and_wait(tasks)
        for close in closers:
            await close()
        for proc in procs:
            proc.stop()
        pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--changes", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
