"""The engine's jobs: what to certify (:class:`JobSpec`), the answer (:class:`JobResult`), and the job table: every
live job's state as arrays over slots, so that each step's bookkeeping (chunk allocation, per-job counts, checkpoint
detection, retirement) is a handful of numpy operations over all jobs.

Slots and generations: an admitted job takes a free slot and a fresh generation number (its ``order``). A batch
records the (slot, generation) of each chunk; its counts are added only where the slot still holds that generation
and the job is still running, so counts can never reach another job. A finished job keeps its slot (a *zombie*)
until no chunk of it is in flight, so a slot is never reused while a batch still refers to it.

Counts: selection samples (Cohen's n0) go to ``sel_counts``, estimation samples to ``est_counts``; both are added
only when the batch that drew them has landed, so whoever reads them (the deadline watcher) sees finished batches
only. The engine holds its state lock around every call here.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import numbers
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.table_kernels import (COHEN, FIXED, SEQUENTIAL, add_counts, admit_rows, aheads, edf_take, free_idle,
                                  wants)
from smoothing import DEFAULT_MIN_GAIN, KT_PRIOR, checkpoint_schedule
from smoothing.cohen import MIN_CP_ALPHA
from smoothing.stopping import MAX_BUDGET

KINDS = {"sequential": SEQUENTIAL, "cohen": COHEN, "fixed": FIXED}


@dataclass(frozen=True)
class JobSpec:
    """What to certify. ``tested_class``, ``prior`` and ``proposal_radius`` must be fixed from the clean input."""

    image: np.ndarray  # (C, H, W) float32 in [0, 1]
    alpha: float
    budget: int  # sequential: most samples; cohen / fixed: n, the estimation samples
    deadline: float  # time.monotonic() seconds; the engine answers then with the certificate reached so far
    kind: Literal["sequential", "cohen", "fixed"] = "sequential"
    tested_class: int = 0
    prior: tuple[float, float] = KT_PRIOR
    target_radius: float | None = None  # None: best-radius policy
    proposal_radius: float | None = None  # stop once verified, else best radius (smoothing.proposal_decision)
    min_gain: float | None = None  # best-radius / proposal lambda; None: smoothing.DEFAULT_MIN_GAIN
    n0: int = 100  # cohen selection samples


@dataclass
class JobResult:
    class_index: int  # -1: abstain
    radius: float
    p_lower: float | None
    samples: int
    # certified / target / futility (policy), budget (spent; cohen, fixed: n drawn, 'planned'), deadline, shutdown
    stopped_by: str
    queue_seconds: float
    sampling_seconds: float


class QueueFull(RuntimeError):
    """The engine holds ``max_live_jobs`` jobs; the caller should retry later."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped and accepts no new jobs."""


def job_done_callback(closed: Callable[[], None], cancelled: deque, job) -> Callable[[concurrent.futures.Future], None]:
    """The engine's one done callback for ``job.future``: calls ``closed()`` (its count of open jobs), then queues
    the job in ``cancelled`` for the engine thread if its caller cancelled the future (a job the engine finished,
    ``job.finished`` set before its future is resolved, skips that check and its lock). Held by weak reference: no
    cycle job -> future -> callback -> job, so answered jobs are freed by reference counting, not by the cyclic
    collector (its passes over ~10^5 dead jobs held the interpreter lock for tens of ms). Gone: already answered."""
    return functools.partial(_job_done, closed, cancelled, weakref.ref(job))


def _job_done(closed, cancelled: deque, job_ref: weakref.ref, future: concurrent.futures.Future) -> None:
    closed()
    job = job_ref()
    if job is not None and not job.finished and future.cancelled():
        cancelled.append(job)


def resolve_futures(answers: list) -> None:
    """Resolve (future, result or exception or None) pairs, outside the engine's locks (their done callbacks may
    submit new jobs); a future cancelled by its caller in the meantime is skipped."""
    for future, outcome in answers:
        try:
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            elif outcome is not None:
                future.set_result(outcome)
        except concurrent.futures.InvalidStateError:
            pass


@dataclass
class Batch:
    """One model call's chunks: chunk i draws sizes[i] samples of the job in slots[i] (generation gens[i])."""

    slots: np.ndarray
    gens: np.ndarray
    sizes: np.ndarray
    selection: np.ndarray  # bool: the chunk's samples are Cohen selection samples
    images: np.ndarray

    @property
    def samples(self) -> int:
        return int(self.sizes.sum())


