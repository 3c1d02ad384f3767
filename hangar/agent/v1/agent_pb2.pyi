import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from hangar.type.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContainerStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTAINER_STATUS_UNSPECIFIED: _ClassVar[ContainerStatus]
    CONTAINER_STATUS_STARTING: _ClassVar[ContainerStatus]
    CONTAINER_STATUS_RUNNING: _ClassVar[ContainerStatus]
    CONTAINER_STATUS_STOPPING: _ClassVar[ContainerStatus]
    CONTAINER_STATUS_EXITED: _ClassVar[ContainerStatus]
    CONTAINER_STATUS_FAILED: _ClassVar[ContainerStatus]

class RestartPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESTART_POLICY_UNSPECIFIED: _ClassVar[RestartPolicy]
    RESTART_POLICY_ON_FAILURE: _ClassVar[RestartPolicy]
    RESTART_POLICY_ALWAYS: _ClassVar[RestartPolicy]
    RESTART_POLICY_NEVER: _ClassVar[RestartPolicy]

class SleepStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLEEP_STATUS_UNSPECIFIED: _ClassVar[SleepStatus]
    SLEEP_STATUS_AWAKE: _ClassVar[SleepStatus]
    SLEEP_STATUS_SLEEPING: _ClassVar[SleepStatus]
    SLEEP_STATUS_WAKING: _ClassVar[SleepStatus]
CONTAINER_STATUS_UNSPECIFIED: ContainerStatus
CONTAINER_STATUS_STARTING: ContainerStatus
CONTAINER_STATUS_RUNNING: ContainerStatus
CONTAINER_STATUS_STOPPING: ContainerStatus
CONTAINER_STATUS_EXITED: ContainerStatus
CONTAINER_STATUS_FAILED: ContainerStatus
RESTART_POLICY_UNSPECIFIED: RestartPolicy
RESTART_POLICY_ON_FAILURE: RestartPolicy
RESTART_POLICY_ALWAYS: RestartPolicy
RESTART_POLICY_NEVER: RestartPolicy
SLEEP_STATUS_UNSPECIFIED: SleepStatus
SLEEP_STATUS_AWAKE: SleepStatus
SLEEP_STATUS_SLEEPING: SleepStatus
SLEEP_STATUS_WAKING: SleepStatus

class Container(_message.Message):
    __slots__ = ("container_id", "deployment_id", "project_id", "status", "exit_code", "reason", "address", "port", "pid", "started_at", "ended_at", "sleep_status", "last_request_at", "restart_count", "last_exit_reason", "last_log_lines", "crash_loop", "next_restart_at", "restart_backoff", "slug_sha256", "building", "image_digest")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    SLEEP_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_REQUEST_AT_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_LINES_FIELD_NUMBER: _ClassVar[int]
    CRASH_LOOP_FIELD_NUMBER: _ClassVar[int]
    NEXT_RESTART_AT_FIELD_NUMBER: _ClassVar[int]
    RESTART_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    SLUG_SHA256_FIELD_NUMBER: _ClassVar[int]
    BUILDING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    deployment_id: str
    project_id: str
    status: ContainerStatus
    exit_code: int
    reason: str
    address: str
    port: int
    pid: int
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    sleep_status: SleepStatus
    last_request_at: _timestamp_pb2.Timestamp
    restart_count: int
    last_exit_reason: str
    last_log_lines: _containers.RepeatedScalarFieldContainer[str]
    crash_loop: bool
    next_restart_at: _timestamp_pb2.Timestamp
    restart_backoff: _duration_pb2.Duration
    slug_sha256: str
    building: bool
    image_digest: str
    def __init__(self, container_id: _Optional[str] = ..., deployment_id: _Optional[str] = ..., project_id: _Optional[str] = ..., status: _Optional[_Union[ContainerStatus, str]] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., pid: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sleep_status: _Optional[_Union[SleepStatus, str]] = ..., last_request_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restart_count: _Optional[int] = ..., last_exit_reason: _Optional[str] = ..., last_log_lines: _Optional[_Iterable[str]] = ..., crash_loop: _Optional[bool] = ..., next_restart_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restart_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., slug_sha256: _Optional[str] = ..., building: _Optional[bool] = ..., image_digest: _Optional[str] = ...) -> None: ...

class StartContainerRequest(_message.Message):
    __slots__ = ("container_id", "deployment_id", "project_id", "command", "image", "env", "resources", "health_check_path", "restart_policy", "liveness_check_path", "liveness_period", "liveness_failure_threshold", "source_sha256", "slug_sha256", "process_type", "image_command", "registry_username", "registry_password")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_PATH_FIELD_NUMBER: _ClassVar[int]
    RESTART_POLICY_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_CHECK_PATH_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_PERIOD_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FAILURE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SLUG_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROCESS_TYPE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COMMAND_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_USERNAME_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_PASSWORD_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    deployment_id: str
    project_id: str
    command: str
    image: str
    env: _containers.ScalarMap[str, str]
    resources: _resources_pb2.Resources
    health_check_path: str
    restart_policy: RestartPolicy
    liveness_check_path: str
    liveness_period: _duration_pb2.Duration
    liveness_failure_threshold: int
    source_sha256: str
    slug_sha256: str
    process_type: str
    image_command: str
    registry_username: str
    registry_password: str
    def __init__(self, container_id: _Optional[str] = ..., deployment_id: _Optional[str] = ..., project_id: _Optional[str] = ..., command: _Optional[str] = ..., image: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., resources: _Optional[_Union[_resources_pb2.Resources, _Mapping]] = ..., health_check_path: _Optional[str] = ..., restart_policy: _Optional[_Union[RestartPolicy, str]] = ..., liveness_check_path: _Optional[str] = ..., liveness_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., liveness_failure_threshold: _Optional[int] = ..., source_sha256: _Optional[str] = ..., slug_sha256: _Optional[str] = ..., process_type: _Optional[str] = ..., image_command: _Optional[str] = ..., registry_username: _Optional[str] = ..., registry_password: _Optional[str] = ...) -> None: ...

class StartContainerResponse(_message.Message):
    __slots__ = ("address", "port", "pid")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    pid: int
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class StopContainerRequest(_message.Message):
    __slots__ = ("container_id", "grace")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    grace: _duration_pb2.Duration
    def __init__(self, container_id: _Optional[str] = ..., grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class SleepContainerRequest(_message.Message):
    __slots__ = ("container_id", "idle_since", "grace")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_SINCE_FIELD_NUMBER: _ClassVar[int]
    GRACE_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    idle_since: _timestamp_pb2.Timestamp
    grace: _duration_pb2.Duration
    def __init__(self, container_id: _Optional[str] = ..., idle_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class ListContainersRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "project_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    project_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., project_id: _Optional[str] = ...) -> None: ...

class ListContainersResponse(_message.Message):
    __slots__ = ("containers", "next_page_token")
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    containers: _containers.RepeatedCompositeFieldContainer[Container]
    next_page_token: str
    def __init__(self, containers: _Optional[_Iterable[_Union[Container, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WakeContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...
