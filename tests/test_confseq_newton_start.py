"""The confidence sequence's Newton start (smoothing.kernels._closer_start, compiled): left of the exact root and
closer than the plain start.

The start is not what makes a bound sound (the kernel verifies its final iterate with the e-value test and steps
back), but a start right of the root would leave Newton stuck there and the bound to the step-back loop, and a start
that is not closer would only cost iterations. Grid: tests/test_smoothing_confseq_exact.py's fast grid.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

from smoothing.eprocess import _ULP_MARGIN
from smoothing.kernels import LOG_P_FLOOR as _LOG_P_FLOOR
from smoothing.kernels import _closer_start, log_marginal
from tests.test_smoothing_confseq_exact import _exact_excess, _grid


def _kernel_terms(s, t, alpha, a, b, w):
    """(v1, const, S, F, shrink, log p_hat) as the kernel forms them for one entry (F > 0, g(floor) >= 0), else None."""
    sf, f = float(s), float(t - s)
    log_threshold = -np.log(alpha)
    mix, magnitude = log_marginal(sf, f, float(a), float(b), float(w))
    const = mix - log_threshold - _ULP_MARGIN * (magnitude + log_threshold)
    shrink = 1.0 - _ULP_MARGIN
    log_phat = np.log(sf / (sf + f))
    g_floor = const - shrink * (sf * _LOG_P_FLOOR + f * np.log(-np.expm1(_LOG_P_FLOOR)))
    if f <= 0 or not g_floor >= 0:
        return None
    v1 = float(min(max(const / (shrink * sf), _LOG_P_FLOOR), log_phat))
    return v1, float(const), sf, f, shrink, float(log_phat)


def _entries():
    return [(p, terms) for p in _grid("fast") if (terms := _kernel_terms(*p)) is not None]


def test_start_is_left_of_the_exact_root_and_not_behind_the_plain_start():
    """Exact log E_t(e^start) >= log(1/alpha) (start inside the exact rejection region, i.e. left of the root) and
    v1 <= start <= log p_hat everywhere; start > v1 (strictly closer) wherever S >= 10, the engine's counts (with
    one to a few hits the Gaussian approximation lands left of v1, which is then kept). Ran once against a start
    that stepped the wrong way (v0 + g/g' instead of v0 - g/g') and once against the approximation v0 itself, no
    tangent step: both fail (starts right of the exact root)."""
    mp.mp.dps = 40
    right_of_root, closer, many_hits, entries = [], 0, 0, _entries()
    for (s, t, alpha, a, b, w), terms in entries:
        start = _closer_start(*terms)
        assert terms[0] <= start <= terms[5], ((s, t, alpha, a, b, w), start, terms)
        if s >= 10:
            many_hits += 1
            closer += start > terms[0]
        if _exact_excess(s, t, mp.exp(start), alpha, a, b, w) < 0:
            right_of_root.append(((s, t, alpha, a, b, w), start))
    assert not right_of_root, f"{len(right_of_root)} starts right of the exact root, e.g. {right_of_root[:3]}"
    assert many_hits > 100 and closer == many_hits, (closer, many_hits)
