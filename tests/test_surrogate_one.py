"""The served surrogate's one-image answer (models.surrogate.surrogate_answer on smoothing.conformal's ``*_one``
kernels) is bit for bit the batch path's row (surrogate_answers, the function the offline evaluation and the
calibration checks use), so the cheaper request path certifies exactly what was evaluated and calibrated.

Checked against the bugs it guards against (each run once with the bug put in the one-value kernel, each failed
here): the rounding slack of z_lower left out (radius a few ulp above the array path's), the z < 0 margin of
p_lower left out (p_lower above it), the bin chosen with side="left" (the quantile of the wrong bin at an edge),
and the radius not zeroed where p_lower <= 1/2. Seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.bundle import Calibration, load_bundle
from models.surrogate import surrogate_answer, surrogate_answers
from smoothing import level_split
from smoothing.conformal import (surrogate_log_odds, surrogate_log_odds_one, validated_conformal_certificate,
                                 validated_conformal_certificate_one)


def _level(alpha, q_hat, edges, values=(-1.0, 0.0, 3.0)):
    delta, alpha_1 = level_split(alpha)
    return {"alpha": alpha, "delta": delta, "alpha_1": alpha_1, "knots": [-2.0, 1.0, 10.0], "values": list(values),
            "scale": [2.0, 1.0, 0.5], "edges": list(edges), "q_hat": q_hat, "bin_sizes": [4000 // len(q_hat)] * (len(q_hat) - 1) + [4000 - 4000 // len(q_hat) * (len(q_hat) - 1)]}


def _synthetic() -> Calibration:
    """Three levels whose z_lower crosses 0 and goes far below it (the z < 0 branch of p_lower and its tiny
    values), with abstaining bins (q_hat null) and bin edges that logits land on."""
    return Calibration.model_validate({
        "samples_per_image": 10_000, "num_calibration": 4000, "num_tuning": 200,
        "levels": [_level(0.1, [0.5, 0.2], [0.5]), _level(0.01, [None, 3.0, 0.4], [0.0, 4.0], (-30.0, 0.5, 3.0)),
                   _level(0.001, [None, 0.8], [4.0])]})


CALIBRATIONS = {"bundle": load_bundle().manifest.calibration, "synthetic": _synthetic()}
ALPHAS = (0.5, 0.1, 0.05, 0.01, 0.002, 0.001, 0.0001)


def _logit_rows(seed: int) -> np.ndarray:
    """Seeded logit rows of several widths and spreads: ambiguous (near ties), confident (log-odds up to ~1e3), and
    exact ties; as the (1, K) arrays the service passes."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in (2, 3, 10, 57):
        for spread in (1e-6, 0.3, 3.0, 30.0, 1e3):
            rows += [rng.normal(size=k) * spread for _ in range(25)]
        rows += [np.zeros(k), np.r_[5.0, 5.0, np.zeros(k - 2)], np.r_[4.0, np.full(k - 1, 4.0 - 1e-12)]]
    return rows


def _same(one: float | None, batch) -> bool:
    """Bit-for-bit equality of a scalar answer and the batch row (NaN never appears in an answer)."""
    return (one is None and batch is None) or (one is not None and batch is not None
                                                and np.float64(one).tobytes() == np.float64(batch).tobytes())


@pytest.mark.parametrize("name", sorted(CALIBRATIONS))
def test_the_one_image_answer_is_the_batch_row_bit_for_bit(name):
    cal = CALIBRATIONS[name]
    rows = _logit_rows(7)
    for alpha in ALPHAS:
        batch = surrogate_answers(np.array([r for r in rows if r.size == 10]), cal, 0.25, alpha)
        for i, row in enumerate(r for r in rows if r.size == 10):
            one = surrogate_answer(row[None], cal, 0.25, alpha)
            assert one.class_index == batch.class_index[i] and one.level == batch.level
            assert _same(one.z_hat, batch.z_hat[i]) and _same(one.radius, batch.radius[i])
            assert _same(one.p_lower, None if batch.p_lower is None else batch.p_lower[i]), (alpha, i)
        for row in (r for r in rows if r.size != 10):  # other widths, one at a time against a one-row batch
            one, ref = surrogate_answer(row[None], cal, 0.25, alpha), surrogate_answers(row[None], cal, 0.25, alpha)
            assert (one.class_index, one.level) == (ref.class_index[0], ref.level)
            assert _same(one.radius, ref.radius[0]) and _same(one.z_hat, ref.z_hat[0])
            assert _same(one.p_lower, None if ref.p_lower is None else ref.p_lower[0])


