"""Mutation audit, round 8b: the offline evaluation behind docs/results.md and docs/results-mnist.md
(calibration.evaluate, calibration.front, calibration.report and the `calibrate evaluate` entry point): certified
accuracy, mean radius (0 for abstentions and wrong classes), samples per image (Cohen's n0 counted), the surrogate's
per-level violations, the targets table, the routes and the radius-samples front.

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. Deterministic: the evaluation runs on the
embedded default bundle's real onnxruntime sessions over 8 chosen Fashion-MNIST test images (3 of them classified
wrong by the models), with SYNTHETIC seeded noise streams placed in its `--streams` cache (so every method's outcome
per image is designed: certain, abstaining, wrong class, NaN copies, a selection that disagrees with the clean class).
The round's tests of the row arithmetic on hand-made inputs, of the published report and of the entry point are in
tests/test_mutation_review8b_arithmetic.py.
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
from calibration.counts import images_digest
from calibration.data import load_dataset, load_npz
from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from models.priors import class_and_prior, softmax
from models.surrogate import surrogate_answers

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
