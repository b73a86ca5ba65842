"""API keys: with keys configured, the certification endpoints need one (``Authorization: Bearer <key>`` or
``X-API-Key``), compared in constant time; health, readiness and metrics stay open for probes and scrapers. Keys come
from settings or from ``CERTSERVE_API_KEYS`` (comma-separated).
"""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

IMAGE = {"image": np.full((28, 28), 0.5).tolist(), "mode": "surrogate"}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(api_keys=["k1", "k2"], max_samples=200), seed=0)) as c:
        yield c


def assert_unauthorized(r) -> None:
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert err["code"] == "unauthorized"
    assert "Authorization: Bearer" in err["message"] and "X-API-Key" in err["message"]


def test_no_key_is_401(client):
    assert_unauthorized(client.post("/certify", json=IMAGE))


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"}, {"Authorization": "Bearer "}, {"X-API-Key": ""},
    {"Authorization": "k1"},  # not a bearer token
    {"Authorization": "Basic azE6"}, {"X-API-Key": "k1 "}, {"X-API-Key": "K1"}, {"X-API-Key": "k1k2"},
], ids=["bearer-wrong", "x-api-key-wrong", "bearer-empty", "x-api-key-empty", "no-scheme", "basic", "trailing-space",
        "case", "concatenated"])
def test_wrong_key_is_401(client, headers):
    assert_unauthorized(client.post("/certify", json=IMAGE, headers=headers))


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer k2"}, {"X-API-Key": "k1"}, {"Authorization": "bearer k1"}, {"X-API-Key": "k2"},
], ids=["bearer-k2", "x-api-key-k1", "lowercase-scheme", "x-api-key-k2"])
def test_valid_key_is_accepted(client, headers):
    r = client.post("/certify", json=IMAGE, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["method"] == "surrogate"


def test_bearer_takes_precedence_over_x_api_key(client):
    assert_unauthorized(client.post("/certify", json=IMAGE, headers={"Authorization": "Bearer bad", "X-API-Key": "k1"}))
    r = client.post("/certify", json=IMAGE, headers={"Authorization": "Bearer k1", "X-API-Key": "bad"})
    assert r.status_code == 200


def test_batch_endpoint_is_protected(client):
    batch = {"images": [IMAGE["image"]], "mode": "surrogate"}
    assert_unauthorized(client.post("/certify/batch", json=batch))
    assert client.post("/certify/batch", json=batch, headers={"X-API-Key": "k2"}).status_code == 200


def test_key_is_checked_before_the_body_is_parsed(client):
    """No information about the request format leaks to a caller without a key."""
    assert_unauthorized(client.post("/certify", content=b"not json", headers={"content-type": "application/json"}))
    assert_unauthorized(client.post("/certify", content=b"x", headers={"content-type": "text/plain"}))


def test_probes_and_metrics_stay_open(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 200 and "certserve_requests_total" in r.text


def test_without_keys_no_authentication():
    with TestClient(create_app(Settings(max_samples=200), seed=0)) as c:
        assert c.post("/certify", json=IMAGE).status_code == 200
        assert c.post("/certify", json=IMAGE, headers={"X-API-Key": "anything"}).status_code == 200


def test_api_keys_from_environment(monkeypatch):
    monkeypatch.setenv("CERTSERVE_API_KEYS", "a,b")
    assert Settings().api_keys == ["a", "b"]
    monkeypatch.setenv("CERTSERVE_API_KEYS", " a , b ,, ")
    assert Settings().api_keys == ["a", "b"]
    monkeypatch.setenv("CERTSERVE_API_KEYS", "single")
    assert Settings().api_keys == ["single"]
    monkeypatch.setenv("CERTSERVE_API_KEYS", "")
    assert Settings().api_keys == []
    monkeypatch.delenv("CERTSERVE_API_KEYS")
    assert Settings().api_keys == []


def test_environment_keys_protect_the_app(monkeypatch):
    monkeypatch.setenv("CERTSERVE_API_KEYS", "env-key")
    monkeypatch.setenv("CERTSERVE_MAX_SAMPLES", "300")
    settings = Settings()
    assert settings.max_samples == 300
    with TestClient(create_app(settings, seed=0)) as c:
        assert_unauthorized(c.post("/certify", json=IMAGE))
        assert c.post("/certify", json=IMAGE, headers={"Authorization": "Bearer env-key"}).status_code == 200


def test_other_settings_from_environment(monkeypatch):
    monkeypatch.setenv("CERTSERVE_DEFAULT_ALPHA", "0.01")
    monkeypatch.setenv("CERTSERVE_DRAIN_SECONDS", "2.5")
    monkeypatch.setenv("CERTSERVE_DEVICE", "cpu")
    s = Settings()
    assert (s.default_alpha, s.drain_seconds, s.device) == (0.01, 2.5, "cpu")
    monkeypatch.setenv("CERTSERVE_DEFAULT_ALPHA", "2")
    with pytest.raises(ValueError):
        Settings()
