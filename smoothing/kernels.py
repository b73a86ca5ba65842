"""The compiled per-entry kernels of the sequential path: the confidence-sequence lower bound L_t and the marginal-gain
(best-radius) rule, one loop over entries, compiled by numba.

Why compiled: the bound is a short Newton iteration per entry and the rule a few bounds and comparisons per job. As
numpy calls over arrays, an engine step paid ~1-3 us of fixed cost per call, ~100 calls (0.6 ms at 512 jobs), and a
lone job's decision ~50 us on Python floats; compiled, the same work is one call per step (~0.4 ms at 512 jobs, ~3 us
for one job), and it releases the interpreter lock while it runs. Every caller - the engine, the offline replays,
the public :func:`smoothing.lower_bound` - goes through these loops, so a job's bound never depends on how many other
jobs shared its call or on which path computed it. The special functions are scipy's own (``betaln``, ``ndtri`` from
``scipy.special.cython_special``), the elementary ones the C library's.

Guarantees (per input, at the entry's alpha, for hits S_t i.i.d. Bernoulli(pA) of a class fixed before the samples
and a prior (a, b, kt_weight) fixed before them): :func:`lower_bound_one` / :func:`lower_bounds` return L_t with
P(exists t: L_t > pA) <= alpha, rounded down: the returned value is a p0 at which the e-value test of
:mod:`smoothing.eprocess` REJECTS H0: pA <= p0 with its 64-ulp margin (checked on the returned value itself), or 0.
The best-radius rule only decides when to stop; its L_t output is that same bound.
The algorithm (start, Newton, verification, step-back) is :mod:`smoothing.confseq`'s, described there.
"""

from __future__ import annotations

import math

import llvmlite.binding as llvm
import numba
import numpy as np
import scipy.special
from numba import types
from numba.extending import get_cython_function_address

from smoothing.radius import _MIN_RADIUS, RADIUS_ROUNDING

# scipy's betaln, ndtri and ndtr (its real variant: the fused function's second entry) as external C symbols: numba
# caches code that calls them by name (a ctypes pointer held as a global would make every function using it
# uncacheable, i.e. compiled again in every process, ~2.5 s).
llvm.add_symbol("certserve_betaln", get_cython_function_address("scipy.special.cython_special", "betaln"))
llvm.add_symbol("certserve_ndtri", get_cython_function_address("scipy.special.cython_special", "ndtri"))
llvm.add_symbol("certserve_ndtr", get_cython_function_address("scipy.special.cython_special", "__pyx_fuse_1ndtr"))
_betaln = types.ExternalFunction("certserve_betaln", types.float64(types.float64, types.float64))
_ndtri = types.ExternalFunction("certserve_ndtri", types.float64(types.float64))
_ndtr = types.ExternalFunction("certserve_ndtr", types.float64(types.float64))

#: Relative safety margin of the e-value test: a rejection is declared only when log E exceeds log(1/alpha) by more
#: than 64 ulp of the magnitudes involved, so floating-point error cannot create a rejection that exact arithmetic
#: would not. The magnitudes include those of the log-gamma terms inside betaln, ~ (t + a + b) log(t + a + b): its
#: absolute error grows with them (measured: 1.6e-10 at t = 1e5, 1.3e-8 at t = 1e7), not with betaln's own value.
ULP_MARGIN = 64 * float(np.finfo(np.float64).eps)
LOG_P_FLOOR = math.log(1e-300)  # bounds below this are reported as 0
MAX_NEWTON = 60
#: Newton stops once a step moves v = log p0 by at most this, relative, or the next step would (:func:`_newton`; the
#: iterate is left of the root either way, short of it by <= ~1e-12 relative, and verified afterwards).
NEWTON_RTOL = 1e-12
_KT = 0.5  # the KT prior's a = b (smoothing.priors.KT_PRIOR)
_LOG_BETA_KT = float(scipy.special.betaln(_KT, _KT))  # log B(1/2, 1/2) = log pi: the same bits as the C call's
_CONTINUE, _CERTIFIED, _FUTILITY, _BUDGET = 0, 2, 3, 4  # smoothing.stopping.Stop


