"""Constants and small helpers shared by the server benchmark sections (see ``bench.server_bench``)."""

from __future__ import annotations

import io
import queue
import threading
import time

import numpy as np

SECTIONS = ("worker", "http", "certs", "auto", "coldstart", "engine")  # report order (a)-(e), (i); (f) overload.py
ALPHA = 0.001  # the server's default request alpha
BUDGET = 10_000  # the server's default max_samples; Cohen-10k's n
#: issue 11's worker-efficiency targets by sampler device: (label, fewest jobs, most jobs or None, efficiency)
EFFICIENCY_TARGETS = {"cpu": (("1 job", 1, 1, 0.9), (">= 8 jobs", 8, None, 0.95)),
                      "cuda": ((">= 64 jobs", 64, None, 0.85), (">= 512 jobs", 512, None, 0.9))}
TARGET_P99_MS = 20.0
#: issue 11's surrogate-path p99 targets under load: (HTTP bench row, label, p99 ms)
UNDER_LOAD_TARGETS = (("hey_burst", "bursts of 20", 40.0), ("hey_mixed", "with 8 sequential requests in flight", 10.0))
TARGET_AUTO_SAMPLES = 150.0
BOUNDARY = "certservebenchboundary7f3a"


def set_up_as_the_server() -> None:
    """Put this process in the state ``certserve serve`` reaches before its first request: the compiled kernels
    loaded (``smoothing.kernels.warm_up``, as the service's start-up does), then the start-up heap frozen
    (``server.serve.freeze_startup_heap``), so that the engine's full garbage collections scan only what jobs
    allocate, as in the server (unfrozen, each scanned the ~1.6x10^5 start-up objects, numba's and numpy's included,
    for ~65-80 ms). Looked up at call time: tests replace either."""
    from server.serve import freeze_startup_heap
    from smoothing.kernels import warm_up

    warm_up()
    freeze_startup_heap()


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def floor3(x: float) -> str:
    """``x`` rounded DOWN to 3 decimals: an efficiency shown next to a ">= target" verdict never reads as met when
    it is not (0.8996 is "0.899", not "0.900")."""
    return f"{np.floor(x * 1000) / 1000:.3f}" if np.isfinite(x) else f"{x}"


def efficiency_verdict(device: str, rows: list[dict]) -> tuple[str, str, str]:
    """(verdict, targets, measured) of worker-efficiency ``rows`` (dicts with ``jobs`` and ``efficiency``) against
    :data:`EFFICIENCY_TARGETS` of ``device`` ("cuda", "cuda:N"; any other is held to the CPU's): PASS only when every
    target has at least one measured row in its job range and the lowest efficiency there meets it; measured gives
    that lowest value per target (floored, :func:`floor3`), or "not measured"."""
    met, parts = True, []
    for label, lo, hi, bound in _efficiency_targets(device):
        effs = [r["efficiency"] for r in rows if r["jobs"] >= lo and (hi is None or r["jobs"] <= hi)]
        worst = min(effs) if effs else float("nan")
        met = met and bool(effs) and worst >= bound
        parts.append(f"{label}: {floor3(worst) if effs else 'not measured'}")
    return ("PASS" if met else "FAIL"), efficiency_targets_text(device), "; ".join(parts)


def efficiency_targets_text(device: str) -> str:
    """The worker-efficiency targets of ``device`` as the report states them (">= 0.9 at 1 job, ...")."""
    return ", ".join(f">= {bound:g} at {label}" for label, _, _, bound in _efficiency_targets(device))


def _efficiency_targets(device: str) -> tuple:
    return EFFICIENCY_TARGETS["cuda" if str(device).startswith("cuda") else "cpu"]


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def latency_summary(ms) -> dict:
    ms = np.asarray(ms, dtype=np.float64)
    if not len(ms):
        return {"n": 0, "mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan"),
                "max": float("nan")}
    return {"n": len(ms), "mean": float(ms.mean()), "p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99),
            "max": float(ms.max())}


