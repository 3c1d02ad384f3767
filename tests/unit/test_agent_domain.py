"""The agent's plain rules: start requests, exit codes, the log ring buffer, the app's
starting environment, and how containers look on the wire."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from hangar.agent.v1 import agent_pb2 as pb
from hangar.type.v1 import resources_pb2
from services.agent.api import container_to_proto, spec_from_proto
from services.agent.domain import (
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    LogBuffer,
    LogStream,
    describe_exit,
    exit_code_of,
)
from services.agent.drivers import inherited_env
from shared.errors import InvalidArgument
from shared.resources import Resources


def test_a_valid_command_spec_passes() -> None:
    ContainerSpec(container_id="c-1.a_b", command="python3 app.py", env={"DB_URL": "x"}).validate()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (ContainerSpec(container_id="", command="true"), "container_id"),
        (ContainerSpec(container_id="c/1", command="true"), "container_id"),
        (ContainerSpec(container_id="c-1"), "source"),
        (ContainerSpec(container_id="c-1", command="true", image="nginx"), "source"),
        (ContainerSpec(container_id="c-1", command="   "), "source"),
        (ContainerSpec(container_id="c-1", command="true", env={"1X": "v"}), "env['1X']"),
        (ContainerSpec(container_id="c-1", command="true", env={"X": "a\x00b"}), "env[X]"),
        (
            ContainerSpec(container_id="c-1", command="true", resources=Resources(-1, 0)),
            "resources.ram_mb",
        ),
        (
            ContainerSpec(container_id="c-1", command="true", health_check_path="up"),
            "health_check_path",
        ),
    ],
)
def test_bad_specs_name_the_field(spec: ContainerSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        spec.validate()
    assert field in [v.field for v in caught.value.violations]


def test_exit_codes_follow_the_shell_convention_for_signals() -> None:
    assert exit_code_of(0) == 0 and exit_code_of(3) == 3
    assert exit_code_of(-9) == 137 and exit_code_of(-15) == 143
    assert describe_exit(2) == "exited with code 2"
    assert describe_exit(-9) == "killed by SIGKILL"


def test_log_buffer_keeps_the_newest_lines_with_increasing_sequences() -> None:
    logs = LogBuffer(capacity=3)
    for n in range(1, 6):
        logs.append(LogStream.STDOUT, f"line {n}")
    assert [line.text for line in logs.since(0)] == ["line 3", "line 4", "line 5"]
    assert [line.sequence for line in logs.since(3)] == [4, 5]
    assert logs.dropped == 2 and logs.last_sequence == 5


def test_log_buffer_counts_only_unacknowledged_lines_as_dropped() -> None:
    logs = LogBuffer(capacity=2)
    logs.append(LogStream.STDOUT, "a")
    logs.append(LogStream.STDERR, "b")
    logs.acknowledge(2)  # runtime stored both
    logs.append(LogStream.STDOUT, "c")
    logs.append(LogStream.STDOUT, "d")
    assert logs.dropped == 0
    logs.append(LogStream.STDOUT, "e")  # pushes out "c", never shipped
    assert logs.dropped == 1


def test_log_buffer_trims_oversized_lines() -> None:
    logs = LogBuffer(capacity=5, max_line_chars=4)
    assert logs.append(LogStream.STDOUT, "abcdefgh").text == "abcd"
    assert logs.trimmed == 1


def test_apps_start_from_path_home_and_lang_only() -> None:
    agent_env = {
        "PATH": "/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "HANGAR_AGENT_SERVICE_SECRET": "s",
        "DATABASE_URL": "postgresql://secret",
    }
    assert inherited_env(agent_env) == {"PATH": "/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    assert inherited_env({})["PATH"]


def test_a_stopped_container_is_exited_on_the_wire_with_its_reason() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    info = ContainerInfo(
        container_id="c-1",
        deployment_id="d-1",
        project_id="p-1",
        state=ContainerState.STOPPED,
        address="127.0.0.1:4000",
        port=4000,
        pid=42,
        exit_code=143,
        reason="stopped",
        started_at=moment,
        ended_at=moment,
    )
    message = container_to_proto(info)
    assert message.status == pb.CONTAINER_STATUS_EXITED and message.reason == "stopped"
    assert message.exit_code == 143 and message.ended_at.ToDatetime(UTC) == moment
    running = container_to_proto(ContainerInfo("c-2", "d", "p", ContainerState.RUNNING))
    assert not running.HasField("exit_code") and not running.HasField("ended_at")


def test_start_request_maps_to_a_spec() -> None:
    request = pb.StartContainerRequest(
        container_id="c-1",
        command="run",
        env={"A": "1"},
        resources=resources_pb2.Resources(ram_mb=256, cpu_millis=100, bandwidth_gb=5),
        health_check_path="/up",
    )
    spec = spec_from_proto(request)
    assert (spec.command, spec.image, dict(spec.env)) == ("run", "", {"A": "1"})
    assert spec.resources == Resources(256, 100) and spec.health_check_path == "/up"
