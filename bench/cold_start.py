"""Section (e): spawn of ``certserve serve`` to GET /readyz 200, and its memory idle and after load."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.server_common import markdown_table
from bench.server_process import ServerProc


def bench_coldstart(args, ctx, first: dict) -> tuple[str, str, str, dict]:
    spawns = [first]
    for k in range(1, args.cold_starts or (5 if args.full else 3)):
        srv = ServerProc.for_bench(args, ctx["workdir"], f"cold{k}")
        try:
            ready = srv.wait_ready()
            time.sleep(1.0)
            rss = srv.rss()
        finally:
            stop = srv.stop()
        spawns.append({"ready_s": ready, "idle": rss, "stop_s": stop})
    readies = [s["ready_s"] for s in spawns]
    rows = [[str(i + 1), f"{s['ready_s']:.2f}", f"{s['idle'].get('VmRSS', float('nan')):.0f}",
             f"{s['stop_s']:.2f}"] for i, s in enumerate(spawns)]
    table = markdown_table(["spawn", "spawn -> /readyz 200 (s)", "idle VmRSS (MiB)", "SIGTERM -> exit (s)"], rows)
    load = first.get("after_load")
    if load:
        steps = "; ".join(f"after {k}: VmRSS {v.get('VmRSS', float('nan')):.0f} MiB" for k, v in
                          first.get("rss_after", {}).items())
        load_txt = (f"After the load of the sections run in this server ({first['load_desc']}): VmRSS "
                    f"**{load.get('VmRSS', float('nan')):.0f} MiB**, peak VmHWM {load.get('VmHWM', float('nan')):.0f} "
                    f"MiB (idle after start-up: {first['idle'].get('VmRSS', float('nan')):.0f} MiB; {steps}). "
                    "Growth during the sequential batches is consistent with onnxruntime's CPU arena keeping the "
                    "activation buffers of 1,024-sample batches for reuse (in a standalone check a session's RSS "
                    "grew over its first batches of 1,024 and then stayed flat); the auto section's RSS marks show "
                    "whether it keeps growing under load.")
    else:
        load_txt = "No load section ran in this invocation, so there is no after-load RSS (run with http or auto)."
    body = f"""Spawn = `subprocess.Popen` of `{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(ctx['serve_cmd']))}`
(the console script: interpreter start, imports, bundle verification with sha256 of every artifact, ONNX sessions,
warm-up forward passes and one engine job); ready = the first `GET /readyz` answered 200, polled every 10 ms. RSS
from `/proc/<pid>/status` (VmRSS; VmHWM = peak), idle = 1 s after ready. Spawn 1 is the server the http/auto
sections then loaded.

{table}

**Cold start to ready: median {float(np.median(readies)):.2f} s** (min {min(readies):.2f}, max {max(readies):.2f}).
{load_txt}
"""
    data = {"ready_s": readies, "median_ready_s": float(np.median(readies)),
            "idle_rss_mib": [s["idle"].get("VmRSS") for s in spawns],
            "after_load": load, "rss_after": first.get("rss_after"), "stop_s": [s["stop_s"] for s in spawns]}
    return "coldstart", "(e) Cold start and memory", body, data
