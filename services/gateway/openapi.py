"""OpenAPI 3.0 document generated from the same routes the gateway serves.

Schemas follow the proto3 JSON mapping the gateway speaks: lowerCamelCase properties, enums
by name, 64-bit integers as decimal strings, Timestamp as RFC 3339, one component per message
(`$ref`s, so recursive messages are fine). Every operation answers `default` with the error
body (google.rpc.Status as JSON).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor
from google.protobuf.descriptor import FieldDescriptor as FD

from services.gateway.routes import Route
from services.gateway.transcode import RequestPlan

_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
# Within range on purpose: a generated example must be a value the API can accept.
_INT64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,18}$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": "^[0-9]{1,19}$"}

_SCALARS: dict[int, dict[str, Any]] = {
    FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FD.TYPE_FLOAT: {"type": "number", "format": "float"},
    FD.TYPE_INT32: _INT32,
    FD.TYPE_SINT32: _INT32,
    FD.TYPE_SFIXED32: _INT32,
    FD.TYPE_UINT32: _UINT32,
    FD.TYPE_FIXED32: _UINT32,
    FD.TYPE_INT64: _INT64,
    FD.TYPE_SINT64: _INT64,
    FD.TYPE_SFIXED64: _INT64,
    FD.TYPE_UINT64: _UINT64,
    FD.TYPE_FIXED64: _UINT64,
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte"},
}

_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated lowerCamelCase field paths.",
    },
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    "google.protobuf.DoubleValue": _SCALARS[FD.TYPE_DOUBLE],
    "google.protobuf.FloatValue": _SCALARS[FD.TYPE_FLOAT],
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": _INT32,
    "google.protobuf.UInt32Value": _UINT32,
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte"},
}

STATUS_SCHEMA = {
    "type": "object",
    "description": "google.rpc.Status as JSON: code is the gRPC code number.",
    "properties": {
        "code": {"type": "integer", "format": "int32"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
    },
    "required": ["code", "message", "details"],
}


class _Schemas:
    """Collects a component per message and enum reached from the routes."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {"Status": STATUS_SCHEMA}

    def ref(self, name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def message(self, message: descriptor.Descriptor, skip: Iterable[str] = ()) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        skipped = set(skip)
        if skipped:  # a request body without its path-bound fields: inline
            return self._object(message, skipped)
        if message.full_name not in self.components:
            self.components[message.full_name] = {}  # placeholder: recursion ends here
            self.components[message.full_name] = self._object(message, set())
        return self.ref(message.full_name)

    def _object(self, message: descriptor.Descriptor, skipped: set[str]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                fd.json_name: self.field(fd) for fd in message.fields if fd.name not in skipped
            },
            "additionalProperties": False,
        }

    def field(self, fd: FD) -> dict[str, Any]:
        if fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            value = fd.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        if fd.is_repeated:
            return {"type": "array", "items": self.single(fd)}
        return self.single(fd)

    def single(self, fd: FD) -> dict[str, Any]:
        if fd.type == FD.TYPE_MESSAGE:
            return self.message(fd.message_type)
        if fd.type == FD.TYPE_ENUM:
            enum = fd.enum_type
            if enum.full_name not in self.components:
                self.components[enum.full_name] = {
                    "type": "string",
                    "enum": [value.name for value in enum.values],
                }
            return self.ref(enum.full_name)
        return dict(_SCALARS[fd.type])


def openapi_path(route: Route) -> str:
    """The template as an OpenAPI path: `{var}` for each variable, the verb kept."""
    template = route.template
    parts: list[str] = []
    i = 0
    starts = {var.start: var for var in template.variables}
    while i < len(template.segments):
        var = starts.get(i)
        if var is not None:
            parts.append("{" + var.name + "}")
            i = var.end
        else:
            parts.append(template.segments[i])
            i += 1
    path = "/" + "/".join(parts)
    return f"{path}:{template.verb}" if template.verb else path


def build_openapi(routes: Iterable[Route], title: str = "Hangar API") -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(openapi_path(route), {})[route.http_method.lower()] = _operation(
            route, schemas
        )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": "v1",
            "description": "HTTP/JSON transcoding of Hangar's gRPC services "
            "(google.api.http annotations, proto3 JSON mapping).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        # A token is optional at the HTTP layer; each RPC decides whom it serves.
        "security": [{"bearerAuth": []}, {}],
    }


def _operation(route: Route, schemas: _Schemas) -> dict[str, Any]:
    plan: RequestPlan = route.plan
    request = route.method.input_type
    parameters: list[dict[str, Any]] = []
    for var in route.template.variables:
        leaf = _leaf(request, var.field_path)
        schema = schemas.single(leaf)
        if schema.get("type") == "string" and "format" not in schema:
            schema["minLength"] = 1
        parameters.append({"name": var.name, "in": "path", "required": True, "schema": schema})
    documented: set[str] = set()
    for ref in plan.query_fields.values():
        if ref.spelling in documented:
            continue
        documented.add(ref.spelling)
        parameters.append(
            {
                "name": ref.spelling,
                "in": "query",
                "required": False,
                "schema": schemas.field(_leaf(request, ref.keys)),
            }
        )
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "tags": [route.service.name],
        "summary": _words(route.method.name),
        "x-grpc-method": route.method.full_name,
        "parameters": parameters,
        "responses": {
            "200": _success(route, schemas),
            "default": {
                "description": "An error: the gRPC status mapped to HTTP.",
                "content": {"application/json": {"schema": schemas.ref("Status")}},
            },
        },
    }
    if route.body:
        operation["requestBody"] = _request_body(route, schemas)
    return operation


def _request_body(route: Route, schemas: _Schemas) -> dict[str, Any]:
    plan: RequestPlan = route.plan
    if plan.streamed_body:
        return {
            "required": True,
            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        }
    if plan.raw_body:
        return {
            "required": True,
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        }
    if route.body == "*":
        top_level = {
            var.field_path[0] for var in route.template.variables if len(var.field_path) == 1
        }
        schema = schemas.message(route.method.input_type, skip=top_level)
    else:
        assert plan.body_field is not None
        schema = schemas.field(plan.body_field)
    return {"required": False, "content": {"application/json": {"schema": schema}}}


def _success(route: Route, schemas: _Schemas) -> dict[str, Any]:
    plan: RequestPlan = route.plan
    response = route.method.output_type
    content: dict[str, Any]
    if plan.raw_response:
        content = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
    elif route.response_body:
        content = {
            "application/json": {
                "schema": schemas.field(response.fields_by_name[route.response_body])
            }
        }
    elif route.streaming:
        line: dict[str, Any] = {
            "type": "object",
            "description": "One line of newline-delimited JSON: a message, or the final error.",
            "properties": {"result": schemas.message(response), "error": schemas.ref("Status")},
        }
        content = {"application/x-ndjson": {"schema": line}}
    else:
        content = {"application/json": {"schema": schemas.message(response)}}
    return {"description": "OK", "content": content}


def _leaf(message: descriptor.Descriptor, path: Iterable[str]) -> FD:
    fd = None
    current: descriptor.Descriptor | None = message
    for name in path:
        assert current is not None
        fd = current.fields_by_name[name]
        current = fd.message_type
    assert fd is not None
    return fd


def _words(name: str) -> str:
    words = "".join(f" {c.lower()}" if c.isupper() else c for c in name).strip()
    return words[:1].upper() + words[1:]
