"""Ray Serve vs one process: the surrogate path's latency at a fixed rate, and sequential certificates/s.

Both servers run at the same time on this machine, inside one private network namespace (:mod:`bench.netns`; Ray
would otherwise bind the host's address), and are measured in alternating windows (A B A B), so that both see the
same machine load:

- A: ``certserve serve --threads 2``: uvicorn, one process, one engine with a 2-thread onnxruntime pool;
- B: ``certserve serve --replicas 2``: a local Ray cluster (2 CPUs, no dashboard), Ray's HAProxy ingress (the default
  of ``--replicas``: HAProxy forwards to the replicas' own HTTP listeners), two replicas with one engine and a
  1-thread pool each;
- C (a second phase, in its own namespace, again against A): the same with ``--ingress proxy``, Serve's Python HTTP
  proxy.

``latency``: POST /certify of a real test image that the surrogate answers (auto mode), 200 req/s from 4 evenly
phased ``hey`` streams (the primary load of ``certserve bench server``), after 200 warm-up requests; added p50/p99 of
B over A (target: p99 added <= 5 ms). ``throughput``: 64 closed-loop clients posting ``mode=sequential`` requests
(default alpha 0.001 and budget 10,000) over 64 test images; certificates/s of B / A (target >= 0.9). Also the
start-up time and the memory of each (RSS of every process).

Run as ``certserve bench ray`` or ``python -m bench.ray_bench`` (needs root for the namespace, ``hey`` from Debian);
the section ``ray`` of docs/benchmarks.md is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench import netns
from bench.hey_runs import run_hey_staggered
from bench.http_load import first_surrogate_image
from bench.machine import (CpuMeter, code_version, describe_load, ensure_tool, machine_description, proc_cpu_seconds,
                           proc_status)
from bench.models_and_data import load_test_images
from bench.report import section_text, write_report
from bench.server_common import BOUNDARY, markdown_table, multipart_body, png_bytes
from bench.server_process import ServerProc, free_ports

TARGET_ADDED_P99_MS = 5.0
TARGET_THROUGHPUT_RATIO = 0.9
CLIENTS = 64
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=200.0, help="surrogate requests per second (default 200)")
    parser.add_argument("--latency-window", type=float, default=20.0, help="seconds per latency window")
    parser.add_argument("--throughput-window", type=float, default=30.0, help="seconds per throughput window")
    parser.add_argument("--rounds", type=int, default=2, help="A/B window pairs per measurement (default 2)")
    parser.add_argument("--ingress", default="haproxy,proxy",
                        help="Ray ingress phases to run (`certserve serve --replicas 2 --ingress ...`): haproxy (the "
                             "default of --replicas) and/or proxy (Serve's Python HTTP proxy)")
    parser.add_argument("--out", default="docs/benchmarks.md", help="report to update (section 'ray')")


INGRESS = {  # the Ray side of each phase (`certserve serve --replicas 2 --ingress <key>`): its label
    "haproxy": "B: Ray Serve, 2 replicas (HAProxy ingress, the default)",
    "proxy": "C: Ray Serve, 2 replicas (Serve's Python HTTP proxy)",
}


def run(args) -> int:
    ok, why = netns.available()
    if not ok:
        print(f"bench ray: needs a private network namespace (root): {why}", file=sys.stderr)
        return 2
    hey = ensure_tool("hey")
    if hey is None:
        print("bench ray: needs `hey` (apt-get install hey)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="certserve-raybench-"))
    meter, started = CpuMeter(), time.perf_counter()
    data = {"phases": {}, "rate": args.rate}
    try:
        for ingress in args.ingress.split(","):
            with netns.private_network() as namespace:  # a fresh namespace per phase: no port left over
                data["phases"][ingress] = measure(args, hey, workdir / ingress, namespace, ingress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - started
    command = "certserve bench ray " + " ".join(sys.argv[sys.argv.index("ray") + 1:] if "ray" in sys.argv else [])
    runinfo = {"command": command.strip(), "seconds": seconds, "machine": machine_description(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "code": code_version(), "load": describe_load(meter.stop())}
    text = section_text("(h) Ray Serve scale-out vs one process", report_body(data, args), data, runinfo)
    write_report(Path(args.out), {"ray": (text.replace("(whole invocation: still running)", ""),
                                          dict(data, _run=runinfo))})
    print(f"bench ray: {seconds:.0f} s -> {args.out}\n" + summary(data))
    return 0


def measure(args, hey: str, workdir: Path, namespace: str, ingress: str) -> dict:
    """One phase: A and the Ray side of ``ingress`` up at once, measured in alternating windows."""
    x, y = load_test_images(64)
    images = [png_bytes(img) for img in x]
    workdir.mkdir(parents=True, exist_ok=True)
    body_path = workdir / "body.bin"
    servers, data = {}, {"startup_s": {}, "rss_mib": {}}
    try:
        servers["A"] = ServerProc(workdir, "--threads", "2", tag="single")
        data["startup_s"]["A"] = servers["A"].wait_ready()
        port, metrics_port = free_ports(2)  # distinct: a port chosen twice in a row can repeat
        servers["B"] = ServerProc(workdir, "--replicas", "2", "--ingress", ingress, "--ray-metrics-port",
                                  str(metrics_port), env=RAY_ENV, tag="ray", port=port)
        data["startup_s"]["B"] = servers["B"].wait_ready(timeout=300)
        pids = {"A": [servers["A"].proc.pid],
                "B": [p for p in netns.processes_in(namespace) if p != servers["A"].proc.pid]}  # all of Ray's
        CpuMeter.pids.update(pids["B"])
        pick, first = first_surrogate_image(servers["A"].url, images)  # the surrogate path's request
        body_path.write_bytes(multipart_body(images[pick]))
        data["latency_image"] = {"index": pick, "label": int(y[pick]), "method": first["method"],
                                 "radius": first["radius"]}
        data["latency"] = {"A": [], "B": []}
        for _ in range(args.rounds):
            for key in ("A", "B"):
                warm_up(servers[key].url, images[pick])
                cpu0 = sum(proc_cpu_seconds(p) for p in pids[key])
                res = run_hey_staggered(hey, servers[key].url, body_path, args.rate, args.latency_window, 4,
                                        workdir, f"{key}{len(data['latency'][key])}")
                res["cpu_ms_per_request"] = 1e3 * (sum(proc_cpu_seconds(p) for p in pids[key]) - cpu0) / res["n"]
                data["latency"][key].append({k: res[k] for k in ("n", "p50", "p90", "p99", "max", "codes", "span_s",
                                                                 "cpu_ms_per_request")})
        data["throughput"] = {"A": [], "B": []}
        for _ in range(args.rounds):
            for key in ("A", "B"):
                data["throughput"][key].append(asyncio.run(closed_loop(servers[key].url, images,
                                                                       args.throughput_window)))
        data["rss_mib"]["A"] = proc_status(servers["A"].proc.pid).get("VmRSS", 0.0)
        data["rss_mib"]["B"] = ray_memory(namespace, servers["A"].proc.pid)
    finally:
        for srv in servers.values():
            srv.stop()
    return finalize(data)


def warm_up(url: str, image: bytes, n: int = 200) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(n):
            client.post("/certify", files={"image": ("x.png", image, "image/png")})


async def closed_loop(url: str, images: list[bytes], window: float) -> dict:
    """CLIENTS tasks, each posting sequential requests back to back over the images; counts what finishes within
    the window (after 5 s of the same load as warm-up)."""
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    done, codes, samples = [], {}, []
    warm_end = time.monotonic() + 5.0
    end = warm_end + window

    async def client(i: int, http: httpx.AsyncClient) -> None:
        k = i
        while time.monotonic() < end:
            body = multipart_body(images[k % len(images)], mode="sequential")
            r = await http.post("/certify", content=body,
                                headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
            k += CLIENTS
            now = time.monotonic()
            if warm_end <= now <= end:
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    done.append(now)
                    samples.append(r.json()["samples"])

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(CLIENTS)))
    return {"certificates": len(done), "certs_per_s": len(done) / window, "samples_per_s": sum(samples) / window,
            "mean_samples": float(np.mean(samples)) if samples else float("nan"), "codes": codes, "window_s": window}


def ray_memory(namespace: str, exclude: int) -> dict:
    """RSS (MiB) of the Ray side: each replica, and every Ray process together."""
    replicas, total = [], 0.0
    for pid in netns.processes_in(namespace):
        if pid == exclude:
            continue
        rss = proc_status(pid).get("VmRSS", 0.0)
        total += rss
        try:
            if b"ServeReplica" in Path(f"/proc/{pid}/cmdline").read_bytes():
                replicas.append(rss)
        except OSError:
            pass
    return {"replicas": replicas, "total": total}


def finalize(data: dict) -> dict:
    lat = {k: {q: float(np.mean([w[q] for w in v])) for q in ("p50", "p99", "cpu_ms_per_request")}
           for k, v in data["latency"].items()}
    data["latency_mean"] = lat
    data["added_p50_ms"] = lat["B"]["p50"] - lat["A"]["p50"]
    data["added_p99_ms"] = lat["B"]["p99"] - lat["A"]["p99"]
    tput = {k: float(np.mean([w["certs_per_s"] for w in v])) for k, v in data["throughput"].items()}
    data["certs_per_s_mean"] = tput
    data["throughput_ratio"] = tput["B"] / tput["A"] if tput["A"] else float("nan")
    data["latency_verdict"] = "PASS" if data["added_p99_ms"] <= TARGET_ADDED_P99_MS else "FAIL"
    data["throughput_verdict"] = "PASS" if data["throughput_ratio"] >= TARGET_THROUGHPUT_RATIO else "FAIL"
    return data


def phase_body(ingress: str, d: dict, args) -> str:
    ray_name = INGRESS[ingress]
    names = {"A": "A: uvicorn, 1 process x 2 threads", "B": ray_name}
    lat_rows = [[names[key], i + 1, f"{w['n'] / w['span_s']:.1f}", f"{w['n']:,}", w["codes"], f"{w['p50']:.1f}",
                 f"{w['p90']:.1f}", f"**{w['p99']:.1f}**", f"{w['max']:.1f}", f"{w['cpu_ms_per_request']:.1f}"]
                for key in ("A", "B") for i, w in enumerate(d["latency"][key])]
    tp_rows = [[names[key], i + 1, w["certificates"], f"**{w['certs_per_s']:.2f}**", f"{w['samples_per_s']:,.0f}",
                f"{w['mean_samples']:,.0f}", w["codes"]]
               for key in ("A", "B") for i, w in enumerate(d["throughput"][key])]
    rb, img = d["rss_mib"]["B"], d["latency_image"]
    return f"""### A vs {ray_name[0]}: {ray_name[3:]}

