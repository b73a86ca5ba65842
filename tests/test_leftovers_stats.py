"""Five leftovers of earlier reviews (statistics, planning, provenance, key sets). Each test names its bug and says
that it failed on the unfixed code (checked by running it with the source change stashed)."""

from __future__ import annotations

import json
import types

import httpx
import mpmath as mp
import numpy as np
import pytest

import calibration.pipeline as pipeline
import smoothing as sm
from calibration.config import PipelineConfig
from certification.verify import VerificationError, _radius_bound, load_jwks
from smoothing import fixed
from smoothing.conformal import _p_lower

# ------------------------------------------------------------------------------- 1. p_lower = Phi(z) rounded down

#: float z where scipy's ndtr is off by more than one ulp (found against 160-bit mpmath): ndtr(z) one ulp down was
#: still above the exact Phi(z)
NDTR_MISSES = [1.2689745335899578, 1.3745484401493129, 1.050256020742217, -1.7277589238775128, -6.203889441494429,
               -14.02634951867226]


def test_p_lower_is_never_above_the_exact_phi_where_ndtr_errs_by_more_than_one_ulp():
    """_p_lower claimed "Phi(z_lower) one ulp down (ndtr rounds to nearest)", but ndtr is not correctly rounded: up to
    1.6 x 2^-53 off for z >= 0 (near z = 1.4) and ~(8 + z^2) 2^-52 relative for z < 0, so one ulp down was above the
    exact Phi(z) at the listed z (and for 142 of 20,000 z in [0.9, 1.6]). For z > 0 the margin must also stay inside
    the 8 ulp certification.verify allows, or a radius signed next to p_lower would be refused as inconsistent.
    Fails on the unfixed code: checked."""
    rng = np.random.default_rng(20270102)
    zs = np.concatenate([NDTR_MISSES, rng.uniform(0.9, 1.6, 150), rng.uniform(-38.0, 9.0, 150), [0.0, 40.0]])
    p = _p_lower(zs)
    with mp.workprec(160):
        for z, pz in zip(zs, p):
            assert mp.mpf(float(pz)) <= mp.ncdf(mp.mpf(float(z))), (float(z), float(pz))
    for z, pz in zip(zs, p):  # the radius the surrogate signs next to p_lower passes verify's consistency check
        if pz > 0.5:
            assert 0.25 * z <= _radius_bound(float(pz), 0.25), (float(z), float(pz))
    assert _p_lower(-np.inf) == 0.0 and np.isnan(_p_lower(np.nan))


# ------------------------------------------------------------------ 2. checkpoint_schedule's budget and first

@pytest.mark.parametrize("kwargs, name", [
    ({"budget": 100.5}, "budget"), ({"budget": True}, "budget"), ({"budget": "100"}, "budget"),
    ({"budget": np.array([100, 200])}, "budget"), ({"budget": None}, "budget"),
    ({"budget": 100, "first": 16.5}, "first"), ({"budget": 100, "first": False}, "first"),
    ({"budget": 100, "first": "16"}, "first"), ({"budget": 100, "first": np.array([16])}, "first"),
], ids=repr)
def test_checkpoint_schedule_refuses_a_budget_or_first_that_is_not_one_whole_number(kwargs, name):
    """checkpoint_schedule checked growth but not budget and first: 100.5 gave a schedule ending at 100 (cast by
    int64), True ran as 1 sample, a string raised Python's TypeError ("'<' not supported"), an array numpy's "truth
    value of an array is ambiguous": none named the argument. Now smoothing._checks.check_one_nonneg_int, as
    planned_sample_size's budget. Fails on the unfixed code: checked."""
    with pytest.raises(ValueError, match=rf"^{name} must be (whole numbers|one whole number >= 1 \(samples\))"):
        sm.checkpoint_schedule(**kwargs)
    assert sm.checkpoint_schedule(100.0, first=np.int64(16)).tolist() == sm.checkpoint_schedule(100, first=16).tolist()


# --------------------------------------------------------------------- 3. planned_sample_size with a tiny min_gain

def test_a_tiny_min_gain_plan_stops_its_scan_early_with_the_full_scans_answer(monkeypatch):
    """planned_sample_size(min_gain=1e-6) took ~60 s: its pruning bound was the all-hits radius, which keeps rising
    with n, so the scan tabulated CP radii for every candidate up to ~950,000 samples although the answer is 6068.
    Now a bound on each input's expected radius (from its prior's tail, alpha <= 1/2) stops it near 88,000 with the
    same answer (6068: the unfixed code's full scan). Bounded by work, not time: a candidate beyond 2^17 fails the
    test. Fails on the unfixed code: checked."""
    real = fixed.expected_radius

    def guarded(a, b, n, *args):
        assert n <= 2**17, f"the scan reached a candidate of {n} samples"
        return real(a, b, n, *args)

    monkeypatch.setattr(fixed, "expected_radius", guarded)
    assert sm.planned_sample_size(0.5, 0.5, sigma=0.25, alpha=0.001, budget=2**20, min_gain=1e-6) == 6068
    # the same plans as a scan of every candidate, on seeded random priors (vectorized: the scan stops for all)
    rng = np.random.default_rng(20270103)
    a, b = 10.0 ** rng.uniform(-1, 3, (2, 6))
    got = sm.planned_sample_size(a, b, sigma=0.5, alpha=0.01, budget=3000, min_gain=1e-6)
    cands = fixed._candidates(3000)
    ceiling = np.asarray(sm.radius_from_probability(0.01 ** (1.0 / np.asarray(cands, np.float64)), 0.5))
    table = np.stack([np.clip(np.nan_to_num(real(a, b, n, 0.5, 0.01, sm.DEFAULT_KT_WEIGHT)), 0.0, c) - 1e-6 * n
                      for n, c in zip(cands, ceiling)])
    assert got.tolist() == [cands[j] for j in np.argmax(table, axis=0)]


