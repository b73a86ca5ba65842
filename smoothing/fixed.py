"""The clean-class fixed-n route: class from the clean image, n fixed before sampling, one Clopper-Pearson bound.

For callers who want a radius and no target, a single fixed-n Clopper-Pearson (CP) bound is tighter than an
anytime-valid one (no price for monitoring) and, unlike Cohen et al.'s CERTIFY, spends no selection samples: the
tested class c comes from the clean image's forward pass. The number of samples n may differ per input, as long as it
is a function of the clean input only: :func:`planned_sample_size` chooses it from the clean-image prior (the
meta-learner's Beta(a, b), mixed with KT) so that every input spends samples where they buy radius.

Why it is valid (per input, at level alpha). Let X_1, X_2, ... = 1{f(x + e_i) = c} with e_i i.i.d. N(0, sigma^2 I).
c and n are functions of x alone, so they are independent of the e_i and S_n ~ Binomial(n, pA(c)) exactly; the CP
bound then satisfies P(CP(S_n, n) > pA) <= alpha. Deadline truncation by a clock-only rule stays valid: if the job is
cut at N' = min(n, samples drawn before the deadline), N' depends on the clock and on the engine's scheduling (other
jobs, batch sizes), never on this job's outcomes X_i, so N' is independent of (X_i); given N' = m the first m
outcomes are still i.i.d. Bernoulli(pA) and P(CP(S_N', N') > pA) = sum_m P(N' = m) P(CP(S_m, m) > pA) <= alpha.
What would break it: any rule that looks at this job's hits to decide when to stop (a target, futility, "stop once
the bound is good") - for those, use the e-process (:mod:`smoothing.stopping`), which is valid at any stopping time.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.special import betaln, gammaln, ndtr

from smoothing._checks import check_alpha, check_counts, check_one_nonneg_int, check_prior, check_sigma
from smoothing.cohen import clopper_pearson_lower
from smoothing.priors import DEFAULT_KT_WEIGHT, KT_PRIOR, check_kt_weight
from smoothing.radius import radius_from_probability

#: Lambda of :func:`planned_sample_size` (expected radius per sample at the margin): the largest lambda whose mean
#: radius on held-out dev streams (the bundle's calibration split, never the test set) is >= the previous sequential
#: default's + 0.005; docs/smoothing-benchmark.md, section 3 (``python -m bench.smoothing_bench --full``).
DEFAULT_PLAN_GAIN = 8e-5
#: Candidate sample sizes: geometric from MIN_PLANNED with growth 1.1 (rounded), up to the budget.
MIN_PLANNED = 64
_PLAN_GROWTH = 1.1
#: Planning caps a prior's strength a + b at this (same mean; the plan only, never a bound). A stronger Beta prior is
#: a point mass at the sample sizes a plan reaches, and beyond ~1e12 the predictive's betaln(k + a, n - k + b) -
#: betaln(a, b) cancels catastrophically (expected radii far above the all-hits radius, even inf, at a + b ~ 1e15).
_MAX_PLAN_STRENGTH = 1e8
#: The largest candidate n a plan may scan (each candidate tabulates the n / 2 CP radii above k = n / 2, ~4-8 us
#: each, for every input's predictive): reached only with a tiny or zero min_gain and a budget beyond it, which is
#: refused (_check_scan). The per-prior bound (_radius_bounds) stops a scan far sooner than the all-hits radius
#: alone, which let the KT prior's scan reach ~5e5 samples at sigma = 10, budget 2^31 with the default lambda (34 s;
#: now ~4e4, under 2 s) and ~1e6 with min_gain = 1e-6 at sigma = 0.25 (60 s; now ~9e4, under 2 s).
MAX_PLAN_SAMPLES = 2**20


def fixed_n_certificate(successes, trials, alpha, sigma):
    """(p_lower, radius) of the clean-class fixed-n route: one-sided (1 - alpha) CP bound of S hits in n trials.

    Guarantee (per input, at level alpha): if the tested class c and the planned n were fixed from the clean input
    before sampling, and sampling was stopped only at n or by a clock-only deadline (see the module docstring), then
    P(p_lower > pA(c)) <= alpha, so with probability >= 1 - alpha the smoothed classifier returns c within the radius.
    radius = sigma Phi^-1(p_lower), 0 (abstain) where p_lower <= 1/2 (strict, as everywhere in smoothing).
    Rounded down. Vectorized. Where trials == 0 (cut before any sample) the bound is 0: abstain.
    """
    s, t = check_counts(successes, trials)
    check_sigma(sigma)
    p_lower = np.where(t > 0, clopper_pearson_lower(s, np.maximum(t, 1), alpha), 0.0)
    radius = radius_from_probability(p_lower, sigma)
    return (p_lower if p_lower.ndim else float(p_lower)), radius


def planned_sample_size(a=KT_PRIOR[0], b=KT_PRIOR[1], *, sigma, alpha, budget, min_gain=DEFAULT_PLAN_GAIN,
                        kt_weight=DEFAULT_KT_WEIGHT):
    """Sample size n per input for :func:`fixed_n_certificate`, from its clean-image prior only.

    n maximizes E[r_CP(S_n, n)] - min_gain * n over the candidates (geometric from 64, growth 1.1, capped at
    ``budget``), where S_n follows the prior predictive of the mixture (1 - kt_weight) Beta(a, b) + kt_weight KT
    (a beta-binomial mixture) and r_CP is the certified radius of the CP bound. Stopping each input where its
    expected marginal radius per sample falls to a common lambda maximizes the expected mean radius for the mean
    number of samples spent. A wrong prior misallocates samples but cannot make a certificate invalid: n depends on
    the clean input only. Vectorized over (a, b); returns int64 (scalar for scalar input). Any finite a, b > 0 gets a
    candidate (:data:`_MAX_PLAN_STRENGTH` caps a + b; an expected radius is kept within [0, the all-hits radius]).
    ``budget`` is one whole number >= 1 and ``min_gain`` one finite number >= 0 (arrays, booleans and strings are
    refused); a min_gain so small that the scan could reach candidates beyond :data:`MAX_PLAN_SAMPLES` (2^20)
    samples with this budget (min_gain = 0 with a budget above 2^20) is refused rather than tabulated. The scan
    stops at the first candidate from which no later one can win (:func:`_radius_bounds`; the same n as a full scan).
    """
    a, b = _plannable(*check_prior(a, b))
    check_sigma(sigma)
    alpha_f = float(check_alpha(alpha))
    budget = check_one_nonneg_int(budget, "budget", "one whole number >= 1 (one budget for every input)")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget!r}")
    gain = np.asarray(min_gain)
    if gain.ndim or gain.dtype.kind not in "iuf" or not (np.isfinite(gain) and gain >= 0):
        raise ValueError(f"min_gain must be a finite number >= 0 (radius per sample; one number), got {min_gain!r}")
    min_gain = float(gain)
    w = check_kt_weight(kt_weight)
    a, b = np.broadcast_arrays(a, b)
    flat_a, flat_b = a.ravel(), b.ravel()
    best = np.full(flat_a.shape, -np.inf)
    candidates = _candidates(budget)
    choice = np.full(flat_a.shape, candidates[0], dtype=np.int64)
    # pruning: no expected radius at m can exceed the all-hits radius sigma Phi^-1(alpha^(1/m)), nor (alpha <= 1/2)
    # the input's _radius_bounds, so once that bound minus lambda m is below an input's best objective for all
    # remaining m, no later candidate can win for it; the scan stops when that holds for every input
    ceiling = np.asarray(radius_from_probability(alpha_f ** (1.0 / np.asarray(candidates, np.float64)), sigma))
    cost = min_gain * np.asarray(candidates)
    reachable = np.maximum.accumulate((ceiling - cost)[::-1])[::-1]
    bound = np.broadcast_to(ceiling, (flat_a.size, len(candidates)))
    if alpha_f <= 0.5:  # the first candidate gives every input a best objective >= -cost[0]: beyond, none is scanned
        scanned = int(np.sum(reachable >= -cost[0]))
        bound = _radius_bounds(flat_a, flat_b, w, candidates[:scanned], ceiling[:scanned], float(sigma), bound)
    reach = np.maximum.accumulate((bound - cost)[:, ::-1], axis=1)[:, ::-1]
    _check_scan(candidates, reach.max(axis=0), min_gain, budget)
    for j, n in enumerate(candidates):
        if np.all(reach[:, j] < best):
            break
        radius = np.nan_to_num(expected_radius(flat_a, flat_b, n, float(sigma), alpha_f, w), nan=0.0)
        gain = np.clip(radius, 0.0, ceiling[j]) - min_gain * n
        better = gain > best
        best[better], choice[better] = gain[better], n
    out = choice.reshape(a.shape)
    return out if out.ndim else int(out)


#: Probit ladder of :func:`_radius_bounds`: thresholds q_j = Phi(z_j) at z_j = 0, 1/8, ..., 8 (index 16 on), and
#: Chernoff comparison levels q' = q_(j - d), d in _LADDER_STEPS, down to z = -2.
_LADDER = np.arange(-16, 65) / 8.0
_LADDER_STEPS = (1, 2, 4, 8, 16, 32, 64)
#: Relative slack of :func:`_radius_bounds` over the computed expected radius (its predictive's float error at
#: a + b = 1e8 is ~1e-7 relative) and of the prior tails over their rounding.
_BOUND_SLACK = 1e-3


def _radius_bounds(a, b, w, candidates, ceiling, sigma, full):
    """Upper bounds U[i, j] >= E[min(r_CP(S, m_j), ceiling_j)] for input i (S ~ its predictive, as in
    :func:`expected_radius`) at ``candidates`` m_j (the first ones; ``full`` (inputs x all candidates) elsewhere).
    Valid for alpha <= 1/2 only: the CP bound is then <= S / m (Binomial(m, S/m) has median S), so
    r_CP(S, m) <= sigma Phi^-1(S/m), and with q_j = Phi(z_j)
        r <= sum_(j < J) sigma (z_(j+1) - z_j) 1{S > q_j m} + (ceiling - sigma z_J)+ 1{S > q_J m},
    where P(S > q m) <= P_prior(p > q') + exp(-m KL(q || q')) for any q' < q (Chernoff: KL(q || p) >= KL(q || q')
    for p <= q'). Costs O(inputs x candidates x 455), no CP table; it only decides where the scan may stop."""
    t = ndtr(-_LADDER)  # 1 - q, accurate near q = 1
    log_q = np.log1p(-t)
    tail = (1.0 - w) * _beta_tail_bound(a, b, t) + w * (2.0 / np.pi) * np.arcsin(np.sqrt(t))  # KT: exact
    tail = np.minimum(tail * (1.0 + _BOUND_SLACK), 1.0)  # >= P_prior(p > q) = P(1 - p < t), inputs x levels
    top = _LADDER.size - 1
    first = int(np.argmax(_LADDER >= 0.0))
    out = np.array(full, dtype=np.float64)
    for c, m in enumerate(candidates):
        prob = np.ones((a.size, top + 1 - first))
        for d in _LADDER_STEPS:
            j = np.arange(max(first, d), top + 1)
            kl = (1.0 - t[j]) * (log_q[j] - log_q[j - d]) + t[j] * (np.log(t[j]) - np.log(t[j - d]))
            chernoff = np.exp(-float(m) * kl * (1.0 - _BOUND_SLACK))
            prob[:, j - first] = np.minimum(prob[:, j - first], tail[:, j - d] + chernoff)
        steps = np.diff(_LADDER[first:])
        u = sigma * (prob[:, :-1] @ steps) + max(ceiling[c] - sigma * _LADDER[top], 0.0) * prob[:, -1]
        out[:, c] = np.fmin(u * (1.0 + _BOUND_SLACK) + 1e-12 * sigma, out[:, c])  # NaN: no bound but full
    return out


