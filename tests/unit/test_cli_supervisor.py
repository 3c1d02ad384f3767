"""`hangar up`'s supervisor: a process that ends is started again after a back-off that
doubles to a cap and starts over once a run lasted; the start order honours what each needs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hangar_cli.cli import NEEDS, PROCESSES, Supervisor

EXITS = [sys.executable, "-c", "raise SystemExit(3)"]
SLEEPS = [sys.executable, "-c", "import time; time.sleep(60)"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ended(supervisor: Supervisor, name: str) -> subprocess.Popen[bytes]:
    proc = supervisor.children[name].proc
    assert proc is not None
    proc.wait(timeout=10)
    return proc


def test_processes_start_after_what_they_need() -> None:
    assert set(NEEDS) == set(PROCESSES)
    for position, name in enumerate(PROCESSES):
        assert set(NEEDS[name]) <= set(PROCESSES[:position]), name


def test_a_crash_is_restarted_after_a_doubling_capped_back_off(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    supervisor = Supervisor(first_delay=0.5, max_delay=2.0, stable_after=60, clock=clock)
    supervisor.start("billing", EXITS, {})
    delays = []
    for _ in range(4):
        first = _ended(supervisor, "billing")
        supervisor.check()
        restart_at = supervisor.children["billing"].restart_at
        assert restart_at is not None
        delays.append(restart_at - clock.now)
        clock.now = restart_at - 0.01
        supervisor.check()
        assert supervisor.children["billing"].proc is first  # still waiting
        clock.now = restart_at
        supervisor.check()
        assert supervisor.children["billing"].proc is not first  # started again
    assert delays == [0.5, 1.0, 2.0, 2.0]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "hangar: billing exited with 3 after 0.0s; restarting it in 0.5s"
    assert len(lines) == 4  # one line per exit
    supervisor.stop(grace=5)


def test_a_run_that_lasted_starts_the_back_off_over() -> None:
    clock = Clock()
    supervisor = Supervisor(first_delay=0.5, max_delay=30, stable_after=60, clock=clock)
    supervisor.start("billing", EXITS, {})
    supervisor.children["billing"].crashes = 5  # it had been crashing
    _ended(supervisor, "billing")
    clock.now += 61  # ... but this run lasted
    supervisor.check()
    assert supervisor.children["billing"].restart_at == clock.now + 0.5
    supervisor.stop(grace=5)


def test_a_restart_waits_for_what_it_needs_and_stop_ends_everything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    supervisor = Supervisor(first_delay=0.5, max_delay=30, stable_after=60, clock=clock)
    supervisor.start("identity", EXITS, {})
    supervisor.start("project", EXITS, {}, needs=("identity",))
    supervisor.children["identity"].crashes = 3  # identity waits 4 s, project 0.5 s
    _ended(supervisor, "identity")
    project = _ended(supervisor, "project")
    supervisor.check()
    clock.now += 1
    supervisor.check()
    assert supervisor.children["project"].proc is project  # identity is not back yet
    clock.now += 3
    supervisor.check()
    assert supervisor.children["identity"].proc is not None
    assert supervisor.children["identity"].restart_at is None
    supervisor.check()
    assert supervisor.children["project"].proc is not project
    supervisor.start("gateway", SLEEPS, {})
    running = supervisor.children["gateway"].proc
    assert running is not None
    supervisor.stop(grace=5)
    assert running.returncode == -15  # SIGTERM
    assert "gateway" not in capsys.readouterr().err
