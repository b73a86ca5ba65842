"""Section (d): the Fashion-MNIST test stream through a running server in auto mode."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from bench.models_and_data import load_test_images
from bench.server_common import TARGET_AUTO_SAMPLES, latency_summary, markdown_table, png_bytes
from bench.server_process import ServerProc


def bench_auto(args, ctx, server: ServerProc) -> tuple[str, str, str, dict]:
    from server.settings import Settings

    n = args.auto_images or (1000 if args.full else 500)
    conc = 8
    settings = Settings()  # what the spawned server runs with (same environment, no overrides but host/port/device)
    alpha = settings.default_alpha
    budget = getattr(settings, "auto_max_samples", settings.max_samples)  # older servers: max_samples
    images, labels = load_test_images(n)
    pngs = [png_bytes(x) for x in images]

    rss_marks: dict[int, float] = {}  # server VmRSS (MiB) when 25/50/75/100% of the answers were in
    responses, seconds = _stream(server, pngs, {}, conc, rss_marks)
    ok = [(i, r[1], r[2]) for i, r in enumerate(responses) if r[0] == 200]
    codes = {}
    for r in responses:
        codes[str(r[0])] = codes.get(str(r[0]), 0) + 1
    samples = np.array([c["samples"] for _, c, _ in ok], dtype=np.float64)
    methods, reasons = {}, {}
    for _, c, _ in ok:
        methods[c["method"]] = methods.get(c["method"], 0) + 1
        if c.get("fallback_reason"):
            reasons[c["fallback_reason"]] = reasons.get(c["fallback_reason"], 0) + 1
    cls = np.array([c["class_index"] for _, c, _ in ok])
    lab = np.array([int(labels[i]) for i, _, _ in ok])
    rad = np.array([c["radius"] for _, c, _ in ok])
    correct = (cls == lab) & (cls >= 0)
    by_method = {}
    for m in sorted(methods):
        sel = [k for k, (_, c, _) in enumerate(ok) if c["method"] == m]
        lat = latency_summary([ok[k][2] for k in sel])
        by_method[m] = {"n": len(sel), "samples": float(samples[sel].mean()), "cert_acc": float(correct[sel].mean()),
                        "mean_radius": float(np.where(correct, rad, 0.0)[sel].mean()),
                        "abstain": float((cls[sel] < 0).mean()), "p50_ms": lat["p50"], "p99_ms": lat["p99"],
                        "stopped_by": {}}
        for k in sel:
            sb = ok[k][1]["stopped_by"]
            by_method[m]["stopped_by"][sb] = by_method[m]["stopped_by"].get(sb, 0) + 1
    mean_samples = float(samples.mean()) if len(samples) else float("nan")
    se_samples = float(samples.std(ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")
    verdict = "PASS" if mean_samples <= TARGET_AUTO_SAMPLES and len(ok) == n else "FAIL"
    total_lat = latency_summary([c[2] for c in ok])
    rows = [[m, str(d["n"]), f"{d['n'] / len(ok):.1%}", f"{d['samples']:,.1f}", f"{d['cert_acc']:.3f}",
             f"{d['mean_radius']:.3f}", f"{d['abstain']:.1%}", f"{d['p50_ms']:.1f}", f"{d['p99_ms']:.1f}",
             ", ".join(f"{k} {v}" for k, v in sorted(d["stopped_by"].items()))] for m, d in by_method.items()]
    rows.append(["**all**", str(len(ok)), "100%", f"**{mean_samples:,.1f}**", f"**{float(correct.mean()):.3f}**",
                 f"{float(np.where(correct, rad, 0.0).mean()):.3f}", f"{float((cls < 0).mean()):.1%}",
                 f"{total_lat['p50']:.1f}", f"{total_lat['p99']:.1f}", ""])
    table = markdown_table(["method", "requests", "share", "mean samples (base-model evaluations)",
                            "cert. acc (r=0)", "mean radius", "abstain", "p50 ms", "p99 ms", "stopped by"], rows)
    rss_txt = ", ".join(f"{v:.0f} MiB after {q}% of the answers" for q, v in sorted(rss_marks.items()))
    reason_txt = ", ".join(f"`{k}` {v} ({v / len(ok):.1%})" for k, v in sorted(reasons.items())) or "none"
    body = f"""The first {n} Fashion-MNIST test images (official test split, in order) as PNG through the running
server (`POST /certify`, multipart, no fields: auto mode, default alpha {alpha:g}, fallback budget {budget:,}),
{conc} requests in flight (closed loop, asyncio + httpx), {seconds:.1f} s for all ({n / seconds:.1f} req/s).
Samples = the response's `samples` field (base-model evaluations under noise; 0 for surrogate answers). Certified
accuracy = certified and class == label; mean radius counts 0 for wrong or abstained answers. HTTP status codes:
{codes}.

{table}

Fallback reasons (auto requests not answered by the surrogate): {reason_txt}.

Server VmRSS while this stream was answered (leak check): {rss_txt}.

