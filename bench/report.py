"""docs/benchmarks.md: per-section markdown with ``<!-- section:KEY -->`` markers and an embedded data comment,
merged with the sections of an existing report, under a summary table."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from bench.server_common import (SECTIONS, TARGET_AUTO_SAMPLES, TARGET_P99_MS, UNDER_LOAD_TARGETS, efficiency_verdict,
                                 floor3, markdown_table)

SECTION_RE = re.compile(r"<!-- section:(\S+) -->\n(.*?)<!-- /section:\1 -->\n?", re.DOTALL)
PENDING_TOTAL = "(whole invocation: still running)"
DATA_RE = re.compile(r"<!-- data: (.*?) -->", re.DOTALL)


def read_sections(path: Path) -> dict[str, tuple[str, dict]]:
    if not path.is_file():
        return {}
    out = {}
    for key, text in SECTION_RE.findall(path.read_text(encoding="utf-8")):
        m = DATA_RE.search(text)
        out[key] = (text, json.loads(m.group(1)) if m else {})
    return out


def section_order(key: str) -> tuple[int, str]:
    base = key.split("-")[0]
    return (SECTIONS.index(base) if base in SECTIONS else len(SECTIONS), key)


def summary_table(sections: dict[str, tuple[str, dict]]) -> str:
    rows = []
    for key in sorted(sections, key=section_order):
        d, run = sections[key][1], sections[key][1].get("_run", {})
        when = run.get("date", "?")[:16].replace("T", " ")
        base = key.split("-")[0]
        if base == "worker":
            effs = ", ".join(f"{r['jobs']}: {floor3(r['efficiency'])}" for r in d["rows"])
            # every stored run judged by issue 11's targets of its own device: a CUDA run before 2026-12-07 printed
            # the CPU's targets in its section (its verdict there was FAIL under both)
            verdict, targets, _ = efficiency_verdict(d.get("device", "cpu"), d["rows"])
            rows.append([f"(a) worker efficiency, {d['sampler']}", f"by concurrent jobs: {effs}{_gpu_memory(d)}",
                         targets, verdict, when])
        elif base == "http":
            p = d["primary"]
            w = d["results"].get("wrk", {})
            extra = f"; saturation {w['rps']:,.0f} req/s (wrk)" if w else ""
            measured = f"p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms at {p['n'] / p['span_s']:.0f} req/s{extra}"
            target, verdict = f"p99 <= {TARGET_P99_MS:g} ms at {d['rate']:g} req/s", d["verdict"]
            loads = d.get("under_load_verdicts", {})
            for name, what, bound in UNDER_LOAD_TARGETS:
                if name in loads:
                    measured += f"; {what}: p99 {d['results'][name]['p99']:.1f} ms"
                    target += f"; {what} <= {bound:g} ms"
                    verdict += f"; {loads[name]}"
            rows.append(["(b) HTTP surrogate path", measured, target, verdict, when])
        elif base == "certs":
            parts = "; ".join(f"{x['method'].split(' (')[0]}: {x['certs_per_s']:.2f}/s" for x in d["rows"])
            ratio = (f"{d['speedup_kt_vs_classic']:.1f}x measured, {d.get('sample_ratio_kt_vs_classic', 0):.1f}x at "
                     "equal samples/s (KT worker vs classic)")
            rows.append([f"(c) certificates/s, {d['sampler']}", parts, "-", ratio, when])
        elif base == "auto":
            mix = ", ".join(f"{k} {v / d['images']:.1%}" for k, v in sorted(d["methods"].items()))
            measured = (f"{d['mean_samples']:.1f} samples/request over {d['images']} images ({mix}); "
                        f"cert. acc {d['cert_acc']:.3f}")
            rows.append(["(d) auto mode", measured, f"<= {TARGET_AUTO_SAMPLES:g} samples/request", d["verdict"], when])
        elif base == "engine":
            r = d["at512"]
            rows.append(["(i) engine ceiling, null sampler", f"512 sequential jobs: {r['samples_per_s'] / 1e6:.2f} M "
                         f"samples/s, bookkeeping {r['bookkeeping_ms']:.2f} ms/step ({r.get('cpu_ms', 0):.2f} ms CPU)"
                         + (f"; split over {max(d['sharded'], key=int)} engine processes: "
                            f"{d['sharded'][max(d['sharded'], key=int)]['samples_per_s'] / 1e6:.2f} M "
                            f"({d['shard_scaling']:.2f}x one spawned engine process, run the same way: "
                            f"{d['sharded']['1']['samples_per_s'] / 1e6:.2f} M)" if d.get("sharded") else ""),
                         ">= 20 M samples/s, <= 0.8 ms/step", d["verdict"], when])
        elif base == "coldstart":
            al = d.get("after_load") or {}
            rss = f"; RSS idle {d['idle_rss_mib'][0]:.0f} MiB" + (f", after load {al.get('VmRSS', 0):.0f} MiB "
                                                                     f"(peak {al.get('VmHWM', 0):.0f})" if al else "")
            rows.append(["(e) cold start", f"spawn -> ready median {d['median_ready_s']:.2f} s{rss}", "-", "-", when])
        elif base == "signing":
            s, closed = d["summary"], d["closed"]
            one = closed["signed"]["median_ms"] - closed["unsigned"]["median_ms"]
            measured = (f"p50 at {d['rate']:g} req/s: signed {s['signed']['delta_p50_ms']:+.2f} ms, signed + audit "
                        f"{s['signed+audit']['delta_p50_ms']:+.2f} ms vs unsigned (A/A control "
                        f"{d['control_p50_ms']:+.2f} ms); one request at a time: signed {one:+.3f} ms")
            rows.append(["(g) signed certificates", measured, "<= 0.3 ms on the p50", d["verdict"], when])
        elif base == "ray":
            for name, p in d["phases"].items():
                measured = (f"{name}: added p50 {p['added_p50_ms']:+.1f} ms, p99 {p['added_p99_ms']:+.1f} ms at "
                            f"{d['rate']:g} req/s; sequential certs/s 2 replicas / 1 process {p['throughput_ratio']:.2f}")
                rows.append([f"(h) Ray Serve, 2 replicas ({name})", measured, "p99 added <= 5 ms; ratio >= 0.9",
                             f"{p['latency_verdict']}; {p['throughput_verdict']}", when])
    return markdown_table(["benchmark", "measured", "target", "verdict", "run (UTC)"], rows)


def _gpu_memory(worker: dict) -> str:
    """"; GPU memory peak N MiB" of a worker section that measured it (a CUDA sampler), else ""."""
    peaks = [r["gpu_peak_mib"] for r in worker["rows"] if r.get("gpu_peak_mib") is not None]
    return f"; GPU memory peak {max(peaks):,.0f} MiB (torch allocator)" if peaks else ""


def write_report(path: Path, new: dict[str, tuple[str, dict]]) -> dict:
    sections = read_sections(path)
    sections.update(new)
    parts = ["""# Server benchmarks

