"""Stopping policies for the sequential path: pure functions of a job's past samples (S_t, t) and fixed parameters.

Because the confidence sequence of :mod:`smoothing.confseq` is valid at any stopping time, *no* rule here can make a
certificate invalid: a policy only decides when to spend fewer samples. Each returns, per job, one of the codes of
:class:`Stop` (``CONTINUE`` while sampling should go on). Policies are evaluated at whatever checkpoints the caller
chooses (after every sample in simulations, after each chunk in the worker).
"""

from __future__ import annotations

import enum
import itertools

import numpy as np
from scipy.special import ndtr

from smoothing._checks import (check_alpha, check_counts, check_nonneg_int, check_one_nonneg_int, check_prior,
                              check_sigma)
from smoothing.confseq import upper_from_mirrored, validated_lower_bound
from smoothing.eprocess import validated_rejects
from smoothing.kernels import best_radius_codes, best_radius_one, best_radius_rows
from smoothing.priors import DEFAULT_KT_WEIGHT, KT_PRIOR, check_kt_weight
from smoothing.radius import validated_radius


#: Defaults of the best-radius rules. ``DEFAULT_MIN_GAIN`` (radius units per sample) is the marginal-gain rule's
#: lambda: the largest lambda whose mean radius on held-out dev streams (the bundle's calibration split, never the
#: test set) is >= the previous default's + 0.005; docs/smoothing-benchmark.md section 3
#: (``python -m bench.smoothing_bench --full``). ``DEFAULT_FRACTION`` is the older fraction rule's default, kept for
#: comparison (pass ``fraction=``). Any value keeps validity; they only trade samples for radius.
DEFAULT_MIN_GAIN = 5e-5
DEFAULT_FRACTION = 0.775
DEFAULT_GROWTH = 1.1

#: The per-input path (the server's auto fallbacks without a target radius, per_input=true or not), tuned jointly on
#: held-out dev streams (the bundle's calibration split, never the test set; replayed at budget 2,048, the streams'
#: length, while the server's auto budget is 4,000): the pair (shrink, lambda) with the largest mean radius among those
#: with mean samples <= 300, over shrink 0 (no proposal) .. 1.0 x lambda 5e-5 .. 4e-4, proposals from the surrogate's calibrated point
#: estimate: docs/proposal-tuning.md (``python -m bench.proposal_tuning``). It chose lambda = PER_INPUT_MIN_GAIN and
#: no proposal; DEFAULT_PROPOSAL_SHRINK is the best shrink > 0 at that lambda by the same rule (the proposal adds
#: nothing over the marginal-gain rule there: < 1% of samples at equal radius). Any value keeps validity.
PER_INPUT_MIN_GAIN = 2e-4
DEFAULT_PROPOSAL_SHRINK = 1.0

class Stop(enum.IntEnum):
    """Why a policy stopped a job (``CONTINUE`` while sampling should go on)."""

    CONTINUE = 0
    TARGET = 1  # target radius certified
    CERTIFIED = 2  # best-radius rule: more samples would improve the radius too little
    FUTILITY = 3  # the upper confidence bound (or the projection) rules out the goal
    BUDGET = 4  # sample budget spent


def target_radius_decision(successes, trials, *, sigma, target_radius, alpha, budget, a=KT_PRIOR[0], b=KT_PRIOR[1],
                           alpha_futility=None, kt_weight=DEFAULT_KT_WEIGHT):
    """Policy (i): certify at least ``target_radius``, as cheaply as possible.

    TARGET when H0: pA <= Phi(r/sigma) is rejected at level alpha (then L_t >= Phi(r/sigma) up to L_t's own
    conservative rounding, ~1e-12 relative, so the certified radius is >= r up to ~1e-12 sigma ABSOLUTE near p = 1/2
    - a large relative shortfall for a tiny r: 3% at r = 2.6e-11 sigma - and a few 1e-8 relative as p -> 1 at
    t <= 2^31, where L_t's step back of >= 1e-15 in log p is a large part of 1 - p);
    FUTILITY when the upper bound U_t (level ``alpha_futility``, default alpha) falls below Phi(r/sigma),
    i.e. the target is (with high probability) out of reach; BUDGET when t >= budget. Checked in that order. The
    prior is (1 - kt_weight) Beta(a, b) + kt_weight KT, as in :func:`smoothing.confseq.lower_bound`; the certificate
    must be computed with the same prior.
    Guarantee: none needed, the certificate's validity comes from the confidence sequence at any stopping time;
    ``alpha_futility`` only controls how often a reachable target is given up (<= alpha_futility).
    """
    s, t = check_counts(successes, trials)
    af = alpha if alpha_futility is None else alpha_futility
    arrays = np.broadcast_arrays(s, t, check_alpha(alpha), *check_prior(a, b), _check_budget(budget),
                                 check_sigma(sigma), _check_radius(target_radius, "target_radius"),
                                 check_alpha(af, "alpha_futility"))
    flat = (np.ravel(x) for x in arrays)
    out = validated_target_codes(*flat, kt_weight=check_kt_weight(kt_weight)).reshape(arrays[0].shape)
    return out if out.ndim else Stop(int(out))