def compiled(function, *, nogil: bool = True):
    """numba.njit with numba's on-disk cache, releasing the interpreter lock unless ``nogil`` is False; where no cache
    directory is writable (a read-only file system: numba then refuses ``cache=True``), compiled in each process
    instead (~5 s at first use). The decorator of these kernels and of :mod:`models.table_kernels`' loops."""
    try:
        return numba.njit(cache=True, nogil=nogil)(function)
    except RuntimeError:
        return numba.njit(nogil=nogil)(function)


@compiled
def _beta_term(s, f, a, b, den):
    """(log B(a + S, b + F) - log B(a, b), magnitude of the terms): smoothing.priors' Beta component; ``den`` is
    log B(a, b), the same for every bound of a job (so computed once per job: :func:`_prior_log_beta`)."""
    num = _betaln(a + s, b + f)
    n = s + f + a + b
    return num - den, abs(num) + abs(den) + n * math.log1p(n)


@compiled
def _prior_log_beta(a, b, w):
    """log B(a, b) of the job's own Beta component (scipy's betaln, the same bits as before it was hoisted; not
    needed, 0, where the mixture is KT alone). The KT component's log B(1/2, 1/2) is the constant _LOG_BETA_KT."""
    if a == _KT and b == _KT:
        return _LOG_BETA_KT
    return _betaln(a, b) if w < 1.0 else 0.0


@compiled
def _logaddexp(x, y):  # numpy's npy_logaddexp, operation for operation
    if x == y:
        return x + math.log(2.0)
    d = x - y
    return x + math.log1p(math.exp(-d)) if d > 0 else y + math.log1p(math.exp(d))


@compiled
def log_marginal(s, f, a, b, w):
    """(log m(S, F), magnitude) of the mixture (1 - w) Beta(a, b) + w KT: :func:`smoothing.priors.log_marginal`."""
    return _log_marginal(s, f, a, b, w, _prior_log_beta(a, b, w))


@compiled
def _log_marginal(s, f, a, b, w, log_beta_ab):
    """:func:`log_marginal` given ``log_beta_ab`` = :func:`_prior_log_beta` (a, b, w)."""
    if w == 0.0:
        return _beta_term(s, f, a, b, log_beta_ab)
    kt, kt_magnitude = _beta_term(s, f, _KT, _KT, _LOG_BETA_KT)
    if w == 1.0 or (a == _KT and b == _KT):
        return kt, kt_magnitude
    own, own_magnitude = _beta_term(s, f, a, b, log_beta_ab)
    return (_logaddexp(math.log1p(-w) + own, math.log(w) + kt),
            kt_magnitude + (own_magnitude + abs(math.log(w)) + abs(math.log1p(-w))))


@compiled
def _log_e_excess(s, f, p, log_threshold, mix, magnitude):
    """log E_t(p) - log(1/alpha) - the 64-ulp margin (smoothing.eprocess's test): >= 0 where the test rejects."""
    log_null = (s * math.log(p) if s != 0.0 else 0.0) + (f * math.log1p(-p) if f != 0.0 else 0.0)
    return mix - log_null - log_threshold - ULP_MARGIN * (magnitude - log_null + log_threshold)


@compiled
def rejects_one(hits, trials, p0, alpha, a, b, kt_weight):
    """True where H0: pA <= p0 is rejected at level alpha: log E_t(p0) >= log(1/alpha) (with the 64-ulp margin) and
    S_t >= p0 t. Guarantee (per input, anytime-valid): :func:`smoothing.eprocess.rejects`'s; validated arguments."""
    return _rejects(hits, trials, p0, alpha, a, b, kt_weight, _prior_log_beta(a, b, kt_weight))


@compiled
def _rejects(hits, trials, p0, alpha, a, b, kt_weight, log_beta_ab):
    """:func:`rejects_one` given ``log_beta_ab`` = :func:`_prior_log_beta` (a, b, kt_weight); same test."""
    s, f = float(hits), float(trials - hits)
    mix, magnitude = _log_marginal(s, f, a, b, kt_weight, log_beta_ab)
    return _log_e_excess(s, f, p0, -math.log(alpha), mix, magnitude) >= 0 and hits >= p0 * trials


@compiled
def rejects_many(hits, trials, p0, alpha, a, b, kt_weight):
    """:func:`rejects_one` of each entry of 1-d arrays (int64 counts, float64 p0, alpha, a, b)."""
    out = np.empty(len(hits), dtype=np.bool_)
    for i in range(len(hits)):
        out[i] = rejects_one(hits[i], trials[i], p0[i], alpha[i], a[i], b[i], kt_weight)
    return out


