"""AIP-158 pagination: a default and a maximum page size, and opaque page tokens that carry the
last key of the previous page (keyset pagination, stable under inserts)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from shared.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(
    requested: int, maximum: int = MAX_PAGE_SIZE, *, default: int = DEFAULT_PAGE_SIZE
) -> int:
    """The page size to use: `default` for 0, capped at `maximum`, refused if negative."""
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(requested or default, maximum)


def encode_page_token(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def decode_page_token(token: str, shape: tuple[type, ...]) -> list[Any] | None:
    """The last key of the previous page; INVALID_ARGUMENT for a token we did not make."""
    if not token:
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error):
        raise InvalidArgument.field("page_token", "not a page token from this list") from None
    if (
        not isinstance(key, list)
        or len(key) != len(shape)
        or not all(isinstance(v, t) for v, t in zip(key, shape, strict=True))
    ):
        raise InvalidArgument.field("page_token", "not a page token from this list")
    return key
