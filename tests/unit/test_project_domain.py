"""Project's rules: validation naming the field, field masks, resizes, the secrets hash."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.project import domain
from services.project.domain import ProjectSpec
from shared.errors import InvalidArgument
from shared.resources import Resources

SPEC = ProjectSpec(
    name="Web",
    slug="web",
    resources=Resources(256, 250, 1),
    region="eu-west-1",
    sleep_enabled=False,
    sleep_after_seconds=900,
)


def _fields(exc: InvalidArgument) -> list[str]:
    return [v.field for v in exc.violations]


def test_a_valid_spec_passes_and_the_name_is_trimmed() -> None:
    assert domain.validate_spec(replace(SPEC, name="  Web  ")).name == "Web"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"slug": "-web"}, "project.slug"),
        ({"slug": "web--api"}, "project.slug"),
        ({"slug": "w" * 41}, "project.slug"),
        ({"name": " "}, "project.name"),
        ({"resources": Resources(0, 250, 1)}, "project.resources.ram_mb"),
        ({"resources": Resources(256, 1_000_000, 1)}, "project.resources.cpu_millis"),
        ({"resources": Resources(256, 250, -1)}, "project.resources.bandwidth_gb"),
        ({"region": "Mars"}, "project.region"),
        ({"repository_url": "javascript:alert(1)"}, "project.repository_url"),
        ({"default_image": "Bad Image"}, "project.default_image"),
        ({"health_check_path": "/a b"}, "project.health_check_path"),
        ({"default_command": "x" * 5000}, "project.default_command"),
        ({"restart_policy": "sometimes"}, "project.restart_policy"),
        ({"restart_policy": ""}, "project.restart_policy"),
        ({"liveness_check_path": "healthz"}, "project.liveness_check_path"),
        ({"liveness_period_seconds": -5}, "project.liveness_period_seconds"),
        ({"liveness_period_seconds": 3601}, "project.liveness_period_seconds"),
        ({"liveness_failure_threshold": 0}, "project.liveness_failure_threshold"),
    ],
)
def test_each_rule_names_its_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        domain.validate_spec(replace(SPEC, **change))  # type: ignore[arg-type]
    assert _fields(info.value) == [field]


def test_create_defaults_fill_unset_resources_and_region() -> None:
    spec = domain.with_create_defaults(replace(SPEC, resources=Resources(0, 0, 3), region=""))
    assert (spec.resources, spec.region) == (Resources(256, 250, 3), "local")


def test_create_defaults_restart_on_failure_and_check_liveness_every_10s_3_times() -> None:
    unset = replace(
        SPEC, restart_policy="", liveness_period_seconds=0, liveness_failure_threshold=0
    )
    spec = domain.validate_spec(domain.with_create_defaults(unset))
    assert (spec.restart_policy, spec.liveness_check_path) == ("on-failure", "")
    assert (spec.liveness_period_seconds, spec.liveness_failure_threshold) == (10, 3)


def test_update_paths_follow_aip_134() -> None:
    assert domain.update_paths(["slug", "slug"], []) == ["slug"]
    assert domain.update_paths(["resources"], []) == list(domain.RESOURCE_PATHS)
    assert domain.update_paths(["resources.ram_mb", "name"], []) == ["resources.ram_mb", "name"]
    assert domain.update_paths([], ["name", "resources.cpu_millis"]) == [
        "name",
        "resources.cpu_millis",
    ]
    assert domain.update_paths(["*"], []) == list(domain.UPDATABLE)
    assert domain.update_paths([], ["id", "name"]) == ["name"]
    for bad in (["id"], ["organization_id"], ["created_at"], ["nope"], ["ram_mb"]):
        with pytest.raises(InvalidArgument) as info:
            domain.update_paths(bad, [])
        assert _fields(info.value) == ["update_mask"]
    with pytest.raises(InvalidArgument):
        domain.update_paths([], ["id"])


def test_a_resize_that_grows_any_dimension_is_not_a_shrink() -> None:
    current = Resources(256, 250, 1)
    assert Resources(128, 250, 1).fits_in(current)
    assert not Resources(128, 500, 0).fits_in(current)


def test_secret_names_and_values() -> None:
    for good in ("A", "_X", "DATABASE_URL", "A" * 128):
        assert domain.check_secret_name(good) == good
    for bad in ("", "a", "1A", "A-B", "A" * 129):
        with pytest.raises(InvalidArgument):
            domain.check_secret_name(bad)
    assert domain.check_secret_value("x" * 65536) == b"x" * 65536
    with pytest.raises(InvalidArgument) as info:
        domain.check_secret_value("é" * 40000)  # 80,000 bytes of UTF-8
    assert "é" not in info.value.message


def test_the_version_hash_depends_on_names_and_versions_only() -> None:
    h = domain.secrets_version_hash
    assert h([("A", 1), ("B", 2)]) == h([("B", 2), ("A", 1)])
    assert h([("A", 1)]) != h([("A", 2)])
    assert h([("A", 1)]) != h([("A", 1), ("B", 1)])
    assert h([]).startswith("sha256:")