@compiled
def _g_and_slope(v, const, s, f, shrink):
    """g(v) of smoothing.confseq's module docstring and g'(v) (< 0 left of the MLE)."""
    one_minus = -math.expm1(v)  # 1 - p0, accurate when p0 is close to 1
    return const - shrink * (s * v + f * math.log(one_minus)), -shrink * (s - f * math.exp(v) / one_minus)


@compiled
def _closer_start(v1, const, s, f, shrink, log_phat):
    """A Newton start closer to the root than v1 (left of it): one tangent step off the Gaussian (Wilson)
    approximation t (p_hat - p)^2 = 2 gap p (1 - p), clipped to [v1, log p_hat] (smoothing.confseq). Not a soundness
    step: the final iterate is verified whatever the start."""
    if f <= 0.0:
        return v1
    t = s + f
    gap = shrink * (s * log_phat + f * math.log(f / t)) - const
    if not gap > 0:
        return v1
    centre, width = s + gap, t + 2.0 * gap
    p0 = (centre - math.sqrt(max(centre * centre - width * s * (s / t), 0.0))) / width
    v0 = max(math.log(max(p0, 1e-300)), v1)
    g0, slope0 = _g_and_slope(v0, const, s, f, shrink)
    if not (v0 < log_phat and slope0 < 0):
        return v1
    return min(max(v0 - g0 / slope0, v1), log_phat)


@compiled
def _newton(v, const, s, f, shrink, log_phat):
    """Newton on the convex decreasing g from a start left of the root: every iterate stays left of it (exact
    arithmetic), capped at log p_hat. Stops once a step moved v by <= NEWTON_RTOL relative, or once the next step,
    as quadratic convergence predicts it, would: 10 g''(v) / (2 |g'(v)|) step^2 <= NEWTON_RTOL |v_new| (the factor
    10 covers the curvature growing towards the root). That saves the confirming iteration: ~2.7 -> ~1.9 per bound;
    measured on 3e5 random entries, the iterate is then short of the fully converged one by <= 1.3e-13 relative in v.
    Where to stop is not a soundness step: whichever iterate is left of the root, and it is verified afterwards."""
    for _ in range(MAX_NEWTON):
        one_minus = -math.expm1(v)
        if one_minus <= 0.0:  # v = log p_hat = 0 (S = t): the start is already the root
            return v
        q = math.exp(v)
        g = const - shrink * (s * v + f * math.log(one_minus))
        slope = -shrink * (s - f * q / one_minus)
        step = -g / slope if slope < 0.0 and g > 0.0 else 0.0
        v_new = min(v + step, log_phat)
        if not v_new - v > NEWTON_RTOL * abs(v):
            return v_new
        curvature = shrink * f * q / (one_minus * one_minus)  # g''(v) > 0
        if 10.0 * curvature * step * step <= -2.0 * slope * NEWTON_RTOL * abs(v_new):
            return v_new
        v = v_new
    return v


@compiled
def lower_bound_one(hits, trials, alpha, a, b, kt_weight):
    """L_t from ``hits`` in ``trials`` draws (validated: 0 <= hits <= trials, alpha in (0, 1), a, b > 0, kt_weight in
    [0, 1]). Guarantee: module docstring (per input, anytime-valid at level alpha; rounded down; 0 where hits = 0)."""
    return _lower_bound(hits, trials, alpha, a, b, kt_weight, _prior_log_beta(a, b, kt_weight))


