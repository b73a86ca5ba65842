"""The radius-samples front: every best-radius method as points (mean samples, mean certified radius).

Shared by the evaluation (``certserve calibrate evaluate``, real test streams) and the statistics benchmark
(``bench.smoothing_front``: simulated and held-out dev streams). Inputs are per-image cumulative hit counts of the class
fixed from the clean image, ``hits[i, t - 1] = S_t``, and whether that class is the label (a wrong class counts radius
0, as an abstention does). Sequential methods replay each stream at the engine's checkpoints
(:func:`smoothing.checkpoint_schedule`) and stop where the rule fires, so their sample counts are what the server
spends under load; at light load the engine's speculation lets a best-radius job draw to its next checkpoint while its
decision is pending (those samples count): ~10% more samples, a slightly larger radius (docs/speculation-cost.md).
Proposal and target jobs never run ahead.

Methods (``method`` field of a point; ``param`` is the knob swept along the front):
* ``cohen``: Cohen et al. (n0 selection samples + n estimation samples; param n);
* ``fixed``: clean-class fixed-n Clopper-Pearson (class from the clean image, no selection samples; param n);
* ``planned``: clean-class fixed-n with n planned per image from its prior (:func:`smoothing.planned_sample_size`;
  param lambda);
* ``gain`` / ``fraction``: the e-process with the marginal-gain rule (param lambda) or the fraction rule (param
  fraction) of :func:`smoothing.best_radius_decision`.
"""

from __future__ import annotations

import numpy as np

import smoothing as sm

RADII = (0.0, 0.25, 0.5, 0.75)


def point(correct, samples, radius, **info) -> dict:
    """One point: mean samples, mean radius (0 for abstentions and wrong classes), certified accuracy at RADII."""
    r = np.where(correct, radius, 0.0)
    cert = np.asarray(correct) & (np.asarray(radius) > 0)
    acc = {f"{x:g}": float(np.mean(cert & (r >= x))) for x in RADII}
    return {**info, "samples": float(np.mean(samples)), "radius": float(np.mean(r)), "certified_accuracy": acc}


def replay(hits, decide, budget: int):
    """Stop each image at the first checkpoint where ``decide(S, t, idx)`` != CONTINUE (idx: the images asked).
    Returns the samples used (the budget where nothing stopped earlier)."""
    n = len(hits)
    stop_t = np.full(n, budget)
    live = np.ones(n, dtype=bool)
    for t in sm.checkpoint_schedule(budget):
        idx = np.flatnonzero(live)
        if not len(idx):
            break
        d = np.asarray(decide(hits[idx, t - 1], np.full(len(idx), t), idx))
        done = idx[d != sm.Stop.CONTINUE]
        stop_t[done] = t
        live[done] = False
    return stop_t


def sequential_points(hits, correct, priors: dict, rule: str, params, *, alpha, sigma, budget) -> list[dict]:
    """The e-process under each prior {name: (a, b, kt_weight)} with ``rule`` ('gain' or 'fraction') at ``params``."""
    rows = []
    for name, (a, b, w) in priors.items():
        for param in params:
            kw = {"min_gain": param} if rule == "gain" else {"fraction": param}

            def decide(s, t, idx, a=a, b=b, w=w, kw=kw):
                return sm.best_radius_decision(s, t, sigma=sigma, alpha=alpha, budget=budget, a=a[idx], b=b[idx],
                                               kt_weight=w, **kw)

            used = replay(hits, decide, budget)
            s = hits[np.arange(len(hits)), used - 1]
            radius = np.asarray(sm.certified_radius(s, used, alpha, sigma, a, b, kt_weight=w))
            rows.append(point(correct, used, radius, method=rule, prior=name, param=param))
    return rows


def fixed_points(hits, correct, ns, *, alpha, sigma) -> list[dict]:
    """Clean-class fixed-n: class from the clean image, n fixed in advance, one Clopper-Pearson bound."""
    rows = []
    for n in ns:
        _, radius = sm.fixed_n_certificate(hits[:, n - 1], n, alpha, sigma)
        rows.append(point(correct, np.full(len(hits), n), radius, method="fixed", prior="-", param=int(n)))
    return rows


def planned_points(hits, correct, priors: dict, gains, *, alpha, sigma, budget) -> list[dict]:
    """Clean-class fixed-n with n = planned_sample_size(prior) per image, under each prior {name: (a, b, w)}."""
    rows = []
    for name, (a, b, w) in priors.items():
        for lam in gains:
            n = np.asarray(sm.planned_sample_size(a, b, sigma=sigma, alpha=alpha, budget=budget, min_gain=lam,
                                                  kt_weight=w))
            _, radius = sm.fixed_n_certificate(hits[np.arange(len(hits)), n - 1], n, alpha, sigma)
            rows.append(point(correct, n, radius, method="planned", prior=name, param=lam))
    return rows