def validated_target_codes(s, t, alpha, a, b, budget, sigma, target_radius, alpha_futility=None, *,
                           kt_weight=DEFAULT_KT_WEIGHT):
    """:func:`target_radius_decision` (same codes, always an int8 array) for validated 1-d arrays of one length
    (see :func:`validated_best_radius_codes`); ``target_radius`` finite >= 0, ``alpha_futility`` None (alpha) or in
    (0, 1)."""
    p_target = np.maximum(ndtr(target_radius / sigma), 0.5)
    af = alpha if alpha_futility is None else alpha_futility
    out = np.zeros(s.shape, dtype=np.int8)  # Stop.CONTINUE (np.full costs ~10 us more on a few jobs)
    out[t >= budget] = Stop.BUDGET
    out[upper_from_mirrored(validated_lower_bound(t - s, t, af, b, a, kt_weight)) < p_target] = Stop.FUTILITY
    out[_radius_verified(s, t, p_target, alpha, a, b, kt_weight)] = Stop.TARGET
    return out


def _radius_verified(s, t, p_target, alpha, a, b, kt_weight):
    """True where H0: pA <= p_target is rejected at alpha (then L_t >= p_target up to L_t's conservative rounding);
    validated arrays, p_target >= 1/2.

    A radius beyond ~8.3 sigma has Phi(r/sigma) == 1.0 in floating point: unreachable by any finite sample, so it is
    never verified; the test runs at the largest probability below 1 only to keep the arrays well-formed."""
    p_test = np.minimum(p_target, np.nextafter(1.0, 0.0))
    return (p_target < 1.0) & (t > 0) & validated_rejects(s, np.maximum(t, 1), p_test, alpha, a, b, kt_weight)


def best_radius_decision(successes, trials, *, sigma, alpha, budget, a=KT_PRIOR[0], b=KT_PRIOR[1],
                         kt_weight=DEFAULT_KT_WEIGHT, min_gain=DEFAULT_MIN_GAIN, fraction=None,
                         min_futility_trials=200):
    """Policy (ii): no target; stop when more samples would buy too little radius. Two rules (same futility part).

    Notation (functions of past samples only): r_now = sigma Phi^-1(L_t); r(S', t') = the radius the confidence
    sequence would give with S' hits in t' draws; projections are plug-in (the observed hit rate persists):
    S' = floor(S_t t' / t).

    * Marginal-gain rule (default; ``fraction`` None): with t' = min(2t, budget), CERTIFIED when r_now > 0 and
      (r(S', t') - r_now) / (t' - t) < ``min_gain`` (lambda, radius units per sample; one, or one per job), read as:
      (S', t') does not verify r_now + lambda max(t' - t, 1), by the e-value test at Phi of it over sigma, as the
      target-radius policy verifies its target, not by computing r(S', t') (a test costs ~1/5 of a bound; the two
      readings differ only where that probability is within L_t's rounding, ~1e-12 relative: in none of 2x10^6
      random cases).
      Stopping each input where its marginal radius per sample falls below one common lambda is the allocation that
      maximizes the mean radius for a given mean number of samples (a Lagrangian argument): confident inputs, whose
      radius grows ~ sqrt(log t), stop early; near-converged mid-pA inputs stop as soon as the bound is close to pA.
    * Fraction rule (``fraction`` in (0, 1]; the previous default, kept for comparison): CERTIFIED when r_now > 0 and
      r_now >= fraction * r(S_B, B), the projection at the full budget B.

    FUTILITY (both rules) when r_now = 0 and either U_t < 1/2 (no radius reachable, at level alpha) or, after
    ``min_futility_trials`` samples (one whole number >= 0; negative, fractional, NaN, boolean, string or array
    values are refused), the projection at the budget certifies nothing. BUDGET when t >= B.
    Prior: (1 - kt_weight) Beta(a, b) + kt_weight KT; the certificate must use the same prior.
    Guarantee: as for every policy, validity comes from the confidence sequence at any stopping time; lambda and the
    fraction only trade samples for radius.
    """
    s, t = check_counts(successes, trials)
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    arrays = np.broadcast_arrays(s, t, check_alpha(alpha), *check_prior(a, b), _check_budget(budget),
                                 check_sigma(sigma), _check_min_gain(min_gain))
    futility_trials = check_one_nonneg_int(min_futility_trials, "min_futility_trials")
    out = validated_best_radius_codes(*(np.ravel(x) for x in arrays), kt_weight=check_kt_weight(kt_weight),
                                      fraction=fraction, min_futility_trials=futility_trials)
    out = out.reshape(arrays[0].shape)
    return out if out.ndim else Stop(int(out))


