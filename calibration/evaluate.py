"""``certserve calibrate evaluate``: every certification method side by side on the same test images and noise.

Per image: one ordered stream of n noisy predictions of the base model (plus n0 separate selection samples for
Cohen). Cohen-10k/1k use the stream's first 10k/1k samples; the sequential methods replay it through the worker's
checkpoint schedule, stopping where the rule fires (the engine under load; calibration.front says what speculation
adds at light load); the surrogate needs one forward pass (at every calibrated risk level); per-input = the server's
``auto`` + ``per_input=true`` (the e-process targeting the surrogate's proposed radius, auto budget); auto = the
surrogate where its radius is >= AUTO_MIN_SURROGATE_Z sigmas (models.surrogate.auto_uses_surrogate, the server's
rule), else that per-input path. ``--streams`` caches the sampled streams (keyed by bundle,
data, images and their digest, n, n0, seed), so re-evaluating a recalibrated bundle draws no new noise.
Sharing the noise across methods (common random numbers) makes the comparison sharper; each method on its own
uses samples that are i.i.d. and independent of its class selection, so each is valid on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from calibration import front
from calibration.report import RADII, plots, short_n, write_report
from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle, sha256_file
from models.defaults import AUTO_MAX_SAMPLES, AUTO_MIN_SURROGATE_Z, default_batch_size
from models.priors import class_and_prior, softmax
from models.sampling import SamplingEngine
from models.surrogate import auto_uses_surrogate, surrogate_answers
from smoothing import (DEFAULT_MIN_GAIN, PER_INPUT_MIN_GAIN, best_radius_decision, certified_radius, certify,
                       clopper_pearson_upper, proposal_decision, proposal_radius)

METHODS = ("cohen-10k", "cohen-1k", "sequential-kt", "sequential-meta", "surrogate", "auto", "per-input")


def method_names(n: int) -> tuple[str, ...]:
    """The report's method names for n samples per image (Cohen-n and Cohen-n/10, capped at 1k)."""
    return (f"cohen-{short_n(n)}", f"cohen-{short_n(_small_n(n))}", *METHODS[2:])


