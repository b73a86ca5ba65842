"""Surrogate single-pass certificate numerics (review 2): the served radius and p_lower against an independent
exact re-implementation from the bundle's stored calibration (rational arithmetic for the bin, the maps and
z_lower = h(g) - q v(g); mpmath for Phi), on seeded random inputs and at the edges (z_lower near 0 where h(g) and
q v(g) nearly cancel; z_lower beyond ~8.3 where Phi rounds to 1); and non-finite surrogate logits on the served path.
Each test says what it guards and that it failed on the code before it."""

from __future__ import annotations

from fractions import Fraction as F

import mpmath as mp
import numpy as np
import pytest

from models.bundle import Calibration, load_bundle
from models.surrogate import surrogate_answers
from smoothing import level_split
from smoothing.conformal import validated_conformal_certificate


def _exact_lower(g: float, level) -> F | None:
    """z_lower for the float log-odds g in exact arithmetic (None: the bin abstains)."""
    g = F(float(g))
    q = level.q_hat[sum(1 for e in level.edges if F(e) <= g)]
    if q is None:
        return None
    kn = [F(k) for k in level.knots]

    def interp(vals):
        vals = [F(v) for v in vals]
        if g <= kn[0]:
            return vals[0]
        if g >= kn[-1]:
            return vals[-1]
        j = max(i for i in range(len(kn)) if kn[i] <= g)
        return vals[j] + (vals[j + 1] - vals[j]) * (g - kn[j]) / (kn[j + 1] - kn[j])

    return interp(level.values) - F(q) * interp(level.scale)


def _check(g: float, level, sigma: float, *, p_lower: bool = True) -> None:
    p, r = validated_conformal_certificate(np.array([g]), sigma, **level.arrays)
    z = _exact_lower(g, level)
    exact_radius = F(sigma) * z if z is not None and z > 0 else F(0)
    assert F(float(r[0])) <= exact_radius, (g, level.alpha, r[0], float(exact_radius))
    if p_lower and z is not None:
        with mp.workdps(60):
            exact_p = mp.ncdf(mp.mpf(z.numerator) / z.denominator)
            assert mp.mpf(float(p[0])) <= exact_p, (g, level.alpha, p[0], exact_p)


def _crossing(level, lo: float, hi: float) -> float:
    """A float log-odds where the exact z_lower changes sign in [lo, hi] (bisection on the exact value)."""
    sign = lambda g: _exact_lower(g, level) > 0  # noqa: E731
    assert sign(lo) != sign(hi)
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sign(mid) == sign(lo) else (lo, mid)
    return lo


def test_the_radius_is_never_above_its_exact_value_where_the_point_estimate_and_quantile_nearly_cancel():
    """Near the log-odds where h(g) = q v(g) (the shipped bundle, level 0.1, low-confidence bin), z_lower is the
    difference of two numbers near 0.6: np.interp's few-ulp error is then large relative to z_lower, and the radius's
    relative rounding (1e-10) did not cover it: the served radius was up to ~2 % above the exact sigma z_lower
    (1.249e-16 for 1.228e-16 at g = 0.6088146182419563). Failed on the code before this test."""
    m = load_bundle(check_models=False).manifest
    level = m.calibration.levels[0]
    g0 = _crossing(level, -5.0, level.edges[0] - 1e-9)
    for k in range(-300, 300):
        _check(g0 + k * 4e-16, level, m.sigma, p_lower=False)


