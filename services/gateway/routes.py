"""The route table, built from the services' `google.api.http` annotations, and its matcher.

Templates follow google/api/http.proto:

    Template = "/" Segments [ Verb ] ;   Segment = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;   Verb = ":" LITERAL ;

Matching walks a segment trie (literal children first, then `*`, then `**`), so a request costs
a handful of dict lookups whatever the number of routes, and literals always beat variables.
Starlette's router is not used: it treats ':' as a converter marker and tries routes one
regex at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor

HTTP_BODY = "google.api.HttpBody"
_PATTERNS = ("get", "put", "post", "delete", "patch")


class TemplateError(ValueError):
    """An annotation whose path template does not follow the grammar."""


@dataclass(frozen=True)
class Variable:
    """A path variable: the field path it binds and the segments it covers."""

    field_path: tuple[str, ...]
    start: int
    end: int  # exclusive; a trailing `**` stretches it to the end of the path

    @property
    def name(self) -> str:
        return ".".join(self.field_path)


@dataclass(frozen=True)
class PathTemplate:
    text: str
    segments: tuple[str, ...]  # literals, "*" or "**"
    variables: tuple[Variable, ...]
    verb: str

    def extract(self, segments: list[str]) -> dict[str, str]:
        """Variable values from the (decoded) segments of a path this template matched."""
        n = len(self.segments)
        trailing = n > 0 and self.segments[-1] == "**"
        values = {}
        for var in self.variables:
            end = len(segments) if trailing and var.end == n else var.end
            values[var.name] = (
                segments[var.start] if end == var.start + 1 else "/".join(segments[var.start : end])
            )
        return values


def parse_template(text: str) -> PathTemplate:
    """Parse a google.api.http path template; raises TemplateError."""
    if not text.startswith("/"):
        raise TemplateError(f"{text!r}: a template starts with '/'")
    body, verb = _split_verb(text[1:])
    segments: list[str] = []
    variables: list[Variable] = []
    for raw in _split_top(body, "/"):
        if raw.startswith("{"):
            if not raw.endswith("}"):
                raise TemplateError(f"{text!r}: unbalanced braces in {raw!r}")
            inner = raw[1:-1]
            name, _, sub = inner.partition("=")
            path = tuple(name.split("."))
            if not all(part.isidentifier() for part in path):
                raise TemplateError(f"{text!r}: bad field path {name!r}")
            parts = sub.split("/") if sub else ["*"]
            start = len(segments)
            for part in parts:
                _check_segment(text, part)
                segments.append(part)
            variables.append(Variable(path, start, len(segments)))
        else:
            _check_segment(text, raw)
            segments.append(raw)
    if "**" in segments[:-1]:
        raise TemplateError(f"{text!r}: '**' may only be the last segment")
    return PathTemplate(text, tuple(segments), tuple(variables), verb)


def _check_segment(text: str, segment: str) -> None:
    if segment in ("*", "**"):
        return
    if not segment or any(c in segment for c in "{}=:?#*"):
        raise TemplateError(f"{text!r}: bad segment {segment!r}")


def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside braces."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _split_verb(text: str) -> tuple[str, str]:
    last = _split_top(text, "/")[-1]
    outside = _split_top(last, ":")
    if len(outside) == 1:
        return text, ""
    if len(outside) > 2 or not outside[1]:
        raise TemplateError(f"/{text!r}: bad verb")
    return text[: len(text) - len(outside[1]) - 1], outside[1]


# --- the route table -----------------------------------------------------------------------


@dataclass(eq=False)
class Route:
    """One HTTP binding of one RPC, with everything per-request work needs precomputed."""

    http_method: str
    template: PathTemplate
    service: descriptor.ServiceDescriptor
    method: descriptor.MethodDescriptor
    upstream: str  # the service name whose channel serves it, e.g. "identity"
    body: str  # "" (no body), "*" or a top-level request field name
    response_body: str  # "" or a top-level response field name
    rpc_path: str = ""  # "/hangar.identity.v1.IdentityService/SignUp"
    request_class: Any = None
    response_class: Any = None
    # Filled in by transcode.prepare(); the multicallable by the app once channels exist.
    plan: Any = None
    invoke: Any = None

    @property
    def streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def operation_id(self) -> str:
        return f"{self.service.name}_{self.method.name}"


def http_rules(method: descriptor.MethodDescriptor) -> Iterator[http_pb2.HttpRule]:
    """The method's google.api.http rule and its additional bindings."""
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return
    rule = options.Extensions[annotations_pb2.http]
    yield rule
    yield from rule.additional_bindings