def _small_n(n: int) -> int:
    """Samples of the smaller Cohen run: n / 10, capped at 1,000 (Cohen-1k at the default n = 10,000)."""
    return min(1000, max(1, n // 10))


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: an integer >= 1 (a negative one would slice from the end, silently)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type for a seed: an integer >= 0 (numpy refuses a negative one mid-run, naming no flag)."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type for a threshold: a finite number (nan would silently route every image to the fallback)."""
    return _float_where(text, lambda v: True, "a finite number")


def positive_float(text: str) -> float:
    """argparse type for a noise level: a finite number > 0 (0 or less drew no noise, or noise of the wrong sign)."""
    return _float_where(text, lambda v: v > 0, "a finite number > 0")


def request_alpha(text: str) -> float:
    """argparse type for a risk level: a number in [1e-15, 1), as a request's alpha (certification.plan)."""
    return _float_where(text, lambda v: 1e-15 <= v < 1, "a number in [1e-15, 1), as a request's alpha")


def _float_where(text: str, ok, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def sampler_on(device: str, load):
    """``load()``: the sampling backend on ``device``. ``--device cuda`` where neither onnxruntime nor torch can run
    it is a ValueError on one line (``certserve: error: ...``, exit 2), not a traceback."""
    try:
        return load()
    except RuntimeError as exc:
        if device != "cuda":
            raise
        raise ValueError(f"--device cuda: {exc}") from None


def add_arguments(p) -> None:
    p.add_argument("bundle", nargs="?", default=str(DEFAULT_BUNDLE_DIR))
    p.add_argument("--images", type=positive_int, default=1000, help="first N images of the official test set")
    p.add_argument("--n", type=positive_int, default=10000, help="samples per image (Cohen-10k's n, sequential budget)")
    p.add_argument("--n0", type=positive_int, default=100, help="Cohen selection samples")
    p.add_argument("--alpha", type=request_alpha, default=0.001)
    p.add_argument("--fraction", type=float, default=None, help="sequential methods: the fraction rule at this "
                   "fraction instead of smoothing's default marginal-gain rule")
    p.add_argument("--auto-budget", type=positive_int, default=None,
                   help="budget of auto-mode fallbacks (default: the server's auto_max_samples)")
    p.add_argument("--auto-min-surrogate-z", type=finite_float, default=None,
                   help="auto answers with the surrogate at radius >= this many sigmas (default: the server's)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--sampler", default=None, help="sample with this copy of the base model instead (e.g. TorchScript on GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--seed", type=non_negative_int, default=12345)
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--json", default=None, help="also write raw per-method metrics as JSON")
    p.add_argument("--streams", default=None, help="cache of the sampled streams (.npz): reused when it matches")
    p.set_defaults(func=run)


def run(args) -> int:
    results = evaluate(args)
    results["command_args"] = _command_args(args)
    write_report(results, Path(args.out))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"report written to {args.out}")
    return 0


def _command_args(args) -> str:
    """What followed ``certserve calibrate evaluate``, for the report's Command line: from the command cli.main.main
    was given (``args.command_line``), not the host process's sys.argv (another tool's or pytest's arguments when
    main(argv) is called from code)."""
    line = getattr(args, "command_line", None)
    words = line.split(" ")[3:] if line else sys.argv[3:]
    return " ".join(words)


def evaluate(args) -> dict:
    from calibration.data import check_fits, load_dataset

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    ds = load_dataset(args.data)
    check_fits(ds, m.input.shape, len(m.classes), f"bundle {m.name!r}")
    x, y = ds.x_test[: args.images], ds.y_test[: args.images]
    base = bundle.backend("base", device="cpu")
    # clean forward passes (fixed before any noise): surrogate class, log-odds and point estimate, meta prior
    surrogate, meta = (bundle.backend(role, device="cpu") if bundle.path(role) else None for role in ("surrogate", "meta"))
    logits = surrogate.forward(x) if surrogate is not None else None
    c_seq, prior = class_and_prior(base, surrogate, meta, x, None if logits is None else softmax(logits))
    latency = _clean_latency(bundle, x[:200])
    selection, stream, sampler_name, per_sample, sampling_seconds = _streams(args, bundle, x)

    k = len(m.classes)
    n_small = _small_n(args.n)
    counts = {n: np.stack([(stream[:, :n] == c).sum(axis=1) for c in range(k)], axis=1) for n in {n_small, args.n}}
    raw: dict[str, tuple] = {}  # method -> (class or -1, radius, samples, seconds per image)
    for name, n in ((f"cohen-{short_n(args.n)}", args.n), (f"cohen-{short_n(n_small)}", n_small)):
        cert = certify(selection, counts[n], args.alpha, m.sigma, trials=n)  # a NaN copy (label -1) is a miss
        raw[name] = (cert.class_index, cert.radius, np.full(len(x), n + args.n0),
                     np.full(len(x), per_sample * (n + args.n0) + latency["base"]))
    hits = np.cumsum(stream == c_seq[:, None], axis=1, dtype=np.int64)
    clean_cost = latency["base"] + latency["surrogate"] + latency["meta"]
    for name, (a, b) in (("sequential-kt", (np.full(len(x), 0.5), np.full(len(x), 0.5))),
                         ("sequential-meta", (prior[:, 0], prior[:, 1]))):
        used, radius = _replay_sequential(hits, a, b, args.alpha, m.sigma, args.n, args.fraction)
        raw[name] = (np.where(radius > 0, c_seq, -1), radius, used, per_sample * used + clean_cost)
    extra: dict[str, dict] = {}
    levels: dict[str, dict] = {}
    if logits is not None:
        auto_budget = min(args.n, getattr(args, "auto_budget", None) or AUTO_MAX_SAMPLES)
        ans = surrogate_answers(logits, m.calibration, m.sigma, args.alpha)
        raw["surrogate"] = (np.where(ans.radius > 0, ans.class_index, -1), ans.radius, np.zeros(len(x)),
                            np.full(len(x), latency["surrogate"]))
        extra["surrogate"] = {**_violations(ans, counts[args.n], args.n), "level": ans.level}
        r_prop = np.asarray(proposal_radius(ans.z_hat, sigma=m.sigma))
        used, radius = replay_per_input(hits[:, :auto_budget], prior, r_prop, args.alpha, m.sigma, auto_budget)
        raw["per-input"] = (np.where(radius > 0, c_seq, -1), radius, used, per_sample * used + clean_cost)
        min_z = getattr(args, "auto_min_surrogate_z", None)
        min_z = AUTO_MIN_SURROGATE_Z if min_z is None else min_z
        use_sur = auto_uses_surrogate(ans.radius, m.sigma, min_z)
        raw["auto"] = tuple(np.where(use_sur, s_, q_) for s_, q_ in zip(raw["surrogate"], raw["per-input"]))
        extra["auto"] = {"surrogate_share": float(use_sur.mean()), "fallback_budget": int(auto_budget),
                         "min_surrogate_z": min_z}
        extra["per-input"] = {"budget": int(auto_budget)}
        for lv in m.calibration.levels:
            a_l = surrogate_answers(logits, m.calibration, m.sigma, lv.alpha)
            cls_l = np.where(a_l.radius > 0, a_l.class_index, -1)
            levels[f"{lv.alpha:g}"] = {**_metrics(y, cls_l, a_l.radius, np.zeros(len(x)), np.zeros(len(x))),
                                      **_violations(a_l, counts[args.n], args.n)}
    methods = {name: {**_metrics(y, *vals), **extra.get(name, {})} for name, vals in raw.items()}
    plot_files = plots(y, raw, Path(args.out).parent, Path(args.out).stem)
    # the radius-samples front of every best-radius method (calibration/front.py), defaults marked, routes added
    selected = selection.argmax(axis=1)
    front_rows, front_marks = front.evaluation_points(
        hits, c_seq == y, prior, selected == y, np.cumsum(stream == selected[:, None], axis=1, dtype=np.int64),
        n0=args.n0, alpha=args.alpha, sigma=m.sigma, budget=args.n)
    front_marks += [{**front.point(c_seq == y if name != "surrogate" else raw[name][0] == y, raw[name][2],
                                   raw[name][1], method="route", prior="-", param=0), "note": f"route: {name}"}
                    for name in ("surrogate", "auto", "per-input") if name in raw]
    plot_files["front"] = f"{Path(args.out).stem}-front.png"
    front.plot(front_rows, front_marks, Path(args.out).parent / plot_files["front"],
               f"{len(x)} test images: mean radius vs mean samples (alpha={args.alpha}, sigma={m.sigma})")
    cal = m.calibration
    return {
        "bundle": {"name": m.name, "sha256": bundle.model_sha256, "sigma": m.sigma,
                   "alpha_cal": cal.alpha_cal if cal else None, "levels": [lv.alpha for lv in cal.levels] if cal else [],
                   "calibration": {"method": cal.method, "guarantee": cal.guarantee, "num_calibration":
                                   cal.num_calibration, "num_tuning": cal.num_tuning,
                                   "samples_per_image": cal.samples_per_image} if cal else None},
        "data": ds.name, "images": int(len(x)), "n": args.n, "n0": args.n0, "alpha": args.alpha,
        "fraction": args.fraction, "min_gain": DEFAULT_MIN_GAIN, "sampler": sampler_name,
        "sampling_seconds": round(sampling_seconds, 1), "samples_per_second": round(1 / per_sample),
        "latency_ms": {k_: round(v * 1e3, 3) for k_, v in latency.items()},
        "clean_accuracy": float((base.forward(x).argmax(axis=1) == y).mean()), "methods": methods,
        "surrogate_levels": levels, "plots": plot_files, "front": front_rows, "front_defaults": front_marks,
    }


def _streams(args, bundle, x) -> tuple[np.ndarray, np.ndarray, str, float, float]:
    """(selection counts, ordered streams, sampler name, seconds per sample, sampling seconds): drawn here, or read
    from ``args.streams`` when that cache was drawn with the same bundle model, sigma, sampler, data, images (their
    digest too), n, n0 and seed."""
    from models.backends import load_backend

    from calibration.counts import images_digest

    key = {"model": bundle.model_sha256, "data": args.data, "images": int(len(x)), "n": args.n, "n0": args.n0,
           "seed": args.seed, "sigma": bundle.manifest.sigma,  # two bundles may share a base model at different sigma
           "sampler_sha256": sha256_file(args.sampler) if args.sampler else None}
    # the images themselves: a data FILE rewritten at the same path (an .npz re-exported) holds other test images,
    # whose streams these are not. A cache written before the digest was recorded is trusted only for a named
    # dataset (fixed content), never for a file
    digest = images_digest(x)
    cache = Path(args.streams) if getattr(args, "streams", None) else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as d:
            info = json.loads(str(d["info"]))
            legacy = None if Path(args.data).suffix == ".npz" else digest
            if info["key"] == key and info.get("images_sha256", legacy) == digest:
                return d["selection"], d["stream"], info["sampler"], info["per_sample"], info["seconds"]
    sampler = sampler_on(args.device, lambda: load_backend(args.sampler, device=args.device) if args.sampler
                         else bundle.backend("base", device=args.device))
    batch = args.batch_size or default_batch_size(getattr(sampler, "device", "cpu"))
    engine = SamplingEngine(sampler, sigma=bundle.manifest.sigma, num_classes=len(bundle.manifest.classes),
                            batch_size=batch)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    selection = engine.count(x, args.n0, rng)
    stream = np.stack([engine.predictions(img, args.n, rng) for img in x]).astype(stream_dtype(engine.num_classes))
    seconds = time.perf_counter() - t0
    per_sample = seconds / (len(x) * (args.n + args.n0))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        info = {"key": key, "images_sha256": digest, "sampler": sampler.name, "per_sample": per_sample,
                "seconds": seconds}
        np.savez_compressed(cache, selection=selection, stream=stream, info=json.dumps(info))
    return selection, stream, sampler.name, per_sample, seconds


def stream_dtype(num_classes: int) -> type:
    """The smallest integer type that stores every noisy label of a stream exactly: a class 0..K-1, or -1 for a
    noisy copy that predicts no class (NaN logits). uint8 wrapped a class 300 to 44 and -1 to 255."""
    return np.int8 if num_classes <= 127 else np.int16 if num_classes <= 32767 else np.int32


def _violations(ans, counts, n) -> dict:
    """Surrogate certificates above the truth, estimated with the test streams: p_lower above a (1 - 0.001)
    Clopper-Pearson UPPER bound on pA (clear violations) and above the point estimate k/n (over-counts)."""
    certified = ans.radius > 0
    if ans.p_lower is None:
        return {"certified": 0, "violations_vs_cp_upper": 0, "violations_vs_point_estimate": 0}
    k_c = counts[np.arange(len(counts)), ans.class_index]
    upper = np.asarray(clopper_pearson_upper(k_c, n, 0.001))
    return {"certified": int(certified.sum()),
            "violations_vs_cp_upper": int(np.sum(certified & (ans.p_lower > upper))),
            "violations_vs_point_estimate": int(np.sum(certified & (ans.p_lower > k_c / n)))}


def _replay_sequential(hits, a, b, alpha, sigma, budget, fraction):
    """Replay the worker's checkpoints: stop where best_radius_decision fires; radius of the bound at that point."""
    rule = {} if fraction is None else {"fraction": fraction}  # None: smoothing's default (marginal gain)

    def decide(s, t, idx):
        return best_radius_decision(s, t, sigma=sigma, alpha=alpha, budget=budget, a=a[idx], b=b[idx], **rule)

    stop_t = front.replay(hits, decide, budget)
    s = hits[np.arange(len(hits)), stop_t - 1]
    return stop_t, np.asarray(certified_radius(s, stop_t, alpha, sigma, a, b))


def replay_per_input(hits, prior, r_prop, alpha, sigma, budget):
    """Replay the per-input path as the server runs it: the e-process stops when the surrogate's proposed radius (> 0;
    a proposal of 0 is none) is verified, otherwise by the best-radius rule at PER_INPUT_MIN_GAIN (smoothing.proposal_decision); radius of the
    bound at the stop (per input, anytime-valid)."""
    a, b = prior[:, 0], prior[:, 1]

    def decide(s, t, idx):  # a proposal of radius 0 is none (as the server's): the best-radius rule alone
        codes = np.asarray(best_radius_decision(s, t, sigma=sigma, alpha=alpha, budget=budget, a=a[idx], b=b[idx],
                                                min_gain=PER_INPUT_MIN_GAIN)).copy()
        has = r_prop[idx] > 0
        if has.any():
            codes[has] = proposal_decision(s[has], t[has], sigma=sigma, proposal_radius=r_prop[idx][has], alpha=alpha,
                                           budget=budget, a=a[idx][has], b=b[idx][has], min_gain=PER_INPUT_MIN_GAIN)
        return codes

    stop_t = front.replay(hits, decide, budget)
    s = hits[np.arange(len(hits)), stop_t - 1]
    return stop_t, np.asarray(certified_radius(s, stop_t, alpha, sigma, a, b))


def _metrics(y, cls, radius, samples, seconds) -> dict:
    """Halt Fast columns: certified accuracy (class correct and radius >= r), mean radius, samples all/cert./rest."""
    cert_correct = (cls == y) & (cls >= 0)
    samples = np.asarray(samples, dtype=np.float64)
    rest = ~cert_correct
    return {
        "certified_accuracy": {f"{r:g}": float(np.mean(cert_correct & (radius >= r))) for r in RADII},
        "mean_radius_all": float(np.mean(np.where(cert_correct, radius, 0.0))),
        "mean_radius_certified_correct": float(radius[cert_correct].mean()) if cert_correct.any() else 0.0,
        "abstain_rate": float(np.mean(cls < 0)),
        "samples_mean": float(samples.mean()),
        "samples_certified": float(samples[cert_correct].mean()) if cert_correct.any() else 0.0,
        "samples_rest": float(samples[rest].mean()) if rest.any() else 0.0,
        "ms_per_image": float(np.mean(seconds) * 1e3),
    }


def _clean_latency(bundle, x) -> dict:
    """Median batch-1 latency (seconds) of each clean forward pass, measured on CPU onnxruntime."""
    out = {}
    for role in ("base", "surrogate", "meta"):
        if bundle.path(role) is None:
            out[role] = 0.0
            continue
        backend = bundle.backend(role, device="cpu", threads=1)
        inputs = x if role != "meta" else np.zeros((len(x), len(bundle.manifest.meta_features)), np.float32)
        times = []
        for row in inputs[:100]:
            t0 = time.perf_counter()
            backend.forward(row[None])
            times.append(time.perf_counter() - t0)
        out[role] = float(np.median(times))
    return out
