"""Input checks every service makes the same way (INVALID_ARGUMENT naming the field)."""

from __future__ import annotations

from shared.errors import InvalidArgument

MAX_ID_LENGTH = 100


def require_id(value: str, field: str) -> str:
    """A present, plausibly sized id; the field is named in the error."""
    if not value:
        raise InvalidArgument.field(field, "required")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument.field(field, "too long")
    return value
