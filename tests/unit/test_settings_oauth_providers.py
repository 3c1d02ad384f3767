"""HANGAR_OAUTH_PROVIDERS: the optional fields the dashboard's log-in button reads."""

from __future__ import annotations

import json

import pytest

from shared.settings import OAuthProvider, Settings


def _providers(monkeypatch: pytest.MonkeyPatch, value: object) -> dict[str, OAuthProvider]:
    monkeypatch.setenv("HANGAR_OAUTH_PROVIDERS", json.dumps(value))
    return Settings.from_env("identity").oauth_providers


def test_a_provider_for_browsers_keeps_its_endpoint_label_and_scopes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    google = {
        "issuer": "https://accounts.google.com",
        "client_id": "123.apps.googleusercontent.com",
        "jwks_url": "https://www.googleapis.com/oauth2/v3/certs",
        "authorization_endpoint": "https://accounts.google.com/o/oauth2/v2/auth",
        "label": "Google",
        "scopes": "openid email profile",
    }
    provider = _providers(monkeypatch, {"google": google})["google"]
    assert provider.authorization_endpoint == google["authorization_endpoint"]
    assert provider.label == "Google"
    assert provider.scopes == ("openid", "email", "profile")


def test_the_browser_fields_are_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"issuer": "https://id.test", "client_id": "c", "jwks_url": "https://id.test/k"}
    provider = _providers(monkeypatch, {"test": spec})["test"]
    assert (provider.authorization_endpoint, provider.label) == ("", "")
    assert provider.scopes == ("openid", "email")
