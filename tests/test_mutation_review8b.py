"""Mutation audit, round 8b: the offline evaluation behind docs/results.md and docs/results-mnist.md
(calibration.evaluate, calibration.front, calibration.report and the `calibrate evaluate` entry point): certified
accuracy, mean radius (0 for abstentions and wrong classes), samples per image (Cohen's n0 counted), the surrogate's
per-level violations, the targets table, the routes and the radius-samples front.

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. Deterministic: the evaluation runs on the
embedded default bundle's real onnxruntime sessions over 8 chosen Fashion-MNIST test images (3 of them classified
wrong by the models), with SYNTHETIC seeded noise streams placed in its `--streams` cache (so every method's outcome
per image is designed: certain, abstaining, wrong class, NaN copies, a selection that disagrees with the clean class).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

import smoothing as sm
from calibration import evaluate as ev
from calibration import front
from calibration import report
from calibration.counts import images_digest
from calibration.data import load_dataset, load_npz
from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from models.priors import class_and_prior, softmax
from models.surrogate import SurrogateAnswers, surrogate_answers

ROOT = Path(__file__).resolve().parents[1]
TEST_IDS = [0, 1, 4, 7, 12, 17, 23, 25]  # Fashion-MNIST test images; 12, 23 and 25: the clean class is wrong
N, N0, SEED, PER_SAMPLE = 5000, 100, 8, 1e-6
OTHER = 3  # a class no chosen image's clean class is
LATENCY = {"base": 1e-3, "surrogate": 2e-4, "meta": 1e-4}  # seconds per clean pass, fixed (measured otherwise)


# ------------------------------------------------------------------------------------------ the synthetic run
def _design(c, y) -> tuple[np.ndarray, np.ndarray]:
    """(selection counts (8, 10), streams (8, N)) for the chosen images, each row an outcome by design."""
    rng = np.random.default_rng(SEED)

    def iid(cls, p_hit, miss=OTHER):
        return np.where(rng.random(N) < p_hit, cls, miss)

    stream = np.stack([
        iid(c[0], 0.97),                                                   # certain, surrogate below 1.6 sigma
        np.concatenate([np.full(500, c[1]), iid(c[1], 0.9)[500:]]),        # hits front-loaded: k/N 0.91
        np.where(np.arange(N) % 2 == 0, c[2], OTHER),                      # pA 1/2: every method abstains
        iid(c[3], 0.99),                                                   # certain, surrogate >= 1.6 sigma
        iid(c[4], 0.95),                                                   # certain, but the clean class is wrong
        iid(c[5], 0.7, miss=-1),                                           # 30% NaN copies (label -1)
        iid(c[6], 0.99),                                                   # surrogate certifies a wrong class
        iid(y[7], 0.6, miss=c[7]),                                         # the label wins; clean class 0.4
    ]).astype(np.int8)
    selected = np.array([*c[:7], y[7]])  # Cohen's selection agrees with the clean class but on the last image
    selection = np.zeros((len(c), 10), dtype=np.int64)
    selection[np.arange(len(c)), selected] = N0
    return selection, stream


def _npz_and_cache(tmp: Path, bundle) -> tuple[str, str]:
    fm = load_dataset("fashion-mnist")
    pixels = lambda a: np.round(a[:, 0] * 255).astype(np.uint8)  # noqa: E731
    data = tmp / "chosen.npz"
    np.savez(data, x=pixels(fm.x_train[:20]), y=fm.y_train[:20], x_test=pixels(fm.x_test[TEST_IDS]),
             y_test=fm.y_test[TEST_IDS], classes=np.array(bundle.manifest.classes))
    x = load_npz(data).x_test
    roles = [bundle.backend(r, device="cpu") for r in ("base", "surrogate", "meta")]
    c, _ = class_and_prior(*roles, x)
    selection, stream = _design(c, load_npz(data).y_test)
    key = {"model": bundle.model_sha256, "data": str(data), "images": len(x), "n": N, "n0": N0, "seed": SEED,
           "sigma": bundle.manifest.sigma, "sampler_sha256": None}
    info = {"key": key, "images_sha256": images_digest(x), "sampler": "synthetic", "per_sample": PER_SAMPLE,
            "seconds": 0.5}
    cache = tmp / "streams.npz"
    np.savez_compressed(cache, selection=selection, stream=stream, info=json.dumps(info))
    return str(data), str(cache)


def _args(tmp: Path, data: str, cache: str, **over) -> argparse.Namespace:
    base = dict(bundle=str(DEFAULT_BUNDLE_DIR), images=len(TEST_IDS), n=N, n0=N0, alpha=0.001, fraction=None,
                data=data, sampler=None, device="cpu", batch_size=64, seed=SEED, out=str(tmp / "r.md"), json=None,
                streams=cache, auto_budget=None, auto_min_surrogate_z=None)
    return argparse.Namespace(**{**base, **over})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(result, clean pass facts) of one evaluation over the synthetic streams, and the inputs to recompute it."""
    tmp = tmp_path_factory.mktemp("eval8b")
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    data, cache = _npz_and_cache(tmp, bundle)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "_clean_latency", lambda bundle, x: dict(LATENCY))
        res = ev.evaluate(_args(tmp, data, cache))
    ds = load_npz(Path(data))
    sur, meta, base = (bundle.backend(r, device="cpu") for r in ("surrogate", "meta", "base"))
    logits = sur.forward(ds.x_test)
    c, prior = class_and_prior(base, sur, meta, ds.x_test, softmax(logits))
    with np.load(cache) as d:
        stream = d["stream"]
    facts = dict(y=ds.y_test, c=c, prior=prior, logits=logits, stream=stream, cal=bundle.manifest.calibration,
                 hits=np.cumsum(stream == c[:, None], axis=1), tmp=tmp, data=data, cache=cache)
    return res, facts