def validated_best_radius_codes(s, t, alpha, a, b, budget, sigma, min_gain, *, kt_weight=DEFAULT_KT_WEIGHT,
                                fraction=None, min_futility_trials=200, lower_out=None):
    """:func:`best_radius_decision` (same codes, always an int8 array) for arguments the caller has validated: 1-d
    arrays of one length, int64 counts 0 <= s <= t and budget >= 1, floats alpha in (0, 1), a, b > 0, sigma > 0,
    min_gain finite >= 0; ``kt_weight`` a float in [0, 1]. The engine checks each job's
    parameters once, when it is submitted (models.jobs.check_spec), and decides hundreds of jobs per step.

    ``lower_out`` (optional, a float64 array of the same length) receives the bound the rule computed at the current
    counts, L_t at (s, max(t, 1)) with this prior and ``kt_weight``: bit for bit what
    ``validated_lower_bound(s, max(t, 1), alpha, a, b, kt_weight)`` returns, so a caller answering a job the rule
    stops here can issue that bound as the job's certificate instead of computing it again."""
    if fraction is None:  # the marginal-gain rule: compiled, one call for all jobs (smoothing.kernels)
        return _marginal_gain_codes(s, t, alpha, a, b, budget, sigma, min_gain, float(kt_weight),
                                    min_futility_trials, lower_out)
    t_safe = np.maximum(t, 1)
    bounds = _BoundBatch(alpha, a, b, float(kt_weight))
    every = np.arange(s.size)
    t_proj = budget  # the fraction rule projects to the budget
    # The futility rule needs two more bounds where nothing is certified (r_now = 0). Jobs that may be there get
    # them in the same kernel call; a job found without a radius but not predicted gets them in a second call below,
    # so the codes are the rule's whatever the prediction, which only saves that call's fixed cost.
    maybe_low = np.flatnonzero((t > 0) & (_rough_lower(s, t_safe, alpha) <= _LOW_PREDICTION))
    p = bounds.lower([(s, t_safe, every), (_projected_hits(s, t_proj, t_safe), t_proj, every),
                      *_futility_points(s, t_safe, budget, maybe_low)])
    if lower_out is not None:
        lower_out[:] = p[0]
    radii = validated_radius(np.concatenate(p[:2]), np.concatenate([sigma, sigma]))  # one call for both
    r_now, r_proj = radii[:s.size], radii[s.size:]
    settled = (r_now > 0) & (r_now >= fraction * r_proj)
    # futility only where nothing is certified yet (U_t < 1/2 is impossible where L_t > 1/2; L_t <= S_t/t <= U_t)
    futile = np.zeros(s.shape, dtype=bool)
    low = np.flatnonzero((r_now <= 0) & (t > 0))
    if len(low):
        predicted = np.isin(low, maybe_low)
        p_mirror, p_budget = np.empty(len(low)), np.empty(len(low))
        at = np.searchsorted(maybe_low, low[predicted])
        p_mirror[predicted], p_budget[predicted] = p[2][at], p[3][at]
        if not predicted.all():
            p_mirror[~predicted], p_budget[~predicted] = bounds.lower(_futility_points(s, t_safe, budget,
                                                                                      low[~predicted]))
        upper = upper_from_mirrored(p_mirror)  # U_t, exactly as confseq.upper_bound
        r_budget = validated_radius(p_budget, sigma[low])
        futile[low] = (upper < 0.5) | ((t[low] >= min_futility_trials) & (r_budget <= 0))
    out = np.zeros(s.shape, dtype=np.int8)  # Stop.CONTINUE (np.full costs ~10 us more on a few jobs)
    out[t >= budget] = Stop.BUDGET
    out[futile] = Stop.FUTILITY
    out[settled & (t > 0)] = Stop.CERTIFIED
    return out


