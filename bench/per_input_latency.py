"""Latency of a lone per-input request (auto + per_input=true, one request at a time), this checkout against another,
side by side in one run.

Each checkout runs in its own subprocess (its own packages first on ``sys.path``), alternately (which one goes first
alternates too), ``--rounds`` times. A subprocess builds the certification service of the default bundle with a fixed
seed and certifies the first ``--images`` test images one at a time through ``CertificationService.certify`` (the
service the HTTP app calls: plan, e-process job on the engine, certificate, seal), after a warm-up. Reported per
checkout: the median over rounds of the mean request latency and of the mean samples per request, and the ratio
this / other as the median of the per-round ratios (each round's two runs see about the same machine load) with
their range, also per sample (the seeded noise stream is shared by consecutive requests, so a change in how many
samples the engine draws moves later requests onto other noise and other sample counts). At one request in flight
the engine's per-step bookkeeping (mostly the stopping policy) runs between the job's model calls, so it shows up in
the latency directly.

    python -m bench.per_input_latency --against DIR   # DIR: another checkout, e.g. git worktree add /tmp/before e827423
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

_CHILD = r"""
import asyncio, json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from bench.models_and_data import load_test_images
from certification.plan import CertifyParams
from server.app import build_service
from server.settings import Settings
import server
assert server.__file__.startswith(sys.argv[1]), server.__file__
service = build_service(Settings(), seed=0)
service.start()
images = load_test_images(int(sys.argv[2]))[0].astype(np.float32)
params = CertifyParams(per_input=True)

async def main():
    for image in images[:3]:  # warm-up
        await service.certify(image.reshape(1, 28, 28), params, request_id="warm-up")
    ms, samples = [], []
    for image in images:
        t0 = time.perf_counter()
        cert = await service.certify(image.reshape(1, 28, 28), params, request_id="bench")
        ms.append((time.perf_counter() - t0) * 1e3)
        samples.append(cert.samples)
    return ms, samples

ms, samples = asyncio.run(main())
service.stop(0.0)
print(json.dumps({"ms": float(np.mean(ms)), "samples": float(np.mean(samples))}))
"""


def run_checkout(path: str, images: int) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, str(Path(path).resolve()), str(images)], capture_output=True,
                         text=True, check=True, cwd=path)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.per_input_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="another checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args(argv)
    here = str(Path(__file__).resolve().parents[1])
    runs: dict[str, list[dict]] = {"this": [], "other": []}
    for r in range(args.rounds):
        order = [("other", args.against), ("this", here)] if r % 2 else [("this", here), ("other", args.against)]
        for name, path in order:
            runs[name].append(run_checkout(path, args.images))
            print(f"  round {r + 1}: {name} {runs[name][-1]['ms']:.1f} ms, {runs[name][-1]['samples']:.0f} samples",
                  flush=True)
    ratios = np.array([a["ms"] / b["ms"] for a, b in zip(runs["this"], runs["other"])])
    per_sample = np.array([(a["ms"] / a["samples"]) / (b["ms"] / b["samples"])
                           for a, b in zip(runs["this"], runs["other"])])
    commit = subprocess.run(["git", "-C", args.against, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or args.against
    med = {k: (float(np.median([x["ms"] for x in v])), float(np.median([x["samples"] for x in v])))
           for k, v in runs.items()}
    print(f"\nlone per-input request, {args.images} test images, {args.rounds} alternating rounds:\n"
          f"| checkout | mean latency ms | mean samples |\n|---|---|---|\n"
          f"| {commit} | {med['other'][0]:.1f} | {med['other'][1]:.0f} |\n| this | {med['this'][0]:.1f} | "
          f"{med['this'][1]:.0f} |\n\nlatency ratio this / {commit}: **{np.median(ratios):.2f}** (per-round range "
          f"{ratios.min():.2f} - {ratios.max():.2f}); per sample: **{np.median(per_sample):.2f}** "
          f"({per_sample.min():.2f} - {per_sample.max():.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
