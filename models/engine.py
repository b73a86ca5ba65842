"""The batching engine: one per process (per replica) batches the noise samples of every live job into shared model calls.

No HTTP here (the certification service, the benchmarks and the tests drive it directly). Each step it
1. admits new jobs and drops cancelled or finished ones,
2. fills ONE batch of up to ``batch_size`` noisy inputs with chunks from many jobs, earliest deadline first (every
   job has a deadline, so an old job always reaches the front: no starvation); a sequential job asks for the samples
   up to its next checkpoint of :func:`smoothing.checkpoint_schedule`, a fixed-n job for its remaining n0 or n,
3. runs the model once through :class:`models.sampling.SamplingEngine` (noise drawn where the model runs),
4. adds the per-job counts, evaluates the stopping policy of every job that reached a checkpoint in one vectorized
   call, and resolves the futures of finished jobs (``concurrent.futures.Future``: thread-safe, and awaitable from
   asyncio through ``asyncio.wrap_future``).
The engine is the one owner of deadlines: a watcher thread answers each job at its deadline with the certificate of
the samples counted so far, even while a batch that includes the job is still running.

Statistics: a sequential job tests X_t = 1{f(x + e_t) = c} with c and the Beta prior fixed by the caller from the
clean input before the job is submitted; e_t are i.i.d. across all samples. Its certificate is the confidence-sequence
bound at the stopping time, valid per input at level alpha whatever stopped it (policy, budget, deadline, shutdown).
A fixed-n job bounds the hit rate of a class fixed before its estimation samples with a one-sided Clopper-Pearson
bound: ``cohen`` selects the class from n0 separate samples (Cohen et al. 2019), ``fixed`` takes the caller's class
from the clean input. The number of estimation samples is n, or fewer when the deadline or a shutdown cuts it; that
cut depends on the clock only, never on the outcomes, so the samples counted are a fixed-size i.i.d. sample given the
cut and the Clopper-Pearson bound stays valid for them.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.sampling import SamplingEngine
from smoothing import (KT_PRIOR, Stop, best_radius_decision, checkpoint_schedule, clopper_pearson_lower, lower_bound,
                       radius_from_probability, target_radius_decision)

_STOP_NAMES = {Stop.TARGET: "target", Stop.CERTIFIED: "certified", Stop.FUTILITY: "futility", Stop.BUDGET: "budget"}


class QueueFull(RuntimeError):
    """The engine holds ``max_live_jobs`` jobs; the caller should retry later."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and accepts no new jobs."""


@dataclass(frozen=True)
class JobSpec:
    """What to certify. ``tested_class`` and ``prior`` (sequential, fixed) must be fixed from the clean input."""

    image: np.ndarray  # (C, H, W) float32 in [0, 1]
    alpha: float
    budget: int  # sequential: most samples; cohen / fixed: n, the estimation samples
    deadline: float  # time.monotonic() seconds; the engine answers then with the certificate reached so far
    kind: Literal["sequential", "cohen", "fixed"] = "sequential"
    tested_class: int = 0
    prior: tuple[float, float] = KT_PRIOR
    target_radius: float | None = None  # None: best-radius policy
    n0: int = 100  # cohen selection samples


@dataclass
class JobResult:
    class_index: int  # -1: abstain
    radius: float
    p_lower: float | None
    samples: int
    stopped_by: str
    queue_seconds: float
    sampling_seconds: float


@dataclass(eq=False)
class _Job:
    spec: JobSpec
    future: concurrent.futures.Future
    submitted: float
    order: int
    checkpoints: np.ndarray | None = None
    next_checkpoint: int = 0
    hits: int = 0  # hits of the tested (sequential, fixed) or selected (cohen, after selection) class
    trials: int = 0
    selection: np.ndarray | None = None  # cohen phase-1 class counts
    selected: int = -1  # the class whose hits are counted; -1 while a cohen job is still selecting
    started: float | None = None

    def wanted(self) -> int:
        spec = self.spec
        if spec.kind == "sequential":
            return int(self.checkpoints[self.next_checkpoint]) - self.trials
        if self.selected < 0:
            return spec.n0 - int(self.selection.sum())
        return spec.budget - self.trials


