"""Server benchmarks: worker efficiency, HTTP surrogate path, certificates/s, auto mode, cold start and memory.

Five sections, each selectable with ``--only`` and written to ``docs/benchmarks.md`` (a section re-run replaces only
its own part of the report; every section records the exact command, date, machine and machine load of its run):

``worker``    (a) SequentialEngine driven directly (no HTTP) with 1/8/64/256 concurrent best-radius jobs on real
              Fashion-MNIST test images (KT prior, alpha 0.001, budget 10,000), kept at that concurrency; its
              samples/s divided by the raw model's samples/s at the worker's mean realized batch (size and chunks),
              measured in interleaved windows so that both see the same machine load. Also an exact replay of the
              worker's own batches and the raw rate at the full batch size.
``http``      (b) ``certserve serve`` as a subprocess on 127.0.0.1; POST /certify (multipart PNG of a real test
              image answered by the surrogate in the default auto mode) at a fixed 200 req/s with ``hey``; plus the
              synchronized-burst pattern of a plain ``hey -c 20 -q 10``, an open-loop Poisson complement written
              here (asyncio, raw HTTP/1.1) and the saturation throughput with ``wrk``.
``certs``     (c) certificates per second: the classic per-image Cohen loop (n0 = 100 + n = 10,000 in batches of
              1,000, as locustlab's core.py) vs the worker (many concurrent jobs), same model and images.
``auto``      (d) N test images through the real server in auto mode at the default alpha: base-model evaluations
              per request, method mix, fallback reasons, certified accuracy.
``coldstart`` (e) process spawn of ``certserve serve`` -> GET /readyz 200, and RSS (VmRSS, VmHWM) idle and after load.
``engine``    (i) the engine's own ceiling with a null sampler (labels from a precomputed table, no model): samples/s
              and bookkeeping per step at 64 / 512 / 2,048 live jobs, 16,384-sample batches (``bench.engine_bench``).

Run as ``certserve bench server [--only worker,http,...] [--full]`` or ``python -m bench.server_bench``. With
``--sampler model.pt --device cuda`` the worker and certs sections use a TorchScript base model on the GPU, e.g.
``certserve bench server --only worker,certs --sampler runs/fmnist-sigma0.25/base.pt --device cuda`` (their report
sections are keyed by sampler, so this adds ``torch-cuda`` sections next to the CPU ones). The serve-based sections
always serve the bundle, on ``--serve-device`` (default auto). Default mode: about 6 minutes on the 2-core
development machine; ``--full`` runs longer windows, 200 images for certs (plus Cohen through the worker) and 1,000
for auto, and takes several times longer.

This module parses the options and runs the sections; each section lives in its own module (``worker_efficiency``,
``http_load`` with its hey rows in ``hey_runs``, ``cert_rate``, ``auto_mode``, ``cold_start``), with the report in
``report``, the spawned server in ``server_process``, machine description and load in ``machine``, test images and
the sampled base model in ``models_and_data`` and shared constants and helpers in ``server_common``.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.auto_mode import bench_auto
from bench.cert_rate import bench_certs
from bench.cold_start import bench_coldstart
from bench.engine_bench import bench_engine
from bench.http_load import bench_http
from bench.machine import CpuMeter, code_version, combine_loads, describe_load, machine_description
from bench.report import PENDING_TOTAL, command_line, read_sections, section_text, summary_table, write_report
from bench.server_common import SECTIONS
from bench.server_process import ServerProc
from bench.worker_efficiency import bench_worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--full", action="store_true",
                        help="longer windows and more images (default mode finishes in a few minutes on 2 cores)")
    parser.add_argument("--out", default="docs/benchmarks.md",
                        help="markdown report; sections not run now are kept from an existing report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the embedded one)")
    parser.add_argument("--sampler", default=None,
                        help="base model for the worker/certs sections: .onnx or TorchScript .pt (default: the "
                             "bundle's base.onnx)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="device of the worker/certs sections' sampler (default auto)")
    parser.add_argument("--serve-device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="--device of the spawned `certserve serve` (http/auto/coldstart; default auto)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads of the sampler (0: all cores)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="worker batch size (0: the server's default, 16384 on cuda, 1024 on cpu)")
    parser.add_argument("--jobs", default="1,8,64,256", help="worker section: concurrent job counts")
    parser.add_argument("--rate", type=float, default=200.0, help="http section: fixed request rate (req/s)")
    parser.add_argument("--duration", type=float, default=None, help="http section: seconds of each hey row (steady, "
                        "bursts, with sequential load; default 25, --full 30)")
    parser.add_argument("--http-repeats", type=int, default=3, help="http section: rounds of the three hey rows, "
                        "run in turn and pooled per row (default 3)")
    parser.add_argument("--cert-images", type=int, default=None, help="certs section: test images (default 40, "
                                                                       "--full 200)")
    parser.add_argument("--cohen-worker", action="store_true",
                        help="certs section: also run Cohen-10k jobs through the worker (always with --full)")
    parser.add_argument("--cert-jobs", type=int, default=64, help="certs section: concurrent worker jobs")
    parser.add_argument("--auto-images", type=int, default=None, help="auto section: test images (default 500, "
                                                                       "--full 1000)")
    parser.add_argument("--auto-streams", default=None, help="auto section: `certserve calibrate evaluate`'s cached "
                        "streams (.npz) of the same images, for a Cohen-10k reference next to the routes")
    parser.add_argument("--cold-starts", type=int, default=None, help="coldstart section: spawns (default 3, "
                                                                       "--full 5)")


def run(args) -> int:
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    started = time.perf_counter()
    machine = machine_description()
    code = code_version()
    cmd = command_line(args)
    workdir = Path(tempfile.mkdtemp(prefix="certserve-bench-"))
    ctx = {"workdir": workdir}
    new: dict[str, tuple[str, dict]] = {}
    timings: dict[str, float] = {}

    def record(fn, *fargs):
        name = fn.__name__.removeprefix("bench_")
        print(f"[{name}] ...", flush=True)
        meter = CpuMeter()
        t = time.perf_counter()
        key, title, body, data = fn(args, ctx, *fargs)
        seconds = time.perf_counter() - t
        timings[key] = seconds
        runinfo = {"command": cmd, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "seconds": seconds, "machine": machine, "code": code, "load": describe_load(meter.stop())}
        new[key] = (section_text(title, body, data, runinfo), dict(data, _run=runinfo))
        print(f"[{name}] {seconds:.0f} s", flush=True)
        write_report(Path(args.out), new)  # keep what is done even if a later section fails

    try:
        if "worker" in only:
            record(bench_worker)
        if "certs" in only:
            record(bench_certs)
        if "engine" in only:
            record(bench_engine)
        served = [s for s in ("http", "auto", "coldstart") if s in only]
        if served:
            spawn_meter = CpuMeter()
            t = time.perf_counter()
            srv = ServerProc.for_bench(args, workdir, "main")
            ctx["serve_cmd"] = srv.cmd
            first: dict = {}
            try:
                first["ready_s"] = srv.wait_ready()
                time.sleep(1.0)
                first["idle"] = srv.rss()
                spawn_s = time.perf_counter() - t
                spawn_load = spawn_meter.stop()
                load_parts = []
                first["rss_after"] = {}
                if "http" in only:
                    record(bench_http, srv)
                    load_parts.append("http")
                    first["rss_after"]["http"] = srv.rss()
                if "auto" in only:
                    record(bench_auto, srv)
                    load_parts.append("auto")
                    first["rss_after"]["auto"] = srv.rss()
                if load_parts:
                    first["after_load"] = srv.rss()
                    first["load_desc"] = " + ".join(load_parts)
            finally:
                first["stop_s"] = srv.stop()
            if "coldstart" in only:
                t = time.perf_counter()
                key_meter = CpuMeter()
                name = "coldstart"
                print(f"[{name}] ...", flush=True)
                key, title, body, data = bench_coldstart(args, ctx, first)
                seconds = time.perf_counter() - t + spawn_s
                timings[key] = seconds
                runinfo = {"command": cmd,
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "seconds": seconds, "machine": machine, "code": code,
                           "load": describe_load(combine_loads(spawn_load, key_meter.stop()))}
                new[key] = (section_text(title, body, data, runinfo), dict(data, _run=runinfo))
                print(f"[{name}] {seconds:.0f} s", flush=True)
    finally:
        total = time.perf_counter() - started
        if new:
            whole = (f"(whole invocation: {total:.0f} s; "
                     + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
            for key, (text, data) in new.items():
                new[key] = (text.replace(PENDING_TOTAL, whole), dict(data, _total_s=total))
            write_report(Path(args.out), new)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"server benchmarks ({', '.join(only)}): {total:.0f} s -> {args.out}")
    sections = read_sections(Path(args.out))
    print(summary_table({k: v for k, v in sections.items() if k in new}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server_bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.entry_point = "python -m bench.server_bench"
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
