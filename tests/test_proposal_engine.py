"""Proposal jobs in the real engine (real onnxruntime session of the default bundle, real Fashion-MNIST images).

What must hold:
* a small proposal stops at 'target' at the checkpoint where it is verified (no sample drawn ahead), an unreachable
  one gives the best-radius answer, and a 'target' answer's radius is >= the proposal with p_lower the job-prior
  bound of its counted samples;
* per-job min_gain (JobSpec.min_gain, the marginal-gain rule's lambda of best-radius and proposal jobs): each job's
  decisions are the policy called with its own lambda, a larger lambda stops earlier on the same noise, and submit
  refuses a bad one (and a bad proposal job) with a message saying what was expected.
The policy itself and the decision tables: tests/test_proposal.py.
Each soundness test names the bug it was run against (by editing the code once) and says that it failed then.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.engine import SequentialEngine
from models.sampling import SamplingEngine
from smoothing import (
    DEFAULT_MIN_GAIN,
    KT_PRIOR,
    Stop,
    best_radius_decision,
    certified_radius,
    checkpoint_schedule,
    lower_bound,
)
from smoothing.stopping import proposal_decision
from tests import proposal_helpers
from tests.proposal_helpers import EASY, SIGMA, K, _spec

images = proposal_helpers.images  # the module-scoped fixture


# ------------------------------------------------------------------------------------------------ the engine
class Launches(SamplingEngine):
    """The real sampler; records the chunk sizes of every model call (changes no count)."""

    def __init__(self, backend, batch_size: int = 4096):
        super().__init__(backend, sigma=SIGMA, num_classes=K, batch_size=batch_size)
        self.sizes: list[list[int]] = []
        self.pending: list = []

    def launch(self, images, sizes, rng):
        self.sizes.append([int(x) for x in sizes])
        self.pending.append(super().launch(images, sizes, rng))
        return self.pending[-1]

    def counts(self) -> list[np.ndarray]:
        """The (chunks, K) class counts of every model call so far (all finished once the engine has stopped)."""
        return [p.result() for p in self.pending]


def _run(sampler, specs, **kw):
    """Results of ``specs`` run one after the other on a fresh engine (seeded), and the engine."""
    engine = SequentialEngine(sampler, seed=kw.pop("seed", 0), **kw).start()
    try:
        return [engine.submit(s).result(timeout=120) for s in specs], engine
    finally:
        engine.stop(0.0)


def _hits_of(p_lower: float, trials: int, prior) -> int:
    """The hit count whose confidence-sequence bound (job prior, default weight) is p_lower (fails if none is)."""
    values = lower_bound(np.arange(trials + 1), trials, 0.001, *prior)
    s = int(np.argmin(np.abs(values - p_lower)))
    assert values[s] == pytest.approx(p_lower, rel=1e-12, abs=1e-15)
    return s


def test_small_proposal_stops_at_target_where_verified(backend, images):
    """A trouser (pA ~ 1), proposal 0.1: 'target' at the first checkpoint (64) with a radius >= 0.1, and nothing drawn
    ahead although the engine speculates (one model call of 64 samples): a 'target' answer's certificate is the
    bound at the checkpoint where the proposal was verified. Run once against speculation for proposal jobs
    (``np.isnan(self.proposal)`` removed from JobTable.speculative): a second chunk of 7 samples was drawn and
    counted (71 samples); this test failed."""
    sampler = Launches(backend)
    (res,), engine = _run(sampler, [_spec(images[EASY], proposal_radius=0.1)])
    assert res.stopped_by == "target" and res.class_index == 1 and res.radius >= 0.1
    assert sampler.sizes == [[64]] and res.samples == 64 == engine.samples_processed
    s = _hits_of(res.p_lower, 64, KT_PRIOR)
    assert proposal_decision(s, 64, sigma=SIGMA, proposal_radius=0.1, alpha=0.001, budget=2048) == Stop.TARGET


@pytest.mark.parametrize("tested_class,prior,min_gain", [(1, KT_PRIOR, None), (1, (30.0, 0.5), None),
                                                         (0, (30.0, 0.5), None), (1, KT_PRIOR, 1e-3)])
def test_unreachable_proposal_gives_the_best_radius_answer(backend, images, tested_class, prior, min_gain):
    """A proposal of 2.0 = 8 sigma (needs pA >= 1 - 6e-16: never verified within 2,048 samples) answers exactly as
    the best-radius job with the same min_gain on the same seeded noise (speculation off in both, so the model calls
    match): same class, radius, bound, samples and stop reason; the trouser's own class settles ('certified'), a
    wrong class is futile."""
    results = []
    for proposal in (2.0, None):
        sampler = Launches(backend)
        (res,), _ = _run(sampler, [_spec(images[EASY], proposal_radius=proposal, tested_class=tested_class,
                                         prior=prior, min_gain=min_gain)], speculate=False)
        results.append((res.class_index, res.radius, res.p_lower, res.samples, res.stopped_by, sampler.sizes))
    assert results[0] == results[1]
    assert results[0][4] == ("certified" if tested_class == 1 else "futility")


def test_target_answer_certifies_the_proposal_under_the_jobs_prior(backend, images):
    """Soundness of a 'target' answer: a pessimistic job prior Beta(1, 50) (mixed with KT at the default weight) and a
    proposal of 0.26. With 64/64 hits KT alone would certify 0.272 but the job's prior only 0.239, so the proposal is
    verified at 79 samples (0.269), not at 64. The answer: 'target', radius >= 0.26, p_lower = the job-prior bound of
    its counted samples, and the policy (job prior) says TARGET there.
    Run once against decisions taken with the KT prior while the certificate uses the job's prior (``a``, ``b``
    dropped from proposal_decision's call in models/decisions.py): the job stopped at 64 samples as 'target' with a
    radius of 0.239 < 0.26; this test failed."""
    prior = (1.0, 50.0)
    (res,), _ = _run(Launches(backend), [_spec(images[EASY], proposal_radius=0.26, prior=prior)])
    assert res.stopped_by == "target" and res.class_index == 1
    assert res.radius >= 0.26 and res.samples > 64
    s = _hits_of(res.p_lower, res.samples, prior)
    assert proposal_decision(s, res.samples, sigma=SIGMA, proposal_radius=0.26, alpha=0.001, budget=2048,
                             a=prior[0], b=prior[1]) == Stop.TARGET
    assert res.radius == certified_radius(s, res.samples, 0.001, SIGMA, *prior)


@pytest.mark.parametrize("index,tested_class,proposal", [(EASY, 1, None), (4, 6, None), (EASY, 1, 2.0)])
def test_a_larger_min_gain_stops_earlier_by_its_own_policy(backend, images, index, tested_class, proposal):
    """Per-job lambda in the real engine: on the same seeded noise (speculation off: one model call per checkpoint),
    a job with min_gain = 1e-3 stops ('certified') before the job with the default lambda, and at every checkpoint
    each job's decision is exactly best_radius_decision (or proposal_decision) called with ITS min_gain at the counts
    the model returned: CONTINUE before its stop, the stop code there. Image 4 is a shirt (class 6) of mid pA
    (radius ~0.18 at the default lambda). A proposal of 2.0 (never verified) runs the same rule.
    Run once against decisions that ignore the job's lambda (``min_gain=`` dropped from the two calls in
    models/decisions.py::_policy_at): the min_gain = 1e-3 jobs ran on like the default ones (1,449 samples on the
    trouser), past checkpoints where their own policy says CERTIFIED; all three cases failed (and so did
    test_precomputed_decisions_follow_each_jobs_policy)."""
    runs = {}
    for min_gain in (None, 1e-3):
        sampler = Launches(backend)
        (res,), _ = _run(sampler, [_spec(images[index], tested_class=tested_class, proposal_radius=proposal,
                                         min_gain=min_gain)], speculate=False)
        hits = np.cumsum([int(c[0, tested_class]) for c in sampler.counts()])
        draws = np.cumsum([sizes[0] for sizes in sampler.sizes])
        assert draws[-1] == res.samples and list(draws) == list(checkpoint_schedule(2048)[:len(draws)])
        kw = {"sigma": SIGMA, "alpha": 0.001, "budget": 2048, "min_gain": min_gain or DEFAULT_MIN_GAIN}
        if proposal is None:
            codes = best_radius_decision(hits, draws, **kw)
        else:
            codes = proposal_decision(hits, draws, proposal_radius=proposal, **kw)
        assert res.stopped_by == "certified" and codes[-1] == Stop.CERTIFIED, (min_gain, res)
        assert np.all(codes[:-1] == Stop.CONTINUE), (min_gain, codes)
        assert res.p_lower == pytest.approx(lower_bound(hits[-1], draws[-1], 0.001, *KT_PRIOR), rel=1e-12)
        runs[min_gain] = (res, hits, draws)
    (default, hits, draws), (greedy, _, greedy_draws) = runs[None], runs[1e-3]
    assert greedy.samples < default.samples and np.array_equal(draws[:len(greedy_draws)], greedy_draws)
    assert best_radius_decision(hits[len(greedy_draws) - 1], greedy.samples, sigma=SIGMA, alpha=0.001,
                                budget=2048) == Stop.CONTINUE  # the default lambda would have gone on there


@pytest.mark.parametrize("kwargs,pattern", [
    ({"min_gain": -1e-4}, r"min_gain must be a finite number >= 0 \(radius per sample\), got -0.0001"),
    ({"min_gain": math.inf}, r"min_gain must be a finite number >= 0 .*got inf"),
    ({"min_gain": math.nan}, r"min_gain must be a finite number >= 0 .*got nan"),
    ({"min_gain": True}, r"min_gain must be a finite number >= 0 .*got True"),
    ({"min_gain": "1e-4"}, r"min_gain must be a finite number >= 0 .*got '1e-4'"),
    ({"min_gain": 1e-4, "kind": "fixed"}, r"min_gain applies to sequential best-radius and proposal jobs only, "
                                          r"not to kind 'fixed'"),
    ({"min_gain": 1e-4, "target_radius": 0.2}, r"min_gain applies .* not to a target_radius job"),
])
def test_submit_refuses_a_bad_min_gain(backend, images, kwargs, pattern):
    _assert_submit_refuses(backend, images[EASY], kwargs, pattern)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"proposal_radius": 0.2, "target_radius": 0.2}, r"target_radius .* or proposal_radius .* not both"),
    ({"proposal_radius": -0.1}, r"proposal_radius must be a finite number >= 0, got -0.1"),
    ({"proposal_radius": math.nan}, r"proposal_radius must be a finite number >= 0, got nan"),
    ({"proposal_radius": 0.2, "kind": "fixed"}, r"proposal_radius applies to sequential jobs only"),
])
def test_submit_refuses_bad_proposal_jobs(backend, images, kwargs, pattern):
    _assert_submit_refuses(backend, images[EASY], kwargs, pattern)


def _assert_submit_refuses(backend, image, kwargs, pattern) -> None:
    """submit() of a job with ``kwargs`` raises a ValueError matching ``pattern`` and leaves no job live."""
    engine = SequentialEngine(Launches(backend), seed=0)
    try:
        with pytest.raises(ValueError, match=pattern):
            engine.submit(_spec(image, **kwargs))
        assert engine.live_jobs == 0
    finally:
        engine.stop(0.0)
