"""AgentService servicer: proto in -> driver call -> proto out.

Every RPC is internal: only runtime's service token is accepted (user tokens get
PERMISSION_DENIED, no token UNAUTHENTICATED).
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC

import grpc

from hangar.agent.v1 import agent_pb2, agent_pb2_grpc
from services.agent.domain import (
    MAX_GRACE_SECONDS,
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    LivenessCheck,
    RestartPolicy,
    SleepState,
)
from services.agent.drivers import Driver
from shared import pagination
from shared.auth import require_service
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.proto import timestamp
from shared.resources import Resources

CALLER = "runtime"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# The contract has no "stopped": a container stopped on request is EXITED, reason "stopped".
_STATUS = {
    ContainerState.STARTING: agent_pb2.CONTAINER_STATUS_STARTING,
    ContainerState.RUNNING: agent_pb2.CONTAINER_STATUS_RUNNING,
    ContainerState.STOPPING: agent_pb2.CONTAINER_STATUS_STOPPING,
    ContainerState.EXITED: agent_pb2.CONTAINER_STATUS_EXITED,
    ContainerState.FAILED: agent_pb2.CONTAINER_STATUS_FAILED,
    ContainerState.STOPPED: agent_pb2.CONTAINER_STATUS_EXITED,
}

_SLEEP = {
    SleepState.AWAKE: agent_pb2.SLEEP_STATUS_AWAKE,
    SleepState.SLEEPING: agent_pb2.SLEEP_STATUS_SLEEPING,
    SleepState.WAKING: agent_pb2.SLEEP_STATUS_WAKING,
}

_RESTART_POLICY: dict[int, RestartPolicy] = {
    agent_pb2.RESTART_POLICY_UNSPECIFIED: RestartPolicy.ON_FAILURE,
    agent_pb2.RESTART_POLICY_ON_FAILURE: RestartPolicy.ON_FAILURE,
    agent_pb2.RESTART_POLICY_ALWAYS: RestartPolicy.ALWAYS,
    agent_pb2.RESTART_POLICY_NEVER: RestartPolicy.NEVER,
}
DEFAULT_LIVENESS_PERIOD_SECONDS = 10.0
DEFAULT_LIVENESS_FAILURE_THRESHOLD = 3


class AgentApi(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    async def StartContainer(
        self, request: agent_pb2.StartContainerRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.StartContainerResponse:
        require_service(CALLER)
        spec = spec_from_proto(request)
        spec.validate()
        if spec.image and not self.driver.runs_images:
            raise FailedPrecondition("this agent has no image driver", reason="NO_IMAGE_DRIVER")
        info = await self.driver.start(spec)
        return agent_pb2.StartContainerResponse(address=info.address, port=info.port, pid=info.pid)

    async def StopContainer(
        self, request: agent_pb2.StopContainerRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.Container:
        require_service(CALLER)
        _require_id(request.container_id)
        return container_to_proto(await self.driver.stop(request.container_id, _grace(request)))

    async def SleepContainer(
        self, request: agent_pb2.SleepContainerRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.Container:
        require_service(CALLER)
        _require_id(request.container_id)
        grace = _grace(request)
        idle_since = request.idle_since.ToDatetime(UTC) if request.HasField("idle_since") else None
        info = await self.driver.sleep(request.container_id, idle_since, grace)
        return container_to_proto(info)

    async def WakeContainer(
        self, request: agent_pb2.WakeContainerRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.Container:
        require_service(CALLER)
        _require_id(request.container_id)
        return container_to_proto(await self.driver.wake(request.container_id))

    async def GetContainer(
        self, request: agent_pb2.GetContainerRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.Container:
        require_service(CALLER)
        _require_id(request.container_id)
        info = self.driver.inspect(request.container_id)
        if info is None:
            raise NotFound("this agent runs no such container", reason="CONTAINER_NOT_FOUND")
        return container_to_proto(info)

    async def ListContainers(
        self, request: agent_pb2.ListContainersRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ListContainersResponse:
        require_service(CALLER)
        size = pagination.page_size(request.page_size, MAX_PAGE_SIZE, default=DEFAULT_PAGE_SIZE)
        after = _decode_page_token(request.page_token)
        listed = sorted(
            (
                info
                for info in self.driver.list()
                if info.container_id > after
                and (not request.project_id or info.project_id == request.project_id)
            ),
            key=lambda info: info.container_id,
        )
        page = listed[:size]
        next_token = _encode_page_token(page[-1].container_id) if len(listed) > size else ""
        return agent_pb2.ListContainersResponse(
            containers=[container_to_proto(info) for info in page], next_page_token=next_token
        )


def spec_from_proto(request: agent_pb2.StartContainerRequest) -> ContainerSpec:
    return ContainerSpec(
        container_id=request.container_id,
        deployment_id=request.deployment_id,
        project_id=request.project_id,
        command=request.command,
        image=request.image,
        env=dict(request.env),
        resources=Resources.from_proto(request.resources).compute,
        health_check_path=request.health_check_path,
        restart_policy=_restart_policy(request.restart_policy),
        liveness=_liveness(request),
        source_sha256=request.source_sha256,
        slug_sha256=request.slug_sha256,
        process_type=request.process_type,
        image_command=request.image_command,
        registry_username=request.registry_username,
        registry_password=request.registry_password,
    )


def _restart_policy(value: int) -> RestartPolicy:
    try:
        return _RESTART_POLICY[value]
    except KeyError:
        raise InvalidArgument.field("restart_policy", "on-failure, always or never") from None


def _liveness(request: agent_pb2.StartContainerRequest) -> LivenessCheck | None:
    """The liveness check asked for (validated with the spec); None without a path."""
    if not request.liveness_check_path:
        return None
    period = (
        request.liveness_period.ToTimedelta().total_seconds()
        if request.HasField("liveness_period")
        else DEFAULT_LIVENESS_PERIOD_SECONDS
    )
    return LivenessCheck(
        path=request.liveness_check_path,
        period_seconds=period,
        failure_threshold=request.liveness_failure_threshold or DEFAULT_LIVENESS_FAILURE_THRESHOLD,
    )


def container_to_proto(info: ContainerInfo) -> agent_pb2.Container:
    message = agent_pb2.Container(
        container_id=info.container_id,
        deployment_id=info.deployment_id,
        project_id=info.project_id,
        status=_STATUS[info.state],
        reason=info.reason,
        address=info.address,
        port=info.port,
        pid=info.pid,
    )
    if info.exit_code is not None:
        message.exit_code = info.exit_code
    if info.started_at is not None:
        message.started_at.CopyFrom(timestamp(info.started_at))
    if info.ended_at is not None:
        message.ended_at.CopyFrom(timestamp(info.ended_at))
    message.sleep_status = _SLEEP[info.sleep]
    if info.last_request_at is not None:
        message.last_request_at.CopyFrom(timestamp(info.last_request_at))
    message.restart_count = info.restarts
    message.last_exit_reason = info.last_exit_reason
    message.last_log_lines.extend(info.last_log_lines)
    message.crash_loop = info.crash_loop
    message.building = info.building
    message.slug_sha256 = info.slug_sha256
    message.image_digest = info.image_digest
    if info.next_restart_at is not None:
        message.next_restart_at.CopyFrom(timestamp(info.next_restart_at))
        message.restart_backoff.FromNanoseconds(round(info.restart_delay * 1e9))
    return message


def _grace(
    request: agent_pb2.StopContainerRequest | agent_pb2.SleepContainerRequest,
) -> float | None:
    if not request.HasField("grace"):
        return None
    grace: float = request.grace.ToTimedelta().total_seconds()
    if not 0 <= grace <= MAX_GRACE_SECONDS:
        raise InvalidArgument.field("grace", f"between 0 and {MAX_GRACE_SECONDS:g}s")
    return grace


def _require_id(container_id: str) -> None:
    if not container_id:
        raise InvalidArgument.field("container_id", "required")


_PAGE_TOKEN_PREFIX = "after:"


def _encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"{_PAGE_TOKEN_PREFIX}{last_id}".encode()).decode()


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        text = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith(_PAGE_TOKEN_PREFIX):
        raise InvalidArgument.field("page_token", "not a token this agent issued")
    return text.removeprefix(_PAGE_TOKEN_PREFIX)