def _front(res, method, prior, param) -> dict:
    return front.pick(res["front"], method, prior, param)


def _same_point(row: dict, pt: dict) -> None:
    assert row["samples_mean"] == pytest.approx(pt["samples"], rel=1e-12)
    assert row["mean_radius_all"] == pytest.approx(pt["radius"], rel=1e-12)
    for r in front.RADII:
        assert row["certified_accuracy"][f"{r:g}"] == pytest.approx(pt["certified_accuracy"][f"{r:g}"]), r


# ----------------------------------------------------------------------------- evaluate(): what each row counts
def test_the_chosen_images_give_the_designed_outcomes(run):
    """Guards the fixture: 3 wrong clean classes, the surrogate certifies a wrong class, auto mixes its routes."""
    res, f = run
    assert list(f["c"] != f["y"]) == [False] * 4 + [True, False, True, True]
    assert 0 < res["methods"]["auto"]["surrogate_share"] < 1


def test_cohen_rows_are_the_fronts_cohen_points_with_n0_counted(run):
    """Mutants: Cohen's samples without n0 (n instead of n + n0), counts over the wrong part of the stream, the NaN
    copies left out of n (`trials` dropped), the front's selected class or its correctness check swapped for the
    clean class, the front's n0 not forwarded, Cohen-n/10 computed at n/100."""
    res, _ = run
    for name, n in (("cohen-5k", N), ("cohen-500", 500)):
        row = res["methods"][name]
        assert row["samples_mean"] == n + N0
        _same_point(row, _front(res, "cohen", "-", n))


def test_cohen_counts_abstentions_and_wrong_classes_as_zero(run):
    """Mutants: certified accuracy or mean radius counting an abstention (pA = 1/2) or a certified wrong class."""
    res, _ = run
    cohen = res["methods"]["cohen-5k"]
    # certified and correct: images 0, 1, 3, 5 (70% hits of 5000 with n counting the NaN copies) and 7 (selection)
    assert cohen["certified_accuracy"]["0"] == 5 / 8 and cohen["abstain_rate"] == 1 / 8


def test_cohen_bounds_count_nan_copies_as_misses(run):
    """Mutant: certify(..., trials=n) dropped: image 5's 30% NaN copies left out of n, its bound near 1 instead of
    about 0.68 (certified accuracy at r = 0.75 then counts it)."""
    res, _ = run
    assert res["methods"]["cohen-5k"]["certified_accuracy"]["0.75"] == 0.0


def test_sequential_rows_are_the_fronts_gain_points(run):
    """Mutants: the sequential rows' prior swapped or dropped, their hits counted for the label instead of the
    clean class, the front's KT/meta/mixed priors built wrongly, its correctness check dropped."""
    res, _ = run
    _same_point(res["methods"]["sequential-kt"], _front(res, "gain", "KT", sm.DEFAULT_MIN_GAIN))
    mix = f"meta+KT w={sm.DEFAULT_KT_WEIGHT:g}"
    _same_point(res["methods"]["sequential-meta"], _front(res, "gain", mix, sm.DEFAULT_MIN_GAIN))