def cohen_points(selected_correct, selected_hits, ns, n0: int, *, alpha, sigma) -> list[dict]:
    """Cohen: ``selected_hits[:, n - 1]`` hits of the class selected from n0 separate samples (strict abstain)."""
    rows = []
    for n in ns:
        p_lower = np.asarray(sm.clopper_pearson_lower(selected_hits[:, n - 1], n, alpha))
        radius = np.where(p_lower > 0.5, sm.radius_from_probability(p_lower, sigma), 0.0)
        rows.append(point(selected_correct, np.full(len(p_lower), n + n0), radius, method="cohen", prior="-",
                          param=int(n)))
    return rows


def samples_at_radius(rows: list[dict], radius: float) -> float:
    """Mean samples a method family's front needs for ``radius``: linear interpolation along its points sorted by
    samples (radius made monotone); nan where the front does not reach it."""
    pts = sorted((r["samples"], r["radius"]) for r in rows)
    xs, ys = np.array([p[0] for p in pts]), np.maximum.accumulate([p[1] for p in pts])
    if not len(xs) or radius > ys[-1] or radius < ys[0]:
        return float("nan")
    k = int(np.searchsorted(ys, radius))
    if k == 0 or ys[k] == ys[k - 1]:
        return float(xs[k])
    return float(xs[k - 1] + (xs[k] - xs[k - 1]) * (radius - ys[k - 1]) / (ys[k] - ys[k - 1]))


def family(rows: list[dict], method: str, prior: str = "-") -> list[dict]:
    return [r for r in rows if r["method"] == method and r["prior"] == prior]


def label(row: dict) -> str:
    names = {"cohen": "Cohen-n", "fixed": "clean-class fixed-n", "planned": "planned fixed-n",
             "gain": "e-process, marginal gain", "fraction": "e-process, fraction rule"}
    return names.get(row["method"], row["method"]) + ("" if row["prior"] == "-" else f" ({row['prior']})")


