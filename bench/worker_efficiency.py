"""Section (a): SequentialEngine samples/s with N concurrent best-radius jobs vs the raw model at the same batches."""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from bench.models_and_data import clean_argmax, load_sampler_backend, load_test_images, make_sampling_engine
from bench.server_common import (ALPHA, BUDGET, LiveJobs, efficiency_verdict, floor3, markdown_table, pct,
                                 set_up_as_the_server)


class _Recorder:
    """EngineObserver recording (end time, samples, jobs, model seconds) of every batch."""

    def __init__(self):
        self.batches: list[tuple[float, int, int, float]] = []

    def on_batch(self, samples: int, capacity: int, jobs: int, seconds: float) -> None:
        self.batches.append((time.perf_counter(), samples, jobs, seconds))

    def on_queue(self, waiting: int, live: int) -> None:
        pass


def _gated(sampler):
    """A SamplingEngine that logs each launch's chunk sizes and can park the engine thread at its next launch
    (``pause()`` returns once it is parked AND every batch it launched has finished, so the model is idle;
    ``resume()``), so the raw model can be timed in the same process between slices of worker time. Parked
    intervals are logged and excluded from the worker's time."""
    from models.sampling import SamplingEngine

    class Gated(SamplingEngine):
        def __init__(self):
            super().__init__(sampler.backend, sigma=sampler.sigma, num_classes=sampler.num_classes,
                             batch_size=sampler.batch_size)
            self.sizes_log: list[np.ndarray] = []
            self.parked_log: list[tuple[float, float]] = []
            self._launched: list = []
            self._gate = threading.Event()
            self._gate.set()
            self._parked = threading.Event()

        def launch(self, images, sizes, rng):
            if not self._gate.is_set():
                for pending in self._launched:  # the model finishes what is in flight (worker time); nothing new
                    pending.wait()
                t = time.perf_counter()  # parked from here: the model is idle
                self._parked.set()
                self._gate.wait()
                self.parked_log.append((t, time.perf_counter()))
            self.sizes_log.append(np.array(sizes, dtype=np.int64))
            pending = super().launch(images, sizes, rng)
            self._launched = [p for p in self._launched if not p.done()] + [pending]
            return pending

        def pause(self) -> float:
            self._parked.clear()
            self._gate.clear()
            self._parked.wait()
            return time.perf_counter()

        def resume(self) -> float:
            self._gate.set()
            return time.perf_counter()

    return Gated()


def interleaved_worker(sampler, images, classes, n_jobs: int, *, warm: float, cycles: int, w_slice: float,
                       r_slice: float, seed, rng) -> dict:
    """Keep ``n_jobs`` best-radius jobs live (a finished job is replaced at once by :class:`LiveJobs`' feeder) and
    alternate ``cycles`` times: ``w_slice`` s of worker time, then with the engine parked: the raw model at the
    worker's running mean batch (size and number of chunks) for ``r_slice`` s, an exact replay of (a strided subset
    of) the model calls of the worker slice just run, and one call at the full batch size."""
    from models.engine import JobSpec, SequentialEngine

    gated = _gated(sampler)
    rec = _Recorder()
    engine = SequentialEngine(gated, max_live_jobs=max(512, n_jobs), seed=seed, observer=rec)
    live = LiveJobs(engine, lambda i: JobSpec(images[i % len(images)], ALPHA, BUDGET, time.monotonic() + 3600,
                                              tested_class=int(classes[i % len(images)])))

    raw = {"mean": [0, 0.0], "replay": [0, 0.0], "full": [0, 0.0]}
    per_cycle = []
    full_sizes = split_sizes(sampler.batch_size, 4)
    sampler.count_chunks(images[:4], full_sizes, rng)  # warm the session up once
    live.start(n_jobs)
    time.sleep(warm)
    t_start = gated.pause()
    n_batches0, n_sizes0 = len(rec.batches), len(gated.sizes_log)
    for _ in range(cycles):
        b0, s0 = len(rec.batches), len(gated.sizes_log)
        t_resumed = gated.resume()
        time.sleep(w_slice)
        t_parked = gated.pause()
        sl = rec.batches[b0:]
        since = rec.batches[n_batches0:]
        if not since:
            continue
        mean_b = sum(b[1] for b in since) / len(since)
        mean_j = sum(b[2] for b in since) / len(since)
        m = raw_rate(sampler, images, [split_sizes(round(mean_b), round(mean_j))], r_slice, rng)
        model = sum(b[3] for b in sl)
        sizes = gated.sizes_log[s0:]
        stride = max(1, math.ceil(model / (r_slice / 2))) if model > 0 else 1
        r = raw_rate(sampler, images, sizes[::stride], 0.0, rng, cycle=False) if sizes else (0, 0.0)
        f = raw_rate(sampler, images, [full_sizes], 0.0, rng, cycle=False)
        for key, val in (("mean", m), ("replay", r), ("full", f)):
            raw[key][0] += val[0]
            raw[key][1] += val[1]
        per_cycle.append((sum(b[1] for b in sl), t_parked - t_resumed, m))
    t_end = time.perf_counter()
    live.close()
    gated.resume()
    engine.stop(0.0)
    batches = [b for b in rec.batches[n_batches0:] if b[0] <= t_end]
    parked = sum(min(b, t_end) - max(a, t_start) for a, b in gated.parked_log if b > t_start and a < t_end)
    active = (t_end - t_start) - parked
    certs = live.samples_between(t_start, t_end)
    model = sum(b[3] for b in batches)
    return {"samples": sum(b[1] for b in batches), "active": active, "batches": len(batches),
            "jobs": sum(b[2] for b in batches), "model": model, "certs": len(certs),
            "cert_samples": sum(certs), "raw": raw, "sizes_logged": len(gated.sizes_log) - n_sizes0,
            "per_cycle": per_cycle, "w_slice": w_slice}