def test_sequential_abstention_is_no_certified_class(run):
    """Mutant: a sequential row's class kept where its radius is 0 (`radius >= 0`): the pA = 1/2 image then counts
    as certified at r = 0."""
    res, _ = run
    for name in ("sequential-kt", "sequential-meta", "per-input"):
        # certified and correct: 0, 1, 3, 5; abstaining: 2 (pA 1/2) and 7 (its clean class has 40% of the hits)
        assert res["methods"][name]["certified_accuracy"]["0"] == 4 / 8, name
        assert res["methods"][name]["abstain_rate"] == 2 / 8, name


def _per_input(res, f) -> tuple[np.ndarray, np.ndarray]:
    """Per image (samples, radius) of the server's per-input path: the surrogate's proposal, the meta prior."""
    ans = surrogate_answers(f["logits"], f["cal"], 0.25, 0.001)
    budget = res["methods"]["per-input"]["budget"]
    return ev.replay_per_input(f["hits"][:, :budget], f["prior"], sm.proposal_radius(ans.z_hat, sigma=0.25),
                               0.001, 0.25, budget)


def test_per_input_row_replays_the_proposal_with_the_meta_prior(run):
    """Mutants: per-input replayed without the surrogate's proposal, with the KT prior, or past the auto budget."""
    res, f = run
    used, radius = _per_input(res, f)
    assert res["methods"]["per-input"]["samples_mean"] == pytest.approx(used.mean())
    ok = f["c"] == f["y"]
    assert res["methods"]["per-input"]["mean_radius_all"] == pytest.approx(np.where(ok, radius, 0).mean())


def test_surrogate_rows_count_certified_correct_images_only(run):
    """Mutants: the surrogate's class kept where it abstains (`radius >= 0`), its wrong-class certificate (image 6)
    counted in the mean radius, surrogate_levels computed at the request alpha instead of each level."""
    res, f = run
    ok = f["c"] == f["y"]
    for level in f["cal"].levels:
        ans = surrogate_answers(f["logits"], f["cal"], 0.25, level.alpha)
        row = res["surrogate_levels"][f"{level.alpha:g}"]
        assert row["certified_accuracy"]["0"] == np.mean(ok & (ans.radius > 0))
        assert row["mean_radius_all"] == pytest.approx(np.mean(np.where(ok, ans.radius, 0.0)))
        assert row["certified"] == int((ans.radius > 0).sum())
    same = {k: v for k, v in res["methods"]["surrogate"].items() if k not in ("level", "ms_per_image")}
    assert same == {k: v for k, v in res["surrogate_levels"]["0.001"].items() if k in same}


def test_violations_use_all_n_test_samples_at_each_level(run):
    """Mutants: violations counted on Cohen-n/10's counts (image 1's first 500 samples are all hits, its k/N 0.91
    is below the surrogate's p_lower 0.998), or every level given the request level's violations."""
    res, f = run
    k = (f["stream"] == f["c"][:, None]).sum(axis=1)
    for level in f["cal"].levels:
        ans = surrogate_answers(f["logits"], f["cal"], 0.25, level.alpha)
        row = res["surrogate_levels"][f"{level.alpha:g}"]
        cert = ans.radius > 0
        assert row["violations_vs_point_estimate"] == int(np.sum(cert & (ans.p_lower > k / N)))
        upper = np.asarray(sm.clopper_pearson_upper(k, N, 0.001))
        assert row["violations_vs_cp_upper"] == int(np.sum(cert & (ans.p_lower > upper)))
    assert res["surrogate_levels"]["0.001"]["violations_vs_point_estimate"] >= 1


def test_auto_row_is_the_surrogate_where_it_routes_else_per_input(run):
    """Mutants: auto's two sources swapped, its share counted as every certified surrogate answer."""
    res, f = run
    ans = surrogate_answers(f["logits"], f["cal"], 0.25, 0.001)
    use = (ans.radius > 0) & (ans.radius >= 1.6 * 0.25)
    auto = res["methods"]["auto"]
    assert auto["surrogate_share"] == use.mean() < (ans.radius > 0).mean()
    used, radius = _per_input(res, f)
    assert auto["samples_mean"] == pytest.approx(np.where(use, 0, used).mean())
    ok = f["c"] == f["y"]
    assert auto["mean_radius_all"] == pytest.approx(np.where(ok, np.where(use, ans.radius, radius), 0).mean())


