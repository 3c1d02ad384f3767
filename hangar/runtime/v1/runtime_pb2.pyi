import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from hangar.events.v1 import events_pb2 as _events_pb2
from hangar.type.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServerStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVER_STATUS_UNSPECIFIED: _ClassVar[ServerStatus]
    SERVER_STATUS_ACTIVE: _ClassVar[ServerStatus]
    SERVER_STATUS_DRAINING: _ClassVar[ServerStatus]
    SERVER_STATUS_DOWN: _ClassVar[ServerStatus]

class ServerIsolation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVER_ISOLATION_UNSPECIFIED: _ClassVar[ServerIsolation]
    SERVER_ISOLATION_NONE: _ClassVar[ServerIsolation]
    SERVER_ISOLATION_CONTAINER: _ClassVar[ServerIsolation]

class DeploymentStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOYMENT_STATUS_UNSPECIFIED: _ClassVar[DeploymentStatus]
    DEPLOYMENT_STATUS_QUEUED: _ClassVar[DeploymentStatus]
    DEPLOYMENT_STATUS_SCHEDULING: _ClassVar[DeploymentStatus]
    DEPLOYMENT_STATUS_STARTING: _ClassVar[DeploymentStatus]
    DEPLOYMENT_STATUS_RUNNING: _ClassVar[DeploymentStatus]
    DEPLOYMENT_STATUS_SUPERSEDED: _ClassVar[DeploymentStatus]
    DEPLOYMENT_STATUS_FAILED: _ClassVar[DeploymentStatus]
    DEPLOYMENT_STATUS_CANCELLED: _ClassVar[DeploymentStatus]
    DEPLOYMENT_STATUS_ROLLED_BACK: _ClassVar[DeploymentStatus]
    DEPLOYMENT_STATUS_CRASH_LOOP: _ClassVar[DeploymentStatus]
    DEPLOYMENT_STATUS_BUILDING: _ClassVar[DeploymentStatus]

class ReleaseReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELEASE_REASON_UNSPECIFIED: _ClassVar[ReleaseReason]
    RELEASE_REASON_DEPLOY: _ClassVar[ReleaseReason]
    RELEASE_REASON_ROLLBACK: _ClassVar[ReleaseReason]
    RELEASE_REASON_CONFIG_CHANGE: _ClassVar[ReleaseReason]
    RELEASE_REASON_FAILOVER: _ClassVar[ReleaseReason]

class ContainerStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTAINER_STATUS_UNSPECIFIED: _ClassVar[ContainerStatus]
    CONTAINER_STATUS_STARTING: _ClassVar[ContainerStatus]
    CONTAINER_STATUS_RUNNING: _ClassVar[ContainerStatus]
    CONTAINER_STATUS_STOPPING: _ClassVar[ContainerStatus]
    CONTAINER_STATUS_EXITED: _ClassVar[ContainerStatus]
    CONTAINER_STATUS_FAILED: _ClassVar[ContainerStatus]

class SleepStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLEEP_STATUS_UNSPECIFIED: _ClassVar[SleepStatus]
    SLEEP_STATUS_AWAKE: _ClassVar[SleepStatus]
    SLEEP_STATUS_SLEEPING: _ClassVar[SleepStatus]
    SLEEP_STATUS_WAKING: _ClassVar[SleepStatus]

class LogStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOG_STREAM_UNSPECIFIED: _ClassVar[LogStream]
    LOG_STREAM_STDOUT: _ClassVar[LogStream]
    LOG_STREAM_STDERR: _ClassVar[LogStream]
    LOG_STREAM_BUILD: _ClassVar[LogStream]

class MetricType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_TYPE_UNSPECIFIED: _ClassVar[MetricType]
    METRIC_TYPE_MEMORY_RSS_BYTES: _ClassVar[MetricType]
    METRIC_TYPE_CPU_MILLICORES: _ClassVar[MetricType]
    METRIC_TYPE_NETWORK_RX_BYTES: _ClassVar[MetricType]
    METRIC_TYPE_NETWORK_TX_BYTES: _ClassVar[MetricType]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    AGGREGATION_AVG: _ClassVar[Aggregation]
    AGGREGATION_MAX: _ClassVar[Aggregation]
    AGGREGATION_SUM: _ClassVar[Aggregation]
