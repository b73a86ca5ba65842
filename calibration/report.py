"""The evaluation report (``certserve calibrate evaluate``): tables, targets, plots, from :func:`evaluate`'s result."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration import front
from smoothing import DEFAULT_MIN_GAIN

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def short_n(n: int) -> str:
    """10000 -> '10k' (report names such as cohen-10k)."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _rule(res: dict) -> str:
    if res.get("fraction") is None:
        return f"best-radius marginal-gain rule (lambda = {res.get('min_gain', DEFAULT_MIN_GAIN):g})"
    return f"best-radius fraction rule (fraction = {res['fraction']})"


def plots(y, raw, folder: Path, stem: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    grid = np.linspace(0, 1.2, 241)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (cls, radius, _, _) in raw.items():
        ok = (cls == y) & (cls >= 0)
        ax.plot(grid, [np.mean(ok & (radius >= r)) for r in grid], label=name)
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", title="Certified accuracy vs radius")
    ax.grid(alpha=0.3)
    ax.legend()
    acc_png = folder / f"{stem}-certified-accuracy.png"
    fig.savefig(acc_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [n for n in raw if n != "surrogate"]
    ax.boxplot([np.maximum(raw[n][2], 1) for n in names], tick_labels=names, showfliers=False)
    ax.set_yscale("log")
    ax.set(ylabel="base-model samples per image (log)", title="Samples per image (surrogate: 0, one forward pass)")
    ax.tick_params(axis="x", rotation=20)
    samples_png = folder / f"{stem}-samples.png"
    fig.savefig(samples_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"certified_accuracy": acc_png.name, "samples": samples_png.name}


TARGETS_NOTE = """Targets (issue 9, against Cohen-n on the same images and streams): the surrogate at the bundle's
lowest level alpha_cal within 1 pp of Cohen's certified accuracy at r = 0, mean radius >= 0.8 x Cohen's and certified
accuracy at r = 0.5 >= 0.8 x Cohen's, with 0 samples; auto (surrogate, else the per-input path) within 1 pp, >= 0.75 x
the radius, <= 150 mean samples; per-input (auto + per_input=true) within 1 pp, >= 0.75 x, <= 300 mean samples.
Violations (per risk level, table below): a surrogate certificate whose p_lower exceeds a (1 - 0.001) Clopper-Pearson
upper bound on pA from the n test samples (clear violations), or the point estimate k/n (over-counts). At levels 0.1
and 0.05 a few hundred test images measure the rate; at 0.001 nothing this size can, and the guarantee rests on the
conformal argument and the simulations in tests/."""


def targets(res: dict) -> list[tuple[str, str, bool]]:
    meth = res["methods"]
    cohen = meth[f"cohen-{short_n(res['n'])}"]
    rows = []
    specs = {"surrogate": (0.8, 0.0), "auto": (0.75, 150.0), "per-input": (0.75, 300.0)}
    for name, (radius_ratio, max_samples) in specs.items():
        if name not in meth:
            continue
        v = meth[name]
        # gap and r = 0.5 ratio: of fractions of the images; rounded to 9 decimals, so that an exact 1 pp or 0.8 x is
        # met ((0.893 - 0.883) * 100 is 1.0000000000000009 in floats)
        gap = (cohen["certified_accuracy"]["0"] - v["certified_accuracy"]["0"]) * 100
        ratio = v["mean_radius_all"] / max(cohen["mean_radius_all"], 1e-9)
        ok = round(gap, 9) <= 1.0 and ratio >= radius_ratio and v["samples_mean"] <= max_samples
        measured = f"{gap:+.2f} pp below, {ratio:.2f} x radius, {v['samples_mean']:.1f} samples"
        target = f"within 1 pp of Cohen-{short_n(res['n'])}, >= {radius_ratio} x radius, <= {max_samples:g} samples"
        if name == "surrogate":
            half = v["certified_accuracy"]["0.5"] / max(cohen["certified_accuracy"]["0.5"], 1e-9)
            ok, measured = ok and round(half, 9) >= 0.8, measured + f", r=0.5 accuracy {half:.2f} x"
            target += ", r=0.5 accuracy >= 0.8 x"
        rows.append((f"{name}: {target}", measured, ok))
    for level, v in res.get("surrogate_levels", {}).items():
        rate = v["violations_vs_point_estimate"] / res["images"]
        rows.append((f"surrogate at level {level}: violation rate (vs k/n) <= {level}",
                     f"{v['violations_vs_point_estimate']}/{res['images']} = {rate:.4f}", rate <= float(level)))
    return rows


def write_report(res: dict, path: Path) -> None:
    b = res["bundle"]
    cal = b.get("calibration") or {}
    lines = [f"# Evaluation of bundle `{b['name']}`", "",
             f"Command: `certserve calibrate evaluate {res.get('command_args', '')}`".rstrip(), "",
             f"{res['images']} test images of `{res.get('data', 'fashion-mnist')}` (the first of its test set), "
             f"sigma = {b['sigma']}, request alpha = {res['alpha']}, n = {res['n']} samples per image (Cohen n0 = "
             f"{res['n0']}), sequential methods: {_rule(res)} with smoothing's default prior mixture, at the worker's "
             f"checkpoints, budget n, stopped where the rule fires (the engine under load; at light load its "
             f"speculation adds up to one checkpoint interval: docs/speculation-cost.md). Base model clean accuracy on these images: {res['clean_accuracy']:.3f}. Sampler: "
             f"{res['sampler']} ({res['samples_per_second']:,} samples/s, {res['sampling_seconds']} s for all "
             f"sampling). Surrogate calibration: {cal.get('method')} ({cal.get('guarantee')}), levels "
             f"{', '.join(f'{a:g}' for a in b.get('levels', []))}, {cal.get('num_calibration')} calibration + "
             f"{cal.get('num_tuning')} tuning images with {cal.get('samples_per_image')} samples each.", "",
             "| method | cert. acc (r=0) | mean radius | mean radius (cert. correct) | samples (all) | samples (cert.) | samples (rest) | abstain | ms/image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, v in res["methods"].items():
        lines.append(f"| {name} | {v['certified_accuracy']['0']:.3f} | {v['mean_radius_all']:.3f} | "
                     f"{v['mean_radius_certified_correct']:.3f} | {v['samples_mean']:.1f} | {v['samples_certified']:.1f} | "
                     f"{v['samples_rest']:.1f} | {v['abstain_rate']:.3f} | {v['ms_per_image']:.2f} |")
    lines += ["", "Certified accuracy at radius r (class correct and certified radius >= r):", "",
              "| method | " + " | ".join(f"r={r:g}" for r in RADII) + " |", "|---|" + "---|" * len(RADII)]
    for name, v in res["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v['certified_accuracy'][f'{r:g}']:.3f}" for r in RADII) + " |")
    lines += _route_lines(res)
    lines += _level_lines(res)
    lines += ["", "Mean radius counts 0 for abstentions and wrong classes. Samples include Cohen's n0 selection "
              "samples. ms/image: measured clean forward latency (batch 1, CPU onnxruntime) plus samples x the "
              "measured per-sample cost of this run's sampler.", "", "## Targets", "", TARGETS_NOTE, "",
              "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m_} | {'yes' if ok else 'NO'} |" for t, m_, ok in targets(res)]
    lines += ["", f"![certified accuracy]({res['plots']['certified_accuracy']})", "",
              f"![samples per image]({res['plots']['samples']})", ""]
    if res.get("front"):
        lines += front.report_lines(res["front"], res["front_defaults"], res["plots"]["front"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _route_lines(res: dict) -> list[str]:
    """How the routes were run: per-input budget, auto's threshold and the share the surrogate answered."""
    auto = res["methods"].get("auto")
    if not auto or "min_surrogate_z" not in auto:
        return []
    z = auto["min_surrogate_z"]
    return ["", f"Routes: per-input = the e-process targeting the surrogate's proposed radius (budget "
            f"{auto['fallback_budget']:,}); auto = the surrogate where its calibrated radius is >= {z:g} sigma "
            f"(= {z * res['bundle']['sigma']:.3f}; {auto['surrogate_share']:.1%} of the images here), else the "
            "per-input path (docs/auto-routing.md chose the threshold on held-out tuning images)."]


def _level_lines(res: dict) -> list[str]:
    """The surrogate at every calibrated risk level: certified accuracy, radius, violations."""
    if not res.get("surrogate_levels"):
        return []
    cohen = res["methods"][f"cohen-{short_n(res['n'])}"]
    lines = ["", "## The surrogate at each risk level", "",
             f"A request's alpha uses the largest calibrated level <= alpha (its certificate reports that level). "
             f"Cohen-{short_n(res['n'])} (at alpha = {res['alpha']}): certified accuracy {cohen['certified_accuracy']['0']:.3f}, "
             f"mean radius {cohen['mean_radius_all']:.3f}.", "",
             "| level | cert. acc r=0 | r=0.25 | r=0.5 | mean radius | x Cohen radius | certified | violations (CP upper) "
             "| violations (k/n) | rate (k/n) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for level, v in res["surrogate_levels"].items():
        acc = v["certified_accuracy"]
        ratio = v["mean_radius_all"] / max(cohen["mean_radius_all"], 1e-9)
        lines.append(f"| {level} | {acc['0']:.3f} | {acc['0.25']:.3f} | {acc['0.5']:.3f} | {v['mean_radius_all']:.3f} | "
                     f"{ratio:.2f} | {v['certified']} | {v['violations_vs_cp_upper']} | "
                     f"{v['violations_vs_point_estimate']} | {v['violations_vs_point_estimate'] / res['images']:.4f} |")
    return lines
