"""Bug hunt in the smoothing core (fresh-eyes review): scalar (one-job) and vectorized paths that disagreed at
extreme, but accepted, integer counts. Neither gave an unsound bound (the e-process's rounding margin dominates
there); both broke the documented bit-for-bit agreement, so a job's answer depended on what it was batched with."""

from __future__ import annotations

import numpy as np
import pytest

from smoothing import DEFAULT_KT_WEIGHT, KT_PRIOR, Stop, best_radius_decision, lower_bound
from smoothing.stopping import validated_best_radius_codes
from smoothing.confseq import _lower_bound_kernel
from smoothing.kernels import lower_bound_one as _lower_bound_one


def test_best_radius_decision_one_job_equals_batched_at_counts_beyond_2_62():
    """Guards: the batched marginal-gain rule computed t' = min(2t, max(B, t)) in int64, and 2t wrapped around for
    integer counts t >= 2^62 (then accepted by check_counts): t' became negative, the projected radius 0, and the
    rule said CERTIFIED where the one-job path (Python ints) said BUDGET (min_gain = 0). Failed on the unfixed code:
    yes. check_counts now refuses integer counts from 2^62 (as it refused float counts), so the public function
    refuses them; the unchecked entry point the engine calls keeps the one-job == batched guard at those counts."""
    kw = dict(sigma=0.25, alpha=0.001, budget=4000, min_gain=0.0)
    for t in (2**62, 2**62 + 12345, 2**63 - 1):
        for s in (t, t - t // 4):
            with pytest.raises(ValueError, match=r"below 2\^62"):
                best_radius_decision(s, t, **kw)
            with np.errstate(all="ignore"):
                one = validated_best_radius_codes(*_job_arrays(s, t, 1), kt_weight=DEFAULT_KT_WEIGHT)
                two = validated_best_radius_codes(*_job_arrays(s, t, 2), kt_weight=DEFAULT_KT_WEIGHT)
            assert one.tolist() == [Stop.BUDGET], (s, t, one)
            assert two.tolist() == [int(Stop.BUDGET)] * 2, (s, t, two)


def _job_arrays(s, t, n):
    """Validated per-job arrays (s, t, alpha, a, b, budget, sigma, min_gain) of n identical jobs."""
    return (np.full(n, s, np.int64), np.full(n, t, np.int64), np.full(n, 0.001), np.full(n, KT_PRIOR[0]),
            np.full(n, KT_PRIOR[1]), np.full(n, 4000, np.int64), np.full(n, 0.25), np.full(n, 0.0))


def test_lower_bound_float_path_equals_vectorized_kernel_beyond_2_53():
    """Guards: the vectorized kernel formed F = float(t) - float(S) while the one-entry float path (used for <= 8
    entries) forms float(t - S): for t > 2^53 the two differ and L_t of the same (S, t) depended on how many entries
    shared the call (0.49999943978685363 vs 0.4999994350537537 at S = 2^52 + 3, t = 2^53 + 7, alpha = 5e-324,
    a = 1e-8, b = 0.5, kt_weight 0). Failed on the unfixed code: yes."""
    t = 2**53 + 7
    pts = [(s, t, alpha, a, b) for s in (1, t // 2, t - 1, t) for alpha in (5e-324, 0.05)
           for a, b in ((1e-8, 0.5), (0.5, 0.5), (0.5, 1e8))]
    s, tt, alpha, a, b = (np.array(col) for col in zip(*pts))
    for w in (0.0, 0.1, 1.0):
        with np.errstate(all="ignore"):
            vec = _lower_bound_kernel(s.astype(np.int64), tt.astype(np.int64), alpha, a, b, w)
            for i, (si, ti, al, ai, bi) in enumerate(pts):
                assert _lower_bound_one(si, ti, al, ai, bi, w) == vec[i], (si, ti, al, ai, bi, w)
    # the public function: the same (S, t) alone and among more than 8 entries
    with np.errstate(all="ignore"):
        alone = lower_bound(2**52 + 3, t, 5e-324, 1e-8, 0.5, kt_weight=0.0)
        batched = lower_bound(np.full(9, 2**52 + 3), t, 5e-324, 1e-8, 0.5, kt_weight=0.0)
    assert (batched == alone).all(), (alone, batched)
