"""Mutation audit of the soundness tests: one test per injected bug that no earlier test caught.

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. Deterministic: no noise is drawn, except by the
real service in the last test, which is seeded (create_app(..., seed=0)) and checks only what is fixed before
sampling.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from models.decisions import certificates
from models.engine import JobSpec
from models.jobs import COHEN, FIXED, SEQUENTIAL, Batch, JobTable, checkpoints_of
from smoothing import Stop, lower_bound, radius_from_probability
from smoothing.conformal import LOWER_ROUNDING, bin_index, conformal_lower, validated_conformal_certificate
from tests import server_api_helpers
from tests.server_api_helpers import SIGMA, quantized

fmnist = server_api_helpers.fmnist  # module-scoped fixtures: this module's own app
client = server_api_helpers.client

K, SHAPE = 3, (1, 4, 4)


class _Job:
    def __init__(self, order: int, kind: str = "sequential", budget: int = 1000):
        self.spec = JobSpec(np.zeros(SHAPE, np.float32), 0.01, budget, time.monotonic() + 60, kind=kind,
                            tested_class=1, prior=(2.0, 1.0))
        self.order, self.slot = order, -1


def _land(table: JobTable, slot: int, hits: int, misses: int) -> np.ndarray:
    """A batch of ``hits + misses`` estimation samples of the job in ``slot`` (hits of class 1) lands."""
    size = hits + misses
    table.assigned[slot] += size
    table.inflight[slot] += size
    counts = np.zeros((1, K), np.int64)
    counts[0, 1], counts[0, 0] = hits, misses
    batch = Batch(np.array([slot]), table.gen[[slot]].copy(), np.array([size]), np.array([False]),
                  table.images[[slot]])
    return table.land(batch, counts)


# ------------------------------------------------------------------------------------------------ conformal
@pytest.mark.parametrize("q_hat", [(0.2, 1.0, 0.5), (1.0, 0.2, 1.5)])
def test_the_served_quantile_is_the_one_of_the_bin_the_calibration_scores_an_edge_in(q_hat):
    """A log-odds value exactly on a bin edge belongs to the bin above (bin_index, side='right'), which is where the
    calibration scored such an image (calibration.conformal_fit: mondrian_quantiles over bin_index); the served
    bound must use that bin's quantile. Edges are tuning-set quantiles, so a served image equal to a tuning image
    sits exactly on one. Bug guarded against (run against it, this test failed): the served lookup
    ``q_hat[np.searchsorted(edges, g, side='left')]`` in smoothing.conformal._lower_of_checked, which takes the
    bin below at an edge; with q_hat = (0.2, 1.0, 0.5), g = 0 was certified with the smaller quantile 0.2 of a bin
    it was not calibrated in (z_lower 1.3 instead of 0.5). No earlier test has g exactly on an edge."""
    knots, values, scale = np.array([-5.0, 5.0]), np.array([0.0, 3.0]), np.array([1.0, 1.0])
    edges, q = np.array([0.0, 2.0]), np.array(q_hat)
    g = edges.copy()
    slack = LOWER_ROUNDING * (np.abs(values).max() + np.abs(q[bin_index(g, edges)]) * scale.max())
    want = np.interp(g, knots, values) - q[bin_index(g, edges)] * np.interp(g, knots, scale) - slack
    cal = dict(knots=knots, values=values, scale=scale, edges=edges, q_hat=q)
    assert conformal_lower(g, **cal).tolist() == want.tolist()
    _, radius = validated_conformal_certificate(g, SIGMA, **cal)  # the served path
    assert radius.tolist() == np.where(want > 0, SIGMA * want * (1 - 1e-10), 0.0).tolist()


# ------------------------------------------------------------------------------------------------ job table
def test_a_job_stopped_with_samples_in_flight_keeps_the_bound_it_stopped_on():
    """decisions.certificates answers a policy-stopped job with max(L_t at its stop, L_t at all counted samples)
    (both values of one confidence sequence). Bug guarded against (run against it, this test failed): the
    ``np.fmax(p, table.stop_lower[slots])`` line removed; the job stopped as certified at 100 hits in 100 samples,
    its 100 speculative samples (all misses) landed, and it was answered as an abstention (L_t(100, 200) < 1/2).
    tests/test_engine_certificates.py accepts either value, so it passed with the bug."""
    table = JobTable(SHAPE, K, capacity=2)
    slot = table.admit(_Job(0), SEQUENTIAL, checkpoints_of(1000))
    _land(table, slot, 100, 0)
    stop = certificates(table, np.array([slot]), SIGMA)[2]
    assert stop[0] == lower_bound(100, 100, 0.01, 2.0, 1.0) > 0.5
    table.assigned[slot] += 100
    table.inflight[slot] += 100  # a speculative chunk in flight when the policy stops it
    assert table.settle(np.array([slot]), np.array([int(Stop.CERTIFIED)]), stop).size == 0
    table.inflight[slot] -= 100
    _land(table, slot, 0, 100)
    assert lower_bound(100, 200, 0.01, 2.0, 1.0) < 0.5
    cls, radius, p = certificates(table, np.array([slot]), SIGMA)
    assert (int(cls[0]), float(p[0]), float(radius[0])) == (1, float(stop[0]), radius_from_probability(stop[0], SIGMA))


def test_a_reused_slot_does_not_inherit_the_previous_jobs_stop_bound():
    """A slot's ``stop_lower`` is reset when a new job takes it. Bug guarded against (run against it, this test
    failed): ``self.stop_lower[slots] = np.nan`` removed from JobTable.admit_many; the next job in the slot was
    certified (p_lower 0.92, the previous job's bound) with zero samples of its own. (The engine test that also
    caught it depends on which jobs share a slot under concurrency; this one is deterministic.)"""
    table = JobTable(SHAPE, K, capacity=1)
    slot = table.admit(_Job(0), SEQUENTIAL, checkpoints_of(1000))
    _land(table, slot, 100, 0)
    table.inflight[slot] += 1
    table.settle(np.array([slot]), np.array([int(Stop.CERTIFIED)]), certificates(table, np.array([slot]), SIGMA)[2])
    table.inflight[slot] -= 1
    table.running[slot] = False  # answered
    assert table.release_idle() == 1
    assert table.admit(_Job(1), SEQUENTIAL, checkpoints_of(1000)) == slot
    cls, radius, p = certificates(table, np.array([slot]), SIGMA)
    assert (int(cls[0]), float(radius[0]), float(p[0])) == (-1, 0.0, 0.0)


@pytest.mark.parametrize("kind, code", [("fixed", FIXED), ("cohen", COHEN)])
def test_fixed_n_jobs_never_reach_a_policy_checkpoint(kind, code):
    """A fixed-n (fixed, Cohen) job's Clopper-Pearson bound is valid only on n fixed in advance (cut by the clock at
    most): no policy may stop it on its outcomes. Bug guarded against (run against it, this test failed):
    JobTable.at_checkpoint without its ``kind == SEQUENTIAL`` term; fixed jobs (cp 0) went to the sequential policy
    at every landing and were stopped, then answered with a Clopper-Pearson bound at a data-dependent n. (The only
    earlier test that failed did so through a sample total in a pipelining test.)"""
    table = JobTable(SHAPE, K, capacity=2)
    job = _Job(0, kind, budget=400)
    slot = table.admit(job, code, None)
    if code == COHEN:
        table.cls[slot] = 1  # selection done
    landed = _land(table, slot, 200, 0)
    assert landed.tolist() == [slot]
    assert table.at_checkpoint(landed).size == 0 and table.completed_fixed(landed).size == 0
    landed = _land(table, slot, 200, 0)
    assert table.at_checkpoint(landed).size == 0 and table.completed_fixed(landed).tolist() == [slot]


# ------------------------------------------------------------------------------------------------ service
def test_engine_jobs_take_class_prior_and_proposal_from_the_clean_image(client, fmnist, monkeypatch):
    """The tested class, the Beta prior and (auto's per-input path) the proposed radius of every engine job are the
    clean image's (models.priors.class_and_prior and the surrogate's point estimate on the clean forward pass), fixed
    before any noise sample: the per-input guarantee depends on it. Bug guarded against (run against it, this test
    failed): CertificationService._job_spec computing class and prior from a noisy copy of the image
    (image + N(0, sigma^2)); no earlier test compared a sequential job's class and prior with the clean image's
    (the fixed-mode routing test's n was the budget either way)."""
    from models.priors import class_and_prior, softmax
    from models.surrogate import surrogate_answer
    from smoothing import proposal_radius

    service = client.app.state.service
    specs: list[JobSpec] = []
    submit = service.engine.submit
    monkeypatch.setattr(service.engine, "submit", lambda spec: (specs.append(spec), submit(spec))[1])
    for i in range(3):
        img = quantized(fmnist.x_test[i])
        logits = service.surrogate.forward(img[None])
        tested, priors = class_and_prior(service.base, service.surrogate, service.meta, img[None], softmax(logits))
        for mode, extra in (("sequential", {}), ("fixed", {}), ("auto", {"per_input": True})):
            r = client.post("/certify", json={"image": img.tolist(), "mode": mode, "max_samples": 200, **extra})
            assert r.status_code == 200, r.text
            spec = specs[-1]
            assert spec.tested_class == int(tested[0]), (i, mode)
            assert spec.prior == (float(priors[0, 0]), float(priors[0, 1])), (i, mode)
            if mode == "auto":
                answer = surrogate_answer(logits, service.manifest.calibration, SIGMA, service.config.default_alpha)
                want = float(proposal_radius(answer.z_hat, sigma=SIGMA))
                assert spec.proposal_radius == (want or None), i
    assert len(specs) == 9


def test_a_shared_checkpoint_schedule_cannot_be_changed_by_a_caller():
    """models.jobs.checkpoints_of caches one schedule array per budget, shared by every job with that budget (the
    job table copies it): a caller writing into it changed every later job's checkpoints. Failed before: the write
    went through."""
    schedule = checkpoints_of(1000)
    with pytest.raises(ValueError, match="read-only"):
        schedule[0] = 1
    assert checkpoints_of(1000)[0] == 64
