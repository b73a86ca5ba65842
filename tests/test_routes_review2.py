"""Review of the certification routes end to end (rev2h): the certificate a route answers is the one it computed.

* A best-radius job that its policy stops while speculative samples are in flight keeps the bound it stopped on
  (deterministic engine test on a scripted sampler).
* Seeded end-to-end simulations through the real :class:`certification.service.CertificationService` (real
  onnxruntime sessions, real engine) on a bundle built here with a known smoothed classifier: a linear binary base
  model on a 1x4x4 input, logits [0, w.x + b], so under noise N(0, sigma^2 I) the hit rate of the clean class is
  exactly pA = Phi(|w.x + b| / (sigma ||w||)); a surrogate whose calibrated point estimate z_hat IS Phi^-1(pA) (its
  log-odds are |w.x + b| / (sigma ||w||) and the bundle's point map is the identity), so the per-input route's
  proposal is the exact radius; and a constant meta-learner prior. tests/test_server_soundness.py covers the
  sequential, target, fixed and Cohen routes on a base-only bundle with the KT prior; this file covers what it does
  not: the auto per-input route with a surrogate's proposal, the routes under the meta-learner's (wrong or
  informative) priors, and deadline-cut certificates.
"""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import norm

from certification.config import ServiceConfig
from certification.plan import CertifyParams
from certification.service import CertificationService
from models.bundle import create_bundle
from models.engine import JobSpec, SequentialEngine
from models.priors import FEATURE_NAMES
from models.sampling import SamplingEngine
from smoothing import checkpoint_schedule, level_split, lower_bound, radius_from_probability

SIGMA, ALPHA = 0.25, 0.1


# ------------------------------------------------------------------------------------ speculation keeps its bound
class _Scripted:
    """A backend whose noisy predictions follow a script: call k returns script[k] (labels), whatever the noise."""

    device = "cpu"

    def __init__(self, script):
        self.script, self.calls = list(script), 0

    def noisy_predictions(self, images, repeats, sigma, rng):
        out = np.asarray(self.script[self.calls], dtype=np.int64)
        assert len(out) == int(np.sum(repeats)), (len(out), repeats)
        self.calls += 1
        return out


def test_a_certified_stop_with_speculative_samples_in_flight_keeps_its_bound():
    """A lone best-radius job (KT prior, alpha 0.1, lambda 1: it stops at the first checkpoint with a radius) draws
    64 samples, then, while its decision is pending, speculates 7 more (to the checkpoint 71). 46 hits of 64: L =
    0.533 > 1/2, the rule stops it ('certified'); the 7 speculative samples are misses: L(46, 71) = 0.468. Before
    the fix the engine answered stopped_by='certified' with class -1, radius 0 (an abstention, the bound at 71):
    the certificate it had stopped on was lost. Now: the larger of the two values of the same confidence sequence
    (both valid: P(exists t: L_t > pA) <= alpha), all 71 samples counted. Failed on the old code."""
    labels = [np.r_[np.ones(46), np.zeros(18)], np.zeros(7)]
    sampler = SamplingEngine(_Scripted(labels), sigma=SIGMA, num_classes=2, batch_size=1024)
    engine = SequentialEngine(sampler, seed=0).start()
    try:
        spec = JobSpec(np.zeros((1, 2, 2), np.float32), ALPHA, 2000, time.monotonic() + 60, tested_class=1,
                       min_gain=1.0)
        res = engine.submit(spec).result(timeout=30)
    finally:
        engine.stop(0.0)
    at_stop = lower_bound(46, 64, ALPHA)
    assert at_stop > 0.5 > lower_bound(46, 71, ALPHA)
    assert res.stopped_by == "certified" and res.samples == 71, res
    assert res.class_index == 1 and res.p_lower == at_stop, res
    assert res.radius == radius_from_probability(at_stop, SIGMA)



