"""The batching engine: one per process (per replica) batches the noise samples of every live job into shared model calls.

No HTTP here (the service, benchmarks and tests drive it). The engine thread runs ``depth`` batches (2: double
buffering). Each turn it 1. admits new jobs into the job table (:mod:`models.jobs`, arrays), frees finished ones,
2. fills the next batch of up to ``batch_size`` noisy inputs with chunks from many jobs, earliest deadline first
   (no starvation: every job has a deadline), from what each job still wants *given what is in flight*: a sequential
   job the samples up to its next checkpoint of :func:`smoothing.checkpoint_schedule`, a fixed-n job its remaining
   n0 or n; spare capacity lets best-radius jobs run one checkpoint ahead of their pending decision
   (:meth:`models.jobs.JobTable.speculative`); and launches it (:meth:`models.sampling.SamplingEngine.launch`:
   asynchronous), so the next model call never waits for the current batch's bookkeeping,
3. takes the OLDEST batch in flight, adds its per-job counts (one vectorized update), evaluates the policy of every
   job at a checkpoint in one call per policy and the certificates of all finished jobs in one call
   (:mod:`models.decisions`), and resolves their futures (thread-safe; awaitable via ``asyncio.wrap_future``).
The engine is the one owner of deadlines: a watcher thread answers each job at its deadline with the certificate of
the samples counted so far (batches that have landed only), even while a batch that includes the job is running.

Statistics: a sequential job tests X_t = 1{f(x + e_t) = c}, c and the Beta prior fixed from the clean input before
submission, e_t i.i.d. across all samples; its certificate is the confidence-sequence bound at the stopping time (or
at its policy's stop, if larger: decisions.certificates), valid per input at level alpha whatever stopped it (policy,
budget, deadline, shutdown). A fixed-n job bounds the hit rate of a class fixed before its estimation samples
(one-sided Clopper-Pearson): ``cohen`` selects it from n0 separate samples (Cohen et al. 2019; estimation may start
while selection is in flight: independent samples, class read from the selection counts only), ``fixed`` takes the
caller's class. n estimation samples, or fewer when a deadline or shutdown cuts them: the cut depends on the clock
only, never on the outcomes, so the counted samples are a fixed-size i.i.d. sample given the cut and the
Clopper-Pearson bound stays valid for them.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from models.decisions import STOP_NAMES, DecisionTables, certificates, stop_bounds
from models.jobs import (KINDS, Batch, EngineStopped, JobResult, JobSpec, JobTable, QueueFull, check_spec,
                         checkpoints_of, job_done_callback, resolve_futures)
from models.sampling import SamplingEngine
from models.table_kernels import warm_up as warm_up_table_kernels
from smoothing import Stop


@dataclass(eq=False)
class _Job:
    spec: JobSpec | None  # None once finished: the deadline heap keeps a job till its deadline, not its image
    future: concurrent.futures.Future
    submitted: float
    order: int
    slot: int = -1  # its slot in the job table once admitted
    started: float | None = None
    finished: bool = False  # set under the state lock by whoever answers it (engine thread or deadline watcher)


class EngineObserver:
    """Hooks for metrics; the default does nothing."""

    def on_batch(self, samples: int, capacity: int, jobs: int, seconds: float) -> None: ...

    def on_queue(self, waiting: int, live: int) -> None: ...


class SequentialEngine:
    """Batches the noise samples of all live jobs into shared model calls on one backend (see module docstring)."""

    def __init__(self, sampler: SamplingEngine, *, max_live_jobs: int = 512, seed: int | None = None,
                 observer: EngineObserver | None = None, depth: int = 2, speculate: bool = True):
        warm_up_table_kernels()  # the job table's compiled loops, loaded (or compiled) before any job
        self.sampler, self.sigma = sampler, sampler.sigma
        self.max_live_jobs, self.depth = int(max_live_jobs), max(1, int(depth))
        self.speculate = bool(speculate)  # spare batch capacity runs best-radius jobs ahead (JobTable.speculative)
        device = getattr(getattr(sampler, "backend", None), "device", "cpu")  # decisions tabulated while the model
        self.precompute, self._tables = device != "cpu", DecisionTables()  # runs: free on a GPU, not on a CPU's cores
        self.observer, self._rng = observer or EngineObserver(), np.random.default_rng(seed)
        self._lock = threading.Condition()  # guards _pending, _deadlines, _accepting, _stop_at, _engine_idle
        self._state = threading.Lock()  # guards the job table between the engine thread and the deadline watcher
        self._pending: list[_Job] = []
        self._open, self._count = 0, threading.Lock()  # jobs whose futures are not done (live_jobs), its lock
        self._cancelled: deque[_Job] = deque()
        self._table: JobTable | None = None
        self._image_shape: tuple | None = None  # of every job's image (the first submitted job's); guarded by _lock
        self._deadlines: list[tuple[float, int, _Job]] = []  # heap, guarded by _lock
        self._accepting, self._engine_idle = True, False  # _engine_idle: the engine thread waits in _idle for work
        self._stop_at: float | None = None  # monotonic time after which remaining jobs are finished as "shutdown"
        self._thread = self._watcher = None  # threading.Thread: the engine thread and the deadline watcher, once started
        self._order, self.samples_processed, self.batches = itertools.count(), 0, 0
        self.bookkeeping_seconds = 0.0  # engine-thread time outside waiting for the model (benchmarks)
        self.decision_seconds = 0.0  # of which policies and certificates of finished jobs
        self.decided = 0  # policy evaluations (jobs at a checkpoint)
        self.thread_cpu_seconds = 0.0  # CPU time of the engine thread (as of its latest turn)

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
        """Jobs submitted whose futures are not done: not a zombie, nor a cancelled job awaiting the engine's turn."""
        with self._count:
            return self._open

    def _closed(self) -> None:  # from every job future's first done callback (before the caller's)
        with self._count:
            self._open -= 1

    @property
    def stopping(self) -> bool:
        """True once stop() was called (a drain or shutdown), whether or not the engine thread has ended."""
        return self._stop_at is not None

    @property
    def alive(self) -> bool:
        """True while the engine thread runs (readiness depends on it)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, spec: JobSpec) -> concurrent.futures.Future:
        """Queue a job; returns a future of :class:`JobResult`. Cancel the future to drop the job."""
        check_spec(spec, self.sampler.num_classes)  # ValueError for a spec the engine cannot run
        shape = np.shape(spec.image)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        job = _Job(spec, fut, time.monotonic(), next(self._order))
        with self._lock:
            if not self._accepting or self._thread is not None and not self._thread.is_alive() or (
                    self._stop_at is not None and time.monotonic() >= self._stop_at):
                raise EngineStopped("the certification engine is draining or stopped and accepts no new work")
            if shape != (self._image_shape or shape):  # the job table holds one image shape: the first job's
                raise ValueError(f"every job's image must have the first job's shape {self._image_shape}, got {shape}")
            self._image_shape = shape
            with self._count:
                if self._open >= self.max_live_jobs:
                    raise QueueFull(f"{self.max_live_jobs} sampling jobs are in flight")
                self._open += 1  # until its future is done (_closed)
            self._pending.append(job)  # the engine thread publishes the queue depth (one writer), at admission
            heapq.heappush(self._deadlines, (spec.deadline, job.order, job))
            if len(self._deadlines) > 2 * self.max_live_jobs + 64:  # answered jobs (image, future) wait there for
                self._deadlines = [d for d in self._deadlines if not d[2].future.done()]  # their deadline: drop
                heapq.heapify(self._deadlines)  # them (amortized O(1) per submit; at most ~2 max_live_jobs kept)
            if self._engine_idle or self._deadlines[0][2] is job:  # else no one waits for it (a wake-up costs
                self._lock.notify_all()  # the engine thread a lock hand-over: skipped under load)
        fut.add_done_callback(job_done_callback(self._closed, self._cancelled, job))  # (answered meanwhile: at once)
        return fut

    def stop(self, grace: float = 0.0, *, wait: bool = True, accept: bool = False) -> None:
        """Stop accepting (with ``accept``: only at the stop time, for requests already on their way); let live jobs
        run up to ``grace`` seconds (never later than an earlier call said), then answer the rest with their current
        (valid) certificate, marked ``shutdown``."""
        with self._lock:
            self._accepting = accept and self._accepting
            self._stop_at = min(self._stop_at or float("inf"), time.monotonic() + max(0.0, grace))
            self._lock.notify_all()
            never_started = self._thread is None
            leftover, self._pending = (self._pending, []) if never_started else ([], self._pending)
        if never_started:  # nobody will sample them: answer with what they have (nothing), marked shutdown
            with self._state:
                answers = [self._answer_unadmitted(job, "shutdown") for job in leftover]
            resolve_futures(answers)
        elif wait:
            self._thread.join()
            self._watcher.join()

    # ----------------------------------------------------------------- deadline watcher thread
    def _watch_deadlines(self) -> None:
        """Answer every job at its deadline and every job left at the stop time (valid: the clock alone decides, see the
        module docstring); a batch still running is not counted, so a slow model call never holds an answer back."""
        while True:
            with self._lock:
                while self._deadlines and self._deadlines[0][2].future.done():
                    heapq.heappop(self._deadlines)  # answered or cancelled meanwhile
                if self._stop_at is not None and not self.alive:
                    return  # the engine thread answered every job before it ended (at the stop, or on a fault)
                now = time.monotonic()
                cut = self._stop_at is not None and now >= self._stop_at
                if not cut and (not self._deadlines or self._deadlines[0][0] > now):  # wait at most an hour: a
                    wait = min(self._deadlines[0][0] - now, 3600.0) if self._deadlines else None  # longer one raises
                    self._lock.wait(timeout=wait if self._stop_at is None else min(wait or 0.05, 0.05))
                    continue
                job, unadmitted = (None, list(self._pending)) if cut else (heapq.heappop(self._deadlines)[2], [])
            with self._state:
                jobs = [job]
                if cut:  # the stop time: every job left, one at a time (one that cannot be answered fails alone)
                    table = self._table
                    running = [] if table is None else [table.jobs[s] for s in np.flatnonzero(table.running)]
                    jobs = unadmitted + running
                answers = [a for j in jobs for a in self._answer_job(j, "shutdown" if cut else "deadline")]
            resolve_futures(answers)
            if cut:
                time.sleep(0.05)  # then again, until the engine thread has ended

    # ----------------------------------------------------------------- engine thread
    def _run(self) -> None:
        inflight: deque[tuple[Batch, object]] = deque()
        try:
            while True:
                t0 = time.perf_counter()
                self.thread_cpu_seconds = time.thread_time()
                if self._prepare(inflight):
                    return
                while len(inflight) < self.depth and self._launch_next(inflight):
                    pass
                if inflight and self.precompute:  # decisions ahead, while the model runs (low concurrency)
                    with self._state:
                        self._tables.precompute(self._table, self.sigma)
                self.bookkeeping_seconds += time.perf_counter() - t0
                if inflight:
                    self._land_oldest(inflight)
                else:
                    self._idle()
        except BaseException:  # a fault ends the thread: nobody samples now, so no job may wait for its deadline
            self._answer_unanswered()
            raise
        finally:
            self.sampler.close()

    def _answer_unanswered(self) -> None:
        """The engine thread is ending on a fault: refuse new jobs and answer every unanswered one now (pending, being
        admitted or in the table: each stays in the deadline heap until answered) with the certificate of its landed
        samples, marked ``shutdown``, one at a time as the watcher's stop-time pass does."""
        with self._lock:
            self._accepting = False
            jobs = [entry[2] for entry in self._deadlines]
            self._pending = []
        with self._state:
            answers = [a for job in jobs for a in self._answer_job(job, "shutdown")]
        resolve_futures(answers)
        self.observer.on_queue(0, 0)

    def _land_oldest(self, inflight: deque) -> None:
        try:
            counts = inflight[0][1].result()
            batch, pending = inflight.popleft()
            t0 = time.perf_counter()
            self._land(batch, counts, pending.model_seconds)
            self.bookkeeping_seconds += time.perf_counter() - t0
        except Exception as exc:  # a broken model call must not hang the callers, nor kill this thread
            self._fail_all(exc, inflight)

    def _prepare(self, inflight: deque) -> bool:
        """Admit pending jobs, drop cancelled and finished ones; at shutdown answer everyone. True: stop the loop."""
        with self._lock:
            admit, self._pending = self._pending, []
            table = self._table
            stopping = self._stop_at is not None and (time.monotonic() >= self._stop_at or not self._accepting
                                                      and not admit and (table is None or not table.running.any()))
            self._accepting = self._accepting and not stopping
        with self._state:
            table = self._table_for(admit)
            if table is None:  # nothing was ever admitted
                return stopping
            admit = [job for job in admit if not job.finished and not job.future.done()]
            kinds = [KINDS[job.spec.kind] for job in admit]
            schedules = [checkpoints_of(job.spec.budget) if job.spec.kind == "sequential" else None for job in admit]
            table.admit_many(admit, kinds, schedules)
            while self._cancelled:
                job = self._cancelled.popleft()
                job.finished, job.spec = True, None
                if job.slot >= 0 and table.gen[job.slot] == job.order:
                    table.running[job.slot] = False
        while stopping and inflight:  # let the launched batches land (their samples count), then answer everyone
            self._land_oldest(inflight)  # (the deadline watcher has answered them at the stop time if these were slow)
        with self._state:
            answers = self._answer(np.flatnonzero(table.running), "shutdown") if stopping else []
            table.release_idle()
            self.observer.on_queue(table.waiting(), table.unanswered())
        resolve_futures(answers)
        if stopping:
            with self._lock:
                self._lock.notify_all()  # wake the deadline watcher so that it exits
        return stopping

    def _table_for(self, admit: list[_Job]) -> JobTable:
        if self._table is None and admit:
            self._table = JobTable(self._image_shape, self.sampler.num_classes, capacity=min(self.max_live_jobs, 64))
        return self._table

    def _idle(self) -> None:
        """Nothing to launch: every live job waits for its deadline answer, or there is no job."""
        with self._lock:
            if not self._pending and not self._cancelled:  # submit() and stop() notify
                self._engine_idle = True
                self._lock.wait(timeout=0.5 if self._stop_at is None else 0.05)
                self._engine_idle = False

    def _launch_next(self, inflight: deque) -> bool:
        with self._state:
            table = self._table
            batch = table.allocate(self.sampler.batch_size, self.speculate) if table is not None else None
            if batch is None:
                return False
            now = time.monotonic()
            for slot in table.mark_started(batch.slots):
                table.jobs[slot].started = now
        try:
            inflight.append((batch, self.sampler.launch(batch.images, batch.sizes, self._rng)))
            return True
        except Exception as exc:  # a call that cannot even start (e.g. out of device memory): as a failed batch
            inflight.append((batch, None))
            self._fail_all(exc, inflight)
            return False

    def _land(self, batch: Batch, counts: np.ndarray, model_seconds: float) -> None:
        """Count a finished batch, decide every job at a checkpoint, answer the finished ones."""
        self.samples_processed, self.batches = self.samples_processed + batch.samples, self.batches + 1
        self.observer.on_batch(batch.samples, self.sampler.batch_size, len(batch.slots), model_seconds)
        table = self._table
        with self._state:
            landed = table.land(batch, counts)
            t0 = time.perf_counter()
            done = table.completed_fixed(landed)  # fixed-n and Cohen jobs with all their samples counted
            settled = table.settled(landed)  # stopped by their policy earlier, last samples now counted
            due = table.at_checkpoint(landed)  # neither of the above: those are not running a policy
            stopped_now = due[:0]  # stopped at this checkpoint with nothing in flight: answered now
            known = np.full(table.capacity, np.nan)  # L_t the policies computed at these counts, by slot
            if len(due) or len(settled):  # settled: only their L_t, in the same kernel call (DecisionTables.decide)
                self.decided += len(due)
                codes, known[np.concatenate([due, settled])] = self._tables.decide(table, due, self.sigma, settled)
                stop = codes != int(Stop.CONTINUE)
                table.advance_checkpoint(due[~stop] if (any_stop := stop.any()) else due)  # most steps: all go on
                if any_stop:
                    stopped_now = table.settle(due[stop], codes[stop], stop_bounds(table, due[stop], known, self.sigma))
            stopped = np.concatenate([settled, stopped_now])
            finished = np.concatenate([done, stopped])  # one certificate call for all of them
            names = ["budget"] * len(done) + [STOP_NAMES[c] for c in table.stop_code[stopped].tolist()]
            answers = self._answer(finished, names, known[finished]) if len(finished) else []
            self.decision_seconds += time.perf_counter() - t0
        resolve_futures(answers)

    def _fail_all(self, exc: Exception, inflight: deque) -> None:
        with self._state:
            table = self._table
            while inflight:
                batch, _ = inflight.popleft()
                table.inflight[batch.slots] -= batch.sizes  # the runner finishes or dropped them: nothing lands
            answers = [self._fail_job(table.jobs[s], exc) for s in np.flatnonzero(table.running)]
        resolve_futures(answers)

    # ----------------------------------------------------------------- answers (caller holds _state)
    def _answer(self, slots: np.ndarray, stopped_by, known_lower: np.ndarray | None = None) -> list:
        """The certificates of ``slots`` from their counted samples (see :func:`models.decisions.certificates`, also
        for ``known_lower``); marks the jobs finished. Returns (future, result) pairs to resolve once the state lock
        is released."""
        table = self._table
        slots = np.asarray(slots, dtype=np.int64)
        names = [stopped_by] * len(slots) if isinstance(stopped_by, str) else stopped_by
        jobs = [table.jobs[s] for s in slots.tolist()]
        keep = [k for k, job in enumerate(jobs) if not job.finished]
        known = None if known_lower is None else known_lower[keep]
        cls, radius, p = certificates(table, slots[keep], self.sigma, known)  # first: if it raises, nothing changed
        table.running[slots] = False
        kept = slots[keep]
        samples = (table.sel_done[kept] + table.est_done[kept]).tolist()
        now = time.monotonic()
        out = []
        for k, c, r, p_k, n in zip(keep, cls.tolist(), radius.tolist(), p.tolist(), samples):  # Python scalars
            job = jobs[k]
            job.finished, job.spec = True, None
            queue_s = (job.started or now) - job.submitted
            sampling_s = now - job.started if job.started is not None else 0.0
            out.append((job.future, JobResult(c, r, None if math.isnan(p_k) else p_k, n, names[k], queue_s, sampling_s)))
        return out

    def _answer_job(self, job: _Job, stopped_by: str) -> list:
        """The answer of one job (none if already answered), or its exception if its certificate cannot be computed:
        the watcher goes on (every later deadline depends on it). A job not finished still owns its slot."""
        try:
            if job.finished:
                return []
            return self._answer(np.array([job.slot]), stopped_by) if job.slot >= 0 else [
                self._answer_unadmitted(job, stopped_by)]
        except Exception as exc:
            return [self._fail_job(job, exc)]

    def _answer_unadmitted(self, job: _Job, stopped_by: str) -> tuple:  # never in the table: no samples, bound 0 / none
        if job.finished:
            return (job.future, None)
        job.finished, spec, job.spec = True, job.spec, None
        return (job.future, JobResult(-1, 0.0, None if spec.kind == "cohen" else 0.0, 0, stopped_by,
                                      time.monotonic() - job.submitted, 0.0))

    def _fail_job(self, job: _Job, exc: Exception) -> tuple:
        """(future, exc) for a job that gets an exception instead of a certificate (None if already answered)."""
        if job.finished:
            return (job.future, None)
        if job.slot >= 0 and self._table.gen[job.slot] == job.order:
            self._table.running[job.slot] = False
        job.finished, job.spec = True, None
        return (job.future, exc)


__all__ = ["EngineObserver", "EngineStopped", "JobResult", "JobSpec", "QueueFull", "SequentialEngine"]
