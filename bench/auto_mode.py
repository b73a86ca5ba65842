"""Section (d): the Fashion-MNIST test stream through a running server in auto mode."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from bench.models_and_data import load_test_images
from bench.server_common import TARGET_AUTO_SAMPLES, latency_summary, markdown_table, png_bytes
from bench.server_process import ServerProc


def bench_auto(args, ctx, server: ServerProc) -> tuple[str, str, str, dict]:
    import httpx

    from server.settings import Settings

    n = args.auto_images or (1000 if args.full else 500)
    conc = 8
    settings = Settings()  # what the spawned server runs with (same environment, no overrides but host/port/device)
    alpha = settings.default_alpha
    budget = getattr(settings, "auto_max_samples", settings.max_samples)  # older servers: max_samples
    images, labels = load_test_images(n)
    pngs = [png_bytes(x) for x in images]

    rss_marks: dict[int, float] = {}  # server VmRSS (MiB) when 25/50/75/100% of the answers were in

    async def main():
        sem = asyncio.Semaphore(conc)
        out: list = [None] * n
        done = [0]
        limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120.0) as client:
            async def one(i):
                async with sem:
                    t = time.perf_counter()
                    r = await client.post("/certify", files={"image": ("image.png", pngs[i], "image/png")})
                    out[i] = (r.status_code, r.json(), (time.perf_counter() - t) * 1e3)
                done[0] += 1
                for q in (25, 50, 75, 100):
                    if q not in rss_marks and done[0] >= n * q / 100:
                        rss_marks[q] = server.rss().get("VmRSS", float("nan"))
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            return out, time.perf_counter() - t0

    responses, seconds = asyncio.run(main())
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
    return "auto", "(d) Auto mode on the Fashion-MNIST test stream", body, data