Surrogate path at {args.rate:g} req/s (test image #{img['index']}, label {img['label']}, answered by the
{img['method']} path, radius {img['radius']:.3f}; 4 evenly phased `hey` streams, {args.latency_window:g} s per window
after 200 warm-up requests):

{markdown_table(["server", "window", "achieved req/s", "requests", "codes", "p50 ms", "p90 ms", "p99 ms", "max ms",
                 "server CPU ms/request"], lat_rows)}

Server CPU per request: CPU seconds of the server's processes during the window (A: the uvicorn process; Ray: every
process of the cluster, background included) / requests answered. On 2 cores, {args.rate:g} req/s can be served
only while this stays well below {2000 / args.rate:.0f} ms.

Added by Ray Serve (mean over windows): **p50 {d['added_p50_ms']:+.1f} ms, p99 {d['added_p99_ms']:+.1f} ms**;
target p99 added <= {TARGET_ADDED_P99_MS:g} ms: **{d['latency_verdict']}**.

Sequential certificates per second ({CLIENTS} closed-loop clients, `mode=sequential`, default alpha 0.001 and
budget 10,000, test images 0-63, {args.throughput_window:g} s per window after 5 s of warm-up):

{markdown_table(["server", "window", "certificates", "certs/s", "samples/s", "mean samples", "codes"], tp_rows)}

