"""The agent's restart rules without processes: the back-off schedule, what counts as a
crash loop, which ends each policy restarts, and the log lines kept with a crash."""

from __future__ import annotations

import pytest

from hangar.agent.v1 import agent_pb2 as pb
from services.agent.api import spec_from_proto
from services.agent.domain import (
    ContainerSpec,
    LivenessCheck,
    LogLine,
    LogStream,
    RestartPolicy,
    utcnow,
)
from services.agent.restarts import CrashCount, RestartRules, last_app_lines, restarts_after
from shared.errors import InvalidArgument

RULES = RestartRules(backoff_seconds=1, max_backoff_seconds=60, crash_loop_after=5)


def test_the_back_off_doubles_from_one_second_up_to_its_cap() -> None:
    assert [RULES.delay(n) for n in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert RULES.delay(10_000) == 60  # no overflow however long it loops


def test_quick_crashes_in_a_row_make_a_crash_loop_and_a_stable_run_starts_over() -> None:
    count = CrashCount()
    delays = [count.crashed(RULES, quick=True) for _ in range(4)]
    assert delays == [1, 2, 4, 8] and not count.crash_loop(RULES)
    assert count.crashed(RULES, quick=True) == 16 and count.crash_loop(RULES)
    count.stable()
    assert not count.crash_loop(RULES)
    assert count.crashed(RULES, quick=False) == 1  # after a stable run: from the start


def test_crashes_of_runs_that_had_been_stable_do_not_make_a_crash_loop() -> None:
    count = CrashCount()
    for _ in range(10):
        count.crashed(RULES, quick=False)
        count.stable()
    assert not count.crash_loop(RULES)


@pytest.mark.parametrize(
    ("policy", "returncode", "killed", "restarts"),
    [
        (RestartPolicy.ON_FAILURE, 1, False, True),
        (RestartPolicy.ON_FAILURE, -9, False, True),  # a signal: an OOM kill too
        (RestartPolicy.ON_FAILURE, 0, False, False),  # a clean exit
        (RestartPolicy.ON_FAILURE, 0, True, True),  # killed for its liveness check
        (RestartPolicy.ALWAYS, 0, False, True),
        (RestartPolicy.ALWAYS, 1, False, True),
        (RestartPolicy.NEVER, 1, False, False),
        (RestartPolicy.NEVER, 0, True, False),
    ],
)
def test_which_ends_each_policy_restarts(
    policy: RestartPolicy, returncode: int, killed: bool, restarts: bool
) -> None:
    assert restarts_after(policy, returncode, killed_by_agent=killed) is restarts


def test_the_last_lines_kept_are_the_apps_own_and_short() -> None:
    texts = ["one", "[hangar agent] a notice", "two", "x" * 500, "three", "four", "five"]
    lines = [LogLine(n, LogStream.STDERR, text, utcnow()) for n, text in enumerate(texts, 1)]
    kept = last_app_lines(lines)
    assert kept[0] == "two" and kept[-3:] == ("three", "four", "five") and len(kept) == 5
    assert len(kept[1]) == 200 and kept[1].endswith("…")


def test_a_start_request_carries_its_policy_and_liveness_check() -> None:
    request = pb.StartContainerRequest(
        container_id="c-1",
        command="serve",
        restart_policy=pb.RESTART_POLICY_NEVER,
        liveness_check_path="/live",
        liveness_failure_threshold=2,
    )
    request.liveness_period.FromMilliseconds(500)
    spec = spec_from_proto(request)
    assert spec.restart_policy is RestartPolicy.NEVER
    assert spec.liveness == LivenessCheck("/live", period_seconds=0.5, failure_threshold=2)
    defaults = spec_from_proto(pb.StartContainerRequest(container_id="c-2", command="serve"))
    assert defaults.restart_policy is RestartPolicy.ON_FAILURE and defaults.liveness is None
    checked = spec_from_proto(
        pb.StartContainerRequest(container_id="c-3", command="serve", liveness_check_path="/")
    )
    assert checked.liveness == LivenessCheck("/", period_seconds=10, failure_threshold=3)


@pytest.mark.parametrize(
    ("liveness", "field"),
    [
        (LivenessCheck("live"), "liveness_check_path"),
        (LivenessCheck("/a b"), "liveness_check_path"),
        (LivenessCheck("/", period_seconds=-1), "liveness_period"),
        (LivenessCheck("/", period_seconds=0), "liveness_period"),
        (LivenessCheck("/", failure_threshold=0), "liveness_failure_threshold"),
        (LivenessCheck("/", failure_threshold=101), "liveness_failure_threshold"),
    ],
)
def test_a_bad_liveness_check_is_refused_naming_its_field(
    liveness: LivenessCheck, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ContainerSpec(container_id="c-1", command="serve", liveness=liveness).validate()
    assert [v.field for v in caught.value.violations] == [field]