def test_route_marks_on_the_front_are_the_route_rows(run):
    """Mutants: a route mark's samples or radius taken from the wrong field, the surrogate's correctness from the
    clean class, the route set incomplete."""
    res, _ = run
    marks = {m["note"]: m for m in res["front_defaults"]}
    for name in ("surrogate", "auto", "per-input"):
        _same_point(res["methods"][name], marks[f"route: {name}"])


def test_front_defaults_are_the_servers_defaults(run):
    """Mutants: the planned mark picked at the e-process's lambda (also a swept planned value), the gain mark under
    the meta prior alone, the meta-alone front mixed with KT."""
    res, _ = run
    mix = f"meta+KT w={sm.DEFAULT_KT_WEIGHT:g}"
    planned, gain, previous = res["front_defaults"][:3]
    assert (planned["method"], planned["prior"], planned["param"]) == ("planned", mix, sm.DEFAULT_PLAN_GAIN)
    assert (gain["method"], gain["prior"], gain["param"]) == ("gain", mix, sm.DEFAULT_MIN_GAIN)
    assert (previous["method"], previous["prior"], previous["param"]) == ("fraction", "meta", 0.775)
    assert {r["prior"] for r in res["front"] if r["method"] == "gain"} == {"KT", "meta", mix}
    _, f = run
    meta_alone = {"meta": (f["prior"][:, 0], f["prior"][:, 1], 0.0)}
    again = front.sequential_points(f["hits"], f["c"] == f["y"], meta_alone, "fraction", [0.775], alpha=0.001,
                                    sigma=0.25, budget=N)[0]
    assert again == {k: v for k, v in previous.items() if k != "note"}
    assert any(r["method"] == "cohen" and r["param"] == N for r in res["front"])  # n = budget is a point


def test_ms_per_image_is_samples_at_the_runs_cost_plus_the_clean_passes(run):
    """Mutant: Cohen's time per image without the n0 selection samples."""
    m = run[0]["methods"]
    ms = lambda samples, clean: pytest.approx((PER_SAMPLE * samples + clean) * 1e3)  # noqa: E731
    assert m["cohen-5k"]["ms_per_image"] == ms(N + N0, LATENCY["base"])
    assert m["cohen-500"]["ms_per_image"] == ms(500 + N0, LATENCY["base"])
    seq = m["sequential-meta"]["samples_mean"]
    assert m["sequential-meta"]["ms_per_image"] == ms(seq, sum(LATENCY.values()))
    assert m["surrogate"]["ms_per_image"] == ms(0, LATENCY["surrogate"])


def test_auto_budget_and_threshold_arguments_are_used(run):
    """Mutants: --auto-budget ignored (the server's 4,000), --auto-min-surrogate-z ignored (the server's 1.6),
    --fraction not forwarded to the sequential rows."""
    res, f = run
    other = ev.evaluate(_args(f["tmp"], f["data"], f["cache"], auto_budget=200, auto_min_surrogate_z=0.0,
                              fraction=0.6))
    ans = surrogate_answers(f["logits"], f["cal"], 0.25, 0.001)
    assert other["methods"]["auto"]["surrogate_share"] == (ans.radius > 0).mean()
    assert other["methods"]["per-input"]["budget"] == 200 and other["methods"]["per-input"]["samples_mean"] <= 200
    # --fraction: the sequential rows are the front's fraction-rule points (mutant: --fraction ignored)
    _same_point(other["methods"]["sequential-kt"], _front(other, "fraction", "KT", 0.6))


