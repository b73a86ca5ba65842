"""Tuning the per-input path (PER_INPUT_MIN_GAIN and DEFAULT_PROPOSAL_SHRINK, jointly) on held-out dev streams.

Data: the dev streams of ``bench.smoothing_dev`` (``runs/smoothing-dev/streams-1500.npz``): 1,500 images of the
bundle's CALIBRATION split (never the test set; disjoint from what the base model, the surrogate and the meta-learner
were trained on), each with the clean-image class c, its meta prior, and 2,048 noisy predictions of the base model.

The surrogate's point estimate z_hat of Phi^-1(pA), from the clean images: ``--z-hat bundle`` (default) is what the
service proposes from, :func:`models.surrogate.surrogate_answers` (the calibration's isotonic point map of the
surrogate's log-odds, at the level the request's alpha selects, for the surrogate's own class); ``--z-hat softmax``
is the older Phi^-1(clip(p_hat, 1/2, 1 - 1e-7)) of the tested class.

Each setting replays every stream at the engine's checkpoints (:func:`calibration.front.replay`) with the server's
prior (meta prior + KT at the default weight) and issues the confidence-sequence certificate at its stop. Grid:
shrink x lambda; shrink 0 is no proposal (plain :func:`smoothing.best_radius_decision` at that lambda), shrink > 0 is
:func:`smoothing.stopping.proposal_decision` with proposal = shrink * sigma * max(z_hat, 0). Rule: the pair of the
main grid (lambda in GAINS) with the largest mean radius among those with mean samples <= 300 (ties: fewer samples)
gives PER_INPUT_MIN_GAIN and DEFAULT_PROPOSAL_SHRINK (if its shrink is 0: the best shrink > 0 at its lambda).

Budget: the server's per-input jobs run to models.defaults.AUTO_MAX_SAMPLES (4,000) but the streams hold 2,048
samples, so the replay runs at 2,048; the report bounds the mean samples at 4,000 (:func:`budget_bound`) and
estimates them on streams extended by simulation (:func:`extended`).

Run: ``python -m bench.proposal_tuning`` (about 30 s on the shared 2-core machine); writes docs/proposal-tuning.md.
"""

from __future__ import annotations

import argparse
import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import ndtri

import smoothing as sm
from calibration.front import RADII, point, replay, samples_at_radius
from smoothing.stopping import DEFAULT_PROPOSAL_SHRINK, PER_INPUT_MIN_GAIN, proposal_decision, proposal_radius

