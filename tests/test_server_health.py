"""Readiness follows the engine: a dead sampling engine makes /readyz 503 (traffic goes to other replicas)."""

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.app import create_app
from server.settings import Settings


def test_readyz_reports_a_dead_engine():
    with TestClient(create_app(Settings(max_samples=200), seed=0)) as client:
        assert client.get("/readyz").status_code == 200
        client.app.state.service.engine.stop()  # the engine thread ends
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"
        assert r.headers["Retry-After"] == "1"  # like every 503 (missing before 2026-12-05)
        r = client.get("/healthz")  # liveness fails too: the engine never comes back (tests/test_ops_review2.py)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"


@pytest.mark.parametrize("setting, value, message", [
    ("log_level", "verbose", "'critical', 'error', 'warning', 'info' or 'debug'"),
    ("drain_seconds", float("inf"), "less than or equal to 3600"),
    ("default_deadline_ms", 10**7, "less than or equal to 600000"),
    ("max_samples", 3 * 10**9, "less than or equal to 2147483648"),  # every sequential/cohen request was a 500
    ("auto_max_samples", 3 * 10**9, "less than or equal to 2147483648"),
])
def test_settings_that_would_fail_later_are_refused_at_start(setting, value, message):
    """Values that passed Settings and then failed with a traceback when the server started (log level, infinite
    drain) or gave a default deadline no request may ask for; refused with what is expected (each was accepted
    before 2026-12-05)."""
    with pytest.raises(ValidationError, match=message):
        Settings(**{setting: value})
    assert Settings(log_level="DEBUG").log_level == "debug"