SERVER_STATUS_UNSPECIFIED: ServerStatus
SERVER_STATUS_ACTIVE: ServerStatus
SERVER_STATUS_DRAINING: ServerStatus
SERVER_STATUS_DOWN: ServerStatus
SERVER_ISOLATION_UNSPECIFIED: ServerIsolation
SERVER_ISOLATION_NONE: ServerIsolation
SERVER_ISOLATION_CONTAINER: ServerIsolation
DEPLOYMENT_STATUS_UNSPECIFIED: DeploymentStatus
DEPLOYMENT_STATUS_QUEUED: DeploymentStatus
DEPLOYMENT_STATUS_SCHEDULING: DeploymentStatus
DEPLOYMENT_STATUS_STARTING: DeploymentStatus
DEPLOYMENT_STATUS_RUNNING: DeploymentStatus
DEPLOYMENT_STATUS_SUPERSEDED: DeploymentStatus
DEPLOYMENT_STATUS_FAILED: DeploymentStatus
DEPLOYMENT_STATUS_CANCELLED: DeploymentStatus
DEPLOYMENT_STATUS_ROLLED_BACK: DeploymentStatus
DEPLOYMENT_STATUS_CRASH_LOOP: DeploymentStatus
DEPLOYMENT_STATUS_BUILDING: DeploymentStatus
RELEASE_REASON_UNSPECIFIED: ReleaseReason
RELEASE_REASON_DEPLOY: ReleaseReason
RELEASE_REASON_ROLLBACK: ReleaseReason
RELEASE_REASON_CONFIG_CHANGE: ReleaseReason
RELEASE_REASON_FAILOVER: ReleaseReason
CONTAINER_STATUS_UNSPECIFIED: ContainerStatus
CONTAINER_STATUS_STARTING: ContainerStatus
CONTAINER_STATUS_RUNNING: ContainerStatus
CONTAINER_STATUS_STOPPING: ContainerStatus
CONTAINER_STATUS_EXITED: ContainerStatus
CONTAINER_STATUS_FAILED: ContainerStatus
SLEEP_STATUS_UNSPECIFIED: SleepStatus
SLEEP_STATUS_AWAKE: SleepStatus
SLEEP_STATUS_SLEEPING: SleepStatus
SLEEP_STATUS_WAKING: SleepStatus
LOG_STREAM_UNSPECIFIED: LogStream
LOG_STREAM_STDOUT: LogStream
LOG_STREAM_STDERR: LogStream
LOG_STREAM_BUILD: LogStream
METRIC_TYPE_UNSPECIFIED: MetricType
METRIC_TYPE_MEMORY_RSS_BYTES: MetricType
METRIC_TYPE_CPU_MILLICORES: MetricType
METRIC_TYPE_NETWORK_RX_BYTES: MetricType
METRIC_TYPE_NETWORK_TX_BYTES: MetricType
AGGREGATION_UNSPECIFIED: Aggregation
AGGREGATION_AVG: Aggregation
AGGREGATION_MAX: Aggregation
AGGREGATION_SUM: Aggregation

