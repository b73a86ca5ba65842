"""The pipelined, vectorized engine: what pipelining, the job table and the decision tables must never break.

Real components: the default bundle's base model in a real onnxruntime session behind the real
:class:`models.sampling.SamplingEngine`, real Fashion-MNIST test images, the real :class:`models.jobs.JobTable`.
The only wrapper is ``Recording`` (tests/engine_helpers.py): a SamplingEngine that logs every launch and every result
read, and can hold a batch's result back (a gate) to make "a batch still running" happen on purpose; it changes no
count. Refusals at submit, failures in the engine, stop and drain: tests/test_engine_lifecycle.py.

Each soundness test says which bug it was run against (by editing the code once) and that it failed then.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from models.engine import JobSpec
from models.jobs import FIXED, JobTable
from models.sampling import SamplingEngine
from smoothing import checkpoint_schedule, clopper_pearson_lower
from tests import engine_helpers
from tests.engine_helpers import EASY, SIGMA, K, Recording, bound_hits, start
from tests.worker_helpers import sequential_bound_behind

images = engine_helpers.images  # the module-scoped fixture


# ------------------------------------------------------------------------------------------- job table
def test_counts_never_reach_a_job_that_reuses_a_slot(images):
    """A finished job's slot is not reused while a batch of it is in flight, and a stale batch's counts are
    dropped by the generation check. Run against two bugs: (1) release_idle without the ``inflight == 0`` term:
    job B took A's slot and received A's counts; (2) land() without the generation check: job C received the
    stale batch's counts. Both made this test fail."""
    table = JobTable(images.shape[1:], K, capacity=2)

    class J:
        def __init__(self, order, image):
            self.spec = JobSpec(image, 0.01, 100, time.monotonic() + 60, kind="fixed", tested_class=1)
            self.order, self.slot = order, -1

    a = J(0, images[EASY])
    table.admit(a, FIXED, None)
    batch = table.allocate(64)
    assert batch.slots.tolist() == [a.slot] and batch.sizes.tolist() == [64]
    table.running[a.slot] = False  # A answered (deadline) while its batch runs
    assert table.release_idle() == 0, "a slot with samples in flight must not be freed"
    b = J(1, images[0])
    table.admit(b, FIXED, None)
    assert b.slot != a.slot
    counts = np.zeros((1, K), dtype=np.int64)
    counts[0, 1] = 64
    assert table.land(batch, counts).size == 0  # A finished: nothing counted, for nobody
    assert table.est_counts.sum() == 0
    assert table.release_idle() == 1
    c = J(2, images[1])
    table.admit(c, FIXED, None)
    assert c.slot == a.slot
    table.inflight[c.slot] += 64  # a copy of A's batch landing late (the same slot, A's generation)
    assert table.land(batch, counts).size == 0
    assert table.est_counts[c.slot].sum() == 0 and table.est_done[c.slot] == 0


def test_allocation_is_earliest_deadline_first_and_fills_the_capacity(images):
    table = JobTable(images.shape[1:], K, capacity=4)
    now = time.monotonic()

    class J:
        def __init__(self, order, deadline, budget):
            self.spec = JobSpec(images[order], 0.01, budget, now + deadline, kind="fixed", tested_class=0)
            self.order, self.slot = order, -1

    jobs = [J(0, 30, 500), J(1, 10, 300), J(2, 20, 400)]
    for j in jobs:
        table.admit(j, FIXED, None)
    batch = table.allocate(600)
    assert [int(s) for s in batch.slots] == [jobs[1].slot, jobs[2].slot]  # deadlines 10 s, 20 s; 30 s gets none
    assert batch.sizes.tolist() == [300, 300]
    assert table.wanted()[jobs[2].slot] == 100 and table.wanted()[jobs[1].slot] == 0
    rest = table.allocate(10_000)  # room for every want (no sort then): each job gets exactly what it still wants
    assert sorted(zip(rest.slots.tolist(), rest.sizes.tolist())) == sorted([(jobs[0].slot, 500), (jobs[2].slot, 100)])
    assert not table.wanted().any()


