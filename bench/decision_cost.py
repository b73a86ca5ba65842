"""Cost of one best-radius policy call (the engine's per-step decision) by number of jobs, this checkout against
another one, side by side in one run.

Each checkout runs in its own subprocess (its own ``smoothing`` on ``sys.path``), alternately (which one goes first
alternates too), ``--rounds`` times; per checkout and job count the median over rounds of the mean call time is
reported, and the ratio this / other as the median of the per-round ratios (each round's two runs see about the same
machine load) with their range. The
jobs are random (seeded): counts t in [1, 3000), hit rates from 0.52 to 0.999, alpha 0.001 or 0.01, Beta priors with
a in [0.3, 20] and b in [0.3, 5], budget 10,000, lambda 5e-5; the decision codes of both checkouts are compared too
(they must be equal: the policy is the same function of (S_t, t)).

Run as ``python -m bench.decision_cost --against DIR`` where DIR is another checkout, e.g. ``git worktree add
/tmp/before 7018c58``; writes docs/decision-cost.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

JOB_COUNTS = (1, 8, 64, 512, 4096)

_CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from smoothing import best_radius_decision
import smoothing
assert smoothing.__file__.startswith(sys.argv[1]), smoothing.__file__
out = {}
for n in json.loads(sys.argv[2]):
    rng = np.random.default_rng([7, n])
    t = rng.integers(1, 3000, n)
    s = rng.binomial(t, rng.choice([0.999, 0.99, 0.9, 0.6, 0.52], n))
    kw = dict(sigma=0.25, alpha=rng.choice([0.001, 0.01], n), budget=np.full(n, 10_000), a=rng.uniform(0.3, 20, n),
              b=rng.uniform(0.3, 5, n), min_gain=np.full(n, 5e-5))
    codes = best_radius_decision(s, t, **kw)
    reps = max(5, 4000 // max(n, 8))
    t0 = time.perf_counter()
    for _ in range(reps):
        best_radius_decision(s, t, **kw)
    out[n] = [(time.perf_counter() - t0) / reps * 1e3, codes.tolist()]
print(json.dumps(out))
"""


def run_checkout(path: str) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, str(Path(path).resolve()), json.dumps(JOB_COUNTS)],
                         capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(res.stdout).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decision_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="another checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="docs/decision-cost.md")
    args = parser.parse_args(argv)
    here = str(Path(__file__).resolve().parents[1])
    times: dict[str, dict[int, list[float]]] = {"this": {n: [] for n in JOB_COUNTS}, "other": {n: [] for n in JOB_COUNTS}}
    equal = True
    for r in range(args.rounds):  # alternate, so that both see the same machine load
        if r % 2:
            other, this = run_checkout(args.against), run_checkout(here)
        else:
            this, other = run_checkout(here), run_checkout(args.against)
        for n in JOB_COUNTS:
            times["this"][n].append(this[n][0])
            times["other"][n].append(other[n][0])
            equal &= this[n][1] == other[n][1]
    rows = []
    for n in JOB_COUNTS:
        a, b = float(np.median(times["this"][n])), float(np.median(times["other"][n]))
        ratios = np.array(times["this"][n]) / np.array(times["other"][n])
        rows.append(f"| {n:,} | {b:.3f} | {a:.3f} | **{np.median(ratios):.2f}** | {ratios.min():.2f} - {ratios.max():.2f} |")
    commit = subprocess.run(["git", "-C", args.against, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or args.against
    text = f"""# Cost of one best-radius policy call (the engine's per-step decision)

{__doc__.split(chr(10), 2)[2].strip()}

Command: `python -m bench.decision_cost --against <checkout of {commit}> --rounds {args.rounds}`; this checkout vs
{commit}, {args.rounds} alternating rounds: median of the per-round mean call time, and of the per-round ratios.

| jobs in the call | {commit} ms | this checkout ms | **ratio** (median over rounds) | ratio range over rounds |
|---|---|---|---|---|
{chr(10).join(rows)}

Decision codes identical in every call: **{'yes' if equal else 'NO'}**.
"""
    Path(args.out).write_text(text)
    print(text)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