def test_a_stop_decided_from_a_precomputed_table_also_keeps_its_bound():
    """The same job on the job table directly, its decision taken without a bound at hand (as when the engine looks a
    code up in its DecisionTables on a GPU: ``known`` is NaN): models.decisions.stop_bounds computes L_t at the stop
    from the counts then, with the job's alpha and prior, and the certificate after the speculative chunk lands is
    that bound. Failed on the old code (no such bound kept: the answer abstained at L(46, 71))."""
    from models.decisions import certificates, stop_bounds
    from models.jobs import SEQUENTIAL, JobTable

    class Job:
        def __init__(self, spec):
            self.spec, self.order, self.slot = spec, 0, -1

    prior = (3.0, 1.5)
    table = JobTable((1, 2, 2), 2, capacity=4)
    spec = JobSpec(np.zeros((1, 2, 2), np.float32), ALPHA, 2000, time.monotonic() + 60, tested_class=1, prior=prior,
                   min_gain=1.0)
    slot = table.admit(Job(spec), SEQUENTIAL, checkpoint_schedule(2000))
    first = table.allocate(1024)  # up to the checkpoint 64
    ahead = table.allocate(1024)  # speculative, up to 71
    assert first.samples == 64 and ahead.samples == 7
    due = table.at_checkpoint(table.land(first, np.array([[18, 46]])))
    assert list(due) == [slot]
    known = np.full(table.capacity, np.nan)  # a looked-up decision: no bound computed
    assert table.settle(due, np.array([2], np.int8), stop_bounds(table, due, known, SIGMA)).size == 0  # in flight
    at_stop = lower_bound(46, 64, ALPHA, *prior)
    assert table.stop_lower[slot] == at_stop
    table.land(ahead, np.array([[7, 0]]))
    assert list(table.settled(np.array([slot]))) == [slot]
    cls, radius, p = certificates(table, np.array([slot]), SIGMA)
    assert lower_bound(46, 71, ALPHA, *prior) < 0.5 < at_stop
    assert (cls[0], p[0], radius[0]) == (1, at_stop, radius_from_probability(at_stop, SIGMA))

# ------------------------------------------------------------------------------------ end-to-end simulations
N_INPUTS = 1000
BUDGET = 2000
#: The meta-learner's constant prior: Beta(50, 1), centred at pA ~ 0.98, badly wrong for most inputs here (validity
#: must hold for ANY prior fixed from the clean image; an optimistic one is where a bug would show first).
META_PRIOR = (50.0, 1.0)


