"""Section 3 of the statistics benchmark: the radius-samples front, and how the defaults were chosen.

Two populations, every method of :mod:`calibration.front` on each (alpha = 0.001, sigma = 0.25, budget 10,000):
* ``simulated``: pA drawn to resemble Fashion-MNIST at sigma = 0.25 (most images near 0.999+, some mid, 10% whose
  clean class is not the label) with a meta-like prior Beta(30 p~, 30 (1 - p~)), p~ a noisy estimate of pA;
* ``dev``: real noise streams of the default bundle on held-out images of its calibration split
  (``python -m bench.smoothing_dev``; never the test set), continued beyond the recorded prefix as
  Bernoulli(posterior mean of the prefix). The defaults of smoothing are chosen HERE, by :func:`choose_defaults`.
Each population also gets a "wrong meta" prior (the meta priors randomly permuted across images), to measure what a
useless meta-learner costs with and without the KT component of the mixture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit, logit

import smoothing as sm
from calibration import front

POPULATIONS = """Every method of `calibration/front.py` on two populations (alpha = 0.001, sigma = 0.25, budget 10,000;
sequential methods replayed at the engine's checkpoints):

* simulated: pA drawn to resemble Fashion-MNIST at sigma = 0.25 (55% with 1 - pA in [1e-5, 1e-3], 20% in
  [0.99, 0.999], 15% in [0.9, 0.99], 10% in [0.55, 0.9]; 10% of clean classes wrong), with a meta-like prior
  Beta(30 p~, 30 (1 - p~)), p~ = expit(logit(pA) + N(0, 0.7^2)); Cohen is given the clean class (an advantage);
* dev: real noise streams of the default bundle on held-out images of its calibration split (never the test set),
  continued beyond the recorded 2,048 samples as Bernoulli(posterior mean of the prefix); the defaults are chosen
  here. "wrong meta" = the meta priors randomly permuted across images (a meta-learner that knows the population but
  not the image), to measure what a useless meta-learner costs with and without the KT component.

Mean radius counts 0 for abstentions and wrong classes; Cohen's samples include its n0 = 100 selection samples."""

SIGMA, ALPHA, BUDGET, N0 = 0.25, 0.001, 10_000, 100
GAINS = (3e-5, 4e-5, 5e-5, 6e-5, 8e-5, 1.2e-4, 2e-4)
WRONG_GAINS = (2e-5, 3e-5, 5e-5, 8e-5)
PLAN_GAINS = (4e-5, 5e-5, 6e-5, 7e-5, 8e-5, 1e-4, 1.5e-4)
FRACTIONS = (0.6, 0.7, 0.775, 0.85)
FIXED_NS = (200, 400, 600, 800, 1000, 1500, 2000)
COHEN_NS = (250, 500, 1000, 2000)
WEIGHTS = (0.1, 0.25, 0.5)
#: Margin (radius units) by which a default must beat the previous default's mean radius on the dev streams, so that
#: the dev-to-test difference (the previous default: 0.4636 on dev, 0.459 on the test report) does not undo it.
RADIUS_MARGIN = 0.005


@dataclass
class Population:
    name: str
    hits: np.ndarray  # (N, BUDGET) cumulative hits of the clean-image class
    correct: np.ndarray  # clean-image class == label
    prior: np.ndarray  # (N, 2) meta(-like) Beta prior
    selected_correct: np.ndarray  # Cohen: class selected from n0 samples == label
    selected_hits: np.ndarray  # Cohen: cumulative hits of the selected class in separate estimation samples


def simulated_population(n_images: int, seed: int) -> Population:
    """pA: 55% with 1 - pA ~ LogUniform(1e-5, 1e-3), 20% in [0.99, 0.999], 15% in [0.9, 0.99], 10% in [0.55, 0.9];
    10% of clean classes wrong. Cohen's selection is taken to find the clean class (an advantage to Cohen)."""
    rng = np.random.default_rng([seed, 30])
    u = rng.random(n_images)
    one_minus = np.select([u < 0.55, u < 0.75, u < 0.9],
                          [10 ** rng.uniform(-5, -3, n_images), 10 ** rng.uniform(-3, -2, n_images),
                           10 ** rng.uniform(-2, -1, n_images)], 10 ** rng.uniform(-1, np.log10(0.45), n_images))
    p_a = 1 - one_minus
    correct = rng.random(n_images) >= 0.10
    hits = _cumulative(rng.random((n_images, BUDGET), dtype=np.float32) < p_a[:, None])
    guess = expit(logit(p_a) + 0.7 * rng.standard_normal(n_images))
    prior = np.stack([30 * guess, 30 * (1 - guess)], axis=1)
    cohen = _cumulative(rng.random((n_images, max(COHEN_NS)), dtype=np.float32) < p_a[:, None])
    return Population("simulated", hits, correct, prior, correct, cohen)


def dev_population(path: str | Path, seed: int) -> Population:
    """Real streams (``bench.smoothing_dev``) continued beyond their prefix as Bernoulli(posterior mean)."""
    d = np.load(path)
    stream, tested, label = d["stream"], d["tested_class"], d["label"]
    n_images, n_rec = stream.shape
    rng = np.random.default_rng([seed, 31])
    prefix = stream == tested[:, None]
    rate = (prefix.sum(axis=1) + 0.5) / (n_rec + 1.0)
    rest = rng.random((n_images, max(BUDGET - n_rec, 0)), dtype=np.float32) < rate[:, None]
    selected = d["selection"].argmax(axis=1)
    return Population("dev", _cumulative(np.concatenate([prefix, rest], axis=1)), tested == label,
                      d["prior"].astype(np.float64), selected == label, _cumulative(stream == selected[:, None]))


def _cumulative(x) -> np.ndarray:
    return np.cumsum(x, axis=1, dtype=np.int32)


def priors_of(pop: Population, seed: int, weights=WEIGHTS) -> dict:
    """name -> (a, b, kt_weight): KT, the meta prior alone and mixed with KT, and the same for a permuted ('wrong')
    meta prior (a meta-learner that knows the population but not the image)."""
    n = len(pop.correct)
    a, b = pop.prior[:, 0], pop.prior[:, 1]
    perm = np.random.default_rng([seed, 32]).permutation(n)
    out = {"KT": (np.full(n, sm.KT_PRIOR[0]), np.full(n, sm.KT_PRIOR[1]), 0.0)}
    for tag, (pa, pb) in (("meta", (a, b)), ("wrong meta", (a[perm], b[perm]))):
        out[tag] = (pa, pb, 0.0)
        out.update({f"{tag}+KT w={w:g}": (pa, pb, w) for w in weights})
    return out


def all_points(pop: Population, seed: int, *, weights=WEIGHTS) -> list[dict]:
    """Every method's points on ``pop``; the weights study (wrong meta at each weight) on a shorter lambda grid."""
    pri = priors_of(pop, seed, weights)
    kw = {"alpha": ALPHA, "sigma": SIGMA, "budget": BUDGET}
    mix = f"meta+KT w={sm.DEFAULT_KT_WEIGHT:g}"
    rows = front.cohen_points(pop.selected_correct, pop.selected_hits, COHEN_NS, N0, alpha=ALPHA, sigma=SIGMA)
    rows += front.fixed_points(pop.hits, pop.correct, FIXED_NS, alpha=ALPHA, sigma=SIGMA)
    planned = {k: pri[k] for k in ("KT", "meta", mix, "wrong meta", f"wrong {mix}")}
    rows += front.planned_points(pop.hits, pop.correct, planned, PLAN_GAINS, **kw)
    main = {k: v for k, v in pri.items() if not k.startswith("wrong")}
    rows += front.sequential_points(pop.hits, pop.correct, main, "gain", GAINS, **kw)
    wrong = {k: v for k, v in pri.items() if k.startswith("wrong")}
    rows += front.sequential_points(pop.hits, pop.correct, wrong, "gain", WRONG_GAINS, **kw)
    rows += front.sequential_points(pop.hits, pop.correct, {k: pri[k] for k in ("KT", "meta", mix)}, "fraction",
                                    FRACTIONS, **kw)
    return rows


def choose_defaults(rows: list[dict], weights=WEIGHTS) -> dict:
    """The rule that set smoothing's defaults, applied to the dev points (documented in the report).

    Reference: the previous default (e-process, fraction rule 0.775, meta prior) and its dev mean radius R.
    * kt_weight: minimax regret at radius R over two worlds, the real meta prior and a permuted one: for each weight
      w, the samples its gain-rule front needs for R relative to the best weight in that world; the w with the
      smallest worse-of-two regret.
    * lambdas (planned route, e-process gain rule, with the chosen mixture): the LARGEST lambda (fewest samples) of
      the grid whose dev mean radius is >= R + RADIUS_MARGIN."""
    ref = next(r for r in rows if r["method"] == "fraction" and r["prior"] == "meta" and r["param"] == 0.775)
    need = ref["radius"] + RADIUS_MARGIN
    regret = {}
    for world in ("meta", "wrong meta"):
        need_w = {w: front.samples_at_radius(front.family(rows, "gain", world if w == 0 else f"{world}+KT w={w:g}"),
                                             ref["radius"]) for w in (0.0, *weights)}
        regret[world] = {w: x / min(need_w.values()) - 1 for w, x in need_w.items()}
    minimax = min(regret["meta"], key=lambda w: max(regret["meta"][w], regret["wrong meta"][w]))
    mix = f"meta+KT w={sm.DEFAULT_KT_WEIGHT:g}"

    def largest(method):
        ok = [r for r in front.family(rows, method, mix) if r["radius"] >= need]
        return max(ok, key=lambda r: r["param"]) if ok else None

    return {"reference": ref, "needed_radius": need, "regret": regret, "kt_weight": minimax,
            "plan": largest("planned"), "gain": largest("gain")}


# ------------------------------------------------------------------------------------------------- reporting
MATCHED_RADII = (0.42, 0.44, 0.46, 0.48, 0.50)
PLOTTED_PRIORS = ("KT", "meta", f"meta+KT w={sm.DEFAULT_KT_WEIGHT:g}")


def table(headers, body) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def matched_table(rows: list[dict]) -> str:
    """Mean samples each method family needs for a given mean radius (interpolated along its front)."""
    keys = []
    for r in rows:
        if (r["method"], r["prior"]) not in keys:
            keys.append((r["method"], r["prior"]))
    body = []
    for method, prior in keys:
        fam = front.family(rows, method, prior)
        cells = [front.samples_at_radius(fam, x) for x in MATCHED_RADII]
        body.append([front.label(fam[0])] + ["—" if np.isnan(c) else f"{c:,.0f}" for c in cells])
    return table(["method (prior)"] + [f"samples for r = {x:g}" for x in MATCHED_RADII], body)


def points_table(rows: list[dict]) -> str:
    body = [[front.label(r), f"{r['param']:g}", f"{r['samples']:,.1f}", f"{r['radius']:.4f}",
             f"{r['certified_accuracy']['0']:.3f}", f"{r['certified_accuracy']['0.5']:.3f}"] for r in rows]
    return table(["method (prior)", "param", "mean samples", "mean radius", "cert. acc r=0", "cert. acc r=0.5"], body)


def defaults_text(d: dict, rows: list[dict]) -> str:
    ref, w = d["reference"], sm.DEFAULT_KT_WEIGHT
    regret = table(["kt_weight", "regret, real meta prior", "regret, permuted meta prior", "worse of two"],
                    [[f"{x:g}", f"{d['regret']['meta'][x]:+.1%}", f"{d['regret']['wrong meta'][x]:+.1%}",
                      f"{max(d['regret']['meta'][x], d['regret']['wrong meta'][x]):+.1%}"] for x in d["regret"]["meta"]])
    cohen1k = next(r for r in rows if r["method"] == "cohen" and r["param"] == 1000)
    lines = [f"Reference (the previous default): e-process, fraction rule 0.775, meta prior: {ref['samples']:,.0f} "
             f"mean samples, mean radius {ref['radius']:.4f} on these dev streams. Required of a new default: mean "
             f"radius >= {d['needed_radius']:.4f} (reference + {RADIUS_MARGIN}).", "",
             "KT weight (minimax regret at the reference radius, over the real and a permuted meta prior; samples "
             "relative to the best weight in each world):", "", regret, "",
             f"Rule's choice: kt_weight = {d['kt_weight']:g}; smoothing's DEFAULT_KT_WEIGHT = {w:g}"
             f"{'' if d['kt_weight'] == w else ' (DIFFERS: update smoothing/priors.py)'}.", ""]
    for key, const, value in (("plan", "DEFAULT_PLAN_GAIN (planned fixed-n route)", sm.DEFAULT_PLAN_GAIN),
                              ("gain", "DEFAULT_MIN_GAIN (e-process, marginal-gain rule)", sm.DEFAULT_MIN_GAIN)):
        r = d[key]
        if r is None:
            lines.append(f"- {const}: no lambda of the grid reaches the required radius.")
            continue
        same = "" if r["param"] == value else f" (DIFFERS from the code's {value:g})"
        lines.append(f"- {const}: lambda = {r['param']:g}{same}: {r['samples']:,.0f} mean samples "
                     f"({r['samples'] / ref['samples'] - 1:+.0%} vs the reference), mean radius {r['radius']:.4f}, "
                     f"certified accuracy at r = 0 {r['certified_accuracy']['0']:.3f}; Cohen-1k: "
                     f"{cohen1k['samples']:,.0f} samples, radius {cohen1k['radius']:.4f}.")
    return "\n".join(lines)


def section(pops: dict[str, list[dict]], defaults: dict | None, out_dir: Path, stem: str) -> str:
    """Markdown of section 3 (with one front plot per population written next to the report)."""
    parts = []
    for name, rows in pops.items():
        png = out_dir / f"{stem}-front-{name}.png"
        marks = []
        for key in ("plan", "gain"):
            if defaults and name == "dev" and defaults[key] is not None:
                marks.append({**defaults[key], "note": f"default ({key})"})
        shown = [r for r in rows if not r["prior"].startswith("wrong") and r["prior"] in PLOTTED_PRIORS + ("-",)]
        front.plot(shown, marks, png, f"{name} population: mean radius vs mean samples (alpha={ALPHA}, sigma={SIGMA}); "
                                      "wrong-meta and other weights: tables")
        parts += [f"### {name} population ({len(rows)} points)", "", f"![{name} front]({png.name})", "",
                  "Samples needed for a given mean radius (interpolated along each front; — where it does not reach):",
                  "", matched_table(rows), "", "<details><summary>every point</summary>", "", points_table(rows), "",
                  "</details>", ""]
    if defaults:
        parts += ["### How the defaults were chosen (dev streams only)", "", defaults_text(defaults, pops["dev"]), ""]
    return "\n".join(parts)


def front_section(args) -> str:
    """Section 3: fronts on the simulated population and (when present) the dev streams; defaults from dev."""
    sim_images = args.sim_images or (2000 if args.full else 500)
    pops = {"simulated": all_points(simulated_population(sim_images, args.seed), args.seed)}
    intro = [f"Simulated population: {sim_images} images (seed {args.seed})."]
    defaults = None
    if Path(args.dev).is_file():
        dev = dev_population(args.dev, args.seed)
        pops["dev"] = all_points(dev, args.seed)
        defaults = choose_defaults(pops["dev"])
        intro.append(f"Dev population: {len(dev.correct)} held-out calibration-split images of the default bundle "
                     f"from `{args.dev}` (recorded by `python -m bench.smoothing_dev --images 1500 --n 2048 --seed "
                     f"2025 --out {args.dev}`).")
    else:
        intro.append(f"Dev streams `{args.dev}` not found: dev front and defaults skipped.")
    intro.append(POPULATIONS)
    out = Path(args.out)
    return "\n\n".join(intro) + "\n\n" + section(pops, defaults, out.parent, out.stem)