#: validated_best_radius_codes predicts that a job may have no radius (L_t <= 1/2) where _rough_lower <= this.
_LOW_PREDICTION = 0.5


def _rough_lower(s, t, alpha):
    """A cheap stand-in for L_t, only to predict which jobs may have no radius (never a bound): the hit rate minus
    the half-width t KL(p_hat, L) ~ log(1/alpha) + (1/2) log t + 4 would give under Pinsker's inequality (the mixture's
    regret is ~ (1/2) log t plus a prior-dependent constant). Measured on the engine's job mix it is below L_t for
    nearly every job, so the futility bounds are nearly always in the first kernel call."""
    return s / t - np.sqrt((np.log(1.0 / alpha) + 0.5 * np.log(t + 1.0) + 4.0) / (2.0 * t))


def _marginal_gain_codes(s, t, alpha, a, b, budget, sigma, min_gain, kt_weight, min_futility_trials, lower_out):
    """The marginal-gain rule of :func:`validated_best_radius_codes` (and ``lower_out``), by the compiled
    :func:`smoothing.kernels.best_radius_codes`; the plug-in projections are exact integers computed here: S_t = t
    projects to t' hits, t' = min(2t, max(B, t)) formed without 2t (which wraps around in int64 for t >= 2^62)."""
    t_safe = np.maximum(t, 1)
    if s.size == 1:  # one job (a per-input request): Python ints, exact at any size, cheaper than array calls
        s0, t0, b0 = int(s[0]), int(t_safe[0]), int(budget[0])
        t_proj = min(2 * t0, max(b0, t0))
        code, lower = best_radius_one(s0, int(t[0]), s0 * t_proj // t0, t_proj, s0 * b0 // t0, b0, float(alpha[0]),
                                      float(a[0]), float(b[0]), float(sigma[0]), float(min_gain[0]), kt_weight,
                                      min_futility_trials)
        if lower_out is not None:
            lower_out[0] = lower
        return np.array([code], dtype=np.int8)
    s, t, t_safe, budget = (np.asarray(x, dtype=np.int64) for x in (s, t, t_safe, budget))
    t_proj = t_safe + np.minimum(t_safe, np.maximum(budget - t_safe, 0))
    alpha, a, b, sigma, min_gain = (np.asarray(x, dtype=np.float64) for x in (alpha, a, b, sigma, min_gain))
    return best_radius_codes(s, t, _projected_hits(s, t_proj, t_safe), t_proj, _projected_hits(s, budget, t_safe),
                             budget, alpha, a, b, sigma, min_gain, kt_weight, min_futility_trials,
                             np.empty(s.size) if lower_out is None else lower_out)


def validated_best_radius_rows(rows, counts, cls, trials, alpha, a, b, budget, sigma, min_gain, *,
                               kt_weight=DEFAULT_KT_WEIGHT, min_futility_trials=200, lower_out=None):
    """:func:`validated_best_radius_codes` (marginal-gain rule; same codes, same ``lower_out``) of the jobs ``rows`` of
    a count table, read in place: job r has counts[r, cls[r]] hits (0 where cls[r] < 0) in trials[r] draws and its
    own alpha, a, b, budget, min_gain at r; ``sigma`` one float. Validated arguments, and the table's counts at most
    MAX_BUDGET (the engine's job table: :func:`smoothing.kernels.best_radius_rows`, which forms the projections)."""
    out = np.empty(len(rows)) if lower_out is None else lower_out
    return best_radius_rows(rows, counts, cls, trials, alpha, a, b, budget, float(sigma), min_gain, float(kt_weight),
                            min_futility_trials, out)


def _futility_points(s, t_safe, budget, jobs):
    """The bounds of the futility rule for ``jobs`` (as :meth:`_BoundBatch.lower` points): the mirrored lower bound
    (whose 1 - L is U_t) and the plug-in projection at the budget."""
    sj, tj, bj = s[jobs], t_safe[jobs], budget[jobs]
    return [(tj - sj, tj, jobs, "mirrored"), (_projected_hits(sj, bj, tj), bj, jobs)]


