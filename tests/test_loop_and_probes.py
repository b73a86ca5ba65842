"""The request path's GIL switch interval, error answers of the health probes in the rejected-requests counter, and
two argument messages of smoothing; each through the real app's lifespan (real engine, real onnxruntime) or the real
functions. Seeded.

- ``CERTSERVE_GIL_SWITCH_MS`` (default 5, Python's): the engine thread's bookkeeping keeps the GIL while a waking
  event loop waits for it up to the interpreter's switch interval; with 8 sequential requests in flight the
  surrogate's p99 went 10.2 -> 8.4 ms at 0.5 ms, surrogate-only bursts 43.6 -> 47.2 ms (docs/benchmarks.md (b)).
  Fails with the setting ignored (the line of server.app.build_service removed): checked, the interval stayed.
- GET /readyz and /healthz answering 503 (draining, engine_down) were not counted in
  ``certserve_rejected_requests_total``, which README says counts each error answer once under its code. Fails on
  the unfixed code: checked (no sample for either code).
- ``checkpoint_schedule(-3)`` said "budget must be >= 0" (0 is refused too: the range is >= 1); the negative
  budget of ``planned_sample_size`` likewise. Fails on the unfixed code: checked.
"""

from __future__ import annotations

import sys

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.app import create_app
from server.settings import Settings
from smoothing import checkpoint_schedule, planned_sample_size


@pytest.fixture
def restore_switch_interval():
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


@pytest.mark.parametrize("setting, expected", [({}, 0.005), ({"gil_switch_ms": 0.5}, 0.0005)])
def test_the_app_sets_the_gil_switch_interval(restore_switch_interval, setting, expected):
    sys.setswitchinterval(0.001)  # neither: the app sets it
    with TestClient(create_app(Settings(threads=1, drain_seconds=0, **setting), seed=20261207)) as client:
        assert client.get("/readyz").status_code == 200
        assert sys.getswitchinterval() == pytest.approx(expected)


@pytest.mark.parametrize("bad", [0, -1, 0.01, 1000, float("nan"), "fast"])
def test_a_gil_switch_interval_out_of_range_is_refused_with_its_range(bad):
    with pytest.raises(ValidationError, match="gil_switch_ms"):
        Settings(gil_switch_ms=bad)


def _rejected(client: TestClient, reason: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'certserve_rejected_requests_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_the_probes_error_answers_are_counted_under_their_codes(restore_switch_interval):
    with TestClient(create_app(Settings(threads=1, drain_seconds=0), seed=20261207)) as client:
        state = client.app.state
        assert client.get("/readyz").status_code == 200 and _rejected(client, "draining") == 0
        state.draining = True
        try:
            for _ in range(3):
                r = client.get("/readyz")
                assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
            assert _rejected(client, "draining") == 3
        finally:
            state.draining = False
        state.service.engine.stop(0)  # the engine thread ends: engine_down, for both probes
        assert client.get("/healthz").status_code == 503 and client.get("/readyz").status_code == 503
        assert _rejected(client, "engine_down") == 2


def test_a_negative_budget_is_refused_with_the_range_that_holds():
    with pytest.raises(ValueError, match=r"budget must be one whole number >= 1 \(samples\), got -3"):
        checkpoint_schedule(-3)
    with pytest.raises(ValueError, match=r"first must be one whole number >= 1 \(samples\), got -1"):
        checkpoint_schedule(100, first=-1)
    with pytest.raises(ValueError, match=r"budget must be one whole number >= 1 .*got -5"):
        planned_sample_size(2.0, 1.0, sigma=0.25, alpha=0.001, budget=-5)
