"""Input checks every service makes the same way (INVALID_ARGUMENT naming the field)."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor
from google.protobuf.message import Message

from shared.errors import FieldViolation, InvalidArgument

MAX_ID_LENGTH = 100


def require_id(value: str, field: str) -> str:
    """A present, plausibly sized id; the field is named in the error."""
    if not value:
        raise InvalidArgument.field(field, "required")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument.field(field, "too long")
    return value


# ------------------------------------------------------------- text PostgreSQL can store
#
# PostgreSQL refuses NUL in text, so a request carrying one would fail deep in a query. The
# server interceptor checks every request before its handler: per message type, a plan of
# where its string fields are (made once), walked only where strings can be, and not at all
# for a message without any. (Unpaired surrogates cannot reach a handler: protobuf refuses
# them when a message is built or parsed.)

_STRING, _STRINGS, _MESSAGE, _MESSAGES, _MAP = range(5)
# (field name, kind, nested plan) or, for a map, (name, _MAP, (key is text, value plan|None))
_Step = tuple[str, int, Any]
_plans: dict[str, list[_Step]] = {}
_open: set[str] = set()  # message types whose plan is being made (recursive types)
NUL_DESCRIPTION = "must not contain NUL characters"


def _plan(desc: descriptor.Descriptor) -> list[_Step]:
    plan = _plans.get(desc.full_name)
    if plan is not None:
        return plan
    plan = _plans[desc.full_name] = []  # before recursing: a message may contain itself
    _open.add(desc.full_name)
    try:
        for field in desc.fields:
            repeated = field.is_repeated
            if field.type == field.TYPE_STRING:
                plan.append((field.name, _STRINGS if repeated else _STRING, None))
            elif field.type != field.TYPE_MESSAGE:
                continue
            elif field.message_type.GetOptions().map_entry:
                key = field.message_type.fields_by_name["key"]
                value: int | list[_Step] | None = None
                value_field = field.message_type.fields_by_name["value"]
                if value_field.type == value_field.TYPE_STRING:
                    value = _STRING
                elif value_field.type == value_field.TYPE_MESSAGE and _has_text(
                    value_field.message_type
                ):
                    value = _plan(value_field.message_type)
                key_text = key.type == key.TYPE_STRING
                if key_text or value is not None:
                    plan.append((field.name, _MAP, (key_text, value)))
            elif _has_text(field.message_type):
                kind = _MESSAGES if repeated else _MESSAGE
                plan.append((field.name, kind, _plan(field.message_type)))
    finally:
        _open.discard(desc.full_name)
    return plan


def _has_text(desc: descriptor.Descriptor) -> bool:
    return desc.full_name in _open or bool(_plan(desc))


def text_violation(message: Message) -> FieldViolation | None:
    """The first string field (a dotted path) of `message` holding a NUL, if any."""
    plan = _plans.get(message.DESCRIPTOR.full_name)
    if plan is None:
        plan = _plan(message.DESCRIPTOR)
    return _walk(message, plan, "") if plan else None


def check_text(message: Message) -> None:
    """INVALID_ARGUMENT naming the field if a string field of `message` holds a NUL."""
    violation = text_violation(message)
    if violation is not None:
        raise InvalidArgument([violation], reason="INVALID_TEXT")


def _walk(message: Any, plan: list[_Step], prefix: str) -> FieldViolation | None:
    for name, kind, sub in plan:
        if kind == _STRING:
            if "\x00" in getattr(message, name):
                return FieldViolation(prefix + name, NUL_DESCRIPTION)
        elif kind == _MESSAGE:
            if message.HasField(name):
                found = _walk(getattr(message, name), sub, f"{prefix}{name}.")
                if found is not None:
                    return found
        elif kind == _STRINGS:
            for index, text in enumerate(getattr(message, name)):
                if "\x00" in text:
                    return FieldViolation(f"{prefix}{name}[{index}]", NUL_DESCRIPTION)
        elif kind == _MESSAGES:
            for index, item in enumerate(getattr(message, name)):
                found = _walk(item, sub, f"{prefix}{name}[{index}].")
                if found is not None:
                    return found
        else:
            key_text, value = sub
            for key, item in getattr(message, name).items():
                if key_text and "\x00" in key:
                    return FieldViolation(f"{prefix}{name}", "keys " + NUL_DESCRIPTION)
                where = f"{prefix}{name}[{key!r}]"
                if value == _STRING:
                    if "\x00" in item:
                        return FieldViolation(where, NUL_DESCRIPTION)
                elif value is not None:
                    found = _walk(item, value, where + ".")
                    if found is not None:
                        return found
    return None