def test_p_lower_is_never_above_phi_of_the_exact_lower_bound():
    """p_lower = Phi(z_lower) was ndtr's round-to-nearest value: up to one ulp above the exact Phi (892 of 20,000
    random shipped-bundle answers), and exactly 1.0 for z_lower >~ 8.3 (a bin whose quantile is well below 0): a
    certificate claiming P(f(x+e) = c) >= 1. Failed on the code before this test."""
    m = load_bundle(check_models=False).manifest
    rng = np.random.default_rng(20261207)
    for g in rng.normal(6.0, 4.0, 300):
        _check(float(g), m.calibration.levels[int(rng.integers(len(m.calibration.levels)))], m.sigma)
    delta, alpha_1 = level_split(0.1)
    level = Calibration.model_validate({
        "samples_per_image": 1000, "num_calibration": 100, "num_tuning": 10, "levels": [{
            "alpha": 0.1, "delta": delta, "alpha_1": alpha_1, "knots": [0.0, 10.0], "values": [0.0, 3.0],
            "scale": [1.0, 0.5], "edges": [], "q_hat": [-12.0], "bin_sizes": [100]}]}).levels[0]
    for g in (5.0, 9.0, 30.0):
        _check(g, level, 0.25)


def test_served_answers_match_the_exact_reimplementation_on_random_logits_and_levels():
    """End to end through models.surrogate.surrogate_answers (class, log-odds, level lookup incl. alpha between
    levels and at a level): radius and p_lower never above the exact values, the level the largest <= alpha."""
    m = load_bundle(check_models=False).manifest
    cal = m.calibration
    rng = np.random.default_rng(7)
    for _ in range(150):
        logits = rng.normal(0.0, rng.uniform(0.5, 8.0), (1, 10)).astype(np.float32)
        alpha = float(rng.choice([0.2, 0.1, 0.1000000001, 0.0999999999, 0.05, 0.03, 0.01, 0.001]))
        a = surrogate_answers(logits, cal, m.sigma, alpha)
        level = cal.level_for(alpha)
        assert a.level == level.alpha and level.alpha <= alpha
        assert all(lv.alpha > alpha for lv in cal.levels if lv.alpha > level.alpha)
        _check(float(a.log_odds[0]), level, m.sigma)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_surrogate_logit_abstains_instead_of_raising(bad):
    """surrogate_log_odds refuses non-finite logits (right for the calibration fit), and the served path called it
    unguarded: one NaN / inf logit (a float32 overflow, a log(softmax) graph's log 0) raised ValueError, a 500 for
    that request. The row abstains now (no calibrated score exists for it); the other rows are unchanged. Failed on
    the code before this test."""
    m = load_bundle(check_models=False).manifest
    logits = np.array([[9.0, 0.0, 1.0], [9.0, bad, 1.0]])
    a = surrogate_answers(logits, m.calibration, m.sigma, 0.1)
    ref = surrogate_answers(logits[:1], m.calibration, m.sigma, 0.1)
    assert a.radius[0] == ref.radius[0] > 0 and a.p_lower[0] == ref.p_lower[0] and a.z_hat[0] == ref.z_hat[0]
    assert a.radius[1] == 0.0 and a.p_lower[1] == 0.0 and a.z_hat[1] == 0.0 and np.isnan(a.log_odds[1])
    below = surrogate_answers(logits, m.calibration, m.sigma, 1e-6)  # below every level: no p_lower at all
    assert below.p_lower is None and not below.radius.any() and below.z_hat[1] == 0.0


def _post_with_a_nan_surrogate(*bodies: dict, submitted: list | None = None) -> list:
    """POST each JSON body (``image`` added: a grey image) to /certify of the real app (embedded bundle, seeded
    engine) whose surrogate's clean pass gives NaN logits; ``submitted`` collects the engine's job specs."""
    import asyncio

    import httpx

    from server.app import create_app
    from server.settings import Settings

    async def main():
        app = create_app(Settings(max_samples=2000, drain_seconds=0), seed=5)
        async with app.router.lifespan_context(app):
            service = app.state.service
            k = len(service.classes)
            service.surrogate.forward = lambda x: np.full((len(x), k), np.nan, dtype=np.float32)
            if submitted is not None:
                submit = service.engine.submit
                service.engine.submit = lambda spec: (submitted.append(spec), submit(spec))[1]
            image = np.full(service.shape, 0.5, dtype=np.float32).tolist()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as ac:
                return [await ac.post("/certify", json={"image": image, **body}) for body in bodies]

    return asyncio.run(main())