def _linear_onnx(path, weight: np.ndarray, bias: np.ndarray, in_shape: tuple) -> str:
    """y = flatten(x) @ weight + bias as a float32 ONNX graph with a dynamic batch axis."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", weight.shape[1]])
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["mm"]), helper.make_node("Add", ["mm", "B"], ["output"])]
    graph = helper.make_graph(nodes, "linear", [x], [y], [numpy_helper.from_array(weight.astype(np.float32), "W"),
                                                         numpy_helper.from_array(bias.astype(np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _bundle(root, *, point_scale: float, prior=META_PRIOR):
    """The linear bundle (module docstring). The surrogate's log-odds are |m| k, k = 1 / (sigma ||w||), i.e. exactly
    Phi^-1(pA); the calibration's point map is z = point_scale * g (so the per-input route proposes point_scale x the
    exact radius). Its quantiles do not matter here: every request asks for a per-input guarantee."""
    rng = np.random.default_rng(2024)
    w = rng.normal(size=16)
    b = -w.sum() / 2  # the boundary passes through the grey image
    k = 1.0 / (SIGMA * np.linalg.norm(w))
    base = _linear_onnx(root / "base.onnx", np.stack([np.zeros(16), w], 1), np.array([0.0, b]), (1, 4, 4))
    surrogate = _linear_onnx(root / "sur.onnx", np.stack([np.zeros(16), k * w], 1), np.array([0.0, k * b]), (1, 4, 4))
    meta = _linear_onnx(root / "meta.onnx", np.zeros((4, 2)), np.array(prior), (4,))
    levels = []
    for alpha in (0.2, ALPHA):
        delta, alpha_1 = level_split(alpha)
        levels.append({"alpha": alpha, "delta": delta, "alpha_1": alpha_1, "knots": [0.0, 40.0],
                       "values": [0.0, 40.0 * point_scale], "scale": [1.0, 1.0], "edges": [], "q_hat": [0.5],
                       "bin_sizes": [1000]})
    calibration = {"samples_per_image": 1000, "num_calibration": 1000, "num_tuning": 100, "levels": levels}
    bundle = create_bundle(root / "bundle", base=base, surrogate=surrogate, meta=meta, sigma=SIGMA,
                           input_shape=(1, 4, 4), classes=["neg", "pos"], calibration=calibration,
                           meta_features=list(FEATURE_NAMES), name="linear-known-pa")
    return bundle, w, b


def _inputs(w, b, n, *, seed=314, lo=0.6, hi=0.995):
    """n images with pA in [lo, hi] (rejection sampling from uniform images): x, true class, pA, exact radius."""
    rng = np.random.default_rng(seed)
    x = rng.random((40 * n, 1, 4, 4), dtype=np.float32)
    margin = x.reshape(len(x), 16).astype(np.float64) @ w + b
    p_a = norm.cdf(np.abs(margin) / (SIGMA * np.linalg.norm(w)))
    keep = np.flatnonzero((p_a >= lo) & (p_a <= hi))[:n]
    assert len(keep) == n
    return x[keep], (margin[keep] > 0).astype(int), p_a[keep], np.abs(margin[keep]) / np.linalg.norm(w)


def _served(root, point_scale: float):
    bundle, w, b = _bundle(root, point_scale=point_scale)
    service = CertificationService(bundle, ServiceConfig(max_samples=BUDGET, auto_max_samples=BUDGET, threads=1,
                                                         cohen_n0=100, default_deadline_ms=120_000,
                                                         max_live_jobs=2 * N_INPUTS), seed=11)
    service.start()
    x, cls, p_a, radius = _inputs(w, b, N_INPUTS)
    return {"service": service, "x": x, "cls": cls, "pA": p_a, "radius": radius, "scale": point_scale}


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """The served bundle whose per-input route proposes the exact radius, and its 1,000 inputs."""
    s = _served(tmp_path_factory.mktemp("exact"), 1.0)
    yield s
    s["service"].stop(1.0)


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """The same model, its per-input route proposing half the exact radius (verified for most inputs)."""
    s = _served(tmp_path_factory.mktemp("half"), 0.5)
    yield s
    s["service"].stop(1.0)


def _first(s: dict, n: int) -> dict:
    return {k: v[:n] for k, v in s.items() if k in ("x", "cls", "pA", "radius")}


def _certify(service, xs, *, at_once: int | None = None, **params):
    """Every image through CertificationService._certify (the route, the engine, the certificate: no signing and no
    HTTP), ``at_once`` requests at a time (default all: the engine batches them as under load; 1: light load, where
    the engine has spare batch capacity, i.e. where a best-radius job speculates)."""
    p = CertifyParams(**params)
    step = at_once or len(xs)

    async def run():
        out = []
        for start in range(0, len(xs), step):
            out += await asyncio.gather(*[service._certify(x, p, request_id=f"r{start + i}")
                                          for i, x in enumerate(xs[start:start + step])])
        return out

    return asyncio.run(run())


def _assert_sound(certs, s, what):
    """Violation: certified with the wrong class or with p_lower > the true pA. Rate <= alpha + 3 binomial SE."""
    bad = np.array([c.certified and (c.class_index != k or c.p_lower > p) for c, k, p in zip(certs, s["cls"], s["pA"])])
    limit = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / len(certs))
    assert bad.mean() <= limit, f"{what}: violation rate {bad.mean():.3f} > {limit:.3f} over {len(certs)} inputs"
    return bad


def _crossing_probabilities(p_grid: np.ndarray, prior: tuple[float, float]) -> np.ndarray:
    """Exact P(exists checkpoint c of the budget's schedule: L_c(S_c) > p) for a Bernoulli(p) walk, for each p of
    ``p_grid``: the confidence sequence (alpha, the prior mixed with KT as the engine's) crossing the truth at a
    point where a job can be answered. A job answered at a checkpoint with the bound there (proposal and target jobs
    never run ahead) can only be wrong on such a path. Dynamic program over S, all p at once (~2 s)."""
    p = np.asarray(p_grid, dtype=np.float64)[:, None]
    mass = np.zeros((len(p), BUDGET + 1))
    mass[:, 0] = 1.0
    crossed, t = np.zeros(len(p)), 0
    for c in checkpoint_schedule(BUDGET):
        while t < c:  # one sample: S -> S + 1 with probability p
            mass[:, 1:t + 2] = mass[:, 1:t + 2] * (1.0 - p) + mass[:, :t + 1] * p
            mass[:, 0] *= 1.0 - p[:, 0]
            t += 1
        over = np.asarray(lower_bound(np.arange(c + 1), c, ALPHA, *prior))[None, :] > p
        crossed += np.where(over, mass[:, :c + 1], 0.0).sum(axis=1)
        mass[:, :c + 1][over] = 0.0
    return crossed


@pytest.fixture(scope="module")
def envelope():
    """p -> the crossing probability of :func:`_crossing_probabilities` under the meta prior, on a grid of step
    0.0033 over the inputs' range; an input takes the larger value of the two grid points around its pA."""
    grid = np.linspace(0.6, 0.995, 120)
    table = _crossing_probabilities(grid, META_PRIOR)

    def at(p_a):
        i = np.clip(np.searchsorted(grid, p_a), 1, len(grid) - 1)
        return np.maximum(table[i - 1], table[i])

    return at


def _assert_consistent(c, *, sigma=SIGMA):
    """What every engine certificate must say of itself: certified iff a bound > 1/2, radius from that bound, a
    'certified' stop certifies, samples within the budget."""
    assert c.certified == (c.class_index >= 0) == (c.radius > 0)
    if c.stopped_by in ("certified", "target"):
        assert c.certified, c
    if c.certified:
        assert c.p_lower > 0.5 and c.radius == radius_from_probability(c.p_lower, sigma)
    assert 0 <= c.samples <= BUDGET


@pytest.mark.parametrize("bundle", ["exact", "half"])
def test_per_input_route_with_the_surrogates_proposal_is_sound_and_stops_where_verified(bundle, envelope, request):
    """auto + per_input=true: a sequential job whose proposal is the surrogate's point estimate (here the exact radius,
    or half of it), under the meta-learner's prior. Per input at alpha = 0.1: the rate of certificates with p_lower > pA
    (or the wrong class) must be <= alpha + 3 SE over 1,000 inputs, and the number of such certificates at most what
    the confidence sequence allows (the exact probability that it crosses pA at a checkpoint, summed over inputs,
    + 4 SD + 1: the bound alpha is far from tight for the e-process, this is); a 'target' answer certifies at least
    the proposal, with the bound of a checkpoint; every certificate is self-consistent.
    Planted once each (2026-12-06, rev2h), this test failed on both: (1) the engine handing a job the bound computed
    for another job's stop (``known[:len(due)] = ...`` for ``known[due] = ...`` in SequentialEngine._land): 'certified'
    and 'target' answers that abstain; (2) the sequential certificate computed as the fixed-n Clopper-Pearson bound at
    the stop (optional stopping): 79 violations (proposal = exact radius) against an allowance of 36, while
    alpha + 3 SE (128) alone would have passed it."""
    from models.surrogate import surrogate_answer
    from smoothing import proposal_radius

    s = request.getfixturevalue(bundle)
    service = s["service"]
    light = 200  # the first inputs one at a time (spare batch capacity), the others all at once
    certs = (_certify(service, s["x"][:light], at_once=1, mode="auto", per_input=True, alpha=ALPHA)
             + _certify(service, s["x"][light:], mode="auto", per_input=True, alpha=ALPHA))
    schedule = set(checkpoint_schedule(BUDGET).tolist())
    cal = service.manifest.calibration
    targets = 0
    for c, x, r in zip(certs, s["x"], s["radius"]):
        assert c.method == "sequential" and c.fallback_reason == "per_input_requested"
        assert c.guarantee.kind == "anytime-valid" and c.guarantee.alpha == ALPHA
        _assert_consistent(c)
        if c.stopped_by == "target":
            targets += 1
            z_hat = surrogate_answer(service.surrogate.forward(x[None]), cal, SIGMA, ALPHA).z_hat
            proposal = proposal_radius(z_hat, sigma=SIGMA)
            assert proposal == pytest.approx(s["scale"] * r, rel=1e-4, abs=1e-5)
            assert c.radius >= proposal and c.samples in schedule, (c.radius, proposal, c.samples)
    bad = _assert_sound(certs, s, "auto per_input (proposal)")
    expected = envelope(s["pA"])  # per input: an upper bound on its P(violation)
    sd = math.sqrt(float(np.sum(expected * (1 - expected))))
    assert bad.sum() <= expected.sum() + 4 * sd + 1, (int(bad.sum()), float(expected.sum()), sd)
    if s["scale"] < 1:  # a proposal below the truth is verified for most inputs
        assert targets >= 0.4 * len(certs), targets


def test_sequential_routes_under_a_wrong_prior_are_sound(exact):
    """mode=sequential (best-radius rule, speculation on) and sequential with target_radius = the EXACT radius (a
    'target' answer is then a type-I error: p_target = pA), both under the meta-learner's Beta(50, 1) prior fixed
    from the clean image: rate of p_lower > pA <= alpha + 3 SE. Every 'certified' stop certifies: on the code before
    this review, a best-radius job stopped while speculative samples were in flight could answer 'certified' with an
    abstention (3 of ~300 requests with pA in [0.5, 0.75])."""
    s, service = exact, exact["service"]
    certs = (_certify(service, s["x"][:100], at_once=1, mode="sequential", alpha=ALPHA)
             + _certify(service, s["x"][100:], mode="sequential", alpha=ALPHA))
    for c in certs:
        assert c.method == "sequential" and c.fallback_reason is None and c.guarantee.alpha == ALPHA
        _assert_consistent(c)
    _assert_sound(certs, s, "sequential best-radius, Beta(50, 1) prior")
    part = _first(s, N_INPUTS // 2)
    p = CertifyParams(mode="sequential", alpha=ALPHA)

    async def targeted():
        return await asyncio.gather(*[service._certify(x, p.model_copy(update={"target_radius": float(r)}),
                                                       request_id="t") for x, r in zip(part["x"], part["radius"])])

    certs = asyncio.run(targeted())
    for c, r in zip(certs, part["radius"]):
        _assert_consistent(c)
        if c.stopped_by == "target":
            assert c.radius >= r - 1e-9
    _assert_sound(certs, part, "sequential, target = exact radius, Beta(50, 1) prior")


def test_fixed_and_cohen_routes_under_the_meta_prior_are_sound(exact):
    """mode=fixed (n planned from the meta prior, class from the clean image) and mode=cohen at alpha 0.1: their
    Clopper-Pearson bounds are nearly exact, so the violation rate sits near alpha; <= alpha + 3 SE."""
    s, service = exact, exact["service"]
    fixed = _certify(service, s["x"], mode="fixed", alpha=ALPHA, max_samples=1000)
    for c in fixed:
        assert c.method == "fixed" and c.guarantee.kind == "clopper-pearson" and c.stopped_by == "planned"
        _assert_consistent(c)
    _assert_sound(fixed, s, "fixed, Beta(50, 1) prior")
    cohen = _certify(service, s["x"][:500], mode="cohen", alpha=ALPHA, max_samples=500)
    for c in cohen:
        assert c.method == "cohen" and c.samples == 600 and c.stopped_by == "budget"
    _assert_sound(cohen, _first(s, 500), "cohen")


@pytest.mark.parametrize("mode", ["sequential", "fixed"])
def test_deadline_cut_certificates_are_valid(exact, mode):
    """deadline_ms = 3 on 500 requests at once: most jobs are answered by the deadline watcher with the samples
    landed so far (a sequential job's anytime bound; a fixed job's Clopper-Pearson bound on a clock-cut n). Still
    valid per input: rate of p_lower > pA <= alpha + 3 SE; 'deadline' answers drew fewer samples than a full job."""
    s, service = _first(exact, 500), exact["service"]
    certs = _certify(service, s["x"], mode=mode, alpha=ALPHA, deadline_ms=3, max_samples=BUDGET)
    cut = [c for c in certs if c.stopped_by == "deadline"]
    assert len(cut) >= 0.2 * len(certs), {c.stopped_by for c in certs}
    for c in certs:
        assert c.method == mode
        _assert_consistent(c)
    assert all(c.samples < BUDGET for c in cut)
    _assert_sound(certs, s, f"{mode}, deadline 3 ms")
