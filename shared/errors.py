"""Domain errors, and their mapping to gRPC status with google.rpc details.

Services raise these from domain and store code; the server interceptor turns them into a
`google.rpc.Status` with one `ErrorInfo` (stable `reason`) and, where it applies, `BadRequest`
field violations or a `QuotaFailure`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "hangar.dev"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """A failure a caller should see, with a gRPC code and a stable reason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(
            code=self.code.value[0], message=self.message, details=self.details()
        )


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: Sequence[FieldViolation] | FieldViolation,
        message: str | None = None,
        **kwargs: object,
    ) -> None:
        if isinstance(violations, FieldViolation):
            violations = [violations]
        self.violations = list(violations)
        text = message or "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(text, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [*super().details(), packed]


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class Aborted(DomainError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class QuotaViolation:
    subject: str
    description: str


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        violations: Sequence[QuotaViolation] = (),
        *,
        retry_after: float | None = None,
        **kwargs: object,
    ) -> None:
        """`retry_after`: a load to shed, not a quota spent; clients get a RetryInfo (and the
        gateway a Retry-After) saying when to try again."""
        self.violations = list(violations)
        self.retry_after = retry_after
        super().__init__(message, **kwargs)  # type: ignore[arg-type]

    def details(self) -> list[any_pb2.Any]:
        details = super().details()
        if self.retry_after is not None:
            details.append(retry_info(self.retry_after))
        if self.violations:
            quota = error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=v.subject, description=v.description
                    )
                    for v in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(quota)
            details.append(packed)
        return details


class Unavailable(DomainError):
    """Something this call needs is down; a RetryInfo detail says when to try again."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: object) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)  # type: ignore[arg-type]

    def details(self) -> list[any_pb2.Any]:
        return [*super().details(), retry_info(self.retry_after)]


def retry_info(seconds: float) -> any_pb2.Any:
    """A google.rpc.RetryInfo detail: try again in `seconds`."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(0.0, seconds) * 1e9))
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return packed


class Unimplemented(DomainError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


def internal_status(message: str = "internal error") -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.INTERNAL, message=message)


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


# ------------------------------------------------------------- failures of what a call uses


def dependency_unavailable() -> Unavailable:
    return Unavailable(
        "a service this call needs is unavailable; retry shortly", reason="DEPENDENCY_UNAVAILABLE"
    )


def database_unavailable() -> Unavailable:
    return Unavailable("the database is unavailable; retry shortly", reason="DATABASE_UNAVAILABLE")


def translate(exc: BaseException) -> DomainError | None:
    """The status an infrastructure failure a handler let through stands for, if it has one.

    - a downstream gRPC call that failed UNAVAILABLE / DEADLINE_EXCEEDED (identity down while
      project authorizes, ...): the same code, without the downstream's own text (it names
      addresses);
    - PostgreSQL unreachable, restarting or gone mid-query: UNAVAILABLE, and so is any other
      refused connection;
    - text PostgreSQL cannot store (NUL, an unpaired surrogate) that reached a query:
      INVALID_ARGUMENT. Requests are checked field by field before their handler runs
      (shared.validation.check_text); this is the net under it.

    Anything else is a bug: None, and the caller answers INTERNAL.
    """
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        if code is grpc.StatusCode.UNAVAILABLE:
            return dependency_unavailable()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(
                "a service this call needs did not answer in time", reason="DEPENDENCY_TIMEOUT"
            )
        return None
    if isinstance(exc, OSError):  # refused, reset, timed out, no such socket file
        if _raised_in("asyncpg", exc):
            return database_unavailable()
        return dependency_unavailable() if isinstance(exc, ConnectionError) else None
    asyncpg = sys.modules.get("asyncpg")  # not imported: the failure cannot be asyncpg's
    if asyncpg is None:
        return None
    errors = asyncpg.exceptions
    if isinstance(
        exc,
        errors.PostgresConnectionError  # class 08: cannot connect, connection lost
        | errors.OperatorInterventionError  # class 57: shutting down, starting up
        | errors.TooManyConnectionsError,
    ) or (isinstance(exc, errors.InterfaceError) and "connection is closed" in str(exc)):
        return database_unavailable()
    if isinstance(
        exc, errors.CharacterNotInRepertoireError | errors.UntranslatableCharacterError
    ) or (isinstance(exc, errors.DataError) and isinstance(exc.__cause__, UnicodeError)):
        return InvalidArgument(
            [FieldViolation("request", "text must not contain NUL or unpaired surrogates")],
            reason="INVALID_TEXT",
        )
    return None


# ------------------------------------------------------------- what a downstream answered

_PASSED_ON: dict[grpc.StatusCode, type[DomainError]] = {
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def from_downstream(
    exc: grpc.aio.AioRpcError,
    service: str,
    passed_on: Mapping[grpc.StatusCode, str | None],
    *,
    field: str = "request",
) -> DomainError:
    """What `service` answered an outbound call, as this service's own error.

    A code in `passed_on` keeps its code and the downstream's message, with the reason given
    there (None: the code's default); INVALID_ARGUMENT is reported against `field`, and
    RESOURCE_EXHAUSTED keeps its quota violations. Any other code is UNAVAILABLE
    `<SERVICE>_UNAVAILABLE`, without the downstream's text. (`translate` is the net under
    handlers for a call nobody caught; this is for the clients that know which of a
    downstream's answers their own callers should see.)
    """
    code = exc.code()
    if code not in passed_on:
        return Unavailable(
            f"{service} is unavailable: {code.name}", reason=f"{service.upper()}_UNAVAILABLE"
        )
    message, reason = exc.details() or f"{service} refused", passed_on[code]
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument([FieldViolation(field, message)], reason=reason)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(message, _quota_violations(exc), reason=reason)
    return _PASSED_ON[code](message, reason=reason)


def _quota_violations(exc: grpc.aio.AioRpcError) -> list[QuotaViolation]:
    violations = []
    status = rpc_status.from_call(exc)
    for detail in status.details if status else ():
        quota = error_details_pb2.QuotaFailure()
        if detail.Is(quota.DESCRIPTOR):
            detail.Unpack(quota)
            violations += [QuotaViolation(v.subject, v.description) for v in quota.violations]
    return violations


def _raised_in(package: str, exc: BaseException) -> bool:
    """Whether a frame of `package` is on the exception's traceback."""
    tb = exc.__traceback__
    prefix = package + "."
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if name == package or name.startswith(prefix):
            return True
        tb = tb.tb_next
    return False