def plot(rows: list[dict], defaults: list[dict], path, title: str) -> None:
    """Mean radius against mean samples (log x), one line per method family (line style = method, colour = prior),
    defaults circled, legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"cohen": ("black", "--"), "fixed": ("grey", "-"), "planned": (None, "-"), "gain": (None, "-."),
              "fraction": (None, ":")}
    palette = plt.get_cmap("tab10").colors
    priors = sorted({r["prior"] for r in rows if r["prior"] != "-"})
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for method in styles:
        for prior in ["-", *priors]:
            pts = sorted(family(rows, method, prior), key=lambda r: r["samples"])
            if not pts:
                continue
            colour, style = styles[method]
            colour = colour or palette[priors.index(prior) % len(palette)]
            ax.plot([p["samples"] for p in pts], [p["radius"] for p in pts], ls=style, color=colour, marker="o",
                    ms=3, lw=1.4, label=label(pts[0]))
    for k, d in enumerate(defaults):
        ax.scatter([max(d["samples"], 1.0)], [d["radius"]], s=160, facecolors="none", edgecolors="red", lw=1.8, zorder=5)
        ax.annotate(d.get("note", "default"), (max(d["samples"], 1.0), d["radius"]), textcoords="offset points",
                    xytext=(10, -16 - 11 * k), fontsize=8, color="red")
    ax.set_xscale("log")
    ax.set_xlabel("mean samples per image")
    ax.set_ylabel("mean certified radius (0 if abstain or wrong)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the evaluation's front
EVAL_GAINS = (3e-5, 5e-5, 8e-5, 1.2e-4, 2e-4)
EVAL_PLAN_GAINS = (5e-5, 6e-5, 8e-5, 1e-4, 1.5e-4)
EVAL_FRACTIONS = (0.6, 0.7, 0.775, 0.85)
EVAL_FIXED_NS = (250, 500, 750, 1000, 1500, 2000, 5000)
EVAL_COHEN_NS = (250, 500, 1000, 2000, 5000, 10_000)


def evaluation_points(hits, correct, prior, selected_correct, selected_hits, *, n0, alpha, sigma,
                      budget) -> tuple[list[dict], list[dict]]:
    """Every method's front points on the evaluation's test streams, and the points of the defaults to mark.

    Priors: KT, the meta prior alone, and the meta prior mixed with KT at smoothing's default weight (what the server
    runs). Defaults marked: the planned fixed-n route and the e-process's marginal-gain rule (both with the default
    mixture and lambdas), and the previous default (fraction rule 0.775, meta prior) for reference."""
    n = len(correct)
    kt = (np.full(n, sm.KT_PRIOR[0]), np.full(n, sm.KT_PRIOR[1]), 0.0)
    w = sm.DEFAULT_KT_WEIGHT
    priors = {"KT": kt, "meta": (prior[:, 0], prior[:, 1], 0.0), f"meta+KT w={w:g}": (prior[:, 0], prior[:, 1], w)}
    kw = {"alpha": alpha, "sigma": sigma, "budget": budget}
    rows = cohen_points(selected_correct, selected_hits, [m for m in EVAL_COHEN_NS if m <= budget], n0,
                        alpha=alpha, sigma=sigma)
    rows += fixed_points(hits, correct, [m for m in EVAL_FIXED_NS if m <= budget], alpha=alpha, sigma=sigma)
    rows += planned_points(hits, correct, priors, sorted({*EVAL_PLAN_GAINS, sm.DEFAULT_PLAN_GAIN}), **kw)
    rows += sequential_points(hits, correct, priors, "gain", sorted({*EVAL_GAINS, sm.DEFAULT_MIN_GAIN}), **kw)
    rows += sequential_points(hits, correct, priors, "fraction", EVAL_FRACTIONS, **kw)
    mix = f"meta+KT w={w:g}"
    marks = [{**pick(rows, "planned", mix, sm.DEFAULT_PLAN_GAIN), "note": "default: planned fixed-n"},
             {**pick(rows, "gain", mix, sm.DEFAULT_MIN_GAIN), "note": "default: e-process gain rule"},
             {**pick(rows, "fraction", "meta", 0.775), "note": "previous default"}]
    return rows, marks


def pick(rows: list[dict], method: str, prior: str, param) -> dict:
    return next(r for r in rows if r["method"] == method and r["prior"] == prior and r["param"] == param)


def front_table(rows: list[dict]) -> list[str]:
    """Markdown lines: one row per point with certified accuracy at RADII."""
    lines = ["| method (prior) | param | mean samples | mean radius | " + " | ".join(f"r={x:g}" for x in RADII) + " |",
             "|---|---|---|---|" + "---|" * len(RADII)]
    for r in rows:
        acc = " | ".join(f"{r['certified_accuracy'][f'{x:g}']:.3f}" for x in RADII)
        lines.append(f"| {label(r)} | {r['param']:g} | {r['samples']:,.1f} | {r['radius']:.4f} | {acc} |")
    return lines


def front_targets(rows: list[dict], marks: list[dict]) -> list[tuple[str, str, bool]]:
    """Issue 10's targets on these points: (target, measured, met)."""
    out = []
    cohen1k = [r for r in rows if r["method"] == "cohen" and r["param"] == 1000]
    for mark in marks[:2]:
        name = mark["note"].removeprefix("default: ")
        out.append((f"{name}: mean radius >= 0.459 at <= 575 mean samples",
                    f"{mark['radius']:.4f} at {mark['samples']:,.0f}", mark["radius"] >= 0.459 and mark["samples"] <= 575))
        if cohen1k:
            c = cohen1k[0]
            out.append((f"{name} dominates Cohen-1k (fewer samples, larger mean radius)",
                        f"{mark['samples']:,.0f} vs {c['samples']:,.0f} samples, {mark['radius']:.4f} vs "
                        f"{c['radius']:.4f}", mark["samples"] < c["samples"] and mark["radius"] > c["radius"]))
    # meta vs KT at matched mean radius: at the default's radius, the samples the KT front needs (for the planned
    # route, KT plans the same n for every image: its prior-free counterpart is uniform clean-class fixed-n)
    for mark, (method, prior, what) in zip(marks[:2], (("fixed", "-", "uniform fixed-n, no prior"),
                                                       ("gain", "KT", "e-process gain rule, KT"))):
        kt = samples_at_radius(family(rows, method, prior), mark["radius"])
        ratio = mark["samples"] / kt
        out.append((f"meta prior <= 0.8 x KT mean samples at matched mean radius ({mark['note']} vs {what})",
                    f"{ratio:.2f} x ({mark['samples']:,.0f} vs {kt:,.0f}) at radius {mark['radius']:.4f}",
                    bool(ratio <= 0.8)))
    return out


def report_lines(rows: list[dict], marks: list[dict], png: str) -> list[str]:
    """The evaluation report's front section: plot, issue-10 targets, every point with certified accuracy."""
    lines = ["## Radius-samples front", "",
             "Every best-radius method on the same streams: Cohen-n (n0 selection samples counted), clean-class "
             "fixed-n Clopper-Pearson (class from the clean image), the planned fixed-n route (n per image from its "
             "prior), and the e-process with the marginal-gain rule (several lambda) and the fraction rule (several "
             "fractions), each with the KT prior, the meta prior, and their mixture (smoothing's default). Circled: "
             + "; ".join(f"{m['note']} ({label(m)}, param {m['param']:g})" for m in marks) + ".", "",
             f"![radius-samples front]({png})", "", "| target (issue 10) | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m_} | {'yes' if ok else 'NO'} |" for t, m_, ok in front_targets(rows, marks)]
    lines += ["", "Certified accuracy at radius r for every point of the front:", "", *front_table(rows), ""]
    return lines
