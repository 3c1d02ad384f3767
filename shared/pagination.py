"""AIP-158 pagination: a default and a maximum page size, and opaque page tokens that carry the
last key of the previous page (keyset pagination, stable under inserts)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from shared.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list and the token to the next one ("" on the last page)."""

    items: list[T]
    next_page_token: str


def page_size(
    requested: int, maximum: int = MAX_PAGE_SIZE, *, default: int = DEFAULT_PAGE_SIZE
) -> int:
    """The page size to use: `default` for 0, capped at `maximum`, refused if negative."""
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(requested or default, maximum)


def page_of(items: list[T], limit: int, key: Callable[[T], list[Any]]) -> Page[T]:
    """`items` (fetched with one extra row) cut to `limit`, with the token to the next page."""
    if len(items) > limit:
        items = items[:limit]
        return Page(items, encode_page_token(key(items[-1])))
    return Page(items, "")


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
