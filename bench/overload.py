"""Overload: offer >= 10x the measured capacity to a spawned ``certserve serve`` for >= 60 s and record that it
degrades cleanly: no crash, only 200 or 503 + Retry-After (never 500), accepted requests on time, bounded RSS.

``python -m bench.overload [--duration 60] [--seq-rate 120] [--sur-rate 300] [--max-live-jobs 64]``

Two open-loop streams (fixed schedule, independent of answers) over loopback:

* sequential: ``mode=sequential, alpha=0.0001, deadline_ms=D`` at ``--seq-rate`` req/s (default 120 = 10x the
  measured ~12 sequential certificates/s of this 2-core machine). With ``CERTSERVE_MAX_LIVE_JOBS=64`` the engine
  queue fills within a second and the admission path must answer 503 + Retry-After.
* surrogate: ``mode=auto`` on easy images, answered in one forward pass, at ``--sur-rate`` req/s, competing for the
  same CPU.

The client bounds its own outstanding requests (``--max-outstanding``); a scheduled request that finds the bound
full is counted as ``not sent`` (the generator is on the same 2 cores, so the offered rate it really achieved is
reported next to the nominal one). Writes the ``overload`` section of docs/benchmarks.md (other sections kept).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.machine import CpuMeter, code_version, describe_load, machine_description
from bench.report import PENDING_TOTAL, section_text, write_report
from bench.server_common import BOUNDARY, latency_summary, markdown_table, multipart_body, png_bytes
from bench.server_process import ServerProc

SEQ_CAPACITY = 12.0  # sequential certificates/s, docs/benchmarks.md (c), onnxruntime-cpu
SUR_CAPACITY = 600.0  # surrogate-path saturation req/s, docs/benchmarks.md (b), wrk


async def _stream(client, url, bodies, rate, duration, deadline_s, rec, sem, tag):
    """Open loop: request k is due at t0 + k / rate; each is fired as its own task."""
    tasks = []
    t0 = time.perf_counter()
    k = 0
    while True:
        due = t0 + k / rate
        if due - t0 >= duration:
            break
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        if sem.locked():
            rec["not_sent"] += 1
        else:
            tasks.append(asyncio.create_task(_one(client, url, bodies[k % len(bodies)], deadline_s, rec, sem)))
        k += 1
    rec["scheduled"] = k
    rec["span_s"] = time.perf_counter() - t0
    await asyncio.gather(*tasks)


async def _one(client, url, body, deadline_s, rec, sem):
    import httpx

    async with sem:
        t = time.perf_counter()
        try:
            r = await client.post(url, content=body,
                                  headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
        except httpx.HTTPError as exc:
            rec["errors"][type(exc).__name__] = rec["errors"].get(type(exc).__name__, 0) + 1
            return
        ms = (time.perf_counter() - t) * 1e3
    rec["status"][r.status_code] = rec["status"].get(r.status_code, 0) + 1
    if r.status_code == 200:
        rec["ok_ms"].append(ms)
        if deadline_s is not None:
            rec["server_total_ms"].append(r.json()["timings"]["total_ms"])
            rec["stopped_by"][r.json()["stopped_by"]] = rec["stopped_by"].get(r.json()["stopped_by"], 0) + 1
    elif r.status_code == 503:
        rec["retry_after_missing"] += 0 if r.headers.get("retry-after") else 1
        code = r.json().get("error", {}).get("code")
        rec["codes_503"][code] = rec["codes_503"].get(code, 0) + 1


def _rec() -> dict:
    return {"status": {}, "errors": {}, "ok_ms": [], "server_total_ms": [], "stopped_by": {}, "codes_503": {},
            "retry_after_missing": 0, "not_sent": 0}


async def _drive(args, srv, bodies_seq, bodies_sur, rss_samples):
    import httpx

    limits = httpx.Limits(max_connections=args.max_outstanding, max_keepalive_connections=args.max_outstanding)
    seq, sur = _rec(), _rec()
    sem_seq = asyncio.Semaphore(args.max_outstanding)  # one bound per stream: neither starves the other's sends
    sem_sur = asyncio.Semaphore(max(8, args.max_outstanding // 4))
    stop = asyncio.Event()

    async def sample_rss():
        t0 = time.perf_counter()
        while not stop.is_set():
            rss_samples.append((time.perf_counter() - t0, srv.rss().get("VmRSS", float("nan"))))
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                pass

    timeout = httpx.Timeout(args.deadline_ms / 1e3 + 60)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(
            _stream(client, srv.url + "/certify", bodies_seq, args.seq_rate, args.duration, args.deadline_ms / 1e3,
                    seq, sem_seq, "seq"),
            _stream(client, srv.url + "/certify", bodies_sur, args.sur_rate, args.duration, None, sur, sem_sur, "sur"))
        stop.set()
        await sampler
    return seq, sur


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--seq-rate", type=float, default=10 * SEQ_CAPACITY)
    p.add_argument("--sur-rate", type=float, default=100.0)
    p.add_argument("--deadline-ms", type=int, default=1000)
    p.add_argument("--slack-ms", type=float, default=500.0, help="allowed latency beyond the deadline")
    p.add_argument("--max-live-jobs", type=int, default=64)
    p.add_argument("--max-outstanding", type=int, default=256)
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--bundle", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--serve-device", default="cpu")
    args = p.parse_args(argv)
    from calibration.data import load_fashion_mnist

    x = load_fashion_mnist().x_test[:60]
    bodies_seq = [multipart_body(png_bytes(x[i]), mode="sequential", alpha="0.0001",
                                 deadline_ms=str(args.deadline_ms)) for i in range(len(x))]
    bodies_sur = [multipart_body(png_bytes(x[i]), mode="auto") for i in range(len(x))]

    os.environ["CERTSERVE_MAX_LIVE_JOBS"] = str(args.max_live_jobs)
    os.environ.setdefault("CERTSERVE_LOG_LEVEL", "warning")
    workdir = Path(tempfile.mkdtemp(prefix="certserve-overload-"))
    machine, code = machine_description(), code_version()
    meter = CpuMeter()
    started = time.perf_counter()
    srv = ServerProc.for_bench(args, workdir, "overload")
    rss_samples: list[tuple[float, float]] = []
    crashed = None
    try:
        ready_s = srv.wait_ready()
        idle = srv.rss().get("VmRSS", float("nan"))
        seq, sur = asyncio.run(_drive(args, srv, bodies_seq, bodies_sur, rss_samples))
        crashed = srv.proc.poll()
        after = srv.rss()
        metrics = srv.metrics()
    finally:
        stop_s = srv.stop()
    exit_code = srv.proc.returncode
    seconds = time.perf_counter() - started
    load = describe_load(meter.stop())

    def summary(rec, deadline):
        total = sum(rec["status"].values())
        ok = rec["status"].get(200, 0)
        lat = latency_summary(rec["ok_ms"])
        # deadline check on the server's own total_ms (decode -> answer): the client-measured latency on this shared
        # 2-core box also contains the generator's and the event loop's CPU starvation, reported separately
        late = int(sum(ms > deadline + args.slack_ms for ms in rec["server_total_ms"])) if deadline else 0
        client_late = int(sum(ms > deadline + args.slack_ms for ms in rec["ok_ms"])) if deadline else 0
        return {"scheduled": rec["scheduled"], "not_sent": rec["not_sent"], "answered": total,
                "offered_rps": rec["scheduled"] / rec["span_s"],
                "sent_rps": (rec["scheduled"] - rec["not_sent"]) / rec["span_s"], "status": rec["status"],
                "errors": rec["errors"], "client_late": client_late, "ok_rps": ok / rec["span_s"], "latency_ok_ms": lat, "late": late,
                "retry_after_missing": rec["retry_after_missing"], "codes_503": rec["codes_503"],
                "stopped_by": rec["stopped_by"],
                "server_total_ms_max": max(rec["server_total_ms"]) if rec["server_total_ms"] else None}

    s_seq, s_sur = summary(seq, args.deadline_ms), summary(sur, None)
    rss = [v for _, v in rss_samples]
    n = len(rss)
    rss_first = float(np.median(rss[: max(1, n // 6)])) if n else float("nan")
    rss_last = float(np.median(rss[-max(1, n // 6):])) if n else float("nan")
    bad_status = {k: v for s in (s_seq, s_sur) for k, v in s["status"].items() if k not in (200, 503)}
    data = {"duration_s": args.duration, "deadline_ms": args.deadline_ms, "slack_ms": args.slack_ms,
            "max_live_jobs": args.max_live_jobs, "seq_rate": args.seq_rate, "sur_rate": args.sur_rate,
            "seq_capacity": SEQ_CAPACITY, "sur_capacity": SUR_CAPACITY, "sequential": s_seq, "surrogate": s_sur,
            "ready_s": ready_s, "idle_rss_mib": idle, "rss_max_mib": max(rss) if rss else None,
            "rss_first_sixth_mib": rss_first, "rss_last_sixth_mib": rss_last, "rss_samples": len(rss),
            "after_vmhwm_mib": after.get("VmHWM"), "crashed_during_load": crashed, "exit_code": exit_code,
            "stop_s": stop_s, "bad_status": bad_status,
            "rejected_queue_full": metrics.get('certserve_rejected_requests_total{reason="queue_full"}')}
    verdict = ("PASS" if crashed is None and exit_code == 0 and not bad_status and s_seq["late"] == 0
               and s_seq["retry_after_missing"] == 0 and s_sur["retry_after_missing"] == 0
               and not s_seq["errors"] and not s_sur["errors"] and s_seq["status"].get(503, 0) > 0 else "FAIL")
    data["verdict"] = verdict

    def row(name, s, cap):
        st = ", ".join(f"{k}: {v:,}" for k, v in sorted(s["status"].items()))
        lat = s["latency_ok_ms"]
        return [name, f"{s['offered_rps']:.0f} ({s['offered_rps'] / cap:.1f}x)", f"{s['sent_rps']:.0f}",
                f"{s['not_sent']:,}", st or "-", ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0",
                f"{s['ok_rps']:.1f}", f"{lat['p50']:.0f} / {lat['p99']:.0f} / {lat['max']:.0f}"]

    table = markdown_table(["stream", "offered req/s (x capacity)", "sent req/s", "not sent (client bound)",
                            "answers by status", "transport errors", "200/s", "200 latency p50 / p99 / max (ms)"],
                           [row("sequential, alpha 1e-4, deadline", s_seq, SEQ_CAPACITY),
                            row("surrogate (auto)", s_sur, SUR_CAPACITY)])
    body = f"""`certserve serve` (cpu, 2 threads) with `CERTSERVE_MAX_LIVE_JOBS={args.max_live_jobs}`, driven for
{args.duration:.0f} s by two open-loop streams from one asyncio httpx client on the same machine (at most
{args.max_outstanding} requests outstanding; a request due while the bound is full is counted as not sent):
sequential requests (`mode=sequential, alpha=0.0001, deadline_ms={args.deadline_ms}`) at a nominal
{args.seq_rate:g} req/s = {args.seq_rate / SEQ_CAPACITY:.0f}x the measured {SEQ_CAPACITY:g} sequential certificates/s,
and surrogate requests (`mode=auto`) at a nominal {args.sur_rate:g} req/s (the surrogate saturation of
{SUR_CAPACITY:g} req/s was measured with wrk; a Python generator sharing the 2 cores cannot offer 10x of it, so
the surrogate stream is there to compete for CPU, not to overload by itself).

