"""HTTP request -> request message, response message -> JSON, per google.api.http and the
proto3 JSON mapping.

Request: the body (JSON, or raw bytes for google.api.HttpBody) goes first, then the query
string (fields bound by neither path nor body; dotted names for nested fields, repeated
fields by repeating the parameter, original or lowerCamelCase names), then the path
variables, so a path variable wins over a body or query field of the same name. A request
with an `update_mask` that neither query nor body gives takes the paths the body's JSON sets
(AIP-134's implied mask, as grpc-gateway does): a PATCH updates what it names.

Response: lowerCamelCase names, and every field without presence is printed even at its
default (`always_print_fields_with_no_presence=True`): a list that is empty is `[]`, a zero
is `0`, so a response always has the shape its schema documents. Unset message fields,
`optional` fields and oneof members stay absent. Enums are rendered by name; int64 as strings.

Everything per route is worked out once in `prepare()`; a request then costs one JSON parse,
dict lookups for the query string and attribute sets for string path variables.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import grpc
from google.protobuf import descriptor, json_format
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import Message

from services.gateway.errors import GatewayError, bad_request
from services.gateway.routes import HTTP_BODY, Route, TemplateError, resolve_field
from shared.errors import DomainError

# Message types that the JSON mapping renders as a single scalar (a string, mostly).
WRAPPERS = {
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}
FIELD_MASK = "google.protobuf.FieldMask"
SCALAR_MESSAGES = {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    FIELD_MASK,
    *WRAPPERS,
}
# Messages with no meaningful query-string form.
OPAQUE_MESSAGES = {
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Any",
    "google.protobuf.Empty",
    HTTP_BODY,
}
_MAX_QUERY_DEPTH = 4
_TRUE = {"true", "1", "t", "yes"}
_FALSE = {"false", "0", "f", "no"}

JSON_CONTENT_TYPE = b"application/json"


def print_options() -> dict[str, Any]:
    return {"always_print_fields_with_no_presence": True}


def is_scalar_like(fd: FD) -> bool:
    """A field a single string can set: a scalar, an enum, or a scalar-like message."""
    if fd.type != FD.TYPE_MESSAGE:
        return True
    return fd.message_type.full_name in SCALAR_MESSAGES


def _is_map(fd: FD) -> bool:
    if fd.type != FD.TYPE_MESSAGE:
        return False
    map_entry: bool = fd.message_type.GetOptions().map_entry
    return map_entry


def _leaf_kind(fd: FD) -> str:
    """How a string from a path or query becomes a JSON value for this field."""
    if fd.type == FD.TYPE_BOOL:
        return "bool"
    if fd.type == FD.TYPE_ENUM:
        return "enum"
    if fd.type == FD.TYPE_MESSAGE and fd.message_type.full_name == "google.protobuf.BoolValue":
        return "bool"
    return "str"


@dataclass(frozen=True)
class FieldRef:
    """A leaf field reachable from the request message, as path variables and queries name it."""

    name: str  # dotted proto names, for error messages
    keys: tuple[str, ...]  # proto names, outermost first
    spelling: str  # dotted lowerCamelCase names: the documented query parameter
    kind: str  # "str" | "bool" | "enum"
    repeated: bool
    # Set for the common case (only singular message hops, string leaf): no json_format needed.
    fast: bool


@dataclass
class RequestPlan:
    body: str  # "", "*" or a field name
    body_field: FD | None
    raw_body: bool  # the body is a google.api.HttpBody: bytes in, no JSON
    path_fields: dict[str, FieldRef]
    query_fields: dict[str, FieldRef]
    header_fields: dict[bytes, str] = field(default_factory=dict)  # header -> field name
    response_field: str = ""  # json name of response_body, if any
    raw_response: bool = False
    # AIP-134: a PATCH whose update_mask is not given updates the fields its body names.
    implied_mask: bool = False
    # A client-streaming RPC whose body names a bytes field: the raw request body, streamed
    # in chunks, one message each (the first also carries the path, query and headers).
    streamed_body: bool = False


def _field_ref(message: descriptor.Descriptor, path: tuple[str, ...]) -> FieldRef:
    chain = resolve_field(message, path)
    leaf = chain[-1]
    repeated = leaf.is_repeated
    fast = (
        not repeated
        and leaf.type == FD.TYPE_STRING
        and all(
            fd.type == FD.TYPE_MESSAGE
            and not fd.is_repeated
            and fd.message_type.full_name not in SCALAR_MESSAGES | OPAQUE_MESSAGES
            for fd in chain[:-1]
        )
    )
    return FieldRef(".".join(path), path, leaf.json_name, _leaf_kind(leaf), repeated, fast)


def prepare(route: Route) -> RequestPlan:
    """Work out once how requests for this route become messages."""
    request = route.method.input_type
    path_fields = {}
    for var in route.template.variables:
        ref = _field_ref(request, var.field_path)
        leaf = resolve_field(request, var.field_path)[-1]
        if ref.repeated or not is_scalar_like(leaf):
            raise TemplateError(f"{route.method.full_name}: path variable {var.name} not scalar")
        path_fields[var.name] = ref

    body_field = request.fields_by_name.get(route.body) if route.body not in ("", "*") else None
    if route.body == "*":
        raw_body = request.full_name == HTTP_BODY
    else:
        raw_body = (
            body_field is not None
            and body_field.message_type is not None
            and body_field.message_type.full_name == HTTP_BODY
        )

    query_fields: dict[str, FieldRef] = {}
    header_fields: dict[bytes, str] = {}
    if route.body != "*":
        bound = {var.field_path for var in route.template.variables}
        for fd in request.fields:
            if fd.name == route.body:
                continue
            if raw_body and fd.type == FD.TYPE_STRING and not fd.is_repeated:
                # A raw-body route takes its other string fields from same-named headers
                # (stripe_signature <- Stripe-Signature): the body bytes are signed as sent.
                header_fields[fd.name.replace("_", "-").encode()] = fd.name
                continue
            _collect_query(fd, (fd.name,), (fd.name,), (fd.json_name,), bound, query_fields, set())

    response = route.method.output_type
    response_field = ""
    mask = request.fields_by_name.get("update_mask")
    implied_mask = (
        body_field is not None
        and body_field.message_type is not None
        and mask is not None
        and mask.message_type is not None
        and mask.message_type.full_name == FIELD_MASK
    )
    if route.response_body:
        response_field = response.fields_by_name[route.response_body].json_name
    streamed_body = (
        route.method.client_streaming
        and body_field is not None
        and body_field.type == FD.TYPE_BYTES
        and not body_field.is_repeated
    )
    if route.method.client_streaming and not streamed_body:
        raise TemplateError(
            f"{route.method.full_name}: a client-streaming route's body must name a bytes field"
        )
    return RequestPlan(
        streamed_body=streamed_body,
        body=route.body,
        body_field=body_field,
        raw_body=raw_body,
        implied_mask=implied_mask,
        path_fields=path_fields,
        query_fields=query_fields,
        header_fields=header_fields,
        response_field=response_field,
        raw_response=response.full_name == HTTP_BODY and not route.response_body,
    )


def _collect_query(
    fd: FD,
    keys: tuple[str, ...],
    names: tuple[str, ...],
    json_names: tuple[str, ...],
    bound: set[tuple[str, ...]],
    out: dict[str, FieldRef],
    seen: set[str],
) -> None:
    if keys in bound or _is_map(fd):
        return
    if is_scalar_like(fd):
        ref = FieldRef(
            ".".join(keys),
            keys,
            ".".join(json_names),
            _leaf_kind(fd),
            fd.is_repeated,
            fast=False,
        )
        # Every spelling: proto names, lowerCamelCase, and mixes along the dotted path.
        for spelling in _spellings(names, json_names):
            out.setdefault(spelling, ref)
        return
    message = fd.message_type
    if (
        fd.is_repeated
        or message.full_name in OPAQUE_MESSAGES
        or message.full_name in seen
        or len(keys) >= _MAX_QUERY_DEPTH
    ):
        return
    for sub in message.fields:
        _collect_query(
            sub,
            (*keys, sub.name),
            (*names, sub.name),
            (*json_names, sub.json_name),
            bound,
            out,
            seen | {message.full_name},
        )


def _spellings(names: tuple[str, ...], json_names: tuple[str, ...]) -> set[str]:
    spellings = {""}
    for name, json_name in zip(names, json_names, strict=True):
        spellings = {f"{s}.{n}" if s else n for s in spellings for n in {name, json_name}}
    return spellings


# --- per request ---------------------------------------------------------------------------


class _Malformed(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "MALFORMED_REQUEST"


def invalid(message: str, reason: str = "MALFORMED_REQUEST") -> GatewayError:
    """A 400 about the request as a whole (no single field to name)."""
    return GatewayError.from_domain(_Malformed(message, reason=reason))


def _json_value(ref: FieldRef, param: str, text: str) -> Any:
    if ref.kind == "bool":
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise bad_request(param, f"expected true or false, got {text!r}")
    if ref.kind == "enum" and text.lstrip("-").isdigit():
        return int(text)
    return text


def _set_nested(target: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        nested = target.setdefault(key, {})
        target = nested
    target[keys[-1]] = value


def _merge(
    message: Message,
    values: dict[str, Any],
    field_prefix: str = "",
    spelled: dict[str, str] | None = None,
) -> None:
    try:
        json_format.ParseDict(values, message)
    except Exception as exc:  # json_format raises ParseError, but also TypeError/ValueError
        field, description = parse_failure(exc, field_prefix)
        if spelled:  # name a query parameter as the client spelled it
            field = spelled.get(field, field)
        raise bad_request(field, description) from None


_FAILED = re.compile(r"Failed to parse (\S+) field: ")
_UNKNOWN = re.compile(r'Message type "[^"]+" has no field named "([^"]+)"')
_LOCATION = re.compile(r'\.? at "?[\w.\[\]]+"?\.*$')


def parse_failure(exc: Exception, field_prefix: str = "") -> tuple[str, str]:
    """(field, description) from a json_format error; the field is dotted from the top of
    the request, each name as the client spelled it."""
    text = str(exc).split("\n", 1)[0]
    path = [field_prefix] if field_prefix else []
    while match := _FAILED.match(text):
        path.append(match.group(1))
        text = text[match.end() :]
    if match := _UNKNOWN.match(text):
        path.append(match.group(1))
        text = "unknown field"
    text = _LOCATION.sub("", text).rstrip(".") or "invalid value"
    return ".".join(path) or "body", text


def parse_body(plan: RequestPlan, message: Message, body: bytes, content_type: str) -> Any:
    """Fill the body's field(s); the parsed JSON (None for a raw or empty body)."""
    if plan.raw_body:
        target = message if plan.body == "*" else getattr(message, plan.body)
        target.content_type = content_type
        target.data = body
        return None
    if not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise invalid(f"request body is not valid JSON: {exc}", "MALFORMED_JSON") from None
    if plan.body == "*":
        if not isinstance(data, dict):
            raise invalid("request body must be a JSON object", "MALFORMED_JSON")
        _merge(message, data)
        return data
    assert plan.body_field is not None
    if (
        plan.body_field.type == FD.TYPE_MESSAGE
        and not plan.body_field.is_repeated
        and plan.body_field.message_type.full_name not in SCALAR_MESSAGES | OPAQUE_MESSAGES
    ):
        if not isinstance(data, dict):
            raise invalid("request body must be a JSON object", "MALFORMED_JSON")
        _merge(getattr(message, plan.body), data, plan.body)
        getattr(message, plan.body).SetInParent()
        return data
    _merge(message, {plan.body: data})
    return data