def test_the_log_odds_kernel_is_the_batch_row_bit_for_bit():
    for row in _logit_rows(11):
        cls, g = surrogate_log_odds(row[None])
        assert surrogate_log_odds_one(row) == (int(cls[0]), float(g[0]))


@pytest.mark.parametrize("name", sorted(CALIBRATIONS))
def test_the_certificate_kernel_matches_on_a_dense_grid_of_log_odds(name):
    """Every level of each calibration, log-odds on a seeded grid through every knot region and edge (edges and
    knots themselves included, +-inf too), sigma from tiny to large: (p_lower, radius) bit for bit; and the grid does
    reach both branches of p_lower (z >= 0 and z < 0), certified answers and (synthetic) an abstaining bin."""
    rng = np.random.default_rng(3)
    seen = set()
    for level in CALIBRATIONS[name].levels:
        a = level.arrays
        g = np.concatenate([rng.uniform(-60, 60, 400), rng.uniform(-3, 12, 400), a["knots"], a["edges"],
                            np.nextafter(a["edges"], -np.inf), [-np.inf, np.inf, 0.0]])
        for sigma in (1e-300, 0.12, 0.25, 1.0, 1e300):
            p, r = validated_conformal_certificate(g, sigma, **a)
            for k, gk in enumerate(g):
                one = validated_conformal_certificate_one(float(gk), sigma, **a)
                assert _same(one[0], p[k]) and _same(one[1], r[k]), (level.alpha, gk, sigma, one, p[k], r[k])
                seen.add("certified" if one[1] > 0 else "below" if 0 < one[0] < 0.5 else "zero" if one[0] == 0
                         else "other")
    assert {"certified", "below", "zero" if name == "synthetic" else "below"} <= seen  # the bundle abstains nowhere


def test_non_finite_logits_still_abstain_through_the_batch_path():
    cal = CALIBRATIONS["bundle"]
    for bad in ([np.nan] + [0.0] * 9, [np.inf] + [0.0] * 9, [-np.inf, 1.0] + [0.0] * 8):
        one = surrogate_answer(np.array([bad]), cal, 0.25, 0.001)
        assert one.radius == 0.0 and one.p_lower == 0.0 and one.z_hat == 0.0
        assert math.isfinite(one.z_hat)


def test_a_tiny_positive_z_lower_abstains_in_both_paths():
    """0 < z_lower < ~1.2e-15: Phi(z_lower) less the ndtr margin is <= 1/2, so the radius must be 0 (a radius next
    to such a p_lower is refused by certification.verify as inconsistent). Identity map, q = 0: z_lower = g - 1e-12
    (the rounding slack)."""
    a = {"knots": np.array([0.0, 1.0]), "values": np.array([0.0, 1.0]), "scale": np.array([1.0, 1.0]),
         "edges": np.array([100.0]), "q_hat": np.array([0.0, 0.0])}
    g = 1e-12 + np.arange(1, 40) * 1e-16
    p, r = validated_conformal_certificate(g, 0.25, **a)
    below = 0
    for k, gk in enumerate(g):
        one = validated_conformal_certificate_one(float(gk), 0.25, **a)
        assert _same(one[0], p[k]) and _same(one[1], r[k])
        assert one[1] == 0.0 if one[0] <= 0.5 else one[1] > 0
        below += one[0] <= 0.5
    assert 5 <= below < len(g)  # the grid reaches both sides of ~1.2e-15
