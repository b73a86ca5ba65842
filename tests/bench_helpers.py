"""Fakes for the benchmark tests (tests/test_mutation_review8d.py): a fake clock, fake load tools and model calls,
and the benchmark sections run over fake measurements, so that every figure and verdict they compute is known."""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np

import bench.hey_runs as hey_runs
import bench.http_load as http_load
import bench.worker_efficiency as worker
import server.serve
import smoothing.kernels

URL = "http://127.0.0.1:9"


class FakeClock:
    """A ``time`` stand-in: an integer millisecond clock that only ``sleep``/``advance`` move (10 ms ticks, each
    reported to ``on_tick``)."""

    def __init__(self):
        self.ms, self.on_tick = 0, None

    def now(self) -> float:
        return self.ms / 1000

    perf_counter = monotonic = thread_time = time = now

    def advance(self, seconds: float) -> None:
        target = self.ms + round(seconds * 1000)
        while self.ms < target:
            self.ms = min(self.ms + 10, target)
            if self.on_tick:
                self.on_tick(self.ms)

    sleep = advance


def patch(monkeypatch, module, **attrs) -> None:
    for name, value in attrs.items():
        monkeypatch.setattr(module, name, value, raising=name != "open")


def tool(tmp_path, name: str, source: str) -> tuple[str, object]:
    """(path of an executable Python script, a request body file) for the hey/wrk runners."""
    path, body = tmp_path / name, tmp_path / "body.bin"
    path.write_text(f"#!{sys.executable}\n" + source)
    path.chmod(0o755)
    body.write_bytes(b"x")
    return str(path), body


class SlowBackend:
    """A CPU 'model' for SamplingEngine: every noisy copy is class 0, 2 ms per call."""

    def noisy_predictions(self, images, sizes, sigma, rng):
        time.sleep(0.002)
        return np.zeros(int(np.sum(sizes)), dtype=np.int64)


def run_bench_worker(monkeypatch, effs: dict[int, float], device: str = "cpu", events: list | None = None) -> dict:
    """bench_worker over fake measurements: raw model at 1,000 samples/s, worker at effs[N] x that over 10 s, on a
    sampler that says it runs on ``device`` (on "cuda" without a GPU no memory is read). The kernels' warm-up and the
    heap freeze are recorded in ``events`` (with "row N" per measured row), not run: the test process is never
    frozen."""
    events = [] if events is None else events
    monkeypatch.setattr(smoothing.kernels, "warm_up", lambda: events.append("warm-up"))
    monkeypatch.setattr(server.serve, "freeze_startup_heap", lambda: events.append("freeze"))

    def measured(sampler, images, classes, n_jobs, **kw):
        events.append(f"row {n_jobs}")
        eff = effs[n_jobs]
        return {"samples": 10_000 * eff, "active": 10.0, "batches": 40, "jobs": 160, "model": 4.0, "certs": 20,
                "cert_samples": 4_000, "raw": {"mean": [1000, 1.0], "replay": [2000, 1.0], "full": [4000, 1.0]},
                "per_cycle": [(1000 * eff * q, 1.0, (1000, 1.0)) for q in (0.8, 0.9, 1.0, 1.1, 1.2)],
                "sizes_logged": 40, "w_slice": 0.5}

    patch(monkeypatch, worker, interleaved_worker=measured,
          load_sampler_backend=lambda args: (None, SimpleNamespace(device=device, name="ort"), "fake.onnx"),
          make_sampling_engine=lambda *a: SimpleNamespace(batch_size=1024, sigma=0.25),
          load_test_images=lambda n: (np.zeros((2, 1, 2, 2)), np.zeros(2)), clean_argmax=lambda *a: np.zeros(2))
    args = SimpleNamespace(jobs=",".join(str(j) for j in effs), full=False, seed=0)
    key, title, body, data = worker.bench_worker(args, {})
    return dict(data, body=body)


class FakeEngine:
    """SequentialEngine's counters on a fake clock: nothing for 0.2 s (start-up), then per ms one step of 8,000
    samples, 0.5 ms of bookkeeping (of which the null sampler's launch 0.2 ms), 0.1 ms of decisions, 4 policy
    evaluations, 0.45 ms of engine-thread CPU (null sampler 0.15); a job answered (500 samples) every 100 ms."""

    def __init__(self, null, clock):
        self.null, self.clock, self.futures, self.lock = null, clock, [], threading.Lock()
        self._tick(clock.ms)
        clock.on_tick = self._tick

    def start(self):
        return self

    @property
    def live_jobs(self) -> int:
        with self.lock:
            return len(self.futures)

    def submit(self, spec):
        with self.lock:
            self.futures.append(Future())
            return self.futures[-1]

    def stop(self, grace):
        self.clock.on_tick = None

    def _tick(self, ms):
        steps = max(0, ms - 200)
        self.samples_processed, self.batches, self.decided = 8000 * steps, steps, 4 * steps
        self.bookkeeping_seconds, self.decision_seconds = 0.5e-3 * steps, 0.1e-3 * steps
        self.thread_cpu_seconds = 0.45e-3 * steps
        self.null.seconds, self.null.cpu_seconds, self.null.calls = 0.2e-3 * steps, 0.15e-3 * steps, steps
        if ms % 100 == 0 and ms > 200:
            with self.lock:
                fut = self.futures.pop(0)
            fut.set_result(SimpleNamespace(samples=500))