# ------------------------------------------------------------------------------------------- the engine
def test_next_batch_is_launched_before_the_current_one_lands(backend, images):
    """Double buffering: launch k+1 happens before the engine reads the counts of batch k."""
    sampler = Recording(backend, batch_size=256)
    engine = start(sampler)
    try:
        futs = [engine.submit(JobSpec(images[i], 0.01, 2000, time.monotonic() + 60, kind="fixed",
                                      tested_class=0)) for i in range(4)]
        for f in futs:
            f.result(timeout=60)
    finally:
        engine.stop(0.0)
    order = {e: i for i, e in enumerate(sampler.events)}
    overlapped = [k for k in range(len(sampler.sizes) - 1) if order[("launch", k + 1)] < order.get(("result", k), -1)]
    assert len(overlapped) >= len(sampler.sizes) // 2, sampler.events[:20]
    assert engine.samples_processed == 4 * 2000


def test_deadline_never_reads_counts_of_a_batch_still_running(backend, images):
    """The first batch is held back past the job's deadline: the answer must count nothing (0 samples, abstain).
    Run against the bug of answering with the samples *assigned* (in flight) instead of those counted
    (``_answer`` reading ``table.assigned``): it reported 256 samples for a bound on 0; this test failed."""
    sampler = Recording(backend, batch_size=256)
    sampler.gate.clear()
    engine = start(sampler)
    try:
        fut = engine.submit(JobSpec(images[EASY], 0.01, 256, time.monotonic() + 0.3, kind="fixed", tested_class=1))
        res = fut.result(timeout=30)
        assert res.stopped_by == "deadline" and res.samples == 0 and res.class_index == -1 and res.p_lower == 0.0
        sampler.gate.set()
        spec = JobSpec(images[EASY], 0.01, 256, time.monotonic() + 60, kind="fixed", tested_class=1)
        later = engine.submit(spec).result(timeout=60)
        assert later.stopped_by == "budget" and later.samples == 256 and later.class_index == 1
    finally:
        sampler.gate.set()
        engine.stop(0.0)


def test_queue_depth_has_one_writer_the_engine_thread(backend, images):
    """The queue-depth and live-jobs gauges are published by the engine thread only (admitted but unsampled jobs,
    unanswered jobs). Run against the engine before 2026-12-05: submit also published its own count of jobs not yet
    admitted, overwriting the engine's (a gauge reading 1 with 28 jobs waiting); this test failed."""
    from models.engine import EngineObserver

    writers = []

    class Observer(EngineObserver):
        def on_queue(self, waiting, live):
            writers.append(threading.current_thread().name)

    engine = start(Recording(backend, batch_size=64), observer=Observer())
    try:
        futures = [engine.submit(JobSpec(images[EASY], 0.01, 128, time.monotonic() + 60, kind="fixed",
                                         tested_class=1)) for _ in range(8)]
        for f in futures:
            f.result(timeout=30)
    finally:
        engine.stop(0.0)
    assert writers and set(writers) == {"certserve-engine"}


def test_a_job_stopped_with_samples_in_flight_counts_them(backend, images):
    """A best-radius job alone runs ahead of its decision (speculative chunk to the next checkpoint). When its
    policy stops it, the samples in flight are counted and its bound is the confidence sequence at ALL its
    counted samples (valid at any time): samples is a checkpoint, p_lower = L(S, samples) for an integer S, and
    every sample the engine drew is in the answer. Run against the bug of answering at once and dropping the
    chunk in flight: samples_processed exceeded the answer's samples; this test failed."""
    sampler = Recording(backend, batch_size=1024)
    engine = start(sampler)
    try:
        spec = JobSpec(images[EASY], 0.001, 10_000, time.monotonic() + 60, tested_class=1)
        res = engine.submit(spec).result(timeout=60)
    finally:
        engine.stop(0.0)
    assert res.stopped_by == "certified" and res.class_index == 1
    assert res.samples in set(checkpoint_schedule(10_000).tolist())
    sequential_bound_behind(res, spec)  # L at all counted samples, or the larger bound at the stop (1102371)
    assert engine.samples_processed == res.samples
    ahead = [k for k in range(len(sampler.sizes) - 1)
             if sampler.events.index(("launch", k + 1)) < sampler.events.index(("result", k))]
    assert ahead, "the lone job never ran ahead of its decision"