def _rule_pattern(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind in _PATTERNS:
        return kind.upper(), getattr(rule, kind)
    if kind == "custom":
        return rule.custom.kind.upper(), rule.custom.path
    raise TemplateError(f"http rule without a pattern: {rule}")


def build_routes(
    services: Iterable[descriptor.ServiceDescriptor], message_class: Any
) -> list[Route]:
    """Every annotated RPC of `services` as routes. `message_class(descriptor)` -> class."""
    routes = []
    for service in services:
        upstream = service.full_name.split(".")[1]  # hangar.<service>.v1.XService
        for method in service.methods:
            for rule in http_rules(method):
                verb, path = _rule_pattern(rule)
                template = parse_template(path)
                _check_bindings(method, template, rule.body)
                routes.append(
                    Route(
                        http_method=verb,
                        template=template,
                        service=service,
                        method=method,
                        upstream=upstream,
                        body=rule.body,
                        response_body=rule.response_body,
                        rpc_path=f"/{service.full_name}/{method.name}",
                        request_class=message_class(method.input_type),
                        response_class=message_class(method.output_type),
                    )
                )
    return routes


def _check_bindings(method: descriptor.MethodDescriptor, template: PathTemplate, body: str) -> None:
    for var in template.variables:
        resolve_field(method.input_type, var.field_path)
    if body and body != "*" and body not in method.input_type.fields_by_name:
        raise TemplateError(f"{method.full_name}: body field {body!r} does not exist")


def resolve_field(
    message: descriptor.Descriptor, path: tuple[str, ...]
) -> list[descriptor.FieldDescriptor]:
    """The chain of fields a dotted path names; raises TemplateError if it does not exist."""
    chain = []
    current: descriptor.Descriptor | None = message
    for name in path:
        if current is None or name not in current.fields_by_name:
            raise TemplateError(f"{message.full_name} has no field {'.'.join(path)!r}")
        fd = current.fields_by_name[name]
        chain.append(fd)
        current = fd.message_type
    return chain


# --- the matcher ---------------------------------------------------------------------------


@dataclass
class _Node:
    literals: dict[str, _Node] = field(default_factory=dict)
    star: _Node | None = None
    # verb -> http method -> route, for templates ending here / with a `**` here
    ends: dict[str, dict[str, Route]] = field(default_factory=dict)
    rest: dict[str, dict[str, Route]] = field(default_factory=dict)


@dataclass(frozen=True)
class Match:
    route: Route
    variables: dict[str, str]


class Router:
    """Segment trie over every route's template."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._root = _Node()
        self.routes = list(routes)
        for route in self.routes:
            self._add(route)

    def _add(self, route: Route) -> None:
        node = self._root
        segments = route.template.segments
        for i, segment in enumerate(segments):
            if segment == "**" and i == len(segments) - 1:
                slot = node.rest.setdefault(route.template.verb, {})
                break
            if segment == "*":
                node.star = node.star or _Node()
                node = node.star
            else:
                node = node.literals.setdefault(segment, _Node())
        else:
            slot = node.ends.setdefault(route.template.verb, {})
        if route.http_method in slot:
            other = slot[route.http_method]
            raise TemplateError(
                f"{route.method.full_name} and {other.method.full_name} both bind "
                f"{route.http_method} {route.template.text}"
            )
        slot[route.http_method] = route

    def match(self, http_method: str, raw_path: str) -> Match | set[str] | None:
        """The route and its variables; else the allowed methods of the path (405); else None.

        `raw_path` is still percent-encoded: the verb is split off before decoding, so an
        encoded ':' (%3A) stays part of a variable.
        """
        if not raw_path.startswith("/"):
            return None
        raw = raw_path[1:].split("/")
        last = raw[-1]
        candidates: list[tuple[list[str], str]] = []
        colon = last.rfind(":")
        if colon > 0:
            candidates.append(([*raw[:-1], last[:colon]], last[colon + 1 :]))
        candidates.append((raw, ""))
        allowed: set[str] = set()
        for segments, verb in candidates:
            decoded = [unquote(s) if "%" in s else s for s in segments]
            for slot in self._walk(self._root, decoded, 0, verb):
                route = slot.get(http_method)
                if route is not None:
                    return Match(route, route.template.extract(decoded))
                allowed.update(slot)
            if allowed:
                # A known verb decides: `GET .../d1:rollback` is a 405, not GetDeployment of
                # "d1:rollback". An unknown verb falls back to being part of the variable.
                return allowed
        return None

    def _walk(
        self, node: _Node, segments: list[str], i: int, verb: str
    ) -> Iterator[dict[str, Route]]:
        if i == len(segments):
            slot = node.ends.get(verb)
            if slot:
                yield slot
        else:
            segment = segments[i]
            child = node.literals.get(segment)
            if child is not None:
                yield from self._walk(child, segments, i + 1, verb)
            if node.star is not None and segment:
                yield from self._walk(node.star, segments, i + 1, verb)
        slot = node.rest.get(verb)
        if slot:
            yield slot