@compiled
def _lower_bound(hits, trials, alpha, a, b, kt_weight, log_beta_ab):
    """:func:`lower_bound_one` given ``log_beta_ab`` = :func:`_prior_log_beta` (a, b, kt_weight); same guarantee."""
    if hits <= 0:
        return 0.0
    s, f = float(hits), float(trials - hits)
    log_threshold = -math.log(alpha)
    mix, magnitude = _log_marginal(s, f, a, b, kt_weight, log_beta_ab)
    log_phat = math.log(s / (s + f))
    # rejection at p0 = e^v with the 64-ulp margin reads g(v) >= 0 (smoothing.confseq)
    const = mix - log_threshold - ULP_MARGIN * (magnitude + log_threshold)
    shrink = 1.0 - ULP_MARGIN
    if not _g_and_slope(LOG_P_FLOOR, const, s, f, shrink)[0] >= 0:
        return 0.0  # even p0 = 1e-300 is not rejected
    v1 = min(max(const / (shrink * s), LOG_P_FLOOR), log_phat)  # g(v1) >= 0: left of the root
    v = _newton(_closer_start(v1, const, s, f, shrink, log_phat), const, s, f, shrink, log_phat)
    # Convexity keeps every iterate left of the root in exact arithmetic; rounding in a long first jump can still land
    # a few ulp past it. Verify with the e-value test itself and step back where needed: a Newton step taken from the
    # right of the root of a convex decreasing function lands left of it, plus a growing margin.
    for attempt in range(40):
        if _log_e_excess(s, f, math.exp(v), log_threshold, mix, magnitude) >= 0:
            return math.exp(v)
        gv, slope = _g_and_slope(v, const, s, f, shrink)
        v = v - ((min(gv, 0.0) / slope if slope < 0 else 0.0) + max(1e-12 * abs(v), 1e-15) * 4.0**attempt)
    # never seen in testing: the last step back verified, else abstain rather than report an unverified bound
    return math.exp(v) if _log_e_excess(s, f, math.exp(v), log_threshold, mix, magnitude) >= 0 else 0.0


@compiled
def lower_bounds(hits, trials, alpha, a, b, kt_weight):
    """:func:`lower_bound_one` of each entry of 1-d arrays (int64 hits and trials, float64 alpha, a, b); same guarantee,
    entry by entry."""
    out = np.empty(len(hits))
    for i in range(len(hits)):
        out[i] = lower_bound_one(hits[i], trials[i], alpha[i], a[i], b[i], kt_weight)
    return out


@compiled
def radius_one(p_lower, sigma):
    """sigma Phi^-1(p_lower) rounded down (relative 1e-10), 0 where p_lower <= 1/2, not finite or subnormal: the
    operations of :func:`smoothing.radius.validated_radius`, so the same value."""
    z = _ndtri(p_lower if p_lower > 0.5 else 0.5)
    r = sigma * z * (1.0 - RADIUS_ROUNDING) if z > 0 else 0.0
    return r if math.isfinite(r) and r >= _MIN_RADIUS else 0.0


@compiled
def _verifies(s, t, radius, sigma, alpha, a, b, kt_weight, log_beta_ab):
    """True where ``s`` hits in ``t`` > 0 draws verify ``radius``: H0: pA <= Phi(radius / sigma) rejected at alpha (the
    test of :func:`rejects_one`, given the job's ``log_beta_ab`` = :func:`_prior_log_beta`), as the target-radius and
    proposal policies verify theirs (smoothing.stopping._radius_verified: Phi at least 1/2, never where it rounds to
    1). Then L_t >= Phi(radius / sigma) up to L_t's own rounding: the test stands for the bound's radius >= ``radius``
    without computing the bound. A stopping rule's step only (no guarantee needed)."""
    p = max(_ndtr(radius / sigma), 0.5)
    return p < 1.0 and _rejects(s, t, p, alpha, a, b, kt_weight, log_beta_ab)


@compiled
def best_radius_one(s, t, s_proj, t_proj, s_budget, budget, alpha, a, b, sigma, min_gain, kt_weight, min_trials):
    """(code, L_t) of the marginal-gain rule (:func:`smoothing.stopping.best_radius_decision`) for one job: CERTIFIED
    where r_now > 0 and (s_proj, t_proj) does not verify r_now + min_gain max(t_proj - t, 1) (:func:`_verifies`: one
    e-value test, ~1/5 of the bound r(s_proj, t_proj) it replaces); else FUTILITY where r_now = 0 and U_t < 1/2 or
    (t >= min_trials and r(s_budget, budget) = 0); else BUDGET where t >= budget; else CONTINUE. The plug-in
    projections s_proj = floor(S t_proj / t), s_budget = floor(S B / t) come exact from the caller. L_t is the bound at
    (s, max(t, 1)) (module docstring's guarantee). No guarantee of its own: any stopping rule keeps validity."""
    t_safe = max(t, 1)
    log_beta_ab = _prior_log_beta(a, b, kt_weight)  # the job's prior: one betaln for all its bounds here
    lower = _lower_bound(s, t_safe, alpha, a, b, kt_weight, log_beta_ab)
    r_now = radius_one(lower, sigma)
    if t > 0 and r_now > 0 and not _verifies(s_proj, t_proj, r_now + min_gain * max(t_proj - t, 1), sigma, alpha,
                                             a, b, kt_weight, log_beta_ab):
        return _CERTIFIED, lower
    if t > 0 and r_now <= 0:
        # 1 - L of the misses is U_t; log B(b, a) = log B(a, b): scipy's betaln orders its arguments itself, so
        # the job's log_beta_ab is the same bits (checked on 3e6 random pairs) and is not computed again
        mirrored = _lower_bound(t_safe - s, t_safe, alpha, b, a, kt_weight, log_beta_ab)
        if min(1.0, np.nextafter(1.0 - mirrored, 2.0)) < 0.5:
            return _FUTILITY, lower
        if t >= min_trials and radius_one(_lower_bound(s_budget, budget, alpha, a, b, kt_weight, log_beta_ab),
                                          sigma) <= 0:
            return _FUTILITY, lower
    return (_BUDGET if t >= budget else _CONTINUE), lower