def test_target_radius_jobs_stop_at_their_checkpoint(backend, images):
    """Target-radius jobs never run ahead: a 'target' answer certifies at least the target."""
    engine = start(SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=1024))
    try:
        specs = [JobSpec(images[i], 0.001, 5000, time.monotonic() + 60, tested_class=1, target_radius=0.3)
                 for i in (EASY, EASY, EASY)]
        results = [engine.submit(s).result(timeout=60) for s in specs]
    finally:
        engine.stop(0.0)
    for res in results:
        assert res.stopped_by == "target" and res.radius >= 0.3
        assert res.samples in set(checkpoint_schedule(5000).tolist())
    assert engine.samples_processed == sum(r.samples for r in results)


def test_cohen_estimation_may_start_while_selection_runs(backend, images):
    """Cohen's selection chunk (n0) and estimation chunk are separate batches, the second launched before the
    first lands; the class comes from the selection counts only and the bound is Clopper-Pearson on n."""
    sampler = Recording(backend, batch_size=4096)
    engine = start(sampler)
    try:
        res = engine.submit(JobSpec(images[EASY], 0.001, 1000, time.monotonic() + 60, kind="cohen",
                                    n0=100)).result(timeout=60)
    finally:
        engine.stop(0.0)
    assert sampler.sizes[:2] == [[100], [1000]]
    assert sampler.events.index(("launch", 1)) < sampler.events.index(("result", 0))
    assert res.samples == 1100 and res.class_index == 1 and res.stopped_by == "budget"
    bound_hits(res.p_lower, 1000, lambda s: clopper_pearson_lower(s, 1000, 0.001))


def test_kinds_share_batches_and_all_resolve(backend, images):
    engine = start(SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=512), max_live_jobs=64)
    rng = np.random.default_rng(3)
    try:
        specs = []
        for i in range(48):
            kind = ("sequential", "cohen", "fixed")[i % 3]
            specs.append(JobSpec(images[i], float(rng.choice([0.01, 0.001])), 300, time.monotonic() + 120,
                                 kind=kind, n0=32, tested_class=int(rng.integers(K)) if kind != "cohen" else 0))
        results = [f.result(timeout=120) for f in [engine.submit(s) for s in specs]]
    finally:
        engine.stop(0.0)
    for res, spec in zip(results, specs):
        assert res.stopped_by in {"certified", "futility", "budget"}
        if spec.kind == "sequential":
            assert res.samples <= 300
        else:
            assert res.samples == 300 + (32 if spec.kind == "cohen" else 0)
    assert engine.samples_processed == sum(r.samples for r in results)
    assert engine.batches < sum(r.samples for r in results) / 100  # chunks of many jobs per model call