# ---------------------------------------------------------------------------------------- the row arithmetic
def test_metrics_of_a_five_image_table():
    """Mutants in _metrics: mean radius over every certificate (wrong classes too), the certified-correct mean over
    every certified image, samples (cert.) / (rest) split by certified instead of certified and correct, certified
    accuracy at radius > r instead of >= r."""
    y = np.array([1, 1, 2, 3, 4])
    cls = np.array([1, 2, 2, -1, 4])  # correct, wrong class, correct, abstain, correct
    radius = np.array([0.5, 0.9, 0.25, 0.0, 0.1])
    m = ev._metrics(y, cls, radius, np.array([100, 200, 300, 400, 800]), np.full(5, 0.002))
    assert m["certified_accuracy"] == {"0": 0.6, "0.25": 0.4, "0.5": 0.2, "0.75": 0.0, "1": 0.0}
    assert m["mean_radius_all"] == pytest.approx(0.85 / 5)
    assert m["mean_radius_certified_correct"] == pytest.approx(0.85 / 3)
    assert m["abstain_rate"] == 0.2 and m["samples_mean"] == 360.0
    assert m["samples_certified"] == 400.0 and m["samples_rest"] == 300.0
    assert m["ms_per_image"] == pytest.approx(2.0)


def test_violations_against_the_cp_upper_bound_and_k_over_n():
    """Mutants in _violations: the upper bound at level 0.01 instead of 0.001, abstentions counted, k / (n + 1),
    `>=` instead of `>` against k/n, every row counted as certified."""
    counts = np.array([[930, 70], [800, 200], [10, 990], [900, 100], [500, 500], [1000, 0]])
    ans = SurrogateAnswers(class_index=np.array([0, 0, 1, 0, 0, 0]), log_odds=np.zeros(6), z_hat=np.zeros(6),
                           p_lower=np.array([0.95, 0.95, 0.95, 0.9, 0.6, 0.9995]),
                           radius=np.array([0.4, 0.4, 0.4, 0.3, 0.0, 0.8]), level=0.01)
    # row 0: above k/n only; row 1: above the CP upper bound too; row 3: p_lower == k/n; row 4 abstains
    assert ev._violations(ans, counts, 1000) == {"certified": 5, "violations_vs_cp_upper": 1,
                                                 "violations_vs_point_estimate": 2}


def test_replay_stops_at_the_first_checkpoint_where_the_rule_fires():
    """Mutants in front.replay: the count read one sample late (hits[:, t]) or early, a stopped image decided again
    at later checkpoints, the default stop not the budget."""
    hits = np.tile(np.arange(1, 301), (3, 1))  # every sample a hit ...
    hits[0, 70:] -= 1  # ... but sample 71 of image 0 (a checkpoint) and sample 100 of image 1
    hits[1, 99:] -= 1

    def first_miss(s, t, idx):
        return np.where(s < t, sm.Stop.FUTILITY, sm.Stop.CONTINUE)

    assert list(front.replay(hits, first_miss, 300)) == [71, 106, 300]


def _streams(n_images=12, length=2000, seed=5):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.5, 1.0, n_images)
    return np.cumsum(rng.random((n_images, length)) < p[:, None], axis=1), np.arange(n_images) % 4 != 0


def test_front_points_are_their_definitions():
    """Mutants in front.fixed_points / planned_points / cohen_points / sequential_points: S read at n instead of
    n - 1, Cohen's samples without n0, the prior's KT weight not forwarded to the plan or the bound."""
    hits, ok = _streams()
    kw = dict(alpha=0.001, sigma=0.25)
    a, b = np.full(12, 20.0), np.full(12, 2.0)
    mean_r = lambda r: float(np.mean(np.where(ok, r, 0.0)))  # noqa: E731
    fixed = front.fixed_points(hits, ok, [500], **kw)[0]
    assert fixed["samples"] == 500 and fixed["radius"] == mean_r(sm.fixed_n_certificate(hits[:, 499], 500, **kw)[1])
    cohen = front.cohen_points(ok, hits, [500], 100, **kw)[0]
    p = np.asarray(sm.clopper_pearson_lower(hits[:, 499], 500, 0.001))
    assert cohen["samples"] == 600
    assert cohen["radius"] == mean_r(np.where(p > 0.5, sm.radius_from_probability(p, 0.25), 0.0))
    planned = front.planned_points(hits, ok, {"meta": (a, b, 0.6)}, [8e-5], budget=2000, **kw)[0]
    n = np.asarray(sm.planned_sample_size(a, b, budget=2000, min_gain=8e-5, kt_weight=0.6, **kw))
    assert planned["samples"] == n.mean()
    assert planned["radius"] == mean_r(sm.fixed_n_certificate(hits[np.arange(12), n - 1], n, **kw)[1])
    seq = front.sequential_points(hits, ok, {"meta": (a, b, 0.0)}, "gain", [5e-5], budget=2000, **kw)[0]

    def decide(s, t, idx):
        return sm.best_radius_decision(s, t, budget=2000, a=a[idx], b=b[idx], kt_weight=0.0, min_gain=5e-5, **kw)

    used = front.replay(hits, decide, 2000)
    r = sm.certified_radius(hits[np.arange(12), used - 1], used, 0.001, 0.25, a, b, kt_weight=0.0)
    assert seq["samples"] == used.mean() and seq["radius"] == mean_r(np.asarray(r))


