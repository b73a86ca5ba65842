"""Readiness follows the engine: a dead sampling engine makes /readyz 503 (traffic goes to other replicas)."""

from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings


def test_readyz_reports_a_dead_engine():
    with TestClient(create_app(Settings(max_samples=200), seed=0)) as client:
        assert client.get("/readyz").status_code == 200
        client.app.state.service.engine.stop()  # the engine thread ends
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"
        assert client.get("/healthz").status_code == 200