# ---------------------------------------------------------------------- 4. provenance.config.tune_size

class _Stop(Exception):
    pass


def test_build_provenance_records_the_tune_size_used_not_the_one_asked(tmp_path, monkeypatch):
    """run_pipeline caps tune_size at half the calibration split (_checked_tune_size) and tunes on that many images,
    but its provenance stored dataclasses.asdict(cfg): config.tune_size = the requested 1600 for a bundle that tuned
    on 20. Now config.tune_size is the size used and config.tune_size_requested the one asked. Runs the real
    run_pipeline on a 200-image synthetic pool with training, counting and fitting stubbed out. Fails on the unfixed
    code: checked."""
    rng = np.random.default_rng(20270104)
    x = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)
    y = np.arange(200) % 10
    np.savez(tmp_path / "pool.npz", x=x, y=y, x_test=x[:10], y_test=y[:10])
    (tmp_path / "model.onnx").write_bytes(b"stub")
    seen = {}

    def calibrate(surrogate, images, counts, num_samples, *, tune_size, cut, **options):
        seen["tune_size"], seen["images"] = tune_size, len(images)
        return {"num_tuning": tune_size}

    def create_bundle(out, **kwargs):
        seen["provenance"] = kwargs["provenance"]
        raise _Stop

    stub = types.SimpleNamespace(onnx=tmp_path / "model.onnx", backend=None, sampler=types.SimpleNamespace(name="s"))
    monkeypatch.setattr(pipeline, "_base_model", lambda *a, **k: stub)
    monkeypatch.setattr(pipeline, "_base_quality", lambda *a, **k: {})
    monkeypatch.setattr(pipeline, "SamplingEngine", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "compute_counts", lambda engine, images, *a, **k: np.zeros((len(images), 10)))
    monkeypatch.setattr(pipeline, "_surrogate", lambda *a, **k: tmp_path / "model.onnx")
    monkeypatch.setattr(pipeline, "OnnxBackend", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "calibrate_surrogate", calibrate)
    monkeypatch.setattr(pipeline, "describe", lambda block: "")
    monkeypatch.setattr(pipeline, "_meta_prior", lambda *a, **k: (tmp_path / "model.onnx", {}))
    monkeypatch.setattr(pipeline, "create_bundle", create_bundle)
    cfg = PipelineConfig(data=str(tmp_path / "pool.npz"), out=str(tmp_path / "b"), work=str(tmp_path / "w"),
                         calibration_size=40, surrogate_size=100, tune_size=1600, levels=(0.1,), device="cpu",
                         progress=False)
    with pytest.raises(_Stop):
        pipeline.run_pipeline(cfg, log=lambda *_: None)
    config = seen["provenance"]["config"]
    assert seen["images"] == 40 and seen["tune_size"] == 20
    assert config["tune_size"] == 20 and config["tune_size_requested"] == 1600
    assert json.loads(json.dumps(config))["tune_size"] == 20


# --------------------------------------------------------------------------- 5. load_jwks names its source

def _url_client(body: bytes) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, content=body)))


@pytest.mark.parametrize("raw, fragment", [
    ({"nokeys": []}, 'must be a JSON object {"keys": [...]}'),
    ({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "!!", "kid": "k1"}]}, "entry 'k1' is not an Ed25519 JWK"),
], ids=["not a JWKS", "bad entry"])
@pytest.mark.parametrize("where", ["file", "inline", "url"])
def test_every_key_set_error_names_its_source(tmp_path, raw, fragment, where):
    """load_jwks wrapped the key-set parser's errors with their source for URLs only: a bad local JWKS file (or a
    dict) said 'key set must be a JSON object {"keys": [...]}' without saying which file. Now every error reads
    "key set SOURCE: ...", SOURCE the path, the URL or "(inline dict)". Fails on the unfixed code (file and inline):
    checked."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(raw))
    source, name, kwargs = {"file": (str(path), str(path), {}), "inline": (raw, "(inline dict)", {}),
                            "url": ("https://keys.test/jwks.json", "https://keys.test/jwks.json",
                                    {"client": _url_client(json.dumps(raw).encode())})}[where]
    with pytest.raises(VerificationError) as info:
        load_jwks(source, **kwargs)
    assert info.value.reason == "bad_jwks"
    assert str(info.value) == f"key set {name}: {fragment}"
