"""Mutation audit, round 8b (continued from tests/test_mutation_review8b.py): the row arithmetic of the offline
evaluation (calibration.evaluate's metrics and violations, the replay of the stopping rules, calibration.front's
points and targets, calibration.report's targets and names) on small hand-made inputs, the published report
(docs/results.md is the report of docs/results.json) and the `calibrate evaluate` entry point.

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import smoothing as sm
from calibration import evaluate as ev
from calibration import front
from calibration import report
from models.surrogate import SurrogateAnswers

ROOT = Path(__file__).resolve().parents[1]

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