def raw_rate(sampler, images, sizes_list, seconds: float, rng, *, cycle: bool = True) -> tuple[int, float]:
    """Samples and seconds of back-to-back count_chunks calls over ``sizes_list``: cycled until ``seconds`` have
    passed (at least one call) when ``cycle``, else each entry once."""
    samples, spent, i = 0, 0.0, 0
    deadline = time.perf_counter() + seconds
    while True:
        sizes = sizes_list[i % len(sizes_list)]
        t = time.perf_counter()
        sampler.count_chunks(images[:len(sizes)], sizes, rng)
        spent += time.perf_counter() - t
        samples += int(sizes.sum())
        i += 1
        if (cycle and time.perf_counter() >= deadline) or (not cycle and i >= len(sizes_list)):
            return samples, spent


def split_sizes(total: int, parts: int) -> np.ndarray:
    parts = max(1, min(parts, total))
    sizes = np.full(parts, total // parts, dtype=np.int64)
    sizes[:total % parts] += 1
    return sizes


class _GpuMemory:
    """Peak GPU memory of each row on a CUDA sampler (PyTorch's allocator: torch.cuda.max_memory_allocated, reset
    before the row; it covers the torch backend's weights, noise and activations, not onnxruntime-gpu's own arena);
    nothing on other devices."""

    def __init__(self, device: str):
        self.torch, self.device = None, device
        if str(device).startswith("cuda"):  # "cuda" or "cuda:N" (the torch backend keeps the device it was given)
            import torch

            self.torch = torch if torch.cuda.is_available() else None

    def reset(self) -> None:
        if self.torch is not None:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float | None:
        return None if self.torch is None else self.torch.cuda.max_memory_allocated(self.device) / 2**20

    def headers(self) -> list[str]:
        return [] if self.torch is None else ["GPU memory peak (MiB)"]

    def cells(self, peak: float | None) -> list[str]:
        return [] if self.torch is None else [f"{peak:,.0f}"]

    def note(self) -> str:
        return "" if self.torch is None else (" \"GPU memory peak\" = torch.cuda.max_memory_allocated over the row "
                                               "(reset before it): the torch backend's weights, noise and activations.")


def bench_worker(args, ctx) -> tuple[str, str, str, dict]:
    bundle, backend, source = load_sampler_backend(args)
    sampler = make_sampling_engine(args, bundle, backend)
    images, _ = load_test_images(1000)
    classes = clean_argmax(backend, images)
    set_up_as_the_server()  # kernels loaded, start-up heap frozen, as `certserve serve` before its first request
    jobs_list = [int(j) for j in args.jobs.split(",") if j.strip()]
    cycles = 24 if args.full else 12
    w_slice, r_slice, warm = 0.5, 0.25, 0.5
    rng = np.random.default_rng([args.seed, 11])
    rows, data_rows = [], []
    gpu = _GpuMemory(backend.device)
    for n_jobs in jobs_list:
        gpu.reset()
        res = interleaved_worker(sampler, images, classes, n_jobs, warm=warm, cycles=cycles, w_slice=w_slice,
                                 r_slice=r_slice, seed=[args.seed, n_jobs], rng=rng)
        w_rate = res["samples"] / res["active"]
        m_rate, r_rate, f_rate = (res["raw"][k][0] / res["raw"][k][1] for k in ("mean", "replay", "full"))
        cyc = [(s / t) / (m[0] / m[1]) for s, t, m in res["per_cycle"] if m[1] > 0 and t > 0]
        d = {"jobs": n_jobs, "worker_rate": w_rate, "raw_mean_rate": m_rate, "replay_rate": r_rate,
             "full_rate": f_rate, "efficiency": w_rate / m_rate, "replay_efficiency": w_rate / r_rate,
             "cycle_eff_q25": pct(cyc, 25), "cycle_eff_q75": pct(cyc, 75),
             "mean_batch": res["samples"] / res["batches"], "mean_chunks": res["jobs"] / res["batches"],
             "model_fraction": res["model"] / res["active"], "certs_per_s": res["certs"] / res["active"],
             "samples_per_cert": res["cert_samples"] / res["certs"] if res["certs"] else float("nan"),
             "worker_s": res["active"], "batches": res["batches"], "cycles": len(res["per_cycle"]),
             "gpu_peak_mib": gpu.peak_mib()}
        data_rows.append(d)
        rows.append([str(n_jobs), f"{d['mean_batch']:,.0f}", f"{d['mean_chunks']:.1f}", f"{w_rate:,.0f}",
                     f"{m_rate:,.0f}", f"**{floor3(d['efficiency'])}**",
                     f"{d['cycle_eff_q25']:.2f}-{d['cycle_eff_q75']:.2f}", f"{r_rate:,.0f}",
                     f"{d['replay_efficiency']:.2f}", f"{d['model_fraction']:.2f}", f"{f_rate:,.0f}",
                     f"{w_rate / f_rate:.2f}", f"{d['certs_per_s']:.1f}"] + gpu.cells(d["gpu_peak_mib"]))
        print(f"  worker {n_jobs:>4} jobs: {w_rate:,.0f} samples/s, raw@mean batch {m_rate:,.0f}, "
              f"efficiency {d['efficiency']:.2f}", flush=True)
    device = backend.device
    verdict, targets, measured = efficiency_verdict(device, data_rows)  # issue 11's targets of this device
    table = markdown_table(
        ["concurrent jobs", "mean batch (samples)", "mean chunks/batch", "worker samples/s",
         "raw samples/s @ mean batch", "**efficiency**", "per-cycle efficiency (IQR)", "raw replay of the same batches",
         "efficiency vs replay", "model busy fraction", f"raw @ full batch {sampler.batch_size}",
         "worker / full batch", "certificates/s"] + gpu.headers(), rows)
    noise = ("" if device != "cpu" else "\nOn a 2-core CPU the 1-job efficiency moved by about +-0.05 from run to run "
             "(0.84-0.92 over ten runs of this section's 1-job row on 2026-12-06, git 0d623f6): one run's 1-job "
             "verdict there is within that noise.")
    body = f"""Sampler: `{source}` via `{backend.name}`, batch size {sampler.batch_size}; sigma = {sampler.sigma},
alpha = {ALPHA}, budget {BUDGET:,}, KT prior (1/2, 1/2), best-radius policy; tested class = the base model's clean
arg-max; images = the first 1,000 Fashion-MNIST test images, cycled. A finished job is replaced at once by a feeder
thread (as the server's event loop submits requests), so the engine holds N live jobs. The process is set up as
`certserve serve`'s before the first row: compiled kernels loaded, start-up heap frozen (as in section (i)).
Per N: one `SequentialEngine`, {warm:g} s
warm-up, then {cycles} cycles of {w_slice:g} s of worker time followed, with the engine thread parked at the start of
its next model call, by the raw model in the same process: `SamplingEngine.count_chunks` back to back for
{r_slice:g} s at the worker's running mean batch (same size, same number of chunks), an exact replay of (a strided
subset of) the model calls of the worker slice just run, and one call at the full batch size. The fine interleaving
makes the worker and the raw model see the same machine load. Worker samples/s = samples of the batches finished
in the measured span / (span - parked time). Efficiency = worker samples/s / raw samples/s at the mean batch; the
IQR column is over the per-cycle ratios. "Model busy fraction" = time inside model calls / worker time.\
{gpu.note()}{noise}

{table}

**Target ({device}): efficiency {targets}: {verdict}** (lowest measured: {measured}).
"""
    data = {"device": device, "sampler": backend.name, "batch_size": sampler.batch_size, "rows": data_rows,
            "targets": targets, "verdict": verdict}
    return f"worker-{backend.name}", f"(a) Worker efficiency ({backend.name})", body, data