def all_answered_200(r: dict) -> bool:
    """Every request of a load row answered 200: failures (an open-loop exception, a hey tick without an answer)
    are in ``codes`` next to the status codes, and ``n`` may not count them."""
    total = sum(r["codes"].values())
    return total > 0 and r["codes"].get("200", 0) == total


def hey_period(qps: float) -> float:
    """Seconds between the ticks of one hey worker at ``-q qps`` (hey: ``time.Tick(time.Duration(1e6/qps) *
    time.Microsecond)``, whole microseconds)."""
    return int(1e6 / qps) * 1e-6


def _worker_chains(sends, ends, period: float, workers: int) -> tuple[list[np.ndarray], float]:
    """(each worker's requests as indices in send order, the send tolerance): ``workers`` > 1 share one file, each
    request goes to the worker free longest (see :func:`intended_latencies`)."""
    tol = min(period / 4, 1e-3)  # hey's csv rounds to 0.1 ms; sends jitter around their tick by well under this
    order = np.argsort(sends, kind="stable")
    chains: list[list[int]] = [[] for _ in range(max(1, workers))]
    free_at = np.full(len(chains), -np.inf)
    for i in order:
        idle = np.flatnonzero(free_at <= sends[i] + tol)
        w = int(idle[np.argmin(free_at[idle])]) if len(idle) else int(np.argmin(free_at))
        chains[w].append(i)
        free_at[w] = ends[i]
    return [np.asarray(c, dtype=np.int64) for c in chains], tol


def _tick_origin(s: np.ndarray, period: float) -> float:
    """The ticker's start of one worker's sends ``s`` (sorted): send i is at or after tick i + 1."""
    return float(np.min(s - period * np.arange(1, len(s) + 1)))


def intended_latencies(sends, ends, period: float, workers: int = 1) -> np.ndarray:
    """Latency in ms of every tick of a rate-limited closed-loop generator (hey ``-q``), measured from the tick.

    Each hey worker owns one connection and a ticker of ``period`` s; it waits for a tick, sends, waits for the
    answer, repeats. A response slower than the period delays the next send (it goes out at once on the one tick the
    ticker buffered) and the ticks in between are dropped: measured from its own send, a stall shows up in one
    request per worker instead of in every request due during it (coordinated omission). Here every tick of every
    worker gets the latency of the first request that worker sent at or after the tick, from the tick to that
    request's end: the open-loop latency a request due at the tick would at best have seen. Workers are rebuilt
    from the send and end times (``workers`` > 1 share one file: each request goes to the worker free longest);
    each worker's tick lattice is fitted to its sends (send i is at or after tick i + 1, Go tickers do not drift).
    Ticks after a worker's last send are not counted; a request that failed is not in hey's csv, so its tick gets the
    latency of the next answered one (:func:`unanswered_ticks` counts the ticks without an answer)."""
    sends, ends = np.asarray(sends, dtype=np.float64), np.asarray(ends, dtype=np.float64)
    if not len(sends):
        return np.zeros(0)
    chains, tol = _worker_chains(sends, ends, period, workers)
    out = []
    for chain in chains:
        if not len(chain):
            continue
        s, e = sends[chain], ends[chain]
        origin = _tick_origin(s, period)
        ticks = origin + period * np.arange(1, int(np.floor((s[-1] - origin + tol) / period)) + 1)
        idx = np.minimum(np.searchsorted(s, ticks - tol, side="left"), len(s) - 1)
        out.append(np.maximum(e[idx] - ticks, e[idx] - s[idx]))
    return 1e3 * np.concatenate(out)