def _beta_tail_bound(a, b, t):
    """Upper bounds (inputs x levels) on P(1 - p < t) for p ~ Beta(a, b), i.e. 1 - p ~ Beta(b, a): the integral of
    x^(b-1) (1 - x)^(a-1) over [0, t] is at most t^b / b times the largest (1 - x)^(a-1) there (1 for a >= 1, else
    (1 - t)^(a-1)). Closed form through betaln (scipy's betainc returned 0 for a = b = 2^-1022, where it is 1/2)."""
    a, b = a[:, None], b[:, None]
    with np.errstate(over="ignore", divide="ignore"):
        log_bound = b * np.log(t) + np.minimum(a - 1.0, 0.0) * np.log1p(-t) - np.log(b) - betaln(b, a)
        return np.minimum(np.exp(log_bound), 1.0)


def _check_scan(candidates, reachable, min_gain, budget):
    """ValueError when the scan could tabulate a candidate beyond MAX_PLAN_SAMPLES. After the first candidate every
    input's best objective is >= -min_gain * candidates[0] (expected radii are clipped at >= 0), so the pruning stops
    the scan before the first candidate whose ``reachable`` is below that: only a tiny (or zero) min_gain with a
    huge budget gets there, where each candidate n builds a table of n + 1 radii (2^31: ~17 GB, hours)."""
    scanned = np.asarray(candidates)[reachable >= -min_gain * candidates[0]]
    if scanned.size and scanned[-1] > MAX_PLAN_SAMPLES:
        raise ValueError(f"min_gain={min_gain!r} with budget={budget!r}: the plan could scan sample sizes up to "
                         f"{int(scanned[-1])}, beyond its limit of 2^20 (each candidate n tabulates n + 1 radii); "
                         f"raise min_gain or lower the budget to 2^20")