NULL_ROW = {"steps": 100, "mean_batch": 8000.0, "decision_ms": 0.1, "decided_per_step": 4.0, "cpu_ms": 0.2,
            "null_ms": 0.1, "certs_per_s": 10.0, "samples_per_cert": 500.0, "seconds": 3.0, "live_mean": 64.0,
            "live_min": 63}


FAKE_HEY_WORKERS = """import sys
q, z, c = (float(sys.argv[sys.argv.index(f) + 1].rstrip("s")) for f in ("-q", "-z", "-c"))
period = int(1e6 / q) * 1e-6
print("response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset")
for k in range(1, int((z - 0.0031) / period) + 1):
    for w in range(int(c)):
        print(f"0.0005,0,0,0,0.0005,0,200,{0.0031 + k * period + 0.0001 * (w % 3):.4f}")
"""


WRK_OUTPUT = ("Running 10s test @ http://x/certify\n  Latency Distribution\n     50%  850.00us\n     75%    1.20ms\n"
              "     90%    2.50ms\n     99%    1.10s\n  10180 requests in 10.00s, 5.00MB read\nRequests/sec:   1018.00")


class BlockingHTTP:
    """RawHTTP stand-in whose post blocks the event loop for 20 ms: requests due together queue behind each other."""

    def __init__(self, host, port):
        pass

    async def post(self, path, body, content_type):
        time.sleep(0.02)
        return 200

    def close(self):
        pass


def hey_result(p90: float, p99: float, ok: int = 1000) -> dict:
    """A hey row of 1,000 ticks whose raw latencies (``bench.hey_runs.RAW``) have exactly these p90 and p99."""
    codes = {"200": ok} if ok == 1000 else {"200": ok, "503": 1000 - ok}
    ticks = np.concatenate([np.full(899, 1.0), np.full(90, p90), np.full(11, p99)])
    return {"n": 1000, "scheduled": 1000, "span_s": 5.0, "codes": codes, "mean": 1.0, "p50": 1.0, "p90": p90,
            "p99": p99, "max": p99 + 1, "p99_from_send": p99, "offered_rate": 200.0, "command": "hey", "duration": 5,
            hey_runs.RAW: {"ticks": ticks, "from_send": ticks}}


def run_bench_http(monkeypatch, tmp_path, even: dict | list, mixed: dict | list, repeats: int = 1,
                   order: list | None = None) -> dict:
    """bench_http with hey present (wrk not), fake load runs of 10 s each on a fake clock; bursts p99 39 ms. ``even``
    and ``mixed``: one row reused in every round, or a list of one per round; ``order`` (optional) receives the rows'
    tags in the order they ran.
    The fake worker counts 100 samples per fake second; the loop's fake CPU is 0.2 s per fake 10 s."""
    import httpx

    clock = FakeClock()
    server = SimpleNamespace(url=URL, cmd=["/x/certserve", "serve"], loop_cpu_seconds=lambda: 0.2 * clock.now(),
                             metrics=lambda: {"certserve_samples_processed_total": 100.0 * clock.now()})
    rows = {"even": iter(even if isinstance(even, list) else [even] * repeats),
            "mixed": iter(mixed if isinstance(mixed, list) else [mixed] * repeats)}
    order = [] if order is None else order

    def staggered(hey, url, body, rate, duration, streams, workdir, tag):
        clock.advance(10.0)
        order.append(tag)
        return dict(next(rows[tag]))  # a KeyError for a burst row run as staggered streams

    def burst(*a):
        clock.advance(10.0)  # a 10 s run, as the staggered ones: the loop's fake CPU over it, 2.00 ms per request
        order.append("burst")
        return hey_result(30.0, 39.0)

    client = SimpleNamespace(post=lambda *a, **kw: None)
    monkeypatch.setattr(httpx, "Client", lambda **kw: contextlib.nullcontext(client))
    patch(monkeypatch, hey_runs, time=clock, run_hey_staggered=staggered, run_hey_burst=burst,
          SequentialLoad=lambda *a: contextlib.nullcontext(SimpleNamespace(done=50, codes={"200": 50})))
    patch(monkeypatch, http_load, time=clock, tool_version=lambda name: "1",
          load_test_images=lambda n: (np.zeros((4, 1, 28, 28)), np.zeros(4)),
          first_surrogate_image=lambda url, pngs: (0, {"class_index": 1, "radius": 0.7,
                                                       "guarantee": {"kind": "conformal-marginal"}}),
          ensure_tool=lambda name: name if name == "hey" else None,
          run_open_loop=lambda *a: dict(hey_result(3.0, 5.0), send_lag_p99=0.1))
    args = SimpleNamespace(duration=None, full=False, rate=200.0, seed=0, http_repeats=repeats)
    with contextlib.redirect_stdout(io.StringIO()):
        _, _, body, data = http_load.bench_http(args, {"workdir": tmp_path}, server)
    return dict(data, body=body)