def _projected_hits(hits, draws, past):
    """The plug-in projection floor(hits * draws / past) of int64 arrays, exactly as the one-job path's Python ints
    give it: in int64 where the product fits (hits <= budget <= 2^31 at the engine's counts), in Python ints for the
    entries whose product would overflow (a caller's counts beyond 2^31.5 draws, whose int64 product wrapped around
    and gave a code other than the rule's)."""
    big = hits > (2**62) // np.maximum(draws, 1)
    if not big.any():
        return (hits * draws) // past
    out = (np.where(big, 0, hits) * draws) // past
    out[big] = [int(h) * int(d) // int(p) for h, d, p in zip(hits[big], draws[big], past[big])]
    return out


class _BoundBatch:
    """Several confidence-sequence bounds of the same jobs in ONE kernel call (smoothing.confseq.validated_lower_bound:
    the arguments are validated by the policy first). The engine decides hundreds of jobs per step and each call has
    a fixed cost of a few hundred microseconds, so the policies gather their bounds instead of calling per bound."""

    def __init__(self, alpha, a, b, kt_weight):
        self.alpha, self.a, self.b, self.kt_weight = alpha, a, b, kt_weight

    def lower(self, points):
        """L_t at each point (hits, draws, jobs[, "mirrored"]): jobs index the validated per-job arrays. Mirrored:
        L of the misses with the prior mirrored, L(F, t; b, a), whose 1 - L is the upper bound U_t."""
        jobs = [p[2] for p in points]
        mirrored = [len(p) > 3 for p in points]
        index = np.concatenate(jobs)
        a = np.concatenate([(self.b if m else self.a)[j] for j, m in zip(jobs, mirrored)])
        b = np.concatenate([(self.a if m else self.b)[j] for j, m in zip(jobs, mirrored)])
        p = validated_lower_bound(np.concatenate([p[0] for p in points]), np.concatenate([p[1] for p in points]),
                                  self.alpha[index], a, b, self.kt_weight)
        ends = list(itertools.accumulate(len(j) for j in jobs))
        return [p[end - len(j):end] for j, end in zip(jobs, ends)]  # np.split costs ~20 us more per call


def proposal_decision(successes, trials, *, sigma, proposal_radius, alpha, budget, a=KT_PRIOR[0], b=KT_PRIOR[1],
                      kt_weight=DEFAULT_KT_WEIGHT, min_gain=DEFAULT_MIN_GAIN):
    """Policy (iii): stop as soon as a proposed radius is verified; otherwise the best-radius policy (ii).

    TARGET where H0: pA <= Phi(r/sigma), r = ``proposal_radius``, is rejected at level alpha by the e-process of the
    certificate's confidence sequence (same prior (1 - kt_weight) Beta(a, b) + kt_weight KT): then L_t >=
    Phi(r/sigma), so the certificate issued at these (S_t, t) has radius >= r, up to the conservative rounding of
    L_t (~1e-12 relative: ~1e-12 sigma absolute in radius near p = 1/2, a few 1e-8 relative as p -> 1; see
    :func:`target_radius_decision`) and of :func:`smoothing.radius_from_probability`.
    Elsewhere exactly the code of :func:`best_radius_decision` with the same arguments (CERTIFIED / FUTILITY / BUDGET
    / CONTINUE). So a job never stops later than under (ii); it stops at the proposal when that is verified, and
    otherwise keeps the best anytime-valid certificate (ii) reaches. A proposal beyond ~8.3 sigma (Phi == 1 in
    floating point) is never verified: the job runs policy (ii).
    Guarantee: per input at level alpha, from the confidence sequence, valid at any stopping time: P(the certified
    radius exceeds the true radius) <= alpha whatever the proposal, PROVIDED the proposal (like the tested class and
    the prior) is fixed from the clean input before any noise sample is drawn; the certificate must be computed with
    the same prior and ``kt_weight``. The proposal only decides when to spend fewer samples.
    """
    s, t = check_counts(successes, trials)
    arrays = np.broadcast_arrays(s, t, check_alpha(alpha), *check_prior(a, b), _check_budget(budget),
                                 check_sigma(sigma), _check_min_gain(min_gain),
                                 _check_radius(proposal_radius, "proposal_radius"))
    out = validated_proposal_codes(*(np.ravel(x) for x in arrays), kt_weight=check_kt_weight(kt_weight))
    out = out.reshape(arrays[0].shape)
    return out if out.ndim else Stop(int(out))


def validated_proposal_codes(s, t, alpha, a, b, budget, sigma, min_gain, proposal_radius, *,
                             kt_weight=DEFAULT_KT_WEIGHT, lower_out=None):
    """:func:`proposal_decision` (same codes, always an int8 array) for validated 1-d arrays of one length (see
    :func:`validated_best_radius_codes`, also for ``lower_out``); ``proposal_radius`` finite >= 0."""
    best = validated_best_radius_codes(s, t, alpha, a, b, budget, sigma, min_gain, kt_weight=kt_weight,
                                       lower_out=lower_out)
    p_target = np.maximum(ndtr(proposal_radius / sigma), 0.5)
    verified = _radius_verified(s, t, p_target, alpha, a, b, kt_weight)
    return np.where(verified, np.int8(Stop.TARGET), best).astype(np.int8)


def proposal_radius(z_hat, *, sigma, shrink=DEFAULT_PROPOSAL_SHRINK):
    """The radius a job proposes to verify: ``shrink * sigma * max(z_hat, 0)``.

    ``z_hat`` is a point estimate of Phi^-1(pA) computed from the clean input only (the server's: the surrogate's
    calibrated point map of its log-odds, ``models.surrogate.surrogate_answers(...).z_hat``), so the proposal is fixed
    before sampling, as :func:`proposal_decision` requires. ``shrink`` < 1 proposes less than the point estimate,
    which is verified sooner and more often; DEFAULT_PROPOSAL_SHRINK is chosen on held-out dev streams (see its
    comment), jointly with the lambda the job runs (PER_INPUT_MIN_GAIN).
    No guarantee of its own: the proposal is a stopping heuristic, the certificate's validity does not depend on it.
    """
    z = np.asarray(z_hat, dtype=np.float64)
    if z.size == 0 or not np.all(np.isfinite(z)):
        raise ValueError(f"z_hat must be finite numbers (a point estimate of Phi^-1(pA)), got {z_hat!r}")
    if not (np.isfinite(shrink) and shrink > 0):
        raise ValueError(f"shrink must be a finite number > 0, got {shrink!r}")
    r = shrink * check_sigma(sigma) * np.maximum(z, 0.0)
    return r if r.ndim else float(r)


def _check_radius(radius, name):
    r = np.asarray(radius, dtype=np.float64)
    if r.size == 0 or not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {radius!r}")
    return r


def _check_min_gain(min_gain):
    g = np.asarray(min_gain, dtype=np.float64)
    if g.size == 0 or not (np.isfinite(g) & (g >= 0)).all():
        raise ValueError(f"min_gain must be a finite number >= 0 (radius per sample), got {min_gain!r}")
    return g


#: The largest sample budget: the policies' plug-in projections multiply hits by the budget in int64 (S * B < 2^62)
MAX_BUDGET = 2**31


def _check_budget(budget):
    budget = check_nonneg_int(budget, "budget")
    if np.any(budget < 1) or np.any(budget > MAX_BUDGET):
        raise ValueError(f"budget must be between 1 and 2^31 samples, got {budget!r}")
    return budget


def checkpoint_schedule(budget: int, *, first: int = 64, growth: float = DEFAULT_GROWTH) -> np.ndarray:
    """Cumulative sample counts at which a job's policy is evaluated: first, then geometric growth, ending at budget.

    The sequential worker sizes each job's chunks by this schedule (so the policy runs once per chunk), and the
    offline evaluation replays it, so both spend the same number of samples for the same hits. Any schedule keeps
    the guarantee; geometric growth bounds the overshoot past the ideal stopping time to a factor ``growth``
    (one finite number > 1: NaN, inf, booleans, strings and arrays are refused). ``budget`` and ``first`` are each
    one whole number >= 1 (integers or whole floats; 100.5, booleans, strings and arrays are refused).
    """
    budget = check_one_nonneg_int(budget, "budget", "one whole number >= 1 (samples)")
    first = check_one_nonneg_int(first, "first", "one whole number >= 1 (samples)")
    g = np.asarray(growth)
    if g.ndim or g.dtype.kind not in "iuf" or not np.isfinite(g):  # NaN passed "growth <= 1" and failed in the loop
        raise ValueError(f"growth must be a finite number > 1, got {growth!r}")
    if budget < 1 or first < 1 or growth <= 1.0:
        raise ValueError(f"need budget >= 1, first >= 1 and growth > 1; got {budget}, {first}, {growth}")
    points = [min(first, budget)]
    while points[-1] < budget:
        points.append(min(budget, max(points[-1] + 1, int(np.ceil(points[-1] * growth)))))
    return np.asarray(points, dtype=np.int64)