def unanswered_ticks(sends, ends, period: float, until: float, workers: int = 1) -> int:
    """Ticks up to ``until`` (the end of the run, on the csv's clock) that no answered request accounts for: hey
    sends a request on every tick its worker is idle for, and its csv leaves out the requests that failed
    (connection refused or reset, timeout). Per worker: its ticks, minus its answered requests, minus the ticks
    dropped while a request was in flight (all but the one the ticker buffers; all of them for the last request,
    which may have ended after hey stopped). The count is over the workers of a file, so it holds however
    :func:`intended_latencies` split a shared file among them; a worker with no answer loses every tick. A client
    stall longer than the period (a tick not received in time) counts too: its ticks were not sent either."""
    sends, ends = np.asarray(sends, dtype=np.float64), np.asarray(ends, dtype=np.float64)
    chains, tol = _worker_chains(sends, ends, period, workers) if len(sends) else ([], 0.0)
    lost = 0
    for chain in chains:
        if not len(chain):
            continue
        s, e = sends[chain], ends[chain]
        origin = _tick_origin(s, period)
        busy = np.floor((e + tol - origin) / period) - np.floor((s + tol - origin) / period)  # ticks in flight
        dropped = np.maximum(busy - 1, 0)
        dropped[-1] = busy[-1]
        lost += max(0, int(np.floor((until - origin) / period)) - len(s) - int(dropped.sum()))
    lost += (max(1, workers) - sum(1 for c in chains if len(c))) * int(np.floor(until / period))
    return lost


def png_bytes(image: np.ndarray) -> bytes:
    """(1, H, W) float in [0, 1] (exact multiples of 1/255 for Fashion-MNIST) -> 8-bit greyscale PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.rint(image[0] * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def multipart_body(png: bytes, **fields: str) -> bytes:
    parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in fields.items()]
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"image.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode()
    return b"".join(parts) + head + png + f"\r\n--{BOUNDARY}--\r\n".encode()


class LiveJobs:
    """Keep engine jobs live: every finished job is replaced at once by ``make_spec(i)``, the i-th job, until
    :meth:`close`. ``finished`` holds (time.perf_counter(), samples) of every answered job.

    The replacement is submitted by a feeder thread, not from the future's done callback: the callback runs in the
    engine thread, and a submit there would be counted as engine bookkeeping, whereas in the server the requests'
    submits run on the event loop's thread (the engine only resolves a future, which wakes the loop). Like the loop,
    which runs every callback that became ready in one iteration, the feeder submits every replacement due when it
    wakes (one wake-up per pass, not per job: ~20 jobs finish per 512-job step)."""

    def __init__(self, engine, make_spec):
        self.engine, self.make_spec = engine, make_spec
        self.finished: list[tuple[float, int]] = []
        self._next, self._open = 0, True
        self._lock = threading.Lock()
        self._due: queue.SimpleQueue = queue.SimpleQueue()
        self._feeder = threading.Thread(target=self._feed, name="bench-live-jobs", daemon=True)

    def start(self, n_jobs: int) -> None:
        self.engine.start()
        for _ in range(n_jobs):
            self._submit_one()
        self._feeder.start()

    def close(self) -> None:
        self._open = False
        self._due.put(None)

    def samples_between(self, t0: float, t1: float) -> list[int]:
        return [s for t, s in self.finished if t0 < t <= t1]

    def _submit_one(self) -> None:
        with self._lock:
            i, self._next = self._next, self._next + 1
        self.engine.submit(self.make_spec(i)).add_done_callback(self._on_done)

    def _on_done(self, fut) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        self.finished.append((time.perf_counter(), fut.result().samples))
        self._due.put(True)

    def _feed(self) -> None:
        from models.engine import EngineStopped, QueueFull

        while True:
            due = [self._due.get()]
            while not self._due.empty():  # every replacement due by now, in one wake-up (as an event loop runs all
                due.append(self._due.get())  # its ready callbacks): one hand-over of the interpreter lock, not one each
            if not all(due) or not self._open:
                return
            for _ in due:
                try:
                    self._submit_one()
                except (EngineStopped, QueueFull):
                    pass