def test_auto_falls_back_to_sampling_and_surrogate_mode_abstains_on_a_nan_surrogate_output():
    """Through the real app (embedded bundle, seeded engine): a surrogate whose clean pass gives NaN was a 500
    'internal' for mode=auto and mode=surrogate. Now auto samples (fallback surrogate_abstained, a per-input
    certificate) and surrogate answers an abstaining certificate. Failed on the code before this test."""
    auto, sur = _post_with_a_nan_surrogate({"mode": "auto", "max_samples": 500, "alpha": 0.1},
                                           {"mode": "surrogate", "alpha": 0.1})
    assert auto.status_code == 200, auto.text
    assert auto.json()["method"] == "sequential" and auto.json()["fallback_reason"] == "surrogate_abstained"
    assert sur.status_code == 200, sur.text
    body = sur.json()
    assert body["method"] == "surrogate" and not body["certified"] and body["radius"] == 0.0
    assert body["stopped_by"] == "abstained" and body["p_lower"] is None


def test_a_radius_is_never_signed_next_to_a_p_lower_of_one_half(monkeypatch):
    """p_lower is Phi(z_lower) one ulp down: for 0 < z_lower < ~3e-16 that is 1/2 or below, and the radius sigma z_lower
    (> 0, certified) next to it was refused by certification.verify as INVALID: inconsistent ("a radius needs
    p_lower > 1/2") although the server signed it. Now such a radius is 0 (an abstention: it is below 1e-15 sigma)."""
    from certification.verify import _check_consistent
    from smoothing.conformal import conformal_certificate, validated_conformal_certificate

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))  # not left in sys.path
    from test_verify_review2 import _claims

    g = np.array([0.5, 0.5, 0.5, 0.5])
    for z in (1e-17, 1e-16, 2e-16, 1e-13):
        cal = {"knots": np.array([0.0, 1.0]), "values": np.array([z, z]), "scale": np.array([1.0, 1.0]),
               "edges": np.array([], dtype=np.float64), "q_hat": np.array([0.0])}
        for certify in (conformal_certificate, validated_conformal_certificate):
            p, radius = certify(g, 0.25, **cal)
            assert radius[0] == 0 or p[0] > 0.5, (z, p[0], radius[0])
            cls = 3 if radius[0] > 0 else -1
            _check_consistent(_claims("surrogate", cls, float(radius[0]), float(p[0]), 0.25))
        assert (radius[0] > 0) == (z > 1e-15)


def test_a_proposal_of_radius_zero_is_no_proposal_in_the_server_and_its_replay():
    """z_hat <= 0 (the surrogate's estimate has no radius; also every non-finite surrogate output) proposed radius 0,
    and proposal_decision verifies radius 0 as soon as L_t > 1/2: the per-input job stopped at its first certified
    checkpoint with a tiny radius (seeded simulation at pA = 0.8: mean radius 0.035 instead of 0.095). The server now
    submits no proposal there, and calibration.evaluate.replay_per_input replays it the same way. Failed on the code
    before this test: the submitted proposal_radius was 0.0, and the replay stopped every row at t = 64 (TARGET)."""
    from calibration import front
    from calibration.evaluate import replay_per_input
    from smoothing import PER_INPUT_MIN_GAIN, best_radius_decision

    submitted = []
    (r,) = _post_with_a_nan_surrogate({"per_input": True, "max_samples": 500}, submitted=submitted)
    assert r.status_code == 200, r.text
    assert len(submitted) == 1 and submitted[0].proposal_radius is None

    rng = np.random.default_rng(7)
    hits = np.cumsum(rng.random((40, 2000)) < 0.8, axis=1, dtype=np.int64)
    prior = np.full((40, 2), 0.5)
    used, radius = replay_per_input(hits, prior, np.zeros(40), 0.01, 0.25, 2000)

    def best(s, t, idx):
        return best_radius_decision(s, t, sigma=0.25, alpha=0.01, budget=2000, a=prior[idx, 0], b=prior[idx, 1],
                                    min_gain=PER_INPUT_MIN_GAIN)

    assert np.array_equal(used, front.replay(hits, best, 2000)) and (used > 64).all()