def mask_paths(message: descriptor.Descriptor, data: dict[str, Any]) -> list[str]:
    """The field paths a JSON object sets (either spelling), nested through singular
    messages, as grpc-gateway infers an update_mask from a PATCH body."""
    paths = []
    for key, value in data.items():
        fd = message.fields_by_name.get(key) or next(
            (f for f in message.fields if f.json_name == key), None
        )
        if fd is None:
            continue  # _merge refused unknown fields already
        nested = (
            fd.type == FD.TYPE_MESSAGE
            and not fd.is_repeated
            and fd.message_type.full_name not in SCALAR_MESSAGES | OPAQUE_MESSAGES
            and isinstance(value, dict)
            and value
        )
        if nested:
            paths += [f"{fd.name}.{p}" for p in mask_paths(fd.message_type, value)]
        else:
            paths.append(fd.name)
    return paths


def parse_query(plan: RequestPlan, message: Message, query: str) -> None:
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for param, text in parse_qsl(query, keep_blank_values=True):
        ref = plan.query_fields.get(param)
        if ref is None:
            raise bad_request(param, "unknown query parameter", reason="UNKNOWN_QUERY_PARAMETER")
        value = _json_value(ref, param, text)
        if ref.repeated:
            nested: dict[str, Any] = values
            for key in ref.keys[:-1]:
                nested = nested.setdefault(key, {})
            nested.setdefault(ref.keys[-1], []).append(value)
        else:
            if ref.name in seen:
                raise bad_request(param, "given more than once")
            _set_nested(values, ref.keys, value)
        seen[ref.name] = param
    if values:
        _merge(message, values, spelled=seen)