@compiled
def best_radius_codes(s, t, s_proj, t_proj, s_budget, budget, alpha, a, b, sigma, min_gain, kt_weight, min_trials,
                      lower_out):
    """:func:`best_radius_one` of each job (1-d arrays: int64 counts, projections and budgets, float64 parameters);
    returns the int8 codes and writes each job's L_t into ``lower_out``."""
    codes = np.empty(len(s), dtype=np.int8)
    for i in range(len(s)):
        code, lower_out[i] = best_radius_one(s[i], t[i], s_proj[i], t_proj[i], s_budget[i], budget[i], alpha[i], a[i],
                                             b[i], sigma[i], min_gain[i], kt_weight, min_trials)
        codes[i] = code
    return codes


@compiled
def best_radius_rows(rows, counts, cls, trials, alpha, a, b, budget, sigma, min_gain, kt_weight, min_trials, lower_out):
    """:func:`best_radius_codes` of the jobs in ``rows`` of a count table (the engine's job table), gathered here
    rather than by numpy calls (~40 of them, ~0.1 ms a step at 512 jobs): job r has S = counts[r, cls[r]] hits (0
    where cls[r] < 0) in t = trials[r] draws and its own alpha, a, b, budget and min_gain at r; ``sigma`` is one
    float. The plug-in projections are formed as :func:`smoothing.stopping.validated_best_radius_codes` forms them:
    t' = t_s + min(t_s, max(B - t_s, 0)) with t_s = max(t, 1), S' = floor(S t' / t_s), S_B = floor(S B / t_s), in int64,
    exact for the table's counts (S <= t <= B <= MAX_BUDGET = 2^31: products < 2^62). Returns the int8 codes and
    writes each job's L_t to ``lower_out[j]``; no guarantee of its own (a stopping rule; L_t's is the module's)."""
    codes = np.empty(len(rows), dtype=np.int8)
    for j in range(len(rows)):
        r = rows[j]
        s = counts[r, cls[r]] if cls[r] >= 0 else 0
        t, t_safe, b_r = trials[r], max(trials[r], 1), budget[r]
        t_proj = t_safe + min(t_safe, max(b_r - t_safe, 0))
        code, lower_out[j] = best_radius_one(s, t, s * t_proj // t_safe, t_proj, s * b_r // t_safe, b_r, alpha[r],
                                             a[r], b[r], sigma, min_gain[r], kt_weight, min_trials)
        codes[j] = code
    return codes


def warm_up() -> None:
    """Compile every entry point at the argument types its callers pass (or load it from numba's on-disk cache, next
    to this file), so that no request pays for it: ~5 s to compile on a 2-core machine, ~0.1 s to load."""
    ints, floats = np.ones(2, dtype=np.int64), np.full(2, 0.5)
    lower_bounds(ints, ints + 1, floats, floats, floats, 0.1)
    rejects_many(ints, ints + 1, floats, floats, floats, floats, 0.1)
    best_radius_codes(ints, ints, ints, ints, ints, ints + 1, floats, floats, floats, floats, floats, 0.1, 200,
                      np.empty(2))
    best_radius_one(1, 1, 1, 1, 1, 2, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1, 200)
    rows = ints - 1
    best_radius_rows(rows, np.ones((2, 2), dtype=np.int64), rows, ints + 1, floats, floats, floats, ints + 1, 0.5, floats,
                     0.1, 200, np.empty(2))
    lower_bound_one(1, 2, 0.5, 0.5, 0.5, 0.1)