{table}

- Only 200 or 503: **{'yes' if not bad_status else 'NO: ' + str(bad_status)}**; every 503 carried Retry-After:
  **{'yes' if s_seq['retry_after_missing'] + s_sur['retry_after_missing'] == 0 else 'NO'}**
  (503 codes: sequential {s_seq['codes_503']}, surrogate {s_sur['codes_503']}); server counter
  `rejected_requests{{reason="queue_full"}}` = {data['rejected_queue_full']}.
- Accepted sequential requests answered within deadline + {args.slack_ms:.0f} ms slack by the server's `total_ms`
  (decode -> answer): **{s_seq['status'].get(200, 0) - s_seq['late']} of {s_seq['status'].get(200, 0)}**
  (max {s_seq['server_total_ms_max'] or float('nan'):.0f} ms); client-measured (includes HTTP queueing in the
  server's event loop and the generator's own CPU share on the same 2 cores): {s_seq['client_late']} over
  deadline + slack;
  stopped by: {s_seq['stopped_by']}.
- No crash: the process was alive after the load (poll: {crashed}), SIGTERM -> exit {exit_code} in {stop_s:.2f} s.
- RSS (VmRSS, sampled every 1 s, {len(rss)} samples): idle {idle:.0f} MiB after start-up, **max {data['rss_max_mib']:.0f} MiB**;
  median of the first sixth {rss_first:.0f} MiB, of the last sixth {rss_last:.0f} MiB
  (growth over the run {rss_last - rss_first:+.0f} MiB); VmHWM {after.get('VmHWM', float('nan')):.0f} MiB.

**Verdict: {verdict}** (no crash, exit 0, only 200/503 with Retry-After, no late accepted request, 503 path exercised).
"""
    cmd = "python -m bench.overload " + shlex.join(sys.argv[1:] if argv is None else argv)
    runinfo = {"command": cmd.strip(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "seconds": seconds, "machine": machine, "code": code, "load": load}
    text = section_text("(f) Overload", body, data, runinfo).replace(PENDING_TOTAL, f"(whole invocation: {seconds:.0f} s)")
    write_report(Path(args.out), {"overload": (text, dict(data, _run=runinfo))})
    print(text)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
