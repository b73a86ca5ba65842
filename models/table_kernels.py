"""Compiled loops over the job table's arrays (:mod:`models.jobs`): which chunks the next batch holds, and where a
landed batch's counts go.

Why compiled: each is a handful of comparisons per slot, but as numpy expressions over the table a step paid ~40
array operations of ~1-2 us fixed cost each (wants, speculation, the earliest-deadline order, the count update:
~0.15 ms of a 512-job step on a 2-core VM), a fixed cost that does not shrink with the work. As one loop each they
cost a call (~3 us) plus a few ns per slot. numba's on-disk cache (as :mod:`smoothing.kernels`), so a process loads
them instead of compiling them again; :func:`warm_up` before any job.

No statistics here: these decide which samples are drawn for whom and add the counts of a landed batch to the job
that owns each chunk; the soundness conditions they keep (a chunk's counts reach only the job of its generation,
selection counts stay apart from estimation counts) are :mod:`models.jobs`', stated there and tested through it.
"""

from __future__ import annotations

import numpy as np

from smoothing.kernels import compiled

SEQUENTIAL, COHEN, FIXED = 0, 1, 2  # a job's kind, as the job table's ``kind`` array holds it (models.jobs.KINDS)


def _compiled(function):
    """:func:`smoothing.kernels.compiled` (numba's on-disk cache, or compiled in each process). Unlike
    smoothing.kernels' loops these keep the interpreter lock: they take microseconds, and releasing it would let the
    event loop's thread take it for up to its switch interval while the engine waits to get it back."""
    return compiled(function, nogil=False)


@_compiled
def wants(running, stopping, kind, n0, budget, cp, assigned):
    """Samples each slot wants in the next batch: up to its n0 selection samples first (Cohen), then a sequential job
    up to its checkpoint ``cp``, a fixed-n job up to n0 + its budget; 0 for free, finished or stopping slots."""
    out = np.zeros(len(running), dtype=np.int64)
    for i in range(len(running)):
        if running[i] and not stopping[i]:
            goal = n0[i] if assigned[i] < n0[i] else (cp[i] if kind[i] == SEQUENTIAL else n0[i] + budget[i])
            out[i] = max(goal - assigned[i], 0)
    return out


@_compiled
def aheads(running, stopping, kind, cp, assigned, cp_idx, schedules, target, proposal):
    """Samples a best-radius job (no target, no proposal) waiting on its decision at checkpoint cp (all of it
    assigned) may draw ahead, up to its next checkpoint (:meth:`models.jobs.JobTable.speculative`); 0 elsewhere."""
    out = np.zeros(len(running), dtype=np.int64)
    last = schedules.shape[1] - 1
    for i in range(len(running)):
        if (running[i] and not stopping[i] and kind[i] == SEQUENTIAL and np.isnan(target[i])
                and np.isnan(proposal[i]) and assigned[i] == cp[i]):
            out[i] = max(schedules[i, min(cp_idx[i] + 1, last)] - assigned[i], 0)
    return out


@_compiled
def edf_take(want, order, deadline, capacity):
    """(slots, sizes): the slots with want > 0, each taking up to its want within ``capacity``; when the wants exceed
    it, by (deadline, order), the earliest deadline first (ties: admission order), else in slot order (all served)."""
    idx = np.flatnonzero(want)
    w = want[idx]
    if w.sum() <= capacity:
        return idx, w
    idx = idx[np.argsort(order[idx], kind="mergesort")]  # stable sorts: by order, then by deadline
    idx = idx[np.argsort(deadline[idx], kind="mergesort")]
    sizes = np.zeros(len(idx), dtype=np.int64)
    left, n = capacity, 0
    for k in range(len(idx)):
        if left <= 0:
            break
        sizes[k] = min(want[idx[k]], left)
        left -= sizes[k]
        n = k + 1
    return idx[:n], sizes[:n]


@_compiled
def add_counts(slots, gens, sizes, selection, counts, gen, running, inflight, sel_counts, sel_done, est_counts,
               est_done):
    """A landed batch: every chunk's samples leave ``inflight``; its counts (a row of ``counts``) are added, to the
    selection or the estimation counts as the chunk was drawn, only where its slot still holds the chunk's generation
    and that job still runs. Returns a mask over the chunks: counted."""
    ok = np.zeros(len(slots), dtype=np.bool_)
    for j in range(len(slots)):
        s = slots[j]
        inflight[s] -= sizes[j]
        if gen[s] != gens[j] or not running[s]:
            continue
        ok[j] = True
        if selection[j]:
            sel_counts[s] += counts[j]
            sel_done[s] += sizes[j]
        else:
            est_counts[s] += counts[j]
            est_done[s] += sizes[j]
    return ok


@_compiled
def admit_rows(slots, ints, floats, gen, kind, n0, budget, cls, deadline, alpha, a, b, target, proposal, min_gain,
               live, running, started, stopping, assigned, inflight, sel_done, est_done, cp_idx, stop_lower,
               sel_counts, est_counts):
    """New jobs into free ``slots``: row j of ``ints`` (generation, kind, n0, budget, class) and of ``floats``
    (deadline, alpha, a, b, target, proposal, min_gain) goes to slot ``slots[j]``, live and running, with no samples
    assigned, in flight or counted, at its first checkpoint (index 0), no stop bound (NaN)."""
    for j in range(len(slots)):
        s = slots[j]
        gen[s], kind[s], n0[s], budget[s], cls[s] = ints[j, 0], ints[j, 1], ints[j, 2], ints[j, 3], ints[j, 4]
        deadline[s], alpha[s], a[s], b[s] = floats[j, 0], floats[j, 1], floats[j, 2], floats[j, 3]
        target[s], proposal[s], min_gain[s] = floats[j, 4], floats[j, 5], floats[j, 6]
        live[s], running[s], started[s], stopping[s] = True, True, False, False
        assigned[s] = inflight[s] = sel_done[s] = est_done[s] = cp_idx[s] = 0
        stop_lower[s] = np.nan
        sel_counts[s] = 0
        est_counts[s] = 0


@_compiled
def free_idle(live, running, inflight, gen):
    """Free the slots of finished jobs (live, not running) with nothing in flight: not live, generation -1 (no
    batch's chunk can match it). Returns those slots."""
    idle = np.flatnonzero(live & ~running & (inflight == 0))
    for s in idle:
        live[s] = False
        gen[s] = -1
    return idle


def warm_up() -> None:
    """Compile (or load from numba's cache) every loop at the types the job table passes, before any job."""
    i1, b1, f1 = np.zeros(1, np.int64), np.zeros(1, np.bool_), np.zeros(1)
    wants(b1, b1, i1, i1, i1, i1, i1)
    aheads(b1, b1, i1, i1, i1, i1, np.zeros((1, 1), np.int64), f1, f1)
    edf_take(i1, i1, f1, 1)
    add_counts(i1, i1, i1, b1, np.zeros((1, 1), np.int64), i1, b1, i1, np.zeros((1, 1), np.int64), i1,
               np.zeros((1, 1), np.int64), i1)
    admit_rows(np.zeros(0, np.int64), np.zeros((0, 5), np.int64), np.zeros((0, 7)), i1, i1, i1, i1, i1, f1, f1, f1,
               f1, f1, f1, f1, b1, b1, b1, b1, i1, i1, i1, i1, i1, f1, np.zeros((1, 1), np.int64),
               np.zeros((1, 1), np.int64))
    free_idle(b1, b1, i1, i1)