class EngineObserver:
    """Hooks for metrics; the default does nothing."""

    def on_batch(self, samples: int, capacity: int, jobs: int, seconds: float) -> None: ...

    def on_queue(self, waiting: int, live: int) -> None: ...


class SequentialEngine:
    """Batches the noise samples of all live jobs into shared model calls on one backend (see module docstring)."""

    def __init__(self, sampler: SamplingEngine, *, max_live_jobs: int = 512, seed: int | None = None,
                 observer: EngineObserver | None = None):
        self.sampler = sampler
        self.sigma = sampler.sigma
        self.max_live_jobs = int(max_live_jobs)
        self.observer = observer or EngineObserver()
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Condition()
        self._state = threading.Lock()  # guards job counters between the engine thread and the deadline watcher
        self._pending: list[_Job] = []
        self._jobs: list[_Job] = []
        self._deadlines: list[tuple[float, int, _Job]] = []  # heap, guarded by _lock
        self._accepting = True
        self._stop_at: float | None = None  # monotonic time after which remaining jobs are finished as "shutdown"
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._order = itertools.count()
        self.samples_processed = 0
        self.batches = 0

    # ----------------------------------------------------------------- public API (any thread)
    def start(self) -> SequentialEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="certserve-engine", daemon=True)
            self._watcher = threading.Thread(target=self._watch_deadlines, name="certserve-deadlines", daemon=True)
            self._thread.start()
            self._watcher.start()
        return self

    @property
    def live_jobs(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._jobs)

    @property
    def alive(self) -> bool:
        """True while the engine thread runs (readiness depends on it)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, spec: JobSpec) -> concurrent.futures.Future:
        """Queue a job; returns a future of :class:`JobResult`. Cancel the future to drop the job."""
        if spec.budget < 1 or spec.kind == "cohen" and spec.n0 < 1:
            raise ValueError("a job needs a budget >= 1 (and n0 >= 1 for cohen)")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        job = _Job(spec, fut, time.monotonic(), next(self._order))
        if spec.kind == "sequential":
            job.checkpoints = checkpoint_schedule(spec.budget)
        if spec.kind == "cohen":
            job.selection = np.zeros(self.sampler.num_classes, dtype=np.int64)
        else:
            job.selected = spec.tested_class
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the certification engine is draining and accepts no new work")
            if len(self._pending) + len(self._jobs) >= self.max_live_jobs:
                raise QueueFull(f"{self.max_live_jobs} sequential jobs are in flight")
            self._pending.append(job)
            heapq.heappush(self._deadlines, (spec.deadline, job.order, job))
            self.observer.on_queue(len(self._pending), len(self._pending) + len(self._jobs))
            self._lock.notify_all()
        return fut

    def stop(self, grace: float = 0.0, *, wait: bool = True) -> None:
        """Stop accepting; let live jobs run up to ``grace`` seconds, then answer the rest with their current
        (valid) certificate, marked ``shutdown``."""
        with self._lock:
            self._accepting = False
            self._stop_at = time.monotonic() + max(0.0, grace)
            self._lock.notify_all()
            never_started = self._thread is None
            leftover = self._pending + self._jobs if never_started else []
            if never_started:
                self._pending, self._jobs = [], []
        if never_started:  # nobody will sample them: answer with what they have (nothing), marked shutdown
            self._finish_all(leftover, "shutdown")
        elif wait:
            self._thread.join()
            self._watcher.join()

    # ----------------------------------------------------------------- deadline watcher thread
    def _watch_deadlines(self) -> None:
        """Answer every job at its deadline (valid: the stopping time depends on the clock only, see the module
        docstring); samples of a batch still running for the job are simply not counted."""
        while True:
            with self._lock:
                while self._deadlines and self._deadlines[0][2].future.done():
                    heapq.heappop(self._deadlines)  # answered or cancelled meanwhile
                if self._stop_at is not None and not self.alive:
                    return
                now = time.monotonic()
                if not self._deadlines or self._deadlines[0][0] > now:
                    wait = self._deadlines[0][0] - now if self._deadlines else None
                    self._lock.wait(timeout=wait if self._stop_at is None else min(wait or 0.05, 0.05))
                    continue
                job = heapq.heappop(self._deadlines)[2]
            with self._state:
                self._finish(job, "deadline")

    # ----------------------------------------------------------------- engine thread
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._jobs and self._stop_at is None:
                    self._lock.wait()
                self._jobs.extend(self._pending)
                self._pending.clear()
                stopping = self._stop_at is not None and (time.monotonic() >= self._stop_at or not self._jobs)
                if stopping:
                    leftover, self._jobs, self._pending = self._jobs + self._pending, [], []
            if stopping:
                self._finish_all(leftover, "shutdown")
                with self._lock:
                    self._lock.notify_all()  # wake the deadline watcher so that it exits
                return
            try:
                self._step()
            except Exception as exc:  # a broken model call must not hang the callers, nor kill this thread
                with self._state:
                    for job in self._jobs:
                        _fail(job.future, exc)
                    self._jobs.clear()

    def _step(self) -> None:
        self._jobs = [job for job in self._jobs if not job.future.done()]  # cancelled, or answered at deadline
        self.observer.on_queue(sum(1 for job in self._jobs if job.started is None), len(self._jobs))
        chosen, sizes = self._fill_batch()
        if not chosen:
            with self._lock:  # every live job is waiting for its deadline answer: do not spin
                if not self._pending:
                    self._lock.wait(timeout=0.01)
            return
        t0 = time.monotonic()
        for job in chosen:
            if job.started is None:
                job.started = t0
        images = np.stack([job.spec.image for job in chosen])
        counts = self.sampler.count_chunks(images, np.asarray(sizes), self._rng)
        seconds = time.monotonic() - t0
        total = int(sum(sizes))
        self.samples_processed += total
        self.batches += 1
        self.observer.on_batch(total, self.sampler.batch_size, len(chosen), seconds)
        with self._state:
            self._update(chosen, sizes, counts)

    def _fill_batch(self) -> tuple[list[_Job], list[int]]:
        """Chunks of the live jobs for one model call, earliest deadline first (arrival order breaks ties)."""
        capacity = self.sampler.batch_size
        chosen, sizes = [], []
        for job in sorted(self._jobs, key=lambda j: (j.spec.deadline, j.order)):
            if capacity == 0:
                break
            take = min(job.wanted(), capacity)
            if take > 0:
                chosen.append(job)
                sizes.append(take)
                capacity -= take
        return chosen, sizes

    def _update(self, chosen: list[_Job], sizes: list[int], counts: np.ndarray) -> None:
        due: list[_Job] = []
        for job, size, row in zip(chosen, sizes, counts):
            if job.future.done():
                continue
            if job.selected < 0:  # cohen selection phase: these samples choose the class, they are not counted
                job.selection += row
                if job.selection.sum() >= job.spec.n0:
                    job.selected = int(np.argmax(job.selection))
                continue
            job.hits += int(row[job.selected])
            job.trials += size
            if job.spec.kind != "sequential":
                if job.trials >= job.spec.budget:
                    self._finish(job, "budget")
            elif job.trials >= job.checkpoints[job.next_checkpoint]:
                job.next_checkpoint = min(job.next_checkpoint + 1, len(job.checkpoints) - 1)
                due.append(job)
        if due:
            self._decide(due)
        self._jobs = [job for job in self._jobs if not job.future.done()]
        self.observer.on_queue(sum(1 for job in self._jobs if job.started is None), len(self._jobs))

    def _decide(self, due: list[_Job]) -> None:
        """One vectorized policy evaluation per policy over every job that reached a checkpoint."""
        for targeted in (True, False):
            group = [job for job in due if (job.spec.target_radius is not None) == targeted]
            if not group:
                continue
            s = np.array([j.hits for j in group])
            t = np.array([j.trials for j in group])
            a = np.array([j.spec.prior[0] for j in group])
            b = np.array([j.spec.prior[1] for j in group])
            alpha = np.array([j.spec.alpha for j in group])
            budget = np.array([j.spec.budget for j in group])
            radius = np.array([j.spec.target_radius if targeted else 0.0 for j in group])
            try:
                decision = self._policy(targeted, s, t, radius, alpha, budget, a, b)
            except ValueError:  # isolate the job(s) at fault instead of failing every live job
                decision = []
                for k, job in enumerate(group):
                    try:
                        decision.append(int(self._policy(targeted, *(x[k:k + 1] for x in (s, t, radius, alpha,
                                                                                           budget, a, b)))[0]))
                    except ValueError as exc:
                        _fail(job.future, exc)
                        decision.append(Stop.CONTINUE)
            for job, d in zip(group, np.atleast_1d(decision)):
                if not job.future.done() and d != Stop.CONTINUE:
                    self._finish(job, _STOP_NAMES[Stop(int(d))])

    def _policy(self, targeted, s, t, radius, alpha, budget, a, b):
        if targeted:
            return target_radius_decision(s, t, sigma=self.sigma, target_radius=radius, alpha=alpha, budget=budget,
                                          a=a, b=b)
        return best_radius_decision(s, t, sigma=self.sigma, alpha=alpha, budget=budget, a=a, b=b)

    def _finish_all(self, jobs: list[_Job], stopped_by: str) -> None:
        with self._state:
            for job in jobs:
                self._finish(job, stopped_by)

    def _finish(self, job: _Job, stopped_by: str) -> None:
        """Resolve the job's future with its certificate from the samples counted so far (caller holds _state).

        Sequential: the confidence-sequence bound L_t (prior fixed before sampling), valid per input at level alpha
        at any stopping time. Cohen / fixed: the one-sided (1 - alpha) Clopper-Pearson bound of the counted hits of the
        class fixed before them, valid per input because n (or its clock-only truncation) does not depend on them.
        Certified only where the bound exceeds 1/2; the radius is sigma * Phi^-1(bound), rounded down.
        """
        if job.future.done():
            return
        spec = job.spec
        now = time.monotonic()
        queue_s = (job.started or now) - job.submitted
        sampling_s = now - job.started if job.started is not None else 0.0
        samples = job.trials + (int(job.selection.sum()) if job.selection is not None else 0)
        if job.trials == 0:
            p_lower = None if spec.kind == "cohen" else 0.0
        elif spec.kind == "sequential":
            p_lower = float(lower_bound(job.hits, job.trials, spec.alpha, *spec.prior))
        else:
            p_lower = float(clopper_pearson_lower(job.hits, job.trials, spec.alpha))
        certified = p_lower is not None and p_lower > 0.5
        radius = float(radius_from_probability(p_lower, self.sigma)) if certified else 0.0
        result = JobResult(job.selected if certified else -1, radius, p_lower, samples, stopped_by, queue_s,
                           sampling_s)
        try:
            job.future.set_result(result)
        except concurrent.futures.InvalidStateError:  # cancelled by the caller in the meantime
            pass


def _fail(future: concurrent.futures.Future, exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except concurrent.futures.InvalidStateError:  # answered at its deadline or cancelled meanwhile
        pass


__all__ = ["EngineObserver", "EngineStopped", "JobResult", "JobSpec", "QueueFull", "SequentialEngine"]