Ratio {ray_name[0]} / A (mean certificates/s): **{d['throughput_ratio']:.2f}**; target >= {TARGET_THROUGHPUT_RATIO}:
**{d['throughput_verdict']}**.

Start-up (spawn to the first /readyz 200): A {d['startup_s']['A']:.1f} s, {ray_name[0]} {d['startup_s']['B']:.1f} s.
Memory after the run (RSS): A {d['rss_mib']['A']:.0f} MiB; {ray_name[0]} {rb['total']:.0f} MiB in all, of which
the replicas {", ".join(f"{r:.0f}" for r in rb['replicas'])} MiB (the rest: GCS, raylet, agents, Serve controller,
proxy or HAProxy).
"""


def report_body(data: dict, args) -> str:
    intro = """Each phase runs A and one Ray configuration at the same time in a private network namespace and measures
them in alternating windows (A, Ray, A, Ray), so that both see the same machine load; load generators share the 2
cores with the servers. A: `certserve serve --threads 2` (uvicorn, one engine, 2-thread onnxruntime pool). Ray:
`certserve serve --replicas 2` (local Ray cluster with 2 CPUs and no dashboard, 2 replicas with one engine and a
1-thread pool each), behind Ray's HAProxy ingress, which forwards to the replicas' own HTTP listeners (B, the default
of `--replicas`), or with `--ingress proxy` behind Serve's Python HTTP proxy (C).
"""
    return intro + "\n" + "\n".join(phase_body(k, v, args) for k, v in data["phases"].items())


def summary(data: dict) -> str:
    return "\n".join(f"{INGRESS[k]}: added p50 {d['added_p50_ms']:+.1f} ms, p99 {d['added_p99_ms']:+.1f} ms "
                     f"(server CPU {d['latency_mean']['A']['cpu_ms_per_request']:.1f} -> "
                     f"{d['latency_mean']['B']['cpu_ms_per_request']:.1f} ms/request) "
                     f"({d['latency_verdict']}); certs/s ratio {d['throughput_ratio']:.2f} ({d['throughput_verdict']})"
                     for k, d in data["phases"].items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
