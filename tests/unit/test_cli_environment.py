"""`hangar up` gives each process only the secrets it uses (least privilege)."""

from __future__ import annotations

from hangar_cli.cli import agent_environment, process_environment, service_environment
from shared.settings import SERVICES

CREDS = {
    "db_passwords": {svc: f"pw-{svc}" for svc in SERVICES},
    "service_secrets": {svc: f"secret-{svc}" for svc in (*SERVICES, "agent")},
    "jwt_signing_keys": [{"kid": "k1", "private_key_pem": "PRIVATE"}],
    "project_master_keys": {"mk": "MASTER"},
    "project_master_key_id": "mk",
}
ADMIN_URL = "postgresql://admin:admin-password@db.example:5432/hangar"


def _env() -> dict[str, str]:
    return service_environment(ADMIN_URL, CREDS, {"identity": "127.0.0.1:1"})


def _secrets_in(view: dict[str, str]) -> set[str]:
    text = "\n".join(view.values())
    known = ["admin-password", "PRIVATE", "MASTER"]
    known += [f"pw-{s}" for s in SERVICES] + [f"secret-{s}" for s in (*SERVICES, "agent")]
    return {secret for secret in known if secret in text}


def test_each_service_sees_its_own_login_and_secret_only() -> None:
    for svc in ("project", "runtime", "billing"):
        view = process_environment(svc, _env())
        assert view["DATABASE_URL"] == f"postgresql://hangar_{svc}:pw-{svc}@db.example:5432/hangar"
        expected = {f"pw-{svc}", f"secret-{svc}"} | ({"MASTER"} if svc == "project" else set())
        assert _secrets_in(view) == expected, svc


def test_identity_also_checks_every_service_secret_and_signs_tokens() -> None:
    view = process_environment("identity", _env())
    assert _secrets_in(view) == {
        "pw-identity",
        "PRIVATE",
        *(f"secret-{s}" for s in (*SERVICES, "agent")),
    }


def test_gateway_and_agent_see_no_database_and_no_other_secrets() -> None:
    assert _secrets_in(process_environment("gateway", _env())) == set()
    assert "DATABASE_URL" not in process_environment("gateway", _env())
    agent = agent_environment(_env(), "this-host")
    assert _secrets_in(agent) == {"secret-agent"}