class Server(_message.Message):
    __slots__ = ("id", "name", "region", "agent_address", "capacity", "reserved", "status", "last_heartbeat_at", "created_at", "isolation")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    region: str
    agent_address: str
    capacity: _resources_pb2.Resources
    reserved: _resources_pb2.Resources
    status: ServerStatus
    last_heartbeat_at: _timestamp_pb2.Timestamp
    created_at: _timestamp_pb2.Timestamp
    isolation: ServerIsolation
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., region: _Optional[str] = ..., agent_address: _Optional[str] = ..., capacity: _Optional[_Union[_resources_pb2.Resources, _Mapping]] = ..., reserved: _Optional[_Union[_resources_pb2.Resources, _Mapping]] = ..., status: _Optional[_Union[ServerStatus, str]] = ..., last_heartbeat_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., isolation: _Optional[_Union[ServerIsolation, str]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("id", "project_id", "organization_id", "server_id", "status", "capacity_reserved", "image", "command", "source_sha256", "resources", "secrets_version", "exit_code", "status_reason", "rolled_back_from", "created_at", "updated_at", "slug_sha256", "release_reason", "created_by", "process_type", "processes", "image_command", "image_digest", "replicas", "replica_index", "replica_set_id", "max_surge", "max_unavailable")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_RESERVED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    SECRETS_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_REASON_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FROM_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SLUG_SHA256_FIELD_NUMBER: _ClassVar[int]
    RELEASE_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    PROCESS_TYPE_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COMMAND_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_INDEX_FIELD_NUMBER: _ClassVar[int]
    REPLICA_SET_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_SURGE_FIELD_NUMBER: _ClassVar[int]
    MAX_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    id: str
    project_id: str
    organization_id: str
    server_id: str
    status: DeploymentStatus
    capacity_reserved: bool
    image: str
    command: str
    source_sha256: str
    resources: _resources_pb2.Resources
    secrets_version: str
    exit_code: int
    status_reason: str
    rolled_back_from: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    slug_sha256: str
    release_reason: ReleaseReason
    created_by: str
    process_type: str
    processes: _containers.RepeatedCompositeFieldContainer[DeploymentProcess]
    image_command: str
    image_digest: str
    replicas: int
    replica_index: int
    replica_set_id: str
    max_surge: int
    max_unavailable: int
    def __init__(self, id: _Optional[str] = ..., project_id: _Optional[str] = ..., organization_id: _Optional[str] = ..., server_id: _Optional[str] = ..., status: _Optional[_Union[DeploymentStatus, str]] = ..., capacity_reserved: _Optional[bool] = ..., image: _Optional[str] = ..., command: _Optional[str] = ..., source_sha256: _Optional[str] = ..., resources: _Optional[_Union[_resources_pb2.Resources, _Mapping]] = ..., secrets_version: _Optional[str] = ..., exit_code: _Optional[int] = ..., status_reason: _Optional[str] = ..., rolled_back_from: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., slug_sha256: _Optional[str] = ..., release_reason: _Optional[_Union[ReleaseReason, str]] = ..., created_by: _Optional[str] = ..., process_type: _Optional[str] = ..., processes: _Optional[_Iterable[_Union[DeploymentProcess, _Mapping]]] = ..., image_command: _Optional[str] = ..., image_digest: _Optional[str] = ..., replicas: _Optional[int] = ..., replica_index: _Optional[int] = ..., replica_set_id: _Optional[str] = ..., max_surge: _Optional[int] = ..., max_unavailable: _Optional[int] = ...) -> None: ...

class DeploymentProcess(_message.Message):
    __slots__ = ("type", "percent", "resources")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    type: str
    percent: int
    resources: _resources_pb2.Resources
    def __init__(self, type: _Optional[str] = ..., percent: _Optional[int] = ..., resources: _Optional[_Union[_resources_pb2.Resources, _Mapping]] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("project_id", "sha256", "size_bytes", "created_by", "created_at")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    sha256: str
    size_bytes: int
    created_by: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, project_id: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., created_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("sha256", "size_bytes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Container(_message.Message):
    __slots__ = ("id", "project_id", "deployment_id", "server_id", "status", "sleep_status", "address", "last_request_at", "started_at", "restart_count", "last_exit_reason", "crash_loop", "process_type")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SLEEP_STATUS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAST_REQUEST_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    CRASH_LOOP_FIELD_NUMBER: _ClassVar[int]
    PROCESS_TYPE_FIELD_NUMBER: _ClassVar[int]
    id: str
    project_id: str
    deployment_id: str
    server_id: str
    status: ContainerStatus
    sleep_status: SleepStatus
    address: str
    last_request_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    restart_count: int
    last_exit_reason: str
    crash_loop: bool
    process_type: str
    def __init__(self, id: _Optional[str] = ..., project_id: _Optional[str] = ..., deployment_id: _Optional[str] = ..., server_id: _Optional[str] = ..., status: _Optional[_Union[ContainerStatus, str]] = ..., sleep_status: _Optional[_Union[SleepStatus, str]] = ..., address: _Optional[str] = ..., last_request_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restart_count: _Optional[int] = ..., last_exit_reason: _Optional[str] = ..., crash_loop: _Optional[bool] = ..., process_type: _Optional[str] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("project_id", "deployment_id", "container_id", "stream", "line", "emitted_at")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    EMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    deployment_id: str
    container_id: str
    stream: LogStream
    line: str
    emitted_at: _timestamp_pb2.Timestamp
    def __init__(self, project_id: _Optional[str] = ..., deployment_id: _Optional[str] = ..., container_id: _Optional[str] = ..., stream: _Optional[_Union[LogStream, str]] = ..., line: _Optional[str] = ..., emitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("container_id", "stream", "line", "emitted_at", "sequence")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    EMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    stream: LogStream
    line: str
    emitted_at: _timestamp_pb2.Timestamp
    sequence: int
    def __init__(self, container_id: _Optional[str] = ..., stream: _Optional[_Union[LogStream, str]] = ..., line: _Optional[str] = ..., emitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...

class MetricSample(_message.Message):
    __slots__ = ("container_id", "metric", "value", "sampled_at")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_AT_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    metric: MetricType
    value: float
    sampled_at: _timestamp_pb2.Timestamp
    def __init__(self, container_id: _Optional[str] = ..., metric: _Optional[_Union[MetricType, str]] = ..., value: _Optional[float] = ..., sampled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ContainerStatusReport(_message.Message):
    __slots__ = ("container_id", "status", "exit_code", "reason", "last_request_at", "sleep_status", "restart_count", "last_exit_reason", "last_log_lines", "crash_loop", "slug_sha256", "building", "image_digest")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_REQUEST_AT_FIELD_NUMBER: _ClassVar[int]
    SLEEP_STATUS_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_LINES_FIELD_NUMBER: _ClassVar[int]
    CRASH_LOOP_FIELD_NUMBER: _ClassVar[int]
    SLUG_SHA256_FIELD_NUMBER: _ClassVar[int]
    BUILDING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    status: ContainerStatus
    exit_code: int
    reason: str
    last_request_at: _timestamp_pb2.Timestamp
    sleep_status: SleepStatus
    restart_count: int
    last_exit_reason: str
    last_log_lines: _containers.RepeatedScalarFieldContainer[str]
    crash_loop: bool
    slug_sha256: str
    building: bool
    image_digest: str
    def __init__(self, container_id: _Optional[str] = ..., status: _Optional[_Union[ContainerStatus, str]] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ..., last_request_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sleep_status: _Optional[_Union[SleepStatus, str]] = ..., restart_count: _Optional[int] = ..., last_exit_reason: _Optional[str] = ..., last_log_lines: _Optional[_Iterable[str]] = ..., crash_loop: _Optional[bool] = ..., slug_sha256: _Optional[str] = ..., building: _Optional[bool] = ..., image_digest: _Optional[str] = ...) -> None: ...

class RegisterServerRequest(_message.Message):
    __slots__ = ("server",)
    SERVER_FIELD_NUMBER: _ClassVar[int]
    server: Server
    def __init__(self, server: _Optional[_Union[Server, _Mapping]] = ...) -> None: ...

class ListServersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListServersResponse(_message.Message):
    __slots__ = ("servers", "next_page_token")
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[Server]
    next_page_token: str
    def __init__(self, servers: _Optional[_Iterable[_Union[Server, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetServerRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DrainServerRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CreateDeploymentRequest(_message.Message):
    __slots__ = ("project_id", "deployment")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    deployment: Deployment
    def __init__(self, project_id: _Optional[str] = ..., deployment: _Optional[_Union[Deployment, _Mapping]] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ("project_id", "page_size", "page_token")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    page_size: int
    page_token: str
    def __init__(self, project_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments", "next_page_token")
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    next_page_token: str
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetDeploymentRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RollbackDeploymentRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelDeploymentRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class UploadSourceRequest(_message.Message):
    __slots__ = ("project_id", "chunk")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    chunk: bytes
    def __init__(self, project_id: _Optional[str] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ListSourcesRequest(_message.Message):
    __slots__ = ("project_id", "page_size", "page_token")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    page_size: int
    page_token: str
    def __init__(self, project_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSourcesResponse(_message.Message):
    __slots__ = ("sources", "next_page_token")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    next_page_token: str
    def __init__(self, sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    def __init__(self, chunk: _Optional[bytes] = ...) -> None: ...

class PutArtifactRequest(_message.Message):
    __slots__ = ("project_id", "deployment_id", "chunk")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    deployment_id: str
    chunk: bytes
    def __init__(self, project_id: _Optional[str] = ..., deployment_id: _Optional[str] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ListRoutesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Route(_message.Message):
    __slots__ = ("project_id", "hostnames", "upstreams", "unavailable_reason", "challenges", "sleeping_upstreams", "sleep_enabled")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAMES_FIELD_NUMBER: _ClassVar[int]
    UPSTREAMS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    CHALLENGES_FIELD_NUMBER: _ClassVar[int]
    SLEEPING_UPSTREAMS_FIELD_NUMBER: _ClassVar[int]
    SLEEP_ENABLED_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    hostnames: _containers.RepeatedScalarFieldContainer[str]
    upstreams: _containers.RepeatedScalarFieldContainer[str]
    unavailable_reason: str
    challenges: _containers.RepeatedCompositeFieldContainer[DomainChallenge]
    sleeping_upstreams: _containers.RepeatedScalarFieldContainer[str]
    sleep_enabled: bool
    def __init__(self, project_id: _Optional[str] = ..., hostnames: _Optional[_Iterable[str]] = ..., upstreams: _Optional[_Iterable[str]] = ..., unavailable_reason: _Optional[str] = ..., challenges: _Optional[_Iterable[_Union[DomainChallenge, _Mapping]]] = ..., sleeping_upstreams: _Optional[_Iterable[str]] = ..., sleep_enabled: _Optional[bool] = ...) -> None: ...

class DomainChallenge(_message.Message):
    __slots__ = ("hostname", "token")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    token: str
    def __init__(self, hostname: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class ListRoutesResponse(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class ListContainersRequest(_message.Message):
    __slots__ = ("project_id", "page_size", "page_token")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    page_size: int
    page_token: str
    def __init__(self, project_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListContainersResponse(_message.Message):
    __slots__ = ("containers", "next_page_token")
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    containers: _containers.RepeatedCompositeFieldContainer[Container]
    next_page_token: str
    def __init__(self, containers: _Optional[_Iterable[_Union[Container, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class QueryLogsRequest(_message.Message):
    __slots__ = ("project_id", "start_time", "end_time", "deployment_id", "container_id", "contains", "page_size", "page_token")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    deployment_id: str
    container_id: str
    contains: str
    page_size: int
    page_token: str
    def __init__(self, project_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deployment_id: _Optional[str] = ..., container_id: _Optional[str] = ..., contains: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class QueryLogsResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TailLogsRequest(_message.Message):
    __slots__ = ("project_id", "tail_lines")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    tail_lines: int
    def __init__(self, project_id: _Optional[str] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class QueryMetricsRequest(_message.Message):
    __slots__ = ("project_id", "container_id", "server_id", "metric", "start_time", "end_time", "step", "aggregation")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    container_id: str
    server_id: str
    metric: MetricType
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    step: _duration_pb2.Duration
    aggregation: Aggregation
    def __init__(self, project_id: _Optional[str] = ..., container_id: _Optional[str] = ..., server_id: _Optional[str] = ..., metric: _Optional[_Union[MetricType, str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., step: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ...) -> None: ...

class QueryMetricsResponse(_message.Message):
    __slots__ = ("series",)
    SERIES_FIELD_NUMBER: _ClassVar[int]
    series: _containers.RepeatedCompositeFieldContainer[MetricSeries]
    def __init__(self, series: _Optional[_Iterable[_Union[MetricSeries, _Mapping]]] = ...) -> None: ...

class MetricSeries(_message.Message):
    __slots__ = ("container_id", "server_id", "metric", "points")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    server_id: str
    metric: MetricType
    points: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    def __init__(self, container_id: _Optional[str] = ..., server_id: _Optional[str] = ..., metric: _Optional[_Union[MetricType, str]] = ..., points: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ...) -> None: ...

class MetricPoint(_message.Message):
    __slots__ = ("time", "value")
    TIME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    value: float
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., value: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("server_id", "containers", "isolation")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    containers: _containers.RepeatedCompositeFieldContainer[ContainerStatusReport]
    isolation: ServerIsolation
    def __init__(self, server_id: _Optional[str] = ..., containers: _Optional[_Iterable[_Union[ContainerStatusReport, _Mapping]]] = ..., isolation: _Optional[_Union[ServerIsolation, str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("server_status",)
    SERVER_STATUS_FIELD_NUMBER: _ClassVar[int]
    server_status: ServerStatus
    def __init__(self, server_status: _Optional[_Union[ServerStatus, str]] = ...) -> None: ...

class ShipLogsRequest(_message.Message):
    __slots__ = ("server_id", "lines")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    lines: _containers.RepeatedCompositeFieldContainer[LogLine]
    def __init__(self, server_id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ...) -> None: ...

class ShipLogsResponse(_message.Message):
    __slots__ = ("acknowledged_sequences", "rejected_lines", "rejected_reason")
    class AcknowledgedSequencesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ACKNOWLEDGED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_LINES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REASON_FIELD_NUMBER: _ClassVar[int]
    acknowledged_sequences: _containers.ScalarMap[str, int]
    rejected_lines: int
    rejected_reason: str
    def __init__(self, acknowledged_sequences: _Optional[_Mapping[str, int]] = ..., rejected_lines: _Optional[int] = ..., rejected_reason: _Optional[str] = ...) -> None: ...

class ShipMetricsRequest(_message.Message):
    __slots__ = ("server_id", "samples")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    samples: _containers.RepeatedCompositeFieldContainer[MetricSample]
    def __init__(self, server_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[MetricSample, _Mapping]]] = ...) -> None: ...

class ShipMetricsResponse(_message.Message):
    __slots__ = ("accepted", "rejected")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ...) -> None: ...

class ReportContainerStatusRequest(_message.Message):
    __slots__ = ("server_id", "report")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    report: ContainerStatusReport
    def __init__(self, server_id: _Optional[str] = ..., report: _Optional[_Union[ContainerStatusReport, _Mapping]] = ...) -> None: ...

class CreateJoinTokenRequest(_message.Message):
    __slots__ = ("id", "ttl")
    ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    id: str
    ttl: _duration_pb2.Duration
    def __init__(self, id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class JoinToken(_message.Message):
    __slots__ = ("server_id", "id", "token", "expire_time")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    id: str
    token: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, server_id: _Optional[str] = ..., id: _Optional[str] = ..., token: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RevokeAgentCertificateRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class AgentCertificate(_message.Message):
    __slots__ = ("server_id", "serial", "not_after", "revoke_time", "certificate_chain", "ca_bundle")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_FIELD_NUMBER: _ClassVar[int]
    CA_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    serial: str
    not_after: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    certificate_chain: str
    ca_bundle: str
    def __init__(self, server_id: _Optional[str] = ..., serial: _Optional[str] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., certificate_chain: _Optional[str] = ..., ca_bundle: _Optional[str] = ...) -> None: ...

class RenewAgentCertificateRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class WakeRouteRequest(_message.Message):
    __slots__ = ("project_id",)
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    def __init__(self, project_id: _Optional[str] = ...) -> None: ...

class WakeRouteResponse(_message.Message):
    __slots__ = ("woken",)
    WOKEN_FIELD_NUMBER: _ClassVar[int]
    woken: int
    def __init__(self, woken: _Optional[int] = ...) -> None: ...
