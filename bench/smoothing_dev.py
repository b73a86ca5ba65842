"""Development (held-out) noise streams for choosing the stopping rule's and the prior mixture's defaults.

The defaults of :mod:`smoothing.stopping` and :mod:`smoothing.priors` are chosen on these streams, never on the test
set: images from the bundle's calibration split (disjoint from everything the base model, the surrogate and the
meta-learner were trained on, so their pA distribution is that of test images; using them here touches no conformal
guarantee, since the sequential route's guarantee holds for any fixed rule). Per image: its training-set index, label,
the clean-image class the sequential path tests (surrogate arg-max), the meta-learner's Beta prior, n0 Cohen
selection samples and an ordered stream of n noisy predictions of the base model.

Run: ``python -m bench.smoothing_dev --images 500 --n 2048 --out runs/smoothing-dev/streams.npz`` (CPU: about
1,300 samples/s on the shared 2-core machine, so ~15 minutes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def collect(images: int, n: int, n0: int, seed: int, out: Path) -> None:
    from calibration.data import load_dataset, make_splits
    from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle
    from models.priors import meta_features, softmax
    from models.sampling import SamplingEngine

    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    m = bundle.manifest
    ds = load_dataset(m.provenance.get("dataset", "fashion-mnist"))
    sp = m.provenance["splits"]
    splits = make_splits(len(ds.x_train), calibration=sp["calibration"], surrogate_train=sp["surrogate_train"],
                         seed=sp["seed"])
    if splits.record()["indices_sha256"] != sp["indices_sha256"]:
        raise RuntimeError("the bundle's recorded split digest does not match: cannot tell which images are held out")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(splits.calibration, size=images, replace=False))
    x, y = ds.x_train[idx], ds.y_train[idx]
    base = bundle.backend("base", device="cpu")
    feats, c_seq = meta_features(base.forward(x), softmax(bundle.backend("surrogate", device="cpu").forward(x)))
    prior = bundle.backend("meta", device="cpu").forward(feats)
    engine = SamplingEngine(base, sigma=m.sigma, num_classes=len(m.classes), batch_size=1024)
    selection = engine.count(x, n0, rng)
    stream = np.zeros((images, n), dtype=np.uint8)
    t0 = time.perf_counter()
    for i, img in enumerate(x):
        stream[i] = engine.predictions(img, n, rng)
        if (i + 1) % 50 == 0:
            print(f"{i + 1}/{images} images, {time.perf_counter() - t0:.0f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, index=idx, label=y, tested_class=c_seq, prior=prior, selection=selection, stream=stream,
                        sigma=m.sigma, bundle_sha256=bundle.model_sha256, seed=seed)
    print(f"wrote {out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--out", default="runs/smoothing-dev/streams.npz")
    args = p.parse_args()
    collect(args.images, args.n, args.n0, args.seed, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