Generated by scripts; every number below is written by the script that measured it, none by hand. Sections (a)-(e)
and (i) come from `bench/server_bench.py` (`certserve bench server`), (f) from `bench/overload.py` (`python -m
bench.overload`), (g) from `bench/signing.py` (`python -m bench.signing`) and (h) from `bench/ray_bench.py`
(`certserve bench ray`); each writes only its own sections (through `bench/report.py`, which also rebuilds the
summary). Each section states the exact command, date, machine and machine load of the run that produced it;
re-running a subset (`certserve bench server --only worker,http,...`) replaces only those sections. The worker and
certs sections are keyed by sampler (`onnxruntime-cpu`, `torch-cuda`, ...), so a GPU run (`--only worker,certs
--device cuda`) adds its own sections next to the CPU ones; `bench/device_run.sh` runs every GPU check in one call of a
GPU host without network (after `make device-pack` where pip works).

## Summary

""" + summary_table(sections) + "\n"]
    for key in sorted(sections, key=section_order):
        parts.append(f"<!-- section:{key} -->\n{sections[key][0].rstrip()}\n<!-- /section:{key} -->\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return sections


def section_text(title: str, body: str, data: dict, run: dict) -> str:
    data = dict(data, _run=run)
    return f"""## {title}

- Command: `{run['command']}`
- Date: {run['date']}; wall time of this section: {run['seconds']:.0f} s {PENDING_TOTAL}.
- Code: {run.get('code', 'unknown')}.
- Machine: {run['machine']}.
- Load during this section: {run['load']}.

{body.rstrip()}

<!-- data: {json.dumps(data, default=float, allow_nan=True)} -->
"""


def command_line(args) -> str:
    prefix = getattr(args, "entry_point", None)
    if prefix:
        return f"{prefix} {shlex.join(sys.argv[1:])}".strip()
    argv = sys.argv
    try:
        idx = argv.index("server", argv.index("bench"))
        return f"certserve bench server {shlex.join(argv[idx + 1:])}".strip()
    except ValueError:
        return "certserve bench server " + shlex.join(argv[1:])
