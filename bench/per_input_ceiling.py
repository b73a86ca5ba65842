"""How large a per-input certificate can be at a mean sample budget: an oracle's reach and an upper bound for any
sound per-input method that certifies a one-sided radius.

Issue 9 asks the per-input route (``auto`` + ``per_input=true``) for >= 0.75 x Cohen-10k's mean radius within 300
mean samples. This measures what an oracle could reach on the same test images, and bounds what any valid method of
the same (one-sided) kind could, so that the target and the route's figure can be read against both.

Data: the first ``--images`` Fashion-MNIST test images, ``--n`` noisy predictions each of the bundle's base model
(drawn once, cached in ``--counts``). Per image, pA = the hit rate over the n samples of the class a per-input job
tests: the service's tested class, fixed from the clean input (:func:`models.priors.class_and_prior`); an image whose
tested class is wrong certifies nothing. Reference: a Cohen-style certificate from the same counts (class = their
argmax, one-sided Clopper-Pearson at alpha, radius counted only where the class is the label), next to the
evaluation's own Cohen-10k (docs/results.json).

Each row gives every image the number of samples that maximizes the mean radius at the mean budget (an ORACLE
allocation: it knows every image's pA; Lagrangian over a grid of n, mixing two multipliers in between):
* ``fixed-n Clopper-Pearson (oracle n)``: the expected radius of the one-sided Clopper-Pearson bound at n draws
  (S ~ Binomial(n, pA)). Its events {L >= p0} are the rejection regions of the uniformly most powerful level-alpha
  tests of pA <= p0 (monotone likelihood ratio), so no valid FIXED-n method certifies a radius more often, up to
  randomization. A method that knew pA could reach this row; a sequential one may do better.
* ``upper bound, one-sided certificates``: for any sound method whose certificate is sigma Phi^-1(p_lower) with
  p_lower a lower confidence bound on pA of the class fixed from the clean input (the service's routes and Cohen's
  CERTIFY; a two-sided radius sigma/2 (Phi^-1(pA_lower) - Phi^-1(pB_upper)) can certify more when the runner-up
  class is rare, and is not covered), with E[N] = n under pA: each event {radius >= rho} is a level-alpha test of
  pA <= p0 = Phi(rho / sigma), so its probability 1 - beta obeys Wald's inequality n KL(pA || p0) >= d(1 - beta ||
  alpha) (binary KL; the data-processing inequality for stopped sequences, adaptive stopping and any prior included),
  and E[radius] = integral over rho of P(radius >= rho) <= integral of the largest such 1 - beta (plus alpha beyond
  sigma Phi^-1(pA), up to the largest radius a float64 bound can express). Each rho gets its own best test, so the
  bound is loose: no single method reaches it. The integral is rounded up (left Riemann sums of a decreasing
  integrand, beta from below); the allocation restricts each image's n to the grid below, which lowers the bound a
  little (a 320-point grid: 0.4053 instead of 0.4041 at 100 mean samples, 0.4807 instead of 0.4805 at 300).
* ``anytime KT at an oracle n``: the service's confidence sequence (KT prior) evaluated at the oracle n: what the
  service's own bound could give if it knew when to stop.

Run: ``python -m bench.per_input_ceiling`` (draws 10^7 samples, about 8 min on 2 CPU cores the first time; then
seconds); writes docs/per-input-ceiling.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import beta, binom, norm

from bench.machine import code_version, machine_description
from bench.server_common import markdown_table
from smoothing import lower_bound

GRID = np.array([0, 25, 50, 75, 100, 150, 200, 250, 300, 400, 500, 600, 800, 1000, 1300, 1600, 2000, 2500, 3000,
                 4000, 6000, 10000])
BUDGETS = (100, 150, 200, 300, 400, 600, 900, 1500)
TARGET_RATIO, TARGET_SAMPLES = 0.75, 300


def draw_counts(images: int, n: int, seed: int, cache: Path) -> dict:
    """Counts (N, K) of n noisy predictions per image, the clean classes and labels; cached in ``cache``."""
    if cache.is_file():
        with np.load(cache) as d:
            if d["counts"].shape[0] == images and int(d["counts"][0].sum()) == n and int(d["seed"]) == seed:
                return {k: d[k] for k in ("counts", "clean", "y", "sigma")}
    from calibration.data import load_dataset
    from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle
    from models.sampling import SamplingEngine

    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    ds = load_dataset("fashion-mnist")
    x, y = ds.x_test[:images], ds.y_test[:images]
    base = bundle.backend("base", device="cpu")
    engine = SamplingEngine(base, sigma=bundle.manifest.sigma, num_classes=len(bundle.manifest.classes),
                            batch_size=1024)
    out = {"counts": engine.count(x, n, np.random.default_rng(seed)), "clean": base.forward(x).argmax(axis=1), "y": y,
           "sigma": np.float64(bundle.manifest.sigma)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, seed=seed, **out)
    return out


def tested_classes(images: int) -> np.ndarray:
    """The class the service's per-input job tests for each of the first ``images`` test images, from clean forward
    passes only (:func:`models.priors.class_and_prior`: the surrogate's arg-max where the bundle has one)."""
    from bench.models_and_data import load_test_images, server_class_and_prior
    from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle

    x, _ = load_test_images(images)
    return server_class_and_prior(load_bundle(DEFAULT_BUNDLE_DIR), x)[0]


def reference_radius(counts, y, alpha, sigma) -> np.ndarray:
    """Cohen-style radius per image from the same counts (class = argmax; 0 where wrong or not certified)."""
    n = counts.sum(axis=1)
    cls = counts.argmax(axis=1)
    k = counts[np.arange(len(counts)), cls]
    p = np.nan_to_num(beta.ppf(alpha, k, n - k + 1))
    return np.where((p > 0.5) & (cls == y), sigma * norm.ppf(np.maximum(p, 0.5)), 0.0)


def expected_radius(p, ok, bound, alpha, sigma) -> np.ndarray:
    """(N, len(GRID)): E[sigma Phi^-1(L)] over S ~ Binomial(n, pA) for each n of GRID; 0 where the class is wrong."""
    out = np.zeros((len(p), len(GRID)))
    for j, n in enumerate(GRID[1:], start=1):
        s = np.arange(n + 1)
        low = bound(s, int(n), alpha)
        r = np.where(low > 0.5, sigma * norm.ppf(np.clip(low, 0.5, 1 - 1e-16)), 0.0)
        out[:, j] = np.where(ok, binom.pmf(s[None, :], n, p[:, None]) @ r, 0.0)
    return out


def clopper_pearson(s, n, alpha):
    return np.nan_to_num(beta.ppf(alpha, s, n - s + 1))


def anytime_kt(s, n, alpha):
    return np.asarray(lower_bound(s, np.full_like(s, n), alpha))


#: The largest radius a float64 bound expresses: sigma Phi^-1 of the largest double below 1 (about 8.3 sigma)
RADIUS_CAP_SIGMAS = float(norm.ppf(np.nextafter(1.0, 0.0)))
RHO_CELLS = 2000  # radius grid of the upper bound's integral


def power_bound_radius(p, ok, alpha, sigma) -> np.ndarray:
    """(N, len(GRID)): the upper bound on E[radius] of any sound one-sided per-input method with E[N] = n (module
    docstring), rounded up: left Riemann sums over a radius grid (the integrand decreases in rho), each power read
    from a table at the next larger KL budget (the power increases with the budget) and itself from above."""
    edges = np.linspace(0.0, RADIUS_CAP_SIGMAS * sigma, RHO_CELLS + 1)
    rho, width = edges[:-1], edges[1] - edges[0]  # left ends: P(radius >= rho) is largest there
    p0 = norm.cdf(rho / sigma)
    budgets = np.concatenate([[0.0], np.geomspace(1e-12, np.log(1 / alpha), 50_000)])
    powers = _largest_power(budgets, alpha)
    out = np.zeros((len(p), len(GRID)))
    for i in np.flatnonzero(ok):
        below = p0 < p[i]  # beyond sigma Phi^-1(pA) a valid method certifies with probability <= alpha
        kl = _kl(np.full(int(below.sum()), p[i]), p0[below])
        for j, n in enumerate(GRID[1:], start=1):
            at = np.minimum(np.searchsorted(budgets, n * kl, side="left"), len(budgets) - 1)
            power = np.where(n * kl >= budgets[-1], 1.0, powers[at])
            out[i, j] = float((power.sum() + alpha * np.count_nonzero(~below)) * width)
    return out


def _largest_power(budget, alpha):
    """The largest 1 - beta in [alpha, 1] with d(1 - beta || alpha) <= budget (binary KL, increasing in 1 - beta
    there), by bisection; the upper end of the final bracket, so never below the exact value."""
    budget = np.asarray(budget, dtype=np.float64)
    lo, hi = np.full(budget.shape, alpha), np.ones(budget.shape)
    for _ in range(60):
        mid = (lo + hi) / 2
        over = _kl(mid, np.full(budget.shape, alpha)) > budget
        lo, hi = np.where(over, lo, mid), np.where(over, mid, hi)
    return np.where(np.log(1 / alpha) <= budget, 1.0, hi)


def _kl(a, b):
    """Bernoulli KL(a || b) for a in [0, 1], b in (0, 1)."""
    b = np.clip(b, 1e-300, 1 - 1e-16)
    first = np.where(a > 0, a * np.log(np.maximum(a, 1e-300) / b), 0.0)
    return first + np.where(a < 1, (1 - a) * np.log(np.maximum(1 - a, 1e-300) / (1 - b)), 0.0)


def best_mean_radius(radius: np.ndarray, budget: float) -> float:
    """Largest mean radius over per-image n in GRID with mean n <= budget (oracle allocation; see module docstring)."""
    rows = np.arange(len(radius))
    points = set()
    for lam in np.concatenate([[0.0], np.geomspace(1e-8, 1.0, 600)]):
        pick = np.argmax(radius - lam * GRID[None, :], axis=1)
        points.add((float(GRID[pick].mean()), float(radius[rows, pick].mean())))
    points = sorted(points)
    below = max((q for q in points if q[0] <= budget), key=lambda q: q[1])
    above = [q for q in points if q[0] > budget]
    if not above:
        return below[1]
    nxt = min(above, key=lambda q: q[0])
    return below[1] + (budget - below[0]) / (nxt[0] - below[0]) * (nxt[1] - below[1])


def samples_for(radius: np.ndarray, goal: float) -> float:
    """The smallest mean budget (to 1 sample) whose ceiling reaches ``goal``; inf if none does."""
    lo, hi = 0.0, float(GRID[-1])
    if best_mean_radius(radius, hi) < goal:
        return float("inf")
    while hi - lo > 1:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if best_mean_radius(radius, mid) < goal else (lo, mid)
    return hi


def report(args, data, started: float) -> str:
    counts, tested, y, sigma = data["counts"], data["tested"], data["y"], float(data["sigma"])
    n = int(counts[0].sum())
    p, ok = counts[np.arange(len(counts)), tested] / n, tested == y
    ref = reference_radius(counts, y, args.alpha, sigma).mean()
    evaluation = json.loads(Path(args.results).read_text())["methods"] if Path(args.results).is_file() else {}
    cohen = evaluation.get("cohen-10k", {}).get("mean_radius_all")
    per_input = evaluation.get("per-input", {})
    ceilings = {"fixed-n Clopper-Pearson (oracle n)": expected_radius(p, ok, clopper_pearson, args.alpha, sigma),
                "upper bound, one-sided certificates": power_bound_radius(p, ok, args.alpha, sigma),
                "anytime KT at an oracle n": expected_radius(p, ok, anytime_kt, args.alpha, sigma)}
    rows = [[name, *[f"{best_mean_radius(r, b):.3f} ({best_mean_radius(r, b) / ref:.2f}x)" for b in BUDGETS],
             f"{samples_for(r, TARGET_RATIO * ref):,.0f}"] for name, r in ceilings.items()]
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    seconds = time.perf_counter() - started
    lines = [f"# Ceiling of a per-input certificate at a mean sample budget ({len(counts):,} test images)", "",
             f"Generated by `python -m bench.per_input_ceiling --images {args.images} --n {args.n}` on {when} "
             f"({seconds:.0f} s; {code_version()}; {machine_description()}).", "",
             "\n\n".join(__doc__.split("\n\n")[1:4]), "",  # markdown: wrapped lines, bullets as written
             f"Reference (Cohen-style, from these counts, alpha = {args.alpha:g}, sigma = {sigma:g}): mean radius "
             f"**{ref:.3f}**" + (f"; the evaluation's Cohen-10k on the same images: {cohen:.3f}." if cohen else "."), "",
             "Mean radius (x the reference) by mean samples per image, each row with its oracle allocation, and the "
             f"mean samples at which it reaches {TARGET_RATIO:g} x:", "",
             markdown_table(["row", *[f"{b:,}" for b in BUDGETS], f"samples for {TARGET_RATIO:g} x"], rows), ""]
    bound, oracle = ceilings["upper bound, one-sided certificates"], ceilings["fixed-n Clopper-Pearson (oracle n)"]
    if per_input:
        ratio = per_input["mean_radius_all"] / cohen if cohen else float("nan")
        at, at_oracle = (best_mean_radius(r, per_input["samples_mean"]) for r in (bound, oracle))
        lines += [f"The service's per-input route (docs/results.md, no oracle): mean radius "
                  f"{per_input['mean_radius_all']:.3f} ({ratio:.2f} x its Cohen-10k) at {per_input['samples_mean']:,.1f} "
                  f"mean samples: {per_input['mean_radius_all'] / at_oracle:.2f} of the fixed-n oracle ({at_oracle:.3f}) "
                  f"and {per_input['mean_radius_all'] / at:.2f} of the upper bound ({at:.3f}) at that mean budget.", ""]
    lines += [f"Target (issue 9): >= {TARGET_RATIO:g} x within {TARGET_SAMPLES} mean samples. A fixed-n method that knew "
              f"every pA would reach {best_mean_radius(oracle, TARGET_SAMPLES) / ref:.2f} x there (it needs "
              f"{samples_for(oracle, TARGET_RATIO * ref):,.0f} mean samples for {TARGET_RATIO:g} x); the upper bound for "
              f"one-sided certificates is {best_mean_radius(bound, TARGET_SAMPLES) / ref:.2f} x ({TARGET_RATIO:g} x from "
              f"{samples_for(bound, TARGET_RATIO * ref):,.0f} mean samples), so the target is not ruled out by "
              "information alone, but it asks a method without an oracle to beat a fixed-n oracle.", ""]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--counts", default=None, help="cache of the drawn counts (default runs/eval/ceiling-IxN.npz)")
    p.add_argument("--results", default="docs/results.json", help="the evaluation's JSON (for its Cohen-10k and "
                   "per-input figures)")
    p.add_argument("--out", default="docs/per-input-ceiling.md")
    args = p.parse_args()
    t0 = time.perf_counter()
    cache = Path(args.counts or f"runs/eval/ceiling-{args.images}x{args.n}.npz")
    data = draw_counts(args.images, args.n, args.seed, cache)
    data["tested"] = tested_classes(args.images)
    text = report(args, data, t0)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