def _plannable(a, b):
    """(a, b) with a + b capped at _MAX_PLAN_STRENGTH (mean kept) and each >= the smallest normal float (1 / a
    overflows for a subnormal a: NaN predictive): the prior the plan uses, for the plan only."""
    half_cap = 0.5 * _MAX_PLAN_STRENGTH
    scale = half_cap / np.maximum(0.5 * a + 0.5 * b, half_cap)  # (a + b) / 2: no overflow; scale <= 1
    tiny = np.finfo(np.float64).tiny
    return np.maximum(a * scale, tiny), np.maximum(b * scale, tiny)


def expected_radius(a, b, n: int, sigma: float, alpha: float, kt_weight: float) -> np.ndarray:
    """E[r_CP(S, n)] for S ~ (1 - w) BetaBinomial(n, a, b) + w BetaBinomial(n, 1/2, 1/2); a, b 1-d arrays."""
    k, radius = _cp_radius_table(n, sigma, alpha)
    if not len(k):
        return np.zeros(len(a))
    log_choose = gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)

    def predictive(pa, pb):
        pa, pb = np.asarray(pa, np.float64)[:, None], np.asarray(pb, np.float64)[:, None]
        return np.exp(log_choose + betaln(k + pa, n - k + pb) - betaln(pa, pb)) @ radius

    own = predictive(a, b)
    if kt_weight == 0.0:
        return own
    return (1.0 - kt_weight) * own + kt_weight * predictive([KT_PRIOR[0]], [KT_PRIOR[1]])


@lru_cache(maxsize=512)
def _cp_radius_table(n: int, sigma: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(hit counts k with a positive CP radius, their radii) for n trials; cached per (n, sigma, alpha). For alpha <=
    1/2 the CP bound is <= k / n (see :func:`_radius_bounds`): no k <= n / 2 has a radius, none is computed."""
    k = np.arange(n // 2 + 1 if alpha <= 0.5 else 0, n + 1)
    radius = np.asarray(radius_from_probability(clopper_pearson_lower(k, n, alpha), sigma))
    keep = radius > 0
    return k[keep].astype(np.float64), radius[keep]


def _candidates(budget: int) -> list[int]:
    out = [min(MIN_PLANNED, budget)]
    while out[-1] < budget:
        out.append(min(budget, max(out[-1] + 1, int(np.ceil(out[-1] * _PLAN_GROWTH)))))
    return out
