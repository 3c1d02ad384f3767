"""Per-call context carried in contextvars: request id, caller, deadline."""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from enum import StrEnum


class PrincipalKind(StrEnum):
    ANONYMOUS = "anonymous"
    USER = "user"
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (from an access token), a service, or nobody."""

    kind: PrincipalKind = PrincipalKind.ANONYMOUS
    subject: str = ""  # user id, or service name
    is_platform_admin: bool = False
    claims: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def is_user(self) -> bool:
        return self.kind is PrincipalKind.USER

    @property
    def is_service(self) -> bool:
        return self.kind is PrincipalKind.SERVICE


ANONYMOUS = Principal()

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
principal_var: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "principal", default=ANONYMOUS
)
bearer_token_var: contextvars.ContextVar[str] = contextvars.ContextVar("bearer_token", default="")
# Monotonic time by which the inbound call must finish; outbound calls inherit what is left.
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "deadline", default=None
)


def current_principal() -> Principal:
    return principal_var.get()


def remaining_seconds() -> float | None:
    deadline = deadline_var.get()
    return None if deadline is None else deadline - time.monotonic()