def test_a_point_counts_radius_zero_for_abstentions_and_wrong_classes():
    """Mutants in front.point: the radius of a wrong class averaged in, an abstention with the right class counted
    as certified at r = 0."""
    pt = front.point(np.array([True, False, True, True]), [10, 20, 30, 40], np.array([0.5, 0.9, 0.0, 0.3]), tag=1)
    assert pt == {"tag": 1, "samples": 25.0, "radius": 0.2,
                  "certified_accuracy": {"0": 0.5, "0.25": 0.5, "0.5": 0.25, "0.75": 0.0}}


def test_samples_at_radius_interpolates_along_the_monotone_front():
    """Mutants in front.samples_at_radius: the front not made monotone, a radius below (or above) the front
    answered instead of nan, the interpolation's denominator."""
    rows = [{"samples": s, "radius": r} for s, r in ((100, 0.2), (200, 0.3), (400, 0.25), (800, 0.5))]
    assert front.samples_at_radius(rows, 0.25) == pytest.approx(150.0)
    assert front.samples_at_radius(rows, 0.4) == pytest.approx(600.0)
    assert front.samples_at_radius(rows, 0.5) == 800.0 and front.samples_at_radius(rows, 0.2) == 100.0
    assert np.isnan(front.samples_at_radius(rows, 0.1)) and np.isnan(front.samples_at_radius(rows, 0.51))


def test_front_targets_met_exactly_as_stated():
    """Mutants in front.front_targets: `>` / `<` at the 0.459 / 575 limits, dominance with `or`, the sample ratio
    inverted or met at < 0.8, the marks' prior-free counterparts swapped."""
    mark = lambda note, s, r: {"note": note, "samples": s, "radius": r, "method": "m", "prior": "p"}  # noqa: E731
    marks = [mark("default: planned fixed-n", 575.0, 0.459), mark("default: e-process gain rule", 1200.0, 0.46)]
    rows = [{"method": "cohen", "prior": "-", "param": 1000, "samples": 1100.0, "radius": 0.45},
            {"method": "fixed", "prior": "-", "param": 700, "samples": 718.75, "radius": 0.459},
            {"method": "gain", "prior": "KT", "param": 5e-5, "samples": 1000.0, "radius": 0.46}]
    met = [ok for _, _, ok in front.front_targets(rows, marks)]
    assert met == [True, True, False, False, True, False]


def test_report_targets_met_exactly_as_stated():
    """Mutants in report.targets: the radius ratio of the certified-correct mean, the samples limit dropped, the
    surrogate's r = 0.5 condition joined with `or`, the accuracy gap's sign, a level's rate over the certified
    images or met at < level."""
    row = lambda acc0, acc5, r, rc, s: {"certified_accuracy": {"0": acc0, "0.5": acc5},  # noqa: E731
                                        "mean_radius_all": r, "mean_radius_certified_correct": rc, "samples_mean": s}
    res = {"n": 10000, "images": 100, "methods": {
        "cohen-10k": row(0.75, 0.5, 0.5, 0.7, 10100.0), "surrogate": row(0.75, 0.375, 0.4, 0.9, 0.0),
        "auto": row(0.75, 0.5, 0.375, 0.1, 150.0), "per-input": row(0.5, 0.5, 0.5, 0.7, 10.0)},
        "surrogate_levels": {"0.1": {"violations_vs_point_estimate": 10, "certified": 20},
                             "0.01": {"violations_vs_point_estimate": 2, "certified": 90}}}
    assert [ok for _, _, ok in report.targets(res)] == [False, True, False, True, False]
    res["methods"]["surrogate"]["certified_accuracy"]["0.5"] = 0.4
    res["methods"]["auto"]["samples_mean"] = 151.0
    assert [ok for _, _, ok in report.targets(res)][:2] == [True, False]