def test_precomputed_decisions_equal_direct_evaluation(images):
    """Decisions tabulated while a chunk is in flight must equal the policy at landing: every table entry against a
    direct evaluation, and the lookup with hits placed right at a change of decision (target reached / not).
    Run against an off-by-one in the lookup (``h = hits - base - 1``): the codes differed; this test failed."""
    from models.decisions import DecisionTables, _policy_at, policy_decisions
    from models.jobs import SEQUENTIAL

    rng = np.random.default_rng(8)
    table = JobTable(images.shape[1:], K, capacity=8)

    class J:
        def __init__(self, order, spec):
            self.spec, self.order, self.slot = spec, order, -1

    for i in range(6):
        spec = JobSpec(images[i], float(rng.choice([0.1, 0.01])), 3000, time.monotonic() + 60, tested_class=1,
                       prior=(float(rng.uniform(0.5, 30)), float(rng.uniform(0.5, 3))),
                       target_radius=0.1 if i % 2 == 0 else None)
        table.admit(J(i, spec), SEQUENTIAL, checkpoint_schedule(spec.budget))
    tables, compared, boundaries = DecisionTables(max_points=10_000), 0, 0
    for _ in range(12):
        batch = table.allocate(100_000, speculate=False)
        if batch is None:
            break
        tables.precompute(table, SIGMA)
        hits = np.empty(len(batch.slots), dtype=np.int64)
        for k, slot in enumerate(batch.slots):
            gen, cp, base, tab = tables._tables[int(slot)]
            direct = _policy_at(table, np.full(len(tab), slot), base + np.arange(len(tab)), np.full(len(tab), cp),
                                SIGMA)
            assert np.array_equal(tab, direct)
            change = np.flatnonzero(np.diff(tab))
            boundaries += bool(len(change))
            hits[k] = change[0] + 1 if len(change) else rng.integers(len(tab))
        counts = np.zeros((len(batch.slots), K), dtype=np.int64)
        counts[:, 1], counts[:, 0] = hits, batch.sizes - hits
        landed = table.land(batch, counts)
        due = table.at_checkpoint(landed)
        direct = policy_decisions(table, due, SIGMA)
        looked, found = tables.lookup(table, due)
        assert found.all() and np.array_equal(looked, direct)
        compared += len(due)
        stop = direct != 0
        table.running[due[stop]] = False
        table.advance_checkpoint(due[~stop])
    assert compared >= 12 and boundaries >= 3


@pytest.mark.parametrize("stale", ["none", "slot_reused", "checkpoint_moved", "not_at_checkpoint", "hits_beyond"])
def test_a_stale_decision_table_is_never_looked_up(images, stale):
    """A tabulated decision is used only for the very job (generation), checkpoint and hit count it was computed for,
    with all samples up to that checkpoint counted; otherwise the engine evaluates the policy directly. Each guard was
    removed once from DecisionTables.lookup (generation, checkpoint, counted == checkpoint, 0 <= h < len): the
    matching case found a table and this test failed (randomized engine trials did not reach these states)."""
    from models.decisions import DecisionTables
    from models.jobs import SEQUENTIAL

    class J:
        def __init__(self, order, spec):
            self.spec, self.order, self.slot = spec, order, -1

    table = JobTable(images.shape[1:], K, capacity=2)
    spec = JobSpec(images[0], 0.01, 3000, time.monotonic() + 60, tested_class=1)
    slot = table.admit(J(7, spec), SEQUENTIAL, checkpoint_schedule(spec.budget))
    batch = table.allocate(100_000, speculate=False)  # the chunk up to the first checkpoint, in flight
    tables = DecisionTables(max_points=10_000)
    tables.precompute(table, SIGMA)
    counts = np.zeros((1, K), dtype=np.int64)
    counts[0, 1] = batch.sizes[0]  # every sample a hit: h = the chunk's size, the table's last entry
    table.land(batch, counts)
    if stale == "slot_reused":
        table.gen[slot] = 8  # another job in the same slot
    elif stale == "checkpoint_moved":  # counted up to the NEW checkpoint, same hits: only the checkpoint guard tells
        table.advance_checkpoint(np.array([slot]))
        table.est_done[slot] = table.cp[slot]
    elif stale == "not_at_checkpoint":
        table.est_done[slot] -= 1
    elif stale == "hits_beyond":
        table.est_counts[slot, 1] += 1
    codes, found = tables.lookup(table, np.array([slot]))
    assert found[0] == (stale == "none")
