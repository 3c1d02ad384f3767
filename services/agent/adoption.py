"""What an agent writes down about each container so that the next agent of the same state
directory adopts it (services/agent/runs.py keeps the file; driver_adoption.py `adopt` reads it).

The record is JSON, read tolerantly: a field a newer agent added is ignored by an older one
and a field it lacks takes its default, so an agent upgraded while apps run still adopts
them. Specs and infos go through their dataclasses' own type hints.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from datetime import datetime
from enum import Enum
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from services.agent.domain import ContainerInfo, ContainerSpec

# 2: a spec's RAM and CPU are one `resources` object (1 had ram_mb and cpu_millis beside the
# other fields; such a record is read as it would have been written now).
VERSION = 2
T = TypeVar("T")


def to_json(value: Any) -> Any:
    """A dataclass (and what it holds) as JSON values."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def from_json(cls: type[T], data: Mapping[str, Any]) -> T:
    """`cls` (a dataclass) from `to_json`'s output; unknown keys ignored, missing defaulted."""
    hints = get_type_hints(cls)
    values = {f.name: _typed(hints[f.name], data[f.name]) for f in fields(cls) if f.name in data}  # type: ignore[arg-type]
    return cls(**values)


def _typed(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = get_origin(hint)
    if origin is Union or origin is types.UnionType:
        options = [a for a in get_args(hint) if a is not type(None)]
        return _typed(options[0], value) if len(options) == 1 else value
    if hint is datetime:
        return datetime.fromisoformat(value)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint(value)
    if isinstance(hint, type) and is_dataclass(hint):
        return from_json(hint, value)
    if origin is tuple:
        return tuple(value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return dict(value)
    if hint is float:
        return float(value)
    if hint is int:
        return int(value)
    return value


def container_record(
    isolation: str, spec: ContainerSpec, info: ContainerInfo, **extra: Any
) -> dict[str, Any]:
    return {
        "version": VERSION,
        "isolation": isolation,
        "spec": to_json(spec),
        "info": to_json(info),
        **extra,
    }


def spec_and_info(saved: Mapping[str, Any], isolation: str) -> tuple[ContainerSpec, ContainerInfo]:
    """The container a record describes (ValueError: not one this driver can adopt)."""
    if saved.get("version") == 1:
        saved = {**saved, "spec": _spec_of_version_1(saved["spec"])}
    elif saved.get("version") != VERSION:
        raise ValueError(f"a record of version {saved.get('version')!r}")
    if saved.get("isolation") != isolation:
        raise ValueError(f"a container of the {saved.get('isolation')!r} driver")
    spec = from_json(ContainerSpec, saved["spec"])
    info = from_json(ContainerInfo, saved["info"])
    if spec.container_id != info.container_id:
        raise ValueError("the record names two containers")
    return spec, info


def _spec_of_version_1(spec: Mapping[str, Any]) -> dict[str, Any]:
    upgraded = {k: v for k, v in spec.items() if k not in ("ram_mb", "cpu_millis")}
    upgraded["resources"] = {
        "ram_mb": spec.get("ram_mb", 0),
        "cpu_millis": spec.get("cpu_millis", 0),
    }
    return upgraded
