"""The OpenAPI document the gateway serves, generated from the same descriptors as its routes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from services.gateway.app import PUBLIC_SERVICES, Gateway
from services.gateway.routes import http_rules
from shared.settings import Settings


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    gateway = Gateway(Settings.from_env("gateway"))
    return json.loads(gateway.openapi)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_is_openapi_3_with_components_and_bearer_auth(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.0")
    assert document["info"]["title"]
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "Status" in document["components"]["schemas"]


def test_every_annotated_rpc_is_an_operation(document: dict[str, Any]) -> None:
    expected = {
        f"{service.name}_{method.name}"
        for service in PUBLIC_SERVICES
        for method in service.methods
        if any(True for _ in http_rules(method))
    }
    found = [op["operationId"] for _, _, op in operations(document)]
    assert sorted(found) == sorted(expected)
    assert len(found) == len(set(found))


def test_paths_keep_custom_verbs_and_nested_variables(document: dict[str, Any]) -> None:
    paths = document["paths"]
    assert "post" in paths["/v1/deployments/{id}:rollback"]
    assert "patch" in paths["/v1/organizations/{organization.id}"]
    assert "get" in paths["/.well-known/jwks.json"]
    assert "post" in paths["/v1/webhooks/stripe"]


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for ref in refs(document):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_path_parameters_match_the_path_template(document: dict[str, Any]) -> None:
    for path, method, operation in operations(document):
        declared = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
        assert declared == set(re.findall(r"\{([^}]+)\}", path)), (method, path)
        for parameter in operation["parameters"]:
            assert parameter["in"] in ("path", "query")
            assert "schema" in parameter


def test_each_operation_has_a_success_and_an_error_response(document: dict[str, Any]) -> None:
    for _, _, operation in operations(document):
        assert "200" in operation["responses"]
        error = operation["responses"]["default"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/Status"}


def test_request_and_response_schemas_follow_the_json_mapping(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    project = schemas["hangar.project.v1.Project"]["properties"]
    assert project["resources"] == {"$ref": "#/components/schemas/hangar.type.v1.Resources"}
    assert schemas["hangar.type.v1.Resources"]["properties"]["ramMb"]["type"] == "integer"
    assert project["createdAt"] == {"type": "string", "format": "date-time"}
    assert schemas["hangar.identity.v1.Role"]["enum"][0] == "ROLE_UNSPECIFIED"
    create = document["paths"]["/v1/organizations/{organization_id}/projects"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/hangar.project.v1.Project"}
    # body "*" leaves out the fields bound by the path
    members = document["paths"]["/v1/organizations/{organization_id}/members"]["post"]
    member_body = members["requestBody"]["content"]["application/json"]["schema"]
    assert set(member_body["properties"]) == {"email", "role"}
    listing = document["paths"]["/v1/organizations"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"pageSize", "pageToken"}
    checked = schemas["hangar.identity.v1.VerifyAuditChainResponse"]["properties"]["checked"]
    assert checked["type"] == "string" and checked["format"] == "int64"


def test_streaming_and_raw_body_operations(document: dict[str, Any]) -> None:
    tail = document["paths"]["/v1/projects/{project_id}/logs:tail"]["get"]
    assert "application/x-ndjson" in tail["responses"]["200"]["content"]
    webhook = document["paths"]["/v1/webhooks/stripe"]["post"]
    assert webhook["requestBody"]["content"]["*/*"]["schema"]["format"] == "binary"


def test_validates_when_a_validator_is_installed(document: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(document)
