"""Clean-input features of the meta-learner and the class the sequential path tests (numpy only).

Both are functions of the CLEAN image's forward passes only, computed before any noise sample is drawn, so the
class c and the Beta prior are fixed before the samples they are tested on (required for validity of c, harmless
for the prior, whose choice can cost power but never validity).
"""

from __future__ import annotations

import numpy as np

from smoothing import KT_PRIOR

#: Feature names of the meta-learner, in input order (the bundle's ``meta_features``). All from the CLEAN input only.
FEATURE_NAMES = ("surrogate_top_prob", "base_margin", "base_entropy", "base_agrees")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def tested_class(base_logits: np.ndarray, surrogate_probs: np.ndarray | None) -> np.ndarray:
    """The class c whose hit rate pA is tested: the surrogate's arg-max when there is one, else the base model's. A
    surrogate row that is no distribution (NaN: its logits held a NaN or a +inf, where models.surrogate abstains) has
    no arg-max and gets the base model's class (numpy's arg-max took the first NaN: class 0, whatever the image)."""
    base = np.asarray(base_logits).argmax(axis=1)
    if surrogate_probs is None:
        return base
    probs = np.asarray(surrogate_probs)
    return np.where(np.all(np.isfinite(probs), axis=1), probs.argmax(axis=1), base)


def meta_features(base_logits: np.ndarray, surrogate_probs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 4) float32 in FEATURE_NAMES order, tested class (N,)) from clean-input forward passes."""
    p_base = softmax(np.asarray(base_logits, dtype=np.float64))
    c = tested_class(base_logits, surrogate_probs)
    top2 = np.sort(p_base, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    entropy = -(p_base * np.log(np.clip(p_base, 1e-12, 1.0))).sum(axis=1)
    top_prob = (np.asarray(surrogate_probs)[np.arange(len(c)), c] if surrogate_probs is not None
                else p_base[np.arange(len(c)), c])
    agrees = (p_base.argmax(axis=1) == c).astype(np.float64)
    return np.stack([top_prob, margin, entropy, agrees], axis=1).astype(np.float32), c


def class_and_prior(base, surrogate, meta, images: np.ndarray,
                    surrogate_probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tested class (N,) and Beta prior (N, 2) of each clean image, from clean forward passes only.

    ``base``, ``surrogate`` and ``meta`` are backends with ``forward`` (``surrogate`` and ``meta`` may be None); pass
    ``surrogate_probs`` when the surrogate already ran on these images. Without a meta model the prior is KT; with one,
    an image whose meta output is not two finite numbers >= the smallest normal float gets KT too. The one
    implementation used by the certification service, the offline evaluation and the benchmarks: the class and prior
    a request is tested with are exactly the ones evaluated offline.
    """
    if surrogate_probs is None and surrogate is not None:
        surrogate_probs = softmax(surrogate.forward(images))
    feats, tested = meta_features(base.forward(images), surrogate_probs)
    kt = np.tile(np.asarray(KT_PRIOR, dtype=np.float64), (len(feats), 1))
    if meta is None:
        return tested, kt
    prior = np.array(meta.forward(feats), dtype=np.float64)
    # a row that is no Beta prior (NaN from NaN features, 0 or inf from a float32 under/overflow, a subnormal whose
    # 1 / a overflows) gets KT: the prior's choice costs power only, while the engine would refuse such a job (500)
    usable = np.all(np.isfinite(prior) & (prior >= np.finfo(np.float64).tiny), axis=1)
    return tested, np.where(usable[:, None], prior, kt)