def apply_path(plan: RequestPlan, message: Message, variables: dict[str, str]) -> None:
    slow: dict[str, Any] = {}
    for name, text in variables.items():
        ref = plan.path_fields[name]
        if ref.fast:
            target = message
            for key in ref.keys[:-1]:
                target = getattr(target, key)
            setattr(target, ref.keys[-1], text)
        else:
            _set_nested(slow, ref.keys, _json_value(ref, name, text))
    if slow:
        _merge(message, slow)


def build_request(
    route: Route,
    variables: dict[str, str],
    query: str,
    body: bytes,
    headers: dict[bytes, bytes],
) -> Message:
    """The request message for one HTTP request; raises GatewayError (400) on bad input."""
    plan: RequestPlan = route.plan
    message = route.request_class()
    data = None
    if plan.body and not plan.streamed_body:
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        data = parse_body(plan, message, body, content_type)
    if query:
        parse_query(plan, message, query)
    if plan.implied_mask and isinstance(data, dict) and not message.update_mask.paths:
        assert plan.body_field is not None
        named = f"{plan.body}."
        in_path = {p.removeprefix(named) for p in plan.path_fields if p.startswith(named)}
        paths = mask_paths(plan.body_field.message_type, data)
        message.update_mask.paths.extend(p for p in paths if p not in in_path)
    for header, name in plan.header_fields.items():
        value = headers.get(header)
        if value is not None:
            setattr(message, name, value.decode("latin-1"))
    if variables:
        apply_path(plan, message, variables)
    return message


def render_response(plan: RequestPlan, reply: Message) -> tuple[bytes, bytes]:
    """(content type, body) for a reply."""
    if plan.raw_response:
        return (reply.content_type or "application/octet-stream").encode(), reply.data
    data = json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)
    if plan.response_field:
        data = data.get(plan.response_field)
    return JSON_CONTENT_TYPE, dump(data)


def render_message(reply: Message) -> Any:
    return json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)


def dump(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
