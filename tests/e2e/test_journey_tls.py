"""The journey's core (tests/e2e/test_journey.py, its own steps) with mutual TLS between
every process (start_stack(tls=True), the certificates `hangar up` makes): sign up, an
organization, a project, a secret, a viewer, a command app deployed by runtime through the
agent that answers (at its name too, through the edge) and ships its logs back, and deleting
the project stops it. Every gRPC
server refuses a client without a certificate."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from hangar_cli.cli import wait_healthy
from tests.e2e import test_journey as steps
from tests.support.stack import Stack, module_stack, wait_for

pytestmark = pytest.mark.slow

GRPC_PROCESSES = ("identity", "billing", "project", "runtime", "agent")


@pytest.fixture(scope="module")
def stack(
    create_database: Callable[[str], str],
    db_passwords: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("tls-stack")
    with module_stack(create_database, db_passwords, home, edge=True, tls=True) as running:
        yield running


def test_every_grpc_server_speaks_mutual_tls_only(stack: Stack) -> None:
    assert stack.client_tls is not None
    for name in GRPC_PROCESSES:
        address = stack.addresses[name]
        assert wait_healthy(name, address, time.monotonic() + 30, stack.client_tls), name
        assert not wait_healthy(name, address, time.monotonic() + 1), f"{name} took plaintext"
        own = stack.tls_env[name]["HANGAR_TLS_KEY_FILE"]
        assert Path(own).parent.name == name and Path(own).stat().st_mode & 0o777 == 0o600


# The journey's own steps, in its order, against the stack above (its `stack` fixture).
journey = steps.journey
test_sign_up_log_in_and_read_me = steps.test_sign_up_log_in_and_read_me
test_create_an_organization_with_the_hobby_plan = (
    steps.test_create_an_organization_with_the_hobby_plan
)
test_create_a_project_from_the_pool = steps.test_create_a_project_from_the_pool
test_secrets_are_listed_without_values = steps.test_secrets_are_listed_without_values
test_a_viewer_reads_but_cannot_write = steps.test_a_viewer_reads_but_cannot_write
test_deploy_a_command_app_and_see_it_answer = steps.test_deploy_a_command_app_and_see_it_answer


def test_the_app_answers_at_its_name_through_the_edge(journey: steps.Journey) -> None:
    """The edge learnt the route from runtime (ListRoutes, WatchEvents) over mutual TLS."""
    j = journey
    j.need_deploy()
    edge = f"http://{j.stack.addresses['edge']}/"
    host = {"Host": j.project["hostname"]}
    wait_for(lambda: httpx.get(edge, headers=host, timeout=5).status_code == 200, "the edge")


test_read_its_logs = steps.test_read_its_logs
test_delete_the_project_and_see_the_app_stop = steps.test_delete_the_project_and_see_the_app_stop
