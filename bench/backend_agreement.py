"""Does the device backend sample the same smoothed classifier as the bundle's ONNX model on the CPU?

``python -m bench.backend_agreement --device cuda --out DIR`` compares the bundle's base model as the server runs it
on ``--device`` (on a GPU host without onnxruntime-gpu: PyTorch, converted from base.onnx) with onnxruntime on the
CPU, on the first ``--images`` Fashion-MNIST test images:

1. clean logits: the largest absolute difference and the arg-max agreement (TF32 is off on the torch backend, so
   the two should agree to float32 rounding);
2. noisy counts: ``--samples`` Gaussian draws per image on each backend (independent noise, both seeded) and, per
   image, an exact test of equal miss rates (misses of the tested class, the CPU's clean arg-max): given the two
   backends' misses m1 + m2, under equal rates and equal draws m1 ~ Binomial(m1 + m2, 1/2) (the conditional test
   of two Poisson/binomial rates; exact where the hit rates are near 1, where a z test's tails are far too heavy).
   The report gives the smallest p-value and the number of images with p < ``P_LIMIT`` (1e-4: a correct backend
   trips it on one of 100 images with probability <= 1%). A backend that clipped, scaled or reused noise, or
   mis-converted a layer, moves the miss rates of the images near the boundary by far more.

Writes ``DIR/backend-agreement.json``; exit 1 when an arg-max disagrees or an image has p < P_LIMIT. The CPU run of
this check compares onnxruntime with itself (a smoke test of the script only). Run on a lent GPU by
bench/device_run.sh.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

P_LIMIT = 1e-4
PER_CALL = 4096


def misses(sampler, images: np.ndarray, classes: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Draws per image whose prediction is not ``classes``: ``samples`` noisy draws each, in model calls of at most
    ``PER_CALL`` draws of one image (host memory stays small on a CPU backend)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(images), dtype=np.int64)
    for i in range(len(images)):
        for n in np.diff(np.append(np.arange(0, samples, PER_CALL), samples)):
            counts = sampler.count_chunks(images[i:i + 1], np.array([n]), rng)
            out[i] += n - counts[0, classes[i]]
    return out


def equal_rate_p_values(m1: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """Two-sided exact p-values of H0: equal miss rates, from m1 and m2 misses in equal numbers of independent
    draws: conditionally on m1 + m2, m1 ~ Binomial(m1 + m2, 1/2) under H0 (1 where neither missed)."""
    from scipy.stats import binomtest

    return np.array([binomtest(int(a), int(a + b), 0.5).pvalue if a + b else 1.0 for a, b in zip(m1, m2)])


def run(device: str, n_images: int, samples: int, seed: int) -> dict:
    from bench.models_and_data import load_test_images
    from models.bundle import load_bundle
    from models.sampling import SamplingEngine

    bundle = load_bundle()
    images, _ = load_test_images(n_images)
    sigma, classes_n = bundle.manifest.sigma, len(bundle.manifest.classes)
    cpu = bundle.backend("base", device="cpu")
    dev = bundle.backend("base", device=device)
    logits_cpu, logits_dev = cpu.forward(images), dev.forward(images)
    tested = logits_cpu.argmax(axis=1)
    samplers = [SamplingEngine(b, sigma=sigma, num_classes=classes_n, batch_size=PER_CALL) for b in (cpu, dev)]
    try:
        m_cpu, m_dev = (misses(s, images, tested, samples, seed + k) for k, s in enumerate(samplers))
    finally:
        for s in samplers:
            s.close()
    p = equal_rate_p_values(m_cpu, m_dev)
    result = {"device": device, "backend": dev.name, "images": n_images, "samples_per_image": samples,
              "logits_max_abs_diff": float(np.max(np.abs(logits_cpu - logits_dev))),
              "argmax_agree": int(np.sum(tested == logits_dev.argmax(axis=1))),
              "min_p_value": float(p.min()), "images_below_p_limit": int(np.sum(p < P_LIMIT)),
              "misses_cpu": int(m_cpu.sum()), "misses_device": int(m_dev.sum())}
    result["ok"] = result["argmax_agree"] == n_images and result["images_below_p_limit"] == 0
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("runs/backend-agreement"))
    args = ap.parse_args(argv)
    result = run(args.device, args.images, args.samples, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backend-agreement.json").write_text(json.dumps(result, indent=1))
    print(f"{result['backend']} vs onnxruntime-cpu on {result['images']} images: clean logits max |diff| "
          f"{result['logits_max_abs_diff']:.2e}, arg-max agree {result['argmax_agree']}/{result['images']}; "
          f"{result['samples_per_image']:,} noisy draws each: smallest p {result['min_p_value']:.3g}, "
          f"{result['images_below_p_limit']} image(s) below p {P_LIMIT:g}; misses of the tested class "
          f"{result['misses_cpu']:,} (cpu) vs {result['misses_device']:,}")
    print("agreement:", "ok" if result["ok"] else "FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
