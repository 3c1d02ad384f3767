"""Placement: placements/s and latency with concurrent callers, runtime's design side by side
with a naive one, in one run on one database.

- atomic: one conditional UPDATE that picks the best-fitting server with FOR UPDATE SKIP
  LOCKED (only that row is locked), with a waiting pass in id order only when every fitting
  server was momentarily locked; then the deployment's UPDATE, its event and audit entry.
- atomic-cte: runtime's scheduler as shipped (store.create_deployment): the same UPDATE, the
  deployment's INSERT (already placed), and the creation's and the placement's events and
  audit entries folded into one statement run on its own, outside any BEGIN/COMMIT: one round
  trip per CreateDeployment, and the server row is locked for that one statement.
- naive: the same transaction (deployment row, reservation, status, event, audit), but the
  reservation locks every candidate server of the region (SELECT ... FOR UPDATE), picks the
  best fit in Python, then UPDATEs it.

Each call is a whole CreateDeployment (insert, place, events, audit entries) made through
services.runtime.scheduler; the fleet has room for ~90% of the calls, so the tail
also exercises "no room". After each run: counters = sum over reserved deployments and never
above capacity (zero over-commit), checked as a superuser.

Same footing: one database, one pool, one event loop, so fsync / synchronous_commit (printed)
and the outbox notification are the same for every design (an OutboxFeed runs as in the
service: committed events wake it, and it sends the other replicas one coalesced NOTIFY);
a CHECKPOINT before each timed run; the designs alternate for --rounds rounds on a fresh
fleet each and the median round is shown (the p99 is that round's). Each round also shows
CPU per call: this process (the scheduler's code, asyncpg, the load loop) and the PostgreSQL
cluster (postmaster and its children, read from /proc; "-" when the server is not local) --
and how busy the whole machine was, to tell a CPU-bound design from a lock-bound one.

    .venv/bin/python bench/bench_placement.py [--calls 4000] [--concurrency 32]
        [--servers 16] [--rounds 3]

PostgreSQL: DATABASE_URL if set, else an embedded one (pgserver) in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from services.runtime import store
from services.runtime.domain import Candidate, DeploymentState, Tenancy, best_fit
from services.runtime.scheduler import Reserve, Scheduler
from shared.db import Database, Session
from shared.ids import new_id
from shared.outbox import OutboxFeed
from shared.resources import Resources
from shared.settings import SERVICES, Settings

RAM_MB, CPU_MILLIS = 128, 100


async def naive_reserve(
    tx: Session, region: str, driver: str, need: Resources, tenancy: Tenancy
) -> str | None:
    """Lock every candidate server, choose in Python, update the chosen one (the bench's
    deployments are all one organization's: tenancy never narrows the choice)."""
    rows = await tx.fetch(
        "SELECT id, ram_mb, cpu_millis, ram_mb_reserved, cpu_millis_reserved"
        " FROM runtime.servers WHERE status = 'active' AND region = $1 AND $2 = ANY(drivers)"
        " ORDER BY id FOR UPDATE",
        region,
        driver,
    )
    candidates = [
        Candidate(
            r["id"],
            Resources.from_row(r),
            Resources.from_row(r, suffix="_reserved"),
        )
        for r in rows
    ]
    chosen = best_fit(candidates, need)
    if chosen is None:
        return None
    await tx.execute(
        "UPDATE runtime.servers SET ram_mb_reserved = ram_mb_reserved + $2,"
        " cpu_millis_reserved = cpu_millis_reserved + $3, updated_at = now() WHERE id = $1",
        chosen.id,
        need.ram_mb,
        need.cpu_millis,
    )
    return chosen.id


@dataclass
class Result:
    name: str
    calls: int
    placed: int
    seconds: float
    latencies: list[float]
    overcommit: int
    client_cpu: float = 0.0  # seconds of this process's CPU during the run
    server_cpu: float | None = None  # seconds of the PostgreSQL cluster's CPU, if local
    machine_busy: float | None = None  # fraction of all CPUs busy (anyone's)

    @property
    def placements_per_second(self) -> float:
        return self.placed / self.seconds

    def line(self) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        server = "-" if self.server_cpu is None else f"{self.server_cpu / self.calls * 1e6:.0f}"
        busy = "-" if self.machine_busy is None else f"{self.machine_busy:.0%}"
        return (
            f"{self.name:<10} {self.calls / self.seconds:>6.0f} calls/s"
            f" {self.placements_per_second:>6.0f} placements/s"
            f"   p50 {p50:5.1f} ms   p99 {p99:5.1f} ms"
            f"   placed {self.placed}/{self.calls}   over-commit {self.overcommit}"
            f"   CPU/call: bench {self.client_cpu / self.calls * 1e6:.0f} us,"
            f" PostgreSQL {server} us; machine busy {busy}"
        )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime, stime, and the reaped children's cutime, cstime
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _machine_ticks() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


class CpuMeter:
    """CPU used by this process, the local PostgreSQL cluster, and the whole machine."""

    def __init__(self, postmaster: int | None) -> None:
        self.postmaster = postmaster

    def _cluster(self) -> float | None:
        if self.postmaster is None or _proc_cpu(self.postmaster) is None:
            return None
        total = 0.0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            if _ppid(int(entry)) == self.postmaster:
                total += _proc_cpu(int(entry)) or 0.0
        return total + (_proc_cpu(self.postmaster) or 0.0)

    def snapshot(self) -> tuple[float, float | None, tuple[int, int] | None]:
        return _own_cpu(), self._cluster(), _machine_ticks()

    @staticmethod
    def apply(result: Result, before: tuple, after: tuple) -> Result:
        result.client_cpu = after[0] - before[0]
        if before[1] is not None and after[1] is not None:
            result.server_cpu = after[1] - before[1]
        if before[2] is not None and after[2] is not None:
            total, idle = after[2][0] - before[2][0], after[2][1] - before[2][1]
            result.machine_busy = 1 - idle / total if total else None
        return result


async def postmaster_pid(admin_url: str) -> int | None:
    """The local postmaster's pid (the parent of our backend), or None if not local."""
    conn = await asyncpg.connect(admin_url)
    try:  # while the backend lives
        return _ppid(await conn.fetchval("SELECT pg_backend_pid()"))
    finally:
        await conn.close()


async def settings_line(admin_url: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        names = ("fsync", "synchronous_commit", "wal_sync_method", "commit_delay")
        values = [f"{n}={await conn.fetchval(f'SHOW {n}')}" for n in names]
    finally:
        await conn.close()
    return ", ".join(values)


async def add_fleet(db: Database, region: str, servers: int, room_each: int) -> list[str]:
    ids = []
    async with db.transaction() as tx:
        for i in range(servers):
            server = await store.insert_server(
                tx,
                name=f"{region}-{i}",
                region=region,
                agent_address="127.0.0.1:1",
                capacity=Resources(RAM_MB * room_each, CPU_MILLIS * room_each),
            )
            ids.append(server.id)
    return ids


async def check(admin_url: str, server_ids: list[str]) -> int:
    """Servers whose counters differ from the sum of reservations or exceed capacity."""
    conn = await asyncpg.connect(admin_url)
    try:
        bad = await conn.fetchval(
            """SELECT count(*) FROM (
                 SELECT s.id FROM runtime.servers s
                   LEFT JOIN runtime.deployments d ON d.server_id = s.id AND d.capacity_reserved
                  WHERE s.id = ANY($1::text[])
                  GROUP BY s.id
                 HAVING max(s.ram_mb_reserved) <> COALESCE(sum(d.ram_mb), 0)
                     OR max(s.cpu_millis_reserved) <> COALESCE(sum(d.cpu_millis), 0)
                     OR max(s.ram_mb_reserved) > max(s.ram_mb)
                     OR max(s.cpu_millis_reserved) > max(s.cpu_millis)) x""",
            server_ids,
        )
    finally:
        await conn.close()
    return int(bad)


async def run_design(
    name: str,
    reserve: Reserve | None,
    db: Database,
    admin_url: str,
    *,
    calls: int,
    concurrency: int,
    servers: int,
    meter: CpuMeter | None = None,
) -> Result:
    region = f"bench-{name}-{new_id()}"
    room_each = max(1, int(calls * 0.9) // servers)
    fleet = await add_fleet(db, region, servers, room_each)
    scheduler = Scheduler(db, reserve=reserve)
    need = Resources(RAM_MB, CPU_MILLIS)
    latencies: list[float] = []
    placed = 0
    remaining = calls
    # The load's own ids: cheap hex, so the bench measures the service, not the load.
    project_ids = [secrets.token_hex(12) for _ in range(calls)]
    if meter is not None:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute("CHECKPOINT")
        finally:
            await admin.close()

    async def caller() -> None:
        nonlocal placed, remaining
        while remaining > 0:
            remaining -= 1
            spec = store.DeploymentSpec(
                project_id=project_ids[remaining],
                organization_id="bench",
                resources=need,
                region=region,
                command="true",
            )
            started = time.perf_counter()
            deployment = await scheduler.create(spec)
            latencies.append(time.perf_counter() - started)
            if deployment.status is DeploymentState.SCHEDULING:
                placed += 1

    before = meter.snapshot() if meter is not None else None
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    after = meter.snapshot() if meter is not None else None
    result = Result(name, calls, placed, seconds, latencies, await check(admin_url, fleet))
    if before is not None and after is not None:
        CpuMeter.apply(result, before, after)
    return result


async def bench(admin_url: str, passwords: dict[str, str], args: argparse.Namespace) -> None:
    settings = Settings(service="runtime", database_url=admin_url, db_passwords=passwords)
    db = await Database.connect(
        settings.service_database_url(),
        min_size=args.concurrency + 1,  # + the feed's LISTEN connection
        max_size=args.concurrency + 1,
    )
    feed = OutboxFeed(db, "runtime")
    await feed.start()
    designs: list[tuple[str, Reserve | None]] = [
        ("naive", naive_reserve),
        ("atomic", store.reserve_capacity),  # reservation, then the deployment's update
        ("atomic-cte", None),  # both (and event + audit) in one statement: as shipped
    ]
    meter = CpuMeter(await postmaster_pid(admin_url))
    rounds: dict[str, list[Result]] = {name: [] for name, _ in designs}
    try:
        for name, reserve in designs:  # warm up connections and plans
            await run_design(
                name, reserve, db, admin_url, calls=200, concurrency=args.concurrency, servers=4
            )
        for _ in range(args.rounds):
            for name, reserve in designs:
                result = await run_design(
                    name,
                    reserve,
                    db,
                    admin_url,
                    calls=args.calls,
                    concurrency=args.concurrency,
                    servers=args.servers,
                    meter=meter,
                )
                rounds[name].append(result)
                if args.rounds > 1:
                    print("  round  " + result.line(), flush=True)
    finally:
        await feed.close()
        await db.close()
    print(
        f"placement: {args.calls} CreateDeployment transactions, {args.concurrency} concurrent"
        f" callers, {args.servers} servers in one region (room for ~90% of the calls),"
        f" {os.cpu_count()} CPUs, {args.rounds} alternating rounds (median round shown);"
        f" {await settings_line(admin_url)} for every design"
    )
    medians = {
        name: sorted(results, key=lambda r: r.placements_per_second)[len(results) // 2]
        for name, results in rounds.items()
    }
    for result in medians.values():
        print("  " + result.line())
    naive = medians["naive"]
    for name, result in medians.items():
        if name == "naive":
            continue
        ratio = result.placements_per_second / naive.placements_per_second
        print(f"  {name} / naive placements/s: {ratio:.1f}x")
    print(
        f"  outbox notifications: {feed.notifies} NOTIFYs for {feed.pokes} commits with events"
        " (coalesced; all designs, warm-up included)"
    )
    overcommitted = sum(r.overcommit for results in rounds.values() for r in results)
    print(f"  over-commit or counter drift, all {args.rounds * len(designs)} runs: {overcommitted}")
    if overcommitted:
        raise SystemExit("over-commit or counter drift detected")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--servers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from shared.migrate import migrate
    from shared.pg import create_database, provision

    pg = provision(Path(tempfile.mkdtemp(prefix="hangar-bench-")), ephemeral=True)
    try:
        admin = pg.url
        url = asyncio.run(create_database(admin, f"hangar_bench_{secrets.token_hex(4)}"))
        passwords = {svc: secrets.token_urlsafe(16) for svc in SERVICES}
        migrate(url, passwords)
        try:
            import uvloop

            uvloop.run(bench(url, passwords, args))
        except ImportError:  # pragma: no cover - uvloop is a dependency
            asyncio.run(bench(url, passwords, args))
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