SHRINKS = (0.0, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0)  # 0: no proposal
GAINS = (5e-5, 7.5e-5, 1e-4, 1.5e-4, 2e-4, 2.5e-4, 3e-4, 4e-4)  # the main grid: the rule chooses here
CHEAP_GAINS = (5e-4, 5.5e-4, 6e-4, 8e-4, 1e-3, 1.5e-3)  # beyond it, for the best setting within 150 mean samples
ORACLE_SHRINKS = (0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
PREVIOUS_DEFAULT = (0.48, 5e-5)  # the per-input setting before this tuning (shrink, lambda): the ratios' reference
SERVER_BUDGET = 4000  # models.defaults.AUTO_MAX_SAMPLES (the auto / per_input job's budget)
MAX_SAMPLES, CHEAP_SAMPLES = 300.0, 150.0
P_HAT_CEILING = 1 - 1e-7


@dataclass
class Dev:
    hits: np.ndarray  # (N, n) cumulative hits of the tested class: hits[i, t - 1] = S_t
    correct: np.ndarray  # tested class == label (a wrong class counts radius 0)
    a: np.ndarray
    b: np.ndarray
    z_hat: np.ndarray  # the surrogate's point estimate of Phi^-1(pA), from the clean image
    sigma: float
    info: dict


def load_dev(path: Path, bundle_dir: str | None, source: str, alpha: float) -> Dev:
    """The dev streams and the surrogate's z_hat of their (calibration-split) images; checks that the streams were
    recorded with this bundle's base model and these images."""
    from calibration.data import load_dataset
    from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle

    d = np.load(path)
    bundle = load_bundle(bundle_dir or DEFAULT_BUNDLE_DIR)
    if str(d["bundle_sha256"]) != bundle.model_sha256:
        raise SystemExit(f"{path} was recorded with base model {d['bundle_sha256']}, not this bundle's "
                         f"{bundle.model_sha256}: record new streams with bench.smoothing_dev")
    ds = load_dataset(bundle.manifest.provenance.get("dataset", "fashion-mnist"))
    index, c = d["index"], d["tested_class"]
    if not np.array_equal(ds.y_train[index], d["label"]):
        raise SystemExit(f"{path}: the labels do not match the training-set images at 'index'")
    logits = bundle.backend("surrogate", device="cpu").forward(ds.x_train[index])
    z_hat, info = surrogate_z_hat(bundle, logits, c, source, alpha)
    info.update(tuning_overlap=tuning_overlap(bundle, ds, index) if source == "bundle" else None, images=len(c),
                n=d["stream"].shape[1], seed=int(d["seed"]), base_sha256=bundle.model_sha256, source=source,
                z_hat_quartiles=np.percentile(z_hat, [25, 50, 75]).round(2).tolist())
    return Dev(np.cumsum(d["stream"] == c[:, None], axis=1, dtype=np.int64), c == d["label"],
               d["prior"][:, 0].astype(np.float64), d["prior"][:, 1].astype(np.float64), z_hat, float(d["sigma"]),
               info)


def surrogate_z_hat(bundle, logits, tested, source: str, alpha: float) -> tuple[np.ndarray, dict]:
    """(z_hat, info): the service's point estimate (``bundle``) or the older softmax probit (``softmax``)."""
    from models.priors import softmax

    if source == "softmax":
        p_hat = softmax(logits)[np.arange(len(tested)), tested]
        return ndtri(np.clip(p_hat, 0.5, P_HAT_CEILING)), {"agrees": float(np.mean(logits.argmax(1) == tested))}
    from models.surrogate import surrogate_answers

    cal = bundle.manifest.calibration
    ans = surrogate_answers(logits, cal, bundle.manifest.sigma, alpha=alpha)
    level = cal.level_for(alpha) or cal.levels[-1]
    z_hat, cap = np.asarray(ans.z_hat, np.float64), float(max(level.values))
    return z_hat, {"agrees": float(np.mean(ans.class_index == tested)), "level": level.alpha, "cap": cap,
                   "at_cap": float(np.mean(z_hat >= cap - 1e-9)), "num_tuning": cal.num_tuning,
                   "samples_per_image": cal.samples_per_image,
                   "created": bundle.manifest.provenance.get("recalibration", {}).get("created_unix")}


def tuning_overlap(bundle, ds, index) -> int | None:
    """How many dev images are among the calibration's tuning images (as
    calibration.conformal_fit.tuning_indices names them), where the splits are recorded and rebuild; else None."""
    from calibration.conformal_fit import tuning_indices

    cal = bundle.manifest.calibration
    tuned = tuning_indices(bundle.manifest.provenance, cal.num_tuning, cal.num_calibration, len(ds.x_train))
    return None if tuned is None else int(np.isin(index, tuned).sum())


def run_policy(dev: Dev, policy, *, alpha: float, budget: int, **info) -> dict:
    """Replay every stream under ``policy(s, t, idx)``, issue the certificate (same prior) at its stop; with the
    share stopped at a verified proposal and the mean-samples bound at the server's budget."""
    codes = np.zeros(len(dev.hits), dtype=np.int8)

    def decide(s, t, idx):
        d = np.asarray(policy(s, t, idx))
        codes[idx[d != sm.Stop.CONTINUE]] = d[d != sm.Stop.CONTINUE]
        return d

    used = replay(dev.hits, decide, budget)
    s = dev.hits[np.arange(len(used)), used - 1]
    radius = np.asarray(sm.certified_radius(s, used, alpha, dev.sigma, dev.a, dev.b, kt_weight=sm.DEFAULT_KT_WEIGHT))
    bound = budget_bound(dev, s, used, codes, alpha=alpha, budget=budget)
    return point(dev.correct, used, radius, **info, target=float(np.mean(codes == sm.Stop.TARGET)),
                 bound=bound)


def budget_bound(dev: Dev, s, used, codes, *, alpha: float, budget: int) -> float:
    """An upper bound on the mean samples of the same policy at budget SERVER_BUDGET (> ``budget``).

    Below the replay budget B the checkpoints are the same, and a decision at t <= B/2 does not depend on the
    budget except through the futility projection at the budget (more lenient at a larger budget). So an image keeps
    its stop unless it stopped after B/2 samples (the gain rule's look-ahead min(2t, budget) or the budget itself)
    or by futility while its upper bound was still >= 1/2 (the projection); those are counted at SERVER_BUDGET."""
    if budget >= SERVER_BUDGET:
        return float(np.mean(used))
    upper = np.asarray(sm.upper_bound(s, used, alpha, dev.a, dev.b, kt_weight=sm.DEFAULT_KT_WEIGHT))
    may_move = (used > budget // 2) | ((codes == sm.Stop.FUTILITY) & (upper >= 0.5))
    return float(np.mean(np.where(may_move, SERVER_BUDGET, used)))


def setting(dev: Dev, z_hat, shrink: float, lam: float, method: str, *, alpha: float, budget: int) -> dict:
    """One setting's row: plain best-radius at ``lam`` (shrink 0) or the proposal policy with shrink * sigma * z_hat."""
    kw = {"sigma": dev.sigma, "alpha": alpha, "budget": budget, "kt_weight": sm.DEFAULT_KT_WEIGHT, "min_gain": lam}
    r = proposal_radius(z_hat, sigma=dev.sigma, shrink=shrink) if shrink > 0 else None
    return run_policy(dev, lambda s, t, i: (sm.best_radius_decision(s, t, a=dev.a[i], b=dev.b[i], **kw) if r is None
                                            else proposal_decision(s, t, proposal_radius=r[i], a=dev.a[i], b=dev.b[i],
                                                                   **kw)),
                      alpha=alpha, budget=budget, method="best-radius" if r is None else method, shrink=shrink,
                      min_gain=lam)


def evaluate(dev: Dev, *, alpha: float, budget: int, max_samples: float = MAX_SAMPLES) -> list[dict]:
    """Every (shrink, lambda) of SHRINKS x (GAINS + CHEAP_GAINS), the previous default, and oracle rows (the
    proposal from the image's own hit rate over all its recorded samples: not available to a server, an upper
    reference for any surrogate) at the lambda the rule picks."""
    kw = {"alpha": alpha, "budget": budget}
    rows = [setting(dev, dev.z_hat, k, lam, "proposal", **kw) for lam in GAINS + CHEAP_GAINS for k in SHRINKS]
    rows.append({**setting(dev, dev.z_hat, *PREVIOUS_DEFAULT, "proposal", **kw), "previous": True})
    lam = choose(rows, max_samples)[0]["min_gain"]
    oracle_z = ndtri(np.clip(dev.hits[:, -1] / dev.hits.shape[1], 0.5, P_HAT_CEILING))
    return rows + [setting(dev, oracle_z, k, lam, "oracle proposal", **kw) for k in ORACLE_SHRINKS]


def extended(dev: Dev, length: int = SERVER_BUDGET, seed: int = 0) -> Dev:
    """The streams continued to ``length`` samples by seeded Bernoulli draws at each image's recorded hit rate (an
    ESTIMATE of the server's budget: the recorded part is real, the rest simulated from the plug-in pA)."""
    n = dev.hits.shape[1]
    rate = dev.hits[:, -1] / n
    more = np.random.default_rng(seed).random((len(rate), length - n)) < rate[:, None]
    hits = np.concatenate([dev.hits, dev.hits[:, -1:] + np.cumsum(more, axis=1, dtype=np.int64)], axis=1)
    return Dev(hits, dev.correct, dev.a, dev.b, dev.z_hat, dev.sigma, dev.info)


def at_server_budget(dev: Dev, rows: list[dict], *, alpha: float) -> list[dict]:
    """The plain rows (every lambda) and ``rows`` replayed on the streams extended to SERVER_BUDGET."""
    keys, long = {(0.0, g) for g in GAINS + CHEAP_GAINS} | {(r["shrink"], r["min_gain"]) for r in rows}, extended(dev)
    return [setting(long, dev.z_hat, k, lam, "proposal", alpha=alpha, budget=SERVER_BUDGET)
            for k, lam in sorted(keys, key=lambda x: (x[1], x[0]))]


def grid(rows: list[dict]) -> list[dict]:
    """The main grid's deployable rows (lambda in GAINS, not the previous-default reference)."""
    return [r for r in rows if r["method"] != "oracle proposal" and r["min_gain"] in GAINS and not r.get("previous")]


def best_within(rows: list[dict], max_samples: float) -> dict | None:
    """Largest mean radius among ``rows`` with mean samples <= max_samples (ties: fewer samples)."""
    ok = [r for r in rows if r["samples"] <= max_samples]
    return max(ok, key=lambda r: (r["radius"], -r["samples"])) if ok else None


def choose(rows: list[dict], max_samples: float = MAX_SAMPLES) -> tuple[dict, dict | None]:
    """The rule (module docstring): (the chosen pair's row, the best shrink > 0 row at its lambda)."""
    if (pair := best_within(grid(rows), max_samples)) is None:
        raise SystemExit(f"no setting of the grid meets mean samples <= {max_samples:g}")
    at_lambda = [r for r in grid(rows) if r["min_gain"] == pair["min_gain"] and r["shrink"] > 0]
    return pair, (pair if pair["shrink"] > 0 else best_within(at_lambda, max_samples))


def plain_radius_at(rows: list[dict], samples: float) -> float:
    """Mean radius of the plain best-radius front (shrink 0, every lambda) at ``samples`` mean samples (linear
    interpolation; nan outside the front)."""
    xs, ys = np.array(sorted((r["samples"], r["radius"]) for r in rows if r["method"] == "best-radius")).T
    return float(np.interp(samples, xs, ys)) if xs[0] <= samples <= xs[-1] else float("nan")


def matrix(rows: list[dict], gains, key: str, fmt: str) -> list[str]:
    """One line per shrink, one column per lambda: ``key`` of each setting."""
    cell = {(r["shrink"], r["min_gain"]): r for r in rows if r["method"] != "oracle proposal" and not r.get("previous")}
    out = ["| shrink \\ lambda | " + " | ".join(f"{g:g}" for g in gains) + " |", "|---|" + "---|" * len(gains)]
    for k in SHRINKS:
        name = "0 (no proposal)" if k == 0 else f"{k:g}"
        out.append(f"| {name} | " + " | ".join(format(cell[(k, g)][key], fmt) for g in gains) + " |")
    return out


def table(rows: list[dict], ref: dict) -> list[str]:
    head = " | ".join(f"r={x:g}" for x in RADII[:3])
    lines = [f"| policy | shrink | lambda | mean samples | x samples | bound @{SERVER_BUDGET} | mean radius | x radius "
             f"| {head} | stopped at target |", "|---|---|---|---|---|---|---|---|" + "---|" * 3 + "---|"]
    for r in rows:
        acc = " | ".join(f"{r['certified_accuracy'][f'{x:g}']:.3f}" for x in RADII[:3])
        lines.append(f"| {r['method']} | {r['shrink']:g} | {r['min_gain']:g} | {r['samples']:,.1f} | "
                     f"{r['samples'] / ref['samples']:.3f} | {r['bound']:,.1f} | {r['radius']:.4f} | "
                     f"{r['radius'] / ref['radius']:.3f} | {acc} | {r['target']:.3f} |")
    return lines


def describe(r: dict) -> str:
    what = "no proposal (plain best-radius)" if r["shrink"] == 0 else f"{r['method']}, shrink {r['shrink']:g}"
    bound = "" if r["bound"] == r["samples"] else f" (<= {r['bound']:,.1f} at budget {SERVER_BUDGET:,})"
    return f"{what}, lambda {r['min_gain']:g}: {r['samples']:,.1f} mean samples{bound}, mean radius {r['radius']:.4f}"


def data_lines(dev: Dev, args) -> list[str]:
    i = dev.info
    src = ("Surrogate z_hat = the service's point estimate (`models.surrogate.surrogate_answers(...).z_hat`: the "
           f"bundle calibration's isotonic point map of the surrogate's log-odds at level {i.get('level')} (the one "
           f"alpha = {args.alpha:g} selects, or the lowest), fitted on {i.get('num_tuning')} tuning images with "
           f"{i.get('samples_per_image'):,} Monte-Carlo samples each, capped at {i.get('cap', 0):.3f} (the value "
           f"of {i.get('at_cap', 0):.3f} of the dev images); calibration "
           f"created_unix {i.get('created')}), for the surrogate's own class as the service uses it. "
           f"{i.get('tuning_overlap')} of the {i['images']} dev images are among the map's tuning images (in-sample "
           "for z_hat; the rest are held out from it)." if dev.info["source"] == "bundle" else
           "Surrogate z_hat = Phi^-1(clip(p_hat, 1/2, 1 - 1e-7)) of the tested class (the older softmax probit).")
    return [f"Data: {i['images']} held-out images of the bundle's calibration split (never the test set), each with "
            f"{i['n']} recorded noisy predictions of the base model (`{args.dev}`, recorded by `bench.smoothing_dev`, "
            f"seed {i['seed']}; base model sha256 {i['base_sha256'][:12]}...). {src} The surrogate's class agrees "
            f"with the tested class on {i['agrees']:.3f} of them; z_hat quartiles {i['z_hat_quartiles']}.", "",
            f"Setting: alpha = {args.alpha:g}, sigma = {dev.sigma:g}, the engine's checkpoints, prior = meta prior + "
            f"KT (weight {sm.DEFAULT_KT_WEIGHT:g}) as the server runs it; the certificate is the confidence sequence "
            "at the stop. Radius 0 for abstentions and wrong classes; certified accuracy at r = 0, 0.25, 0.5. "
            "'stopped at target': share of images whose proposal was verified. Every setting is per input and "
            "anytime valid at alpha.", "",
            f"**Budget**: the server runs auto fallbacks and `per_input=true` at budget {SERVER_BUDGET:,} "
            f"(models.defaults.AUTO_MAX_SAMPLES), but the streams hold {i['n']:,} samples: every number here is a "
            f"replay at budget {args.budget:,}. 'bound @{SERVER_BUDGET}' is an upper bound on the mean samples at "
            f"{SERVER_BUDGET:,}: images that stopped after {args.budget // 2:,} samples or by the futility "
            f"projection are counted at {SERVER_BUDGET:,} (every other image stops where it does here; "
            "bench/proposal_tuning.py::budget_bound).", ""]


def top_rows(rows: list[dict], max_samples: float, count: int = 12) -> list[dict]:
    """The main grid's ``count`` largest mean radii within ``max_samples`` mean samples."""
    return sorted((r for r in grid(rows) if r["samples"] <= max_samples), key=lambda r: -r["radius"])[:count]


def server_budget_lines(rows: list[dict], long_rows: list[dict], pair: dict) -> list[str]:
    """The section on the streams extended to SERVER_BUDGET (an estimate; see :func:`extended`)."""
    short = {(r["shrink"], r["min_gain"]): r for r in rows if r["method"] == "proposal" or r["shrink"] == 0}
    lines = [f"## At the server's budget {SERVER_BUDGET:,} (estimate)", "",
             f"The same settings on the streams continued from {2048:,} to {SERVER_BUDGET:,} samples by seeded "
             "Bernoulli draws at each image's recorded hit rate (the recorded part is real, the rest simulated from "
             "the plug-in pA; bench/proposal_tuning.py::extended): every plain lambda and the top settings above.", ""]
    for cap in (CHEAP_SAMPLES, MAX_SAMPLES):
        best = best_within(long_rows, cap)
        plain = best_within([r for r in long_rows if r["shrink"] == 0], cap)
        lines.append(f"- Best within {cap:g} mean samples at {SERVER_BUDGET:,}: "
                     + (f"{describe(best)}; without a proposal: {describe(plain)}." if best else "none."))
    lines += ["", f"| shrink | lambda | samples @2048 | samples @{SERVER_BUDGET} (est.) | radius @2048 | "
              f"radius @{SERVER_BUDGET} (est.) | chosen |", "|---|---|---|---|---|---|---|"]
    for r in long_rows:
        k = (r["shrink"], r["min_gain"])
        mark = "yes" if k == (pair["shrink"], pair["min_gain"]) else ""
        lines.append(f"| {r['shrink']:g} | {r['min_gain']:g} | {short[k]['samples']:,.1f} | {r['samples']:,.1f} | "
                     f"{short[k]['radius']:.4f} | {r['radius']:.4f} | {mark} |")
    return lines + [""]


def verdict_lines(rows: list[dict], pair: dict, shrink_row: dict, max_samples: float) -> list[str]:
    """Does the proposal add anything over the marginal-gain rule alone; the best settings within 150 / 300."""
    deployable = [r for r in rows if r["method"] != "oracle proposal" and not r.get("previous")]
    if pair["shrink"] == 0:
        out = [f"**The proposal adds nothing at this lambda**: the best setting is plain best-radius. The best "
               f"shrink > 0 at lambda {pair['min_gain']:g} is {describe(shrink_row)} "
               f"({shrink_row['radius'] - pair['radius']:+.4f} radius, {shrink_row['samples'] - pair['samples']:+.1f}"
               " samples against no proposal).", ""]
    else:
        plain = next(r for r in grid(rows) if r["min_gain"] == pair["min_gain"] and r["shrink"] == 0)
        out = [f"At the same lambda without a proposal: {describe(plain)}.", ""]

    front = [r for r in rows if r["method"] == "best-radius"]

    def edge(method):  # (smallest samples / plain samples at equal radius, its row) over the method's rows
        ratios = [(r["samples"] / need, r) for r in rows if r["method"] == method and r["shrink"] > 0
                  and not r.get("previous") and np.isfinite(need := samples_at_radius(front, r["radius"]))]
        return min(ratios, key=lambda x: x[0]) if ratios else (float("nan"), None)

    (ratio, row), oracle = edge("proposal"), edge("oracle proposal")[0]
    if row is not None:
        out += [f"Proposal vs the marginal-gain rule alone: over every proposal setting (any shrink > 0, any lambda), "
                "the smallest ratio of its mean samples to what plain best-radius (interpolated along its lambdas) "
                f"needs for the same mean radius is {ratio:.3f} ({describe(row)}): "
                + (f"the proposal saves at most {1 - ratio:.1%} of the samples at equal radius." if ratio < 1
                   else "no proposal setting beats the marginal-gain rule alone.")
                + (" Why: stopping each input where its marginal radius per sample falls below one lambda already "
                   "maximizes the mean radius for the mean samples (a Lagrangian argument); a verified proposal "
                   "stops an input at a radius fixed in advance, whatever its next samples would buy. Even the "
                   f"oracle proposal (a perfect point estimate, reference rows below) reaches at best {oracle:.3f} x "
                   "the samples plain best-radius needs for its radius." if ratio > 0.97 else ""), ""]
    for cap in (CHEAP_SAMPLES, max_samples):
        best, plain = best_within(deployable, cap), best_within([r for r in deployable if r["shrink"] == 0], cap)
        out.append(f"- Best within {cap:g} mean samples (all lambdas {GAINS[0]:g} .. {CHEAP_GAINS[-1]:g}): "
                   + (f"{describe(best)}; without a proposal: {describe(plain)}; plain best-radius interpolated to "
                      f"{best['samples']:,.1f} samples: radius {plain_radius_at(rows, best['samples']):.4f}."
                      if best else "none."))
    return out


def report(rows: list[dict], long_rows: list[dict], dev: Dev, args, seconds: float) -> str:
    ref = next(r for r in rows if r.get("previous"))
    pair, shrink_row = choose(rows, args.max_samples)
    n, a, gains = int(args.max_samples), args.alpha, GAINS + CHEAP_GAINS
    ideal = (sm.certified_radius(n, n, a, dev.sigma), sm.fixed_n_certificate(n, n, a, dev.sigma)[1])
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    same = (PER_INPUT_MIN_GAIN, DEFAULT_PROPOSAL_SHRINK) == (pair["min_gain"], shrink_row["shrink"])
    out = ["# Tuning the per-input path: proposal shrink x lambda", "",
           f"Generated by `python -m bench.proposal_tuning --dev {args.dev} --z-hat {args.z_hat} --out {args.out}` "
           f"on {when} ({seconds:.0f} s).", "", *data_lines(dev, args),
           f"Rule: the pair (shrink, lambda) of the grid below (lambda {GAINS[0]:g} .. {GAINS[-1]:g}; shrink 0 = no "
           f"proposal) with the largest mean radius among those with mean samples <= {args.max_samples:g} (ties: "
           "fewer samples) gives PER_INPUT_MIN_GAIN = its lambda and DEFAULT_PROPOSAL_SHRINK = its shrink (if that "
           "is 0: the best shrink > 0 at that lambda by the same rule). Ratios ('x') are against the previous "
           f"per-input default, proposal shrink {PREVIOUS_DEFAULT[0]:g} at lambda {PREVIOUS_DEFAULT[1]:g} with the "
           f"same z_hat ({ref['samples']:,.1f} samples, radius {ref['radius']:.4f}).", "",
           f"**Chosen pair: {describe(pair)}** ({pair['samples'] / ref['samples']:.3f} x the previous default's "
           f"samples, {pair['radius'] / ref['radius']:.3f} x its radius). smoothing/stopping.py has "
           f"PER_INPUT_MIN_GAIN = {PER_INPUT_MIN_GAIN:g} and DEFAULT_PROPOSAL_SHRINK = {DEFAULT_PROPOSAL_SHRINK:g}"
           + ("." if same else f" **which differ from this run's choice (lambda {pair['min_gain']:g}, shrink "
                               f"{shrink_row['shrink']:g}): update them**."), "",
           *verdict_lines(rows, pair, shrink_row, args.max_samples), "",
           f"Ceiling at {n} samples: an image with {n}/{n} hits certifies {ideal[0]:.4f} (confidence sequence, "
           f"KT prior) or {float(ideal[1]):.4f} (Clopper-Pearson at a fixed n = {n}) at alpha = {a:g}.", "",
           f"## Top settings within {args.max_samples:g} mean samples", "", *table(top_rows(rows, n), ref), "",
           *server_budget_lines(rows, long_rows, pair),
           "## Joint grid: mean radius", "", *matrix(rows, gains, "radius", ".4f"), "",
           "## Joint grid: mean samples (replay at budget 2,048)", "", *matrix(rows, gains, "samples", ",.1f"), "",
           "## Joint grid: share of proposals verified ('target' stops)", "", *matrix(rows, gains, "target", ".3f"), "",
           "## Reference rows", "",
           "The previous default, and the oracle proposal (from each image's own hit rate over all its recorded "
           "samples: what a perfect point estimate could propose, not available to a server) at lambda "
           f"{pair['min_gain']:g}:", "",
           *table([ref, *[r for r in rows if r["method"] == "oracle proposal"]], ref), ""]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dev", default="runs/smoothing-dev/streams-1500.npz")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the embedded one)")
    p.add_argument("--z-hat", choices=("bundle", "softmax"), default="bundle",
                   help="bundle: the service's calibrated point estimate; softmax: the older softmax probit")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--max-samples", type=float, default=MAX_SAMPLES)
    p.add_argument("--out", default="docs/proposal-tuning.md")
    args = p.parse_args()
    t0 = time.perf_counter()
    dev = load_dev(Path(args.dev), args.bundle, args.z_hat, args.alpha)
    if args.budget > dev.hits.shape[1]:
        raise SystemExit(f"budget {args.budget} exceeds the {dev.hits.shape[1]} recorded samples per image")
    rows = evaluate(dev, alpha=args.alpha, budget=args.budget, max_samples=args.max_samples)
    pair, shrink_row = choose(rows, args.max_samples)
    long_rows = at_server_budget(dev, [*top_rows(rows, args.max_samples), pair, shrink_row], alpha=args.alpha)
    text = report(rows, long_rows, dev, args, time.perf_counter() - t0)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
