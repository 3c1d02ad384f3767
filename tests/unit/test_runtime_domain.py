"""Runtime's rules without a database: the deployment graph, best fit, drift."""

from __future__ import annotations

import itertools

import grpc
import pytest

from services.runtime.domain import (
    CANCELLABLE,
    ENDS,
    HOLDS_CAPACITY,
    TRANSITIONS,
    Candidate,
    DeploymentState,
    ProcessShare,
    best_fit,
    can_transition,
    crash_loop_reason,
    ensure_transition,
    find_drift,
    split_processes,
    with_log_lines,
    without_log_lines,
)
from shared.errors import FailedPrecondition, InvalidArgument
from shared.resources import Resources

S = DeploymentState

# The graph as the issue states it, written out pair by pair.
ALLOWED = {
    (S.QUEUED, S.SCHEDULING),
    (S.SCHEDULING, S.STARTING),
    (S.STARTING, S.RUNNING),
    (S.RUNNING, S.SUPERSEDED),
    # cancel from queued, scheduling, starting
    (S.QUEUED, S.CANCELLED),
    (S.SCHEDULING, S.CANCELLED),
    (S.STARTING, S.CANCELLED),
    # failure: no room before the deadline, the agent could not start it, it died later
    (S.QUEUED, S.FAILED),
    (S.SCHEDULING, S.FAILED),
    (S.STARTING, S.FAILED),
    (S.RUNNING, S.FAILED),
    # rollback ends the running one
    (S.RUNNING, S.ROLLED_BACK),
    # a running one that keeps crashing after restarts, running again once it stays up;
    # it ends as a running one does, or cancelled
    (S.RUNNING, S.CRASH_LOOP),
    (S.CRASH_LOOP, S.RUNNING),
    (S.CRASH_LOOP, S.SUPERSEDED),
    (S.CRASH_LOOP, S.FAILED),
    (S.CRASH_LOOP, S.ROLLED_BACK),
    (S.CRASH_LOOP, S.CANCELLED),
    # a source is built on its server before it starts; a build fails or is cancelled
    (S.SCHEDULING, S.BUILDING),
    (S.BUILDING, S.STARTING),
    (S.BUILDING, S.FAILED),
    (S.BUILDING, S.CANCELLED),
}


@pytest.mark.parametrize(("current", "new"), sorted(ALLOWED), ids=lambda s: s.value)
def test_allowed_transitions_pass(current: DeploymentState, new: DeploymentState) -> None:
    assert can_transition(current, new)
    ensure_transition(current, new)


ILLEGAL = sorted(set(itertools.product(S, S)) - ALLOWED)


@pytest.mark.parametrize(("current", "new"), ILLEGAL, ids=lambda s: s.value)
def test_every_other_pair_is_refused_with_failed_precondition(
    current: DeploymentState, new: DeploymentState
) -> None:
    assert not can_transition(current, new)
    with pytest.raises(FailedPrecondition) as caught:
        ensure_transition(current, new)
    error = caught.value
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "ILLEGAL_TRANSITION"
    assert error.metadata == {"from": current.value, "to": new.value}


def test_the_graph_has_every_state_and_only_the_listed_edges() -> None:
    assert set(TRANSITIONS) == set(S)
    assert {(a, b) for a, nexts in TRANSITIONS.items() for b in nexts} == ALLOWED
    assert len(ILLEGAL) == len(S) ** 2 - len(ALLOWED)


def test_ends_hold_no_capacity_and_cancel_is_before_running_or_while_crash_looping() -> None:
    assert ENDS == {S.SUPERSEDED, S.FAILED, S.CANCELLED, S.ROLLED_BACK}
    assert HOLDS_CAPACITY == {S.SCHEDULING, S.BUILDING, S.STARTING, S.RUNNING, S.CRASH_LOOP}
    assert not ENDS & HOLDS_CAPACITY
    assert CANCELLABLE == {S.QUEUED, S.SCHEDULING, S.BUILDING, S.STARTING, S.CRASH_LOOP}


def _server(sid: str, ram: int, cpu: int, ram_used: int = 0, cpu_used: int = 0) -> Candidate:
    return Candidate(sid, Resources(ram, cpu), Resources(ram_used, cpu_used))


def test_best_fit_leaves_the_least_ram_then_cpu() -> None:
    need = Resources(256, 250)
    servers = [
        _server("roomy", 4096, 4000),
        _server("snug", 1024, 1000, ram_used=700),  # 324 MB free: fits, least left
        _server("too-small", 1024, 1000, ram_used=900),
        _server("snug-more-cpu", 1024, 4000, ram_used=700),
    ]
    chosen = best_fit(servers, need)
    assert chosen is not None and chosen.id == "snug"
    assert best_fit([_server("cpu-bound", 4096, 200)], need) is None
    assert best_fit([], need) is None


def test_drift_names_servers_whose_counters_disagree() -> None:
    cap = Resources(1000, 1000)
    servers = [
        ("ok", cap, Resources(200, 100)),
        ("leaked", cap, Resources(500, 300)),
        ("empty-but-counted", cap, Resources(100, 100)),
        ("over", cap, Resources(0, 0)),
    ]
    sums = {"ok": Resources(200, 100), "leaked": Resources(200, 100), "over": Resources(1200, 10)}
    drift = {d.server_id: d for d in find_drift(servers, sums)}
    assert set(drift) == {"leaked", "empty-but-counted", "over"}
    assert drift["empty-but-counted"].actual == Resources(0, 0)
    assert drift["leaked"].repairable and not drift["over"].repairable


def test_a_crash_loop_reason_says_how_the_app_ended_then_its_last_lines() -> None:
    reason = crash_loop_reason("exited with code 1", 5, ["boom", "Traceback: db down"])
    assert reason == (
        "exited with code 1 (crash loop: restarted 5 times)\n"
        "last log lines:\nboom\nTraceback: db down"
    )
    assert without_log_lines(reason) == "exited with code 1 (crash loop: restarted 5 times)"
    assert with_log_lines("stopped", []) == without_log_lines("stopped") == "stopped"


def test_processes_split_the_deployment_as_asked_and_the_rest_goes_to_the_first() -> None:
    total = Resources(512, 500)
    assert split_processes([("web", 75), ("worker", 25)], total) == (
        ProcessShare("web", Resources(384, 375)),
        ProcessShare("worker", Resources(128, 125)),
    )
    # all 0: equal shares, the remainder to the first
    assert split_processes([("web", 0), ("a", 0), ("b", 0)], Resources(100, 100)) == (
        ProcessShare("web", Resources(34, 34)),
        ProcessShare("a", Resources(33, 33)),
        ProcessShare("b", Resources(33, 33)),
    )


@pytest.mark.parametrize(
    ("processes", "field"),
    [
        ([("web", 60), ("worker", 30)], "deployment.processes"),  # not 100
        ([("web", 50), ("web", 50)], "deployment.processes"),  # twice
        ([("web", 100), ("worker", 0)], "deployment.processes[1].percent"),  # mixed with 0
        ([("web", 99), ("worker", 1)], "deployment.processes[1].percent"),  # too small a share
        ([("we b", 100)], "deployment.processes[0].type"),
    ],
)
def test_a_bad_split_names_its_field(processes: list[tuple[str, int]], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        split_processes(processes, Resources(512, 500))
    assert [v.field for v in caught.value.violations] == [field]