class JobTable:
    """Arrays over slots (see module docstring); grows by doubling."""

    _INT = ("gen", "kind", "n0", "budget", "assigned", "inflight", "sel_done", "est_done", "cls", "cp", "cp_idx",
            "stop_code")
    # target, proposal: NaN = none; stop_lower: L_t where a policy stopped a job with samples in flight (NaN: none)
    _FLOAT = ("deadline", "alpha", "a", "b", "target", "proposal", "min_gain", "stop_lower")
    _BOOL = ("live", "running", "started", "stopping")

    def __init__(self, image_shape: tuple[int, ...], num_classes: int, capacity: int = 64):
        self.image_shape, self.num_classes, self.capacity = tuple(image_shape), int(num_classes), 0
        self.jobs: list = []
        self.schedules = np.zeros((0, 1), dtype=np.int64)
        self.occupied = 0
        self._grow(max(1, int(capacity)))

    def _grow(self, capacity: int) -> None:
        old = self.capacity

        def grown(arr, fill):
            out = np.full((capacity, *arr.shape[1:]), fill, dtype=arr.dtype)
            out[:old] = arr[:old]
            return out

        for name in self._INT:
            setattr(self, name, grown(getattr(self, name, np.zeros(0, np.int64)), -1 if name == "gen" else 0))
        for name in self._FLOAT:
            setattr(self, name, grown(getattr(self, name, np.zeros(0)), 0.0))
        for name in self._BOOL:
            setattr(self, name, grown(getattr(self, name, np.zeros(0, bool)), False))
        k = self.num_classes
        self.sel_counts = grown(getattr(self, "sel_counts", np.zeros((0, k), np.int64)), 0)
        self.est_counts = grown(getattr(self, "est_counts", np.zeros((0, k), np.int64)), 0)
        self.images = grown(getattr(self, "images", np.zeros((0, *self.image_shape), np.float32)), 0.0)
        self.schedules = grown(self.schedules, 0)
        self.jobs.extend([None] * (capacity - old))
        self.capacity = capacity

    # ----------------------------------------------------------------------------------------- admission
    def admit(self, job, kind: int, schedule: np.ndarray | None) -> int:
        """Put one job in a free slot (:meth:`admit_many`); returns the slot."""
        return int(self.admit_many([job], [kind], [schedule])[0])

    def admit_many(self, jobs: list, kinds: list[int], schedules: list) -> np.ndarray:
        """Put ``jobs`` (engine jobs with .spec and .order) in free slots, all in one vectorized update; ``schedules``
        holds each job's checkpoint schedule (None for fixed-n kinds). Returns their slots (also set as job.slot)."""
        n = len(jobs)
        if not n:
            return np.zeros(0, dtype=np.int64)
        while self.occupied + n > self.capacity:
            self._grow(2 * self.capacity)
        slots = np.flatnonzero(~self.live)[:n]  # the first free slots
        specs = [job.spec for job in jobs]
        widest = max((len(sc) for sc in schedules if sc is not None), default=0)
        if widest > self.schedules.shape[1]:
            wide = np.zeros((self.capacity, widest), dtype=np.int64)
            wide[:, :self.schedules.shape[1]] = self.schedules
            self.schedules = wide
        ints = np.array([(job.order, kind, sp.n0 if kind == COHEN else 0, sp.budget, -1 if kind == COHEN
                          else sp.tested_class) for job, sp, kind in zip(jobs, specs, kinds)], dtype=np.int64)
        floats = np.array([(sp.deadline, sp.alpha, *sp.prior, np.nan if sp.target_radius is None else sp.target_radius,
                            np.nan if sp.proposal_radius is None else sp.proposal_radius,
                            DEFAULT_MIN_GAIN if sp.min_gain is None else sp.min_gain) for sp in specs],
                          dtype=np.float64)
        admit_rows(slots, ints, floats, self.gen, self.kind, self.n0, self.budget, self.cls, self.deadline, self.alpha,
                   self.a, self.b, self.target, self.proposal, self.min_gain, self.live, self.running, self.started,
                   self.stopping, self.assigned, self.inflight, self.sel_done, self.est_done, self.cp_idx,
                   self.stop_lower, self.sel_counts, self.est_counts)
        shared: dict[int, list[int]] = {}  # jobs by schedule object (checkpoints_of: one per budget), one write each
        for k in (k for k, schedule in enumerate(schedules) if schedule is not None):
            shared.setdefault(id(schedules[k]), []).append(k)
        for ks in shared.values():
            schedule, rows = schedules[ks[0]], slots[ks]
            self.schedules[rows, :len(schedule)], self.schedules[rows, len(schedule):] = schedule, schedule[-1]
            self.cp[rows] = schedule[0]
        self.images[slots] = np.stack([sp.image for sp in specs])
        for slot, job in zip(slots, jobs):
            self.jobs[slot] = job
            job.slot = int(slot)
        self.occupied += n
        return slots

    def release_idle(self) -> int:
        """Free the slots of finished jobs that have no chunk in flight; returns how many."""
        idle = free_idle(self.live, self.running, self.inflight, self.gen)
        for slot in idle:
            self.jobs[slot] = None
        self.occupied -= len(idle)
        return len(idle)

    # ----------------------------------------------------------------------------------------- one batch
    def wanted(self) -> np.ndarray:
        """Samples each slot wants in the next batch (0 for free, finished, or waiting on a decision)."""
        return wants(self.running, self.stopping, self.kind, self.n0, self.budget, self.cp, self.assigned)

    def speculative(self) -> np.ndarray:
        """Samples a best-radius job waiting on its decision at checkpoint c_i may draw ahead, up to c_{i+1}.

        If its policy then stops it at c_i, these samples still count: its certificate is the better of the
        confidence sequence at c_i (``stop_lower``, :meth:`settle`) and at the samples counted once they have landed
        (two values of one sequence, valid at any, even data-dependent, time: P(exists t: L_t > pA) <= alpha), so
        the bound its policy stopped on is never lost; it only stops up to one checkpoint interval later.
        Target-radius and proposal jobs never run ahead (a 'target' stop must certify the target or proposal: its
        certificate is the bound at the very checkpoint where it was verified)."""
        return aheads(self.running, self.stopping, self.kind, self.cp, self.assigned, self.cp_idx, self.schedules,
                      self.target, self.proposal)

    def allocate(self, capacity: int, speculate: bool = True) -> Batch | None:
        """Chunks for one model call: earliest deadline first (admission order breaks ties), each job up to what it
        wants, until ``capacity`` samples; then, with ``speculate``, capacity left over goes to best-radius jobs
        waiting on a decision (:meth:`speculative`). Marks the chunks assigned and in flight."""
        slots, sizes = edf_take(self.wanted(), self.gen, self.deadline, capacity)
        spare = capacity - int(sizes.sum())
        if speculate and spare > 0:
            more, more_sizes = edf_take(self.speculative(), self.gen, self.deadline, spare)
            slots, sizes = np.concatenate([slots, more]), np.concatenate([sizes, more_sizes])
        if not len(slots):
            return None
        selection = self.assigned[slots] < self.n0[slots]
        self.assigned[slots] += sizes
        self.inflight[slots] += sizes
        return Batch(slots, self.gen[slots].copy(), sizes, selection, self.images[slots])

    def land(self, batch: Batch, counts: np.ndarray) -> np.ndarray:
        """Add a finished batch's counts (J, K) to the jobs that still own its chunks; returns those slots."""
        slots = batch.slots
        ok = add_counts(slots, batch.gens, batch.sizes, batch.selection, np.asarray(counts, dtype=np.int64), self.gen,
                        self.running, self.inflight, self.sel_counts, self.sel_done, self.est_counts, self.est_done)
        if batch.selection.any():
            s = slots[ok & batch.selection]
            chosen = s[(self.sel_done[s] >= self.n0[s]) & (self.cls[s] < 0)]
            self.cls[chosen] = np.argmax(self.sel_counts[chosen], axis=1)  # Cohen: class from selection only
        return slots[ok]

    def hits(self, slots: np.ndarray) -> np.ndarray:
        """Estimation hits of each job's tested (sequential, fixed) or selected (Cohen) class; 0 before selection."""
        cls = self.cls[slots]
        return np.where(cls >= 0, self.est_counts[slots, np.maximum(cls, 0)], 0)

    def completed_fixed(self, slots: np.ndarray) -> np.ndarray:
        """Fixed-n and Cohen jobs among ``slots`` whose n estimation samples are all counted."""
        return slots[(self.kind[slots] != SEQUENTIAL) & (self.est_done[slots] >= self.budget[slots])]

    def at_checkpoint(self, slots: np.ndarray) -> np.ndarray:
        """Sequential jobs among ``slots`` whose counted samples reached their checkpoint (a policy decision is due)."""
        return slots[(self.kind[slots] == SEQUENTIAL) & (self.est_done[slots] >= self.cp[slots])
                     & ~self.stopping[slots]]

    def settle(self, slots: np.ndarray, codes: np.ndarray, lower: np.ndarray | None = None) -> np.ndarray:
        """Jobs whose policy stopped them: those with no chunk in flight are returned (answer them now), the others
        stop drawing, keep ``lower`` (their L_t at these counts, the bound the policy stopped on; the engine passes
        models.decisions.stop_bounds) as ``stop_lower``, and are answered once their in-flight samples have landed
        (:meth:`settled`)."""
        self.stop_code[slots] = codes
        busy = self.inflight[slots] > 0
        self.stopping[slots[busy]] = True
        if lower is not None:
            self.stop_lower[slots[busy]] = lower[busy]
        return slots[~busy]

    def settled(self, slots: np.ndarray) -> np.ndarray:
        """Stopping jobs among ``slots`` whose last samples have landed."""
        return slots[self.stopping[slots] & self.running[slots] & (self.inflight[slots] == 0)]

    def advance_checkpoint(self, slots: np.ndarray) -> None:
        """Sequential jobs that continue: their next chunk runs to the next checkpoint of their schedule."""
        last = self.schedules.shape[1] - 1
        self.cp_idx[slots] = np.minimum(self.cp_idx[slots] + 1, last)
        self.cp[slots] = self.schedules[slots, self.cp_idx[slots]]

    def mark_started(self, slots: np.ndarray) -> np.ndarray:
        """Flag the jobs of a batch as started; returns the slots that start now."""
        new = slots[~self.started[slots]]
        self.started[new] = True
        return new

    def waiting(self) -> int:
        return int(np.count_nonzero(self.running & ~self.started))

    def unanswered(self) -> int:
        """Admitted jobs not yet answered (slots of answered jobs still in flight, zombies, excluded)."""
        return int(np.count_nonzero(self.running))


