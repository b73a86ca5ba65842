"""The hey rows of section (b): hey runs (steady, bursts, with sequential load), their csv files read without
coordinated omission, each run's event-loop CPU, and repeated runs pooled into one row per load."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np

from bench.http_clients import SequentialLoad
from bench.server_common import BOUNDARY, hey_period, intended_latencies, latency_summary, pct, unanswered_ticks
from bench.server_process import ServerProc

RAW = "latencies_ms"  # a hey row's latencies (ms) from the tick and from the send, for pooling runs; never stored


def parse_hey_csv(paths: list[Path], period: float, workers: int = 1, duration: float | None = None) -> dict:
    """Status codes and latency of hey's csv files (``workers`` connections of ``-q`` tick ``period`` s per file),
    percentiles over every tick, from the tick (``intended_latencies``: no coordinated omission); ``n``: requests
    answered, ``scheduled``: ticks, ``p50/p99_from_send``: hey's own. hey's csv omits failed requests: with the run's
    ``duration`` (``-z``) the ticks no answer accounts for are ``codes["no answer"]`` and the span is the whole run."""
    lat, codes, ends, sent, lost = [], {}, [], [], 0
    for p in paths:
        rows = [parts for line in p.read_text().splitlines()[1:] if len(parts := line.split(",")) >= 8]
        rt = np.array([float(r[0]) for r in rows])
        offset = np.array([float(r[7]) for r in rows])
        for r in rows:
            codes[r[6]] = codes.get(r[6], 0) + 1
        sent.append(1e3 * rt)
        ends.extend(offset + rt)
        lat.append(intended_latencies(offset, offset + rt, period, workers))
        lost += unanswered_ticks(offset, offset + rt, period, duration, workers) if duration is not None else 0
    codes.update({"no answer": lost} if lost else {})
    ticks = np.concatenate(lat) if lat else np.zeros(0)
    from_send = np.concatenate(sent) if sent else np.zeros(0)
    summary = latency_summary(ticks)
    summary.update({"scheduled": summary["n"], "n": len(from_send), "codes": codes, "p50_from_send": pct(from_send, 50),
                    "p99_from_send": pct(from_send, 99), "span_s": max([*ends, duration or 0.0]) if ends or duration
                    else float("nan"), RAW: {"ticks": ticks, "from_send": from_send}})
    return summary


def run_hey_staggered(hey: str, url: str, body: Path, rate: float, duration: float, streams: int, workdir: Path,
                      tag: str) -> dict:
    """``streams`` hey processes with one connection each at rate/streams req/s, started 1/rate s apart, so the
    arrivals are evenly spaced at ``rate`` (a plain ``hey -c N -q Q`` ticks all N workers together: bursts)."""
    procs, paths = [], []
    per = rate / streams
    for i in range(streams):
        path = workdir / f"hey-{tag}-{i}.csv"
        fh = open(path, "wb")  # noqa: SIM115 (closed after the process exits)
        procs.append((subprocess.Popen(_hey_command(hey, url, body, duration, 1, per), stdout=fh,
                                       stderr=subprocess.DEVNULL), fh))
        paths.append(path)
        time.sleep(1.0 / rate)
    for proc, fh in procs:
        proc.wait(timeout=duration + 120)
        fh.close()
    out = parse_hey_csv(paths, hey_period(per), duration=duration)
    out["command"] = (f"{streams} x `hey -z {duration:g}s -c 1 -q {per:g} -cpus 1 -m POST -T 'multipart/form-data; "
                      f"boundary=...' -D body.bin -o csv URL/certify`, started {1e3 / rate:g} ms apart")
    out["offered_rate"] = rate
    out["duration"] = duration
    return out


def _hey_command(hey: str, url: str, body: Path, duration: float, connections: int, per: float) -> list[str]:
    """hey posting ``body`` (multipart) to URL/certify for ``duration`` s from ``connections`` workers at ``per``
    req/s each, on one CPU, one csv line per request on stdout."""
    return [hey, "-z", f"{duration:g}s", "-c", str(connections), "-q", f"{per:g}", "-cpus", "1", "-m", "POST",
            "-T", f"multipart/form-data; boundary={BOUNDARY}", "-D", str(body), "-o", "csv", url + "/certify"]


def run_hey_burst(hey: str, url: str, body: Path, rate: float, duration: float, workdir: Path) -> dict:
    conc = 20
    per = rate / conc
    path = workdir / "hey-burst.csv"
    with open(path, "wb") as fh:
        subprocess.run(_hey_command(hey, url, body, duration, conc, per), check=False, stdout=fh,
                       stderr=subprocess.DEVNULL, timeout=duration + 120)
    out = parse_hey_csv([path], hey_period(per), conc, duration)
    out["command"] = f"`hey -z {duration:g}s -c {conc} -q {per:g} -cpus 1 -m POST ... -o csv URL/certify`"
    out["offered_rate"] = rate
    out["duration"] = duration
    return out


def with_loop_cpu(server: ServerProc, run) -> dict:
    """``run()``'s row plus ``loop_cpu_ms``: the CPU time of the server's event-loop thread per request answered in
    the row (:meth:`ServerProc.loop_cpu_seconds`; other clients' requests meanwhile count in the time, not the n)."""
    cpu0 = server.loop_cpu_seconds()
    row = run()
    row["loop_cpu_ms"] = 1e3 * (server.loop_cpu_seconds() - cpu0) / max(row["n"], 1)
    return row


SAMPLES = "certserve_samples_processed_total"


def run_rounds(server: ServerProc, hey: str, body: Path, rate: float, duration: float, workdir: Path, images,
               repeats: int) -> dict[str, list[dict]]:
    """``repeats`` rounds of the three hey rows in turn (steady, bursts of 20, steady with 8 sequential requests in
    flight), so that a slow minute of this shared machine falls on every row alike; each run is one
    :func:`with_loop_cpu` row. A steady run also carries the server's own count and time of its surrogate answers
    and its count of other answers (``certserve_request_duration_seconds``)."""
    runs: dict[str, list[dict]] = {"hey_even": [], "hey_burst": [], "hey_mixed": []}
    for k in range(repeats):
        print(f"  round {k + 1}/{repeats}: hey at {rate:g} req/s for {duration:g} s, 4 evenly phased streams; the "
              "same in bursts of 20; the same with 8 sequential requests in flight", flush=True)
        before = server.metrics()
        even = with_loop_cpu(server, lambda: run_hey_staggered(hey, server.url, body, rate, duration, 4, workdir,
                                                               "even"))
        after = server.metrics()
        even.update(surrogate_n=_gained(before, after, "count", "surrogate"),
                    surrogate_s=_gained(before, after, "sum", "surrogate"),
                    other_methods=_gained(before, after, "count", "sequential") + _gained(before, after, "count",
                                                                                          "cohen"))
        runs["hey_even"].append(even)
        runs["hey_burst"].append(with_loop_cpu(server, lambda: run_hey_burst(hey, server.url, body, rate, duration,
                                                                             workdir)))
        runs["hey_mixed"].append(run_mixed(server, hey, body, rate, duration, workdir, images))
    return runs


def _gained(before: dict, after: dict, stat: str, method: str) -> float:
    """How much ``certserve_request_duration_seconds_<stat>{method=...}`` (count or sum) grew between two snapshots."""
    key = f'certserve_request_duration_seconds_{stat}{{method="{method}"}}'
    return after.get(key, 0.0) - before.get(key, 0.0)


def run_mixed(server: ServerProc, hey: str, body: Path, rate: float, duration: float, workdir: Path, images,
              clients: int = 8) -> dict:
    """The steady hey row while ``clients`` closed-loop clients post mode=sequential requests (started 2 s before
    it); adds their answers and the worker's samples/s over the row and its lead-in."""
    seq_before = server.metrics()
    with SequentialLoad(server.url, images[:64], clients) as seq:
        time.sleep(2.0)
        t_mixed = time.perf_counter()
        row = with_loop_cpu(server, lambda: run_hey_staggered(hey, server.url, body, rate, duration, 4, workdir,
                                                              "mixed"))
        seq_after = server.metrics()
        t_mixed = time.perf_counter() - t_mixed + 2.0
    row["sequential_done"], row["sequential_codes"] = seq.done, dict(seq.codes)
    row["worker_samples_per_s"] = (seq_after.get(SAMPLES, 0.0) - seq_before.get(SAMPLES, 0.0)) / t_mixed
    row["command"] += f", while {clients} closed-loop clients post mode=sequential requests (test images 0-63)"
    return row


def pool_runs(runs: list[dict]) -> dict:
    """One row from runs of the same load: percentiles over every tick of every run (their latencies pooled, not an
    average of per-run percentiles), requests, ticks, status codes, time span and sequential answers summed, the
    loop's CPU per answered request over all of them, the worker's samples/s averaged; ``runs`` keeps what each run
    alone reported (p50, p99, loop CPU)."""
    each = [{"p50": r["p50"], "p99": r["p99"], "loop_cpu_ms": r.get("loop_cpu_ms", float("nan"))} for r in runs]
    row = dict(runs[0], runs=each)
    ticks = np.concatenate([r[RAW]["ticks"] for r in runs])
    from_send = np.concatenate([r[RAW]["from_send"] for r in runs])
    row.update(latency_summary(ticks), scheduled=len(ticks), n=sum(r["n"] for r in runs),
               p50_from_send=pct(from_send, 50), p99_from_send=pct(from_send, 99),
               span_s=sum(r["span_s"] for r in runs), codes=_summed([r["codes"] for r in runs]))
    row[RAW] = {"ticks": ticks, "from_send": from_send}
    row["loop_cpu_ms"] = sum(r.get("loop_cpu_ms", float("nan")) * r["n"] for r in runs) / max(row["n"], 1)
    for key in ("surrogate_n", "surrogate_s", "other_methods", "sequential_done"):
        if key in row:
            row[key] = sum(r[key] for r in runs)
    if "sequential_codes" in row:
        row["sequential_codes"] = _summed([r["sequential_codes"] for r in runs])
        row["worker_samples_per_s"] = float(np.mean([r["worker_samples_per_s"] for r in runs]))
    return row


def _summed(counts: list[dict]) -> dict:
    out: dict = {}
    for c in counts:
        for key, value in c.items():
            out[key] = out.get(key, 0) + value
    return out
