"""What lets an agent's apps outlive it (services/agent/runs.py, adoption.py): output files
read into lines from a cursor that a later agent resumes, sequences reserved ahead, bytes
already settled given back to the disk, and the container record read back as written."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.agent import adoption
from services.agent.domain import (
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    LivenessCheck,
    LogBuffer,
    LogStream,
    RestartPolicy,
    SleepState,
)
from services.agent.runs import RESERVED_SEQUENCES, AppHome, LogTail
from shared.resources import Resources


@pytest.fixture
def home(tmp_path: Path) -> AppHome:
    found = AppHome(tmp_path / "c-1")
    found.create()
    return found


def write(home: AppHome, stream: LogStream, data: bytes) -> None:
    with open(home.output[stream], "ab") as f:
        f.write(data)


def texts(logs: LogBuffer) -> list[tuple[int, str]]:
    return [(line.sequence, line.text) for line in logs.since(0)]


def test_output_becomes_lines_and_a_long_line_is_cut_and_its_rest_skipped(home: AppHome) -> None:
    logs = LogBuffer(100, max_line_chars=10)
    tail = LogTail(home)
    tail.open()
    write(home, LogStream.STDOUT, b"one\r\n" + b"x" * 25)
    tail.read(logs)
    write(home, LogStream.STDOUT, b"yy\nthree\npart")
    tail.read(logs)
    assert [text for _, text in texts(logs)] == ["one", "x" * 10, "three"]
    assert logs.trimmed == 1
    tail.finish(logs)  # the run ended: its unfinished last line is a line
    assert texts(logs)[-1] == (4, "part")


def test_a_later_agent_resumes_after_the_settled_lines_with_new_sequences(home: AppHome) -> None:
    logs = LogBuffer(100)
    tail = LogTail(home)
    tail.reserve(logs)
    tail.open()
    write(home, LogStream.STDOUT, b"a\nb\n")
    write(home, LogStream.STDERR, b"oops\n")
    tail.read(logs)
    logs.acknowledge(2)  # runtime stored a and b; "oops" was not acknowledged
    assert tail.settle(logs)
    saved = tail.saved()
    write(home, LogStream.STDOUT, b"c\n")  # written while no agent ran
    tail.close()

    later = LogTail(home, saved)
    resumed = LogBuffer(100)
    resumed.resume_after(later.issued_upto)
    later.open()
    later.read(resumed)
    lines = texts(resumed)
    assert sorted(text for _, text in lines) == ["c", "oops"]  # nothing stored is read again
    assert min(sequence for sequence, _ in lines) == RESERVED_SEQUENCES + 1
    assert later.reserve(resumed) and later.issued_upto > resumed.last_sequence


def test_lines_the_buffer_let_go_are_settled_too(home: AppHome) -> None:
    logs = LogBuffer(2)
    tail = LogTail(home)
    tail.open()
    write(home, LogStream.STDOUT, b"1\n2\n3\n4\n")
    tail.read(logs)
    assert tail.settle(logs)  # 1 and 2 were pushed out: no later agent reads them again
    assert tail.saved()["stdout"] == [4, False]


def test_settled_output_is_given_back_to_the_disk(home: AppHome) -> None:
    logs = LogBuffer(10)
    tail = LogTail(home)
    tail.open()
    line = b"y" * 1023 + b"\n"
    write(home, LogStream.STDOUT, line * 4096)  # 4 MiB
    while tail.read(logs):
        pass
    before = os.stat(home.output[LogStream.STDOUT]).st_blocks
    logs.acknowledge(logs.last_sequence)
    tail.settle(logs)
    after = os.stat(home.output[LogStream.STDOUT])
    if after.st_blocks == before:
        pytest.skip("this file system cannot punch holes")
    assert after.st_size == 4 << 20 and after.st_blocks * 512 < 1 << 20


def test_the_container_record_reads_back_as_written() -> None:
    spec = ContainerSpec(
        container_id="c-1",
        deployment_id="d-1",
        project_id="p-1",
        command="exec app",
        env={"SECRET": "s3cret"},
        resources=Resources(128, 250),
        restart_policy=RestartPolicy.ALWAYS,
        liveness=LivenessCheck("/up", 5.0, 2),
    )
    info = ContainerInfo(
        "c-1",
        "d-1",
        "p-1",
        ContainerState.RUNNING,
        address="127.0.0.1:5000",
        port=5000,
        pid=42,
        started_at=datetime(2026, 12, 1, 12, 0, tzinfo=UTC),
        sleep=SleepState.SLEEPING,
        run=3,
        last_log_lines=("a", "b"),
    )
    saved = adoption.container_record("none", spec, info, private_port=6000)
    saved["info"]["added_by_a_newer_agent"] = True  # ignored
    del saved["info"]["restarts"]  # defaulted
    assert adoption.spec_and_info(saved, "none") == (spec, info)
    with pytest.raises(ValueError):
        adoption.spec_and_info(saved, "container")
    # An agent before version 2 wrote RAM and CPU beside the other fields: read the same.
    older = {**saved, "version": 1, "spec": {**saved["spec"], "ram_mb": 128, "cpu_millis": 250}}
    del older["spec"]["resources"]
    assert adoption.spec_and_info(older, "none") == (spec, info)
    with pytest.raises(ValueError):
        adoption.spec_and_info({**saved, "version": 99}, "none")
