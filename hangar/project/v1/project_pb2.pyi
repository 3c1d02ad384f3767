import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
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

class RestartPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESTART_POLICY_UNSPECIFIED: _ClassVar[RestartPolicy]
    RESTART_POLICY_ON_FAILURE: _ClassVar[RestartPolicy]
    RESTART_POLICY_ALWAYS: _ClassVar[RestartPolicy]
    RESTART_POLICY_NEVER: _ClassVar[RestartPolicy]

class DomainStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DOMAIN_STATUS_UNSPECIFIED: _ClassVar[DomainStatus]
    DOMAIN_STATUS_PENDING: _ClassVar[DomainStatus]
    DOMAIN_STATUS_VERIFIED: _ClassVar[DomainStatus]
RESTART_POLICY_UNSPECIFIED: RestartPolicy
RESTART_POLICY_ON_FAILURE: RestartPolicy
RESTART_POLICY_ALWAYS: RestartPolicy
RESTART_POLICY_NEVER: RestartPolicy
DOMAIN_STATUS_UNSPECIFIED: DomainStatus
DOMAIN_STATUS_PENDING: DomainStatus
DOMAIN_STATUS_VERIFIED: DomainStatus

class Project(_message.Message):
    __slots__ = ("id", "organization_id", "name", "slug", "resources", "region", "sleep_enabled", "sleep_after_seconds", "description", "repository_url", "default_command", "default_image", "health_check_path", "created_at", "updated_at", "restart_policy", "liveness_check_path", "liveness_period_seconds", "liveness_failure_threshold", "hostname", "url")
    ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SLUG_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    SLEEP_ENABLED_FIELD_NUMBER: _ClassVar[int]
    SLEEP_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_URL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_COMMAND_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_PATH_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RESTART_POLICY_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_CHECK_PATH_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_FAILURE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    id: str
    organization_id: str
    name: str
    slug: str
    resources: _resources_pb2.Resources
    region: str
    sleep_enabled: bool
    sleep_after_seconds: int
    description: str
    repository_url: str
    default_command: str
    default_image: str
    health_check_path: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    restart_policy: RestartPolicy
    liveness_check_path: str
    liveness_period_seconds: int
    liveness_failure_threshold: int
    hostname: str
    url: str
    def __init__(self, id: _Optional[str] = ..., organization_id: _Optional[str] = ..., name: _Optional[str] = ..., slug: _Optional[str] = ..., resources: _Optional[_Union[_resources_pb2.Resources, _Mapping]] = ..., region: _Optional[str] = ..., sleep_enabled: _Optional[bool] = ..., sleep_after_seconds: _Optional[int] = ..., description: _Optional[str] = ..., repository_url: _Optional[str] = ..., default_command: _Optional[str] = ..., default_image: _Optional[str] = ..., health_check_path: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restart_policy: _Optional[_Union[RestartPolicy, str]] = ..., liveness_check_path: _Optional[str] = ..., liveness_period_seconds: _Optional[int] = ..., liveness_failure_threshold: _Optional[int] = ..., hostname: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class Secret(_message.Message):
    __slots__ = ("name", "version", "updated_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Domain(_message.Message):
    __slots__ = ("hostname", "status", "verification_path", "verification_token", "verified_at", "created_at", "certificate")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_PATH_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    status: DomainStatus
    verification_path: str
    verification_token: str
    verified_at: _timestamp_pb2.Timestamp
    created_at: _timestamp_pb2.Timestamp
    certificate: DomainCertificate
    def __init__(self, hostname: _Optional[str] = ..., status: _Optional[_Union[DomainStatus, str]] = ..., verification_path: _Optional[str] = ..., verification_token: _Optional[str] = ..., verified_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., certificate: _Optional[_Union[DomainCertificate, _Mapping]] = ...) -> None: ...

class DomainCertificate(_message.Message):
    __slots__ = ("not_before", "not_after", "issuer", "subject", "dns_names", "sha256_fingerprint", "uploaded_at")
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_AT_FIELD_NUMBER: _ClassVar[int]
    not_before: _timestamp_pb2.Timestamp
    not_after: _timestamp_pb2.Timestamp
    issuer: str
    subject: str
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    sha256_fingerprint: str
    uploaded_at: _timestamp_pb2.Timestamp
    def __init__(self, not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., issuer: _Optional[str] = ..., subject: _Optional[str] = ..., dns_names: _Optional[_Iterable[str]] = ..., sha256_fingerprint: _Optional[str] = ..., uploaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SetDomainCertificateRequest(_message.Message):
    __slots__ = ("project_id", "hostname", "certificate_chain_pem", "private_key_pem")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    hostname: str
    certificate_chain_pem: str
    private_key_pem: str
    def __init__(self, project_id: _Optional[str] = ..., hostname: _Optional[str] = ..., certificate_chain_pem: _Optional[str] = ..., private_key_pem: _Optional[str] = ...) -> None: ...

class DeleteDomainCertificateRequest(_message.Message):
    __slots__ = ("project_id", "hostname")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    hostname: str
    def __init__(self, project_id: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class ListDomainCertificatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDomainCertificatesResponse(_message.Message):
    __slots__ = ("certificates",)
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    certificates: _containers.RepeatedCompositeFieldContainer[EdgeCertificate]
    def __init__(self, certificates: _Optional[_Iterable[_Union[EdgeCertificate, _Mapping]]] = ...) -> None: ...

class EdgeCertificate(_message.Message):
    __slots__ = ("project_id", "hostname", "certificate_chain_pem", "private_key_pem", "not_after", "sha256_fingerprint", "dns_names")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    hostname: str
    certificate_chain_pem: str
    private_key_pem: str
    not_after: _timestamp_pb2.Timestamp
    sha256_fingerprint: str
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, project_id: _Optional[str] = ..., hostname: _Optional[str] = ..., certificate_chain_pem: _Optional[str] = ..., private_key_pem: _Optional[str] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sha256_fingerprint: _Optional[str] = ..., dns_names: _Optional[_Iterable[str]] = ...) -> None: ...

class AddDomainRequest(_message.Message):
    __slots__ = ("project_id", "domain")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    domain: Domain
    def __init__(self, project_id: _Optional[str] = ..., domain: _Optional[_Union[Domain, _Mapping]] = ...) -> None: ...

class ListDomainsRequest(_message.Message):
    __slots__ = ("project_id",)
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    def __init__(self, project_id: _Optional[str] = ...) -> None: ...

class ListDomainsResponse(_message.Message):
    __slots__ = ("domains",)
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    domains: _containers.RepeatedCompositeFieldContainer[Domain]
    def __init__(self, domains: _Optional[_Iterable[_Union[Domain, _Mapping]]] = ...) -> None: ...

class VerifyDomainRequest(_message.Message):
    __slots__ = ("project_id", "hostname")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    hostname: str
    def __init__(self, project_id: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class RemoveDomainRequest(_message.Message):
    __slots__ = ("project_id", "hostname")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    hostname: str
    def __init__(self, project_id: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class CreateProjectRequest(_message.Message):
    __slots__ = ("organization_id", "project")
    ORGANIZATION_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    organization_id: str
    project: Project
    def __init__(self, organization_id: _Optional[str] = ..., project: _Optional[_Union[Project, _Mapping]] = ...) -> None: ...

class ListProjectsRequest(_message.Message):
    __slots__ = ("organization_id", "page_size", "page_token", "sleep_enabled")
    ORGANIZATION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SLEEP_ENABLED_FIELD_NUMBER: _ClassVar[int]
    organization_id: str
    page_size: int
    page_token: str
    sleep_enabled: bool
    def __init__(self, organization_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., sleep_enabled: _Optional[bool] = ...) -> None: ...

class ListProjectsResponse(_message.Message):
    __slots__ = ("projects", "next_page_token")
    PROJECTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    projects: _containers.RepeatedCompositeFieldContainer[Project]
    next_page_token: str
    def __init__(self, projects: _Optional[_Iterable[_Union[Project, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetProjectRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class UpdateProjectRequest(_message.Message):
    __slots__ = ("project", "update_mask")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    project: Project
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, project: _Optional[_Union[Project, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class DeleteProjectRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class SetSecretRequest(_message.Message):
    __slots__ = ("project_id", "name", "value", "restart")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    name: str
    value: str
    restart: bool
    def __init__(self, project_id: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[str] = ..., restart: _Optional[bool] = ...) -> None: ...

class ListSecretsRequest(_message.Message):
    __slots__ = ("project_id", "page_size", "page_token")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    page_size: int
    page_token: str
    def __init__(self, project_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSecretsResponse(_message.Message):
    __slots__ = ("secrets", "next_page_token")
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    secrets: _containers.RepeatedCompositeFieldContainer[Secret]
    next_page_token: str
    def __init__(self, secrets: _Optional[_Iterable[_Union[Secret, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSecretRequest(_message.Message):
    __slots__ = ("project_id", "name", "restart")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    name: str
    restart: bool
    def __init__(self, project_id: _Optional[str] = ..., name: _Optional[str] = ..., restart: _Optional[bool] = ...) -> None: ...

class RevealSecretRequest(_message.Message):
    __slots__ = ("project_id", "name")
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    name: str
    def __init__(self, project_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class RevealSecretResponse(_message.Message):
    __slots__ = ("name", "version", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    value: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...

class RotateMasterKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RotateMasterKeyResponse(_message.Message):
    __slots__ = ("key_id", "rewrapped_count")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    REWRAPPED_COUNT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    rewrapped_count: int
    def __init__(self, key_id: _Optional[str] = ..., rewrapped_count: _Optional[int] = ...) -> None: ...

class ResolveSecretsRequest(_message.Message):
    __slots__ = ("project_id",)
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    project_id: str
    def __init__(self, project_id: _Optional[str] = ...) -> None: ...

class ResolveSecretsResponse(_message.Message):
    __slots__ = ("env", "version_hash")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENV_FIELD_NUMBER: _ClassVar[int]
    VERSION_HASH_FIELD_NUMBER: _ClassVar[int]
    env: _containers.ScalarMap[str, str]
    version_hash: str
    def __init__(self, env: _Optional[_Mapping[str, str]] = ..., version_hash: _Optional[str] = ...) -> None: ...