**Target: mean base-model evaluations per request <= {TARGET_AUTO_SAMPLES:g}: {verdict}** ({mean_samples:,.1f},
standard error {se_samples:.1f}: the sequential jobs' sample counts are random and the server draws fresh noise on
every run, so this mean varies between runs).
"""
    data = {"images": n, "alpha": alpha, "budget": budget, "mean_samples": mean_samples, "se_samples": se_samples,
            "methods": methods, "fallback_reasons": reasons,
            "cert_acc": float(correct.mean()), "by_method": by_method, "verdict": verdict, "seconds": seconds,
            "codes": codes, "rss_marks_mib": rss_marks}
    routes_txt, routes = _route_comparison(args, server, pngs, labels, responses, seconds, conc, alpha)
    body += routes_txt
    data["routes"] = routes
    return "auto", "(d) Auto mode on the Fashion-MNIST test stream", body, data


ROUTES = (("`mode=surrogate`", {"mode": "surrogate"}), ("`auto` (default)", None),
          ("`auto` + `per_input=true`", {"per_input": "true"}))


def _stream(server: ServerProc, pngs: list[bytes], fields: dict, conc: int, rss_marks: dict | None = None):
    """POST every PNG (multipart, with ``fields``) with ``conc`` requests in flight: ([(status, body, ms)], seconds)."""
    import httpx

    n = len(pngs)

    async def main():
        sem = asyncio.Semaphore(conc)
        out: list = [None] * n
        done = [0]
        limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120.0) as client:
            async def one(i):
                async with sem:
                    t = time.perf_counter()
                    r = await client.post("/certify", files={"image": ("image.png", pngs[i], "image/png")},
                                          data=fields)
                    out[i] = (r.status_code, r.json(), (time.perf_counter() - t) * 1e3)
                done[0] += 1
                for q in (25, 50, 75, 100):
                    if rss_marks is not None and q not in rss_marks and done[0] >= n * q / 100:
                        rss_marks[q] = server.rss().get("VmRSS", float("nan"))
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            return out, time.perf_counter() - t0

    return asyncio.run(main())


def _route_comparison(args, server, pngs, labels, auto_responses, auto_seconds, conc, alpha) -> tuple[str, list]:
    """Issue 9's table measured black-box: the same images through each route, side by side, as ratios to Cohen-10k
    on the same images where ``--auto-streams`` (the evaluation's cached streams) gives it."""
    ref = _cohen_reference(getattr(args, "auto_streams", None), len(pngs), labels, alpha)
    rows, data = [], []
    for name, fields in ROUTES:
        responses, seconds = ((auto_responses, auto_seconds) if fields is None
                              else _stream(server, pngs, fields, conc))
        ok = [r[1] for r in responses if r[0] == 200]
        cls = np.array([c["class_index"] for c in ok])
        lab = np.asarray(labels[:len(pngs)])[[i for i, r in enumerate(responses) if r[0] == 200]]
        rad = np.where((cls == lab) & (cls >= 0), [c["radius"] for c in ok], 0.0)
        d = {"route": name, "ok": len(ok), "acc0": float(np.mean(rad > 0)), "acc05": float(np.mean(rad >= 0.5)),
             "radius": float(rad.mean()), "samples": float(np.mean([c["samples"] for c in ok])),
             "surrogate_share": float(np.mean([c["method"] == "surrogate" for c in ok])),
             "p99_ms": latency_summary([r[2] for r in responses if r[0] == 200])["p99"], "seconds": seconds}
        data.append(d)
        rows.append([name, f"{d['acc0']:.3f}" + (f" ({(d['acc0'] - ref['acc0']) * 100:+.1f} pp)" if ref else ""),
                     f"{d['radius']:.3f}" + (f" ({d['radius'] / ref['radius']:.2f}x)" if ref else ""),
                     f"{d['acc05']:.3f}" + (f" ({d['acc05'] / ref['acc05']:.2f}x)" if ref else ""),
                     f"{d['samples']:,.1f}", f"{d['surrogate_share']:.1%}", f"{d['p99_ms']:.0f}"])
    if ref:
        rows.insert(0, ["Cohen-10k (evaluation streams, same images)", f"{ref['acc0']:.3f}", f"{ref['radius']:.3f}",
                        f"{ref['acc05']:.3f}", "10,100", "-", "-"])
    table = markdown_table(["route", "cert. acc r=0", "mean radius (x Cohen-10k)", "cert. acc r=0.5",
                            "mean samples", "surrogate answered", "p99 ms"], rows)
    note = ("Cohen-10k from the evaluation's cached streams of the same images (`--auto-streams`), class from n0 = 100 "
            "selection samples, Clopper-Pearson at the default alpha." if ref else
            "No Cohen-10k reference (pass `--auto-streams` with `certserve calibrate evaluate`'s cached streams).")
    return (f"\n### The routes side by side (issue 9, black-box)\n\nThe same {len(pngs)} images through each route "
            f"of the running server, {conc} in flight, default alpha. {note}\n\n{table}\n"), data


def _cohen_reference(path, n: int, labels, alpha: float) -> dict | None:
    """Cohen-10k (class from the n0 selection counts, CP bound on the stream) on the first ``n`` cached images."""
    if not path:
        return None
    import json

    from models.bundle import load_bundle
    from smoothing import certify

    from calibration.counts import images_digest

    bundle = load_bundle()
    m = bundle.manifest
    with np.load(path, allow_pickle=False) as d:
        info, selection, stream = json.loads(str(d["info"])), d["selection"][:n], d["stream"][:n]
    key = info["key"]
    if (len(stream) < n or key["n"] != 10_000 or key.get("n0") != 100 or key["model"] != bundle.model_sha256
            or key.get("sigma") != m.sigma or key.get("data") != "fashion-mnist"
            or info.get("images_sha256") != images_digest(load_test_images(int(key["images"]))[0])):
        return None  # not Cohen-10k (n0 = 100) streams of the served model at its sigma for these test images
    counts = np.stack([(stream == c).sum(axis=1) for c in range(len(m.classes))], axis=1)
    cert = certify(selection, counts, alpha, m.sigma, trials=stream.shape[1])  # a NaN copy (label -1) is a miss
    correct = (cert.class_index == np.asarray(labels[:n])) & (cert.class_index >= 0)
    rad = np.where(correct, cert.radius, 0.0)
    return {"acc0": float(np.mean(rad > 0)), "radius": float(rad.mean()), "acc05": float(np.mean(rad >= 0.5))}
