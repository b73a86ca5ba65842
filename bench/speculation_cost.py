"""What the engine's speculation costs a best-radius job at light load, against the offline replay of the evaluation.

``calibration.evaluate`` replays the best-radius rule on cached streams and stops a job exactly at the checkpoint where
the rule fires: what the engine does under load (no spare batch capacity). With spare capacity the engine lets a
best-radius job draw up to its NEXT checkpoint while its decision is pending (:meth:`models.jobs.JobTable.speculative`),
and those samples count: the job stops up to one checkpoint interval (~10%) later, with a slightly larger radius.
Proposal and target jobs (auto's per-input path) never run ahead, so their rows in docs/results.md are exact.

Light load = one job at a time. Two parts:
* ``null``: the engine over the null sampler of :mod:`bench.engine_bench` (label rows with known pA, no model), jobs
  one at a time with speculation off and on, and the offline replay (:func:`calibration.front.replay`, as the
  evaluation does it) on the very same label rows (identical streams for all three);
* ``model``: the bundle's base model on the first ``--images`` Fashion-MNIST test images (class and prior from the
  clean image, as the service does), one job at a time, speculation off and on (the noise differs between the two).

Run: ``python -m bench.speculation_cost`` (about a minute on 2 CPU cores); writes docs/speculation-cost.md.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np

from bench.machine import code_version, machine_description
from bench.server_common import markdown_table

ALPHA, BUDGET, SIGMA = 0.001, 10_000, 0.25


def one_at_a_time(sampler, specs, speculate: bool, seed: int) -> np.ndarray:
    """(samples, radius) of each spec, submitted one at a time to a fresh engine (light load)."""
    from models.engine import SequentialEngine

    engine = SequentialEngine(sampler, max_live_jobs=8, seed=seed, speculate=speculate).start()
    try:
        results = [engine.submit(spec).result(timeout=600) for spec in specs]
    finally:
        engine.stop(0.0)
    return np.array([(r.samples, r.radius) for r in results])


def null_part(jobs: int, seed: int) -> list[list[str]]:
    from bench.engine_bench import ROWS, NullSampler
    from calibration.front import replay
    from models.engine import JobSpec
    from smoothing import best_radius_decision, certified_radius

    specs = lambda: [JobSpec(np.array([i % ROWS], dtype=np.float32), ALPHA, BUDGET, time.monotonic() + 600,  # noqa
                             tested_class=0) for i in range(jobs)]
    runs = {flag: one_at_a_time(NullSampler(1024, seed), specs(), flag, seed) for flag in (False, True)}
    hits = np.cumsum(NullSampler(1024, seed).labels[:jobs, :BUDGET] == 0, axis=1)  # the rows the jobs drew
    kt = np.full(jobs, 0.5)
    used = replay(hits, lambda s, t, idx: best_radius_decision(s, t, sigma=SIGMA, alpha=ALPHA, budget=BUDGET,
                                                               a=kt[idx], b=kt[idx]), BUDGET)
    radius = np.asarray(certified_radius(hits[np.arange(jobs), used - 1], used, ALPHA, SIGMA, kt, kt))
    rows = [["offline replay (docs/results.md)", f"{used.mean():,.1f}", f"{radius.mean():.4f}", "-"]]
    for flag, out in runs.items():
        rows.append([f"engine, speculation {'on (default)' if flag else 'off'}", f"{out[:, 0].mean():,.1f}",
                     f"{out[:, 1].mean():.4f}", f"{int((out[:, 0] != used).sum())} / {jobs}"])
    return rows


def model_part(images: int, seed: int) -> list[list[str]]:
    from bench.models_and_data import load_test_images, server_class_and_prior
    from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle
    from models.engine import JobSpec
    from models.sampling import SamplingEngine

    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    x, _ = load_test_images(images)
    tested, prior = server_class_and_prior(bundle, x)
    specs = [JobSpec(x[i], ALPHA, BUDGET, time.monotonic() + 600, tested_class=int(tested[i]),
                     prior=(float(prior[i, 0]), float(prior[i, 1]))) for i in range(images)]
    rows = []
    for flag in (False, True):
        sampler = SamplingEngine(bundle.backend("base", device="cpu"), sigma=bundle.manifest.sigma,
                                 num_classes=len(bundle.manifest.classes), batch_size=1024)
        out = one_at_a_time(sampler, specs, flag, seed)
        rows.append([f"engine, speculation {'on (default)' if flag else 'off'}", f"{out[:, 0].mean():,.1f}",
                     f"{out[:, 1].mean():.4f}"])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200, help="null part: jobs (label rows)")
    p.add_argument("--images", type=int, default=40, help="model part: test images")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", default="docs/speculation-cost.md")
    args = p.parse_args()
    t0 = time.perf_counter()
    null_rows, model_rows = null_part(args.jobs, args.seed), model_part(args.images, args.seed)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    text = "\n".join([
        "# What speculation costs a best-radius job at light load", "",
        f"Generated by `python -m bench.speculation_cost --jobs {args.jobs} --images {args.images}` on {when} "
        f"({time.perf_counter() - t0:.0f} s; {code_version()}; {machine_description()}).", "",
        "\n\n".join(__doc__.split("\n\n")[1:3]), "",
        f"Null sampler, {args.jobs} jobs (best-radius rule, KT prior, alpha {ALPHA:g}, budget {BUDGET:,}):", "",
        markdown_table(["method", "mean samples", "mean radius", "jobs whose samples differ from the replay"],
                       null_rows), "",
        f"Base model, the first {args.images} Fashion-MNIST test images (meta + KT prior, alpha {ALPHA:g}, "
        f"budget {BUDGET:,}):", "",
        markdown_table(["method", "mean samples", "mean radius"], model_rows), ""])
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