@functools.lru_cache(maxsize=64)
def checkpoints_of(budget: int) -> np.ndarray:
    """A sequential job's checkpoint schedule (:func:`smoothing.checkpoint_schedule`), one array per budget, shared
    by every job with that budget: read-only, so no caller can change another job's checkpoints."""
    schedule = checkpoint_schedule(budget)
    schedule.flags.writeable = False
    return schedule


def check_spec(spec, num_classes: int | None = None) -> None:
    """ValueError, with a message saying what was expected, for a job spec the engine cannot run (at submit).

    These are all the checks of the stopping policies and the certificate's bound on a job's own parameters: the
    engine runs the validated entry points of :mod:`smoothing.stopping` at every step, so a job must be valid here.
    With ``num_classes`` (the model's), the tested class of a sequential or fixed job must be one of its classes."""
    if not 1 <= spec.budget <= MAX_BUDGET or spec.kind == "cohen" and spec.n0 < 1:
        raise ValueError("a job needs a budget between 1 and 2^31 samples (and n0 >= 1 for cohen)")
    if spec.kind not in KINDS:
        raise ValueError(f"unknown job kind {spec.kind!r}; expected one of {sorted(KINDS)}")
    if not (_is_real(spec.deadline) and not math.isnan(spec.deadline)):  # NaN would break the deadline heap's order
        raise ValueError(f"deadline must be a time.monotonic() value (inf: none), got {spec.deadline!r}")
    if spec.kind != "cohen" and num_classes is not None and not (
            isinstance(spec.tested_class, numbers.Integral) and not isinstance(spec.tested_class, bool)
            and 0 <= spec.tested_class < num_classes):
        raise ValueError(f"tested_class must be an integer in [0, {num_classes}) (the model's classes), "
                         f"got {spec.tested_class!r}")
    if not (_is_real(spec.alpha) and 0.0 < spec.alpha < 1.0):
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {spec.alpha!r}")
    if spec.kind != "sequential" and spec.alpha < MIN_CP_ALPHA:  # its Clopper-Pearson bound would refuse it later
        raise ValueError(f"a {spec.kind} job's alpha must be at least {MIN_CP_ALPHA:g}, got {spec.alpha!r}")
    if len(spec.prior) != 2 or not all(_is_real(x) and math.isfinite(x) and x > 0 for x in spec.prior):
        raise ValueError(f"the Beta prior must be two finite numbers > 0, got {spec.prior!r}")
    if spec.target_radius is not None and not (_is_real(spec.target_radius) and math.isfinite(spec.target_radius)
                                               and spec.target_radius >= 0):
        raise ValueError(f"target_radius must be a finite number >= 0, got {spec.target_radius!r}")
    _check_min_gain(spec)
    r = spec.proposal_radius
    if r is None:
        return
    if spec.target_radius is not None:
        raise ValueError("a job takes target_radius (certify at least that radius) or proposal_radius (stop once "
                         "that radius is verified, else best radius), not both")
    if spec.kind != "sequential":
        raise ValueError(f"proposal_radius applies to sequential jobs only, not to kind {spec.kind!r}")
    if not (_is_real(r) and math.isfinite(r) and r >= 0):
        raise ValueError(f"proposal_radius must be a finite number >= 0, got {r!r}")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_min_gain(spec) -> None:
    """min_gain (the marginal-gain rule's lambda) belongs to the best-radius and proposal policies only."""
    g = spec.min_gain
    if g is None:
        return
    if not (_is_real(g) and math.isfinite(g) and g >= 0):
        raise ValueError(f"min_gain must be a finite number >= 0 (radius per sample), got {g!r}")
    if spec.kind != "sequential" or spec.target_radius is not None:
        raise ValueError("min_gain applies to sequential best-radius and proposal jobs only, not to "
                         + (f"kind {spec.kind!r}" if spec.kind != "sequential" else "a target_radius job"))