def test_short_names_and_the_small_cohen_run():
    """Mutants: short_n naming 1,500 samples '1k', _small_n uncapped (Cohen-2k at n = 20,000) or at n / 100."""
    assert [report.short_n(n) for n in (10000, 1500, 500, 2000)] == ["10k", "1500", "500", "2k"]
    assert [ev._small_n(n) for n in (20000, 10000, 5000, 5)] == [1000, 1000, 500, 1]


def test_replays_forward_the_fraction_and_the_per_input_lambda():
    """Mutants: _replay_sequential ignoring --fraction; replay_per_input's proposal or best-radius branch at the
    default lambda instead of PER_INPUT_MIN_GAIN."""
    hits, _ = _streams()
    a, b = np.full(12, 20.0), np.full(12, 2.0)
    kw = dict(sigma=0.25, alpha=0.001, budget=2000)

    def fraction(s, t, idx):
        return sm.best_radius_decision(s, t, a=a[idx], b=b[idx], fraction=0.6, **kw)

    used, _ = ev._replay_sequential(hits, a, b, 0.001, 0.25, 2000, 0.6)
    assert np.array_equal(used, front.replay(hits, fraction, 2000))
    far = np.where(np.arange(12) % 2 == 0, 5.0, 0.0)  # never verified, or no proposal: best radius decides

    def per_input(s, t, idx):
        lam = dict(a=a[idx], b=b[idx], min_gain=sm.PER_INPUT_MIN_GAIN, **kw)
        return np.where(far[idx] > 0, sm.proposal_decision(s, t, proposal_radius=np.maximum(far[idx], 1.0), **lam),
                        sm.best_radius_decision(s, t, **lam))

    used, _ = ev.replay_per_input(hits, np.stack([a, b], axis=1), far, 0.001, 0.25, 2000)
    assert np.array_equal(used, front.replay(hits, per_input, 2000))


# ------------------------------------------------------------------------------ the report and the entry point
def test_docs_results_md_is_the_report_of_docs_results_json(tmp_path):
    """The published report is write_report of the published raw results, byte for byte: guards every table, label,
    target and yes/NO of report.write_report and front.report_lines (mutants: the targets' or the front table's
    columns swapped, a target's limit changed, auto's threshold in sigmas printed as a radius, the front's labels
    swapped, a level's rate over the certified images, ...)."""
    report.write_report(json.loads((ROOT / "docs/results.json").read_text()), tmp_path / "results.md")
    assert (tmp_path / "results.md").read_text() == (ROOT / "docs/results.md").read_text()


def test_evaluate_defaults_are_the_published_settings():
    """Mutants in the `calibrate evaluate` arguments: the defaults behind docs/results.md (1,000 images, n = 10,000,
    n0 = 100, alpha = 0.001, the marginal-gain rule, seed 12345) changed."""
    from cli.main import build_parser

    args = build_parser().parse_args(["calibrate", "evaluate"])
    assert (args.images, args.n, args.n0, args.alpha, args.fraction, args.seed) == (1000, 10000, 100, 0.001, None, 12345)
    assert (args.auto_budget, args.auto_min_surrogate_z, args.out, args.func) == (None, None, "docs/results.md", ev.run)


def test_evaluate_entry_point_writes_the_report_the_json_and_its_own_command(tmp_path, monkeypatch):
    """`certserve calibrate evaluate` through cli.main.main(argv): the report names the command it was given and
    --json writes the raw results. Real bug, fixed in this round: the report's Command line read the host
    process's sys.argv[3:] (here pytest's arguments), not main's argv (as `calibrate all` records since round 7e).
    Mutant too: --json not written."""
    from cli.main import main

    res = json.loads((ROOT / "docs/results.json").read_text())
    monkeypatch.setattr(ev, "evaluate", lambda args: json.loads(json.dumps(res)))
    monkeypatch.setattr("sys.argv", ["pytest", "-q", "tests/x.py", "--not-this"])
    out, raw = tmp_path / "r.md", tmp_path / "r.json"
    assert main(["calibrate", "evaluate", "b", "--images", "7", "--out", str(out), "--json", str(raw)]) == 0
    line = f"Command: `certserve calibrate evaluate b --images 7 --out {out} --json {raw}`"
    assert out.read_text().splitlines()[2] == line
    assert json.loads(raw.read_text())["methods"] == res["methods"]
