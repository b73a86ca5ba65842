"""The pipelined, vectorized engine: what pipelining and the job table must never break.

Real components: the default bundle's base model in a real onnxruntime session behind the real
:class:`models.sampling.SamplingEngine`, real Fashion-MNIST test images, the real :class:`models.jobs.JobTable`.
The only wrapper is ``Recording``: a SamplingEngine that logs every launch and every result read, and can hold a
batch's result back (a gate) to make "a batch still running" happen on purpose; it changes no count.

Each soundness test says which bug it was run against (by editing the code once) and that it failed then.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from calibration.data import load_fashion_mnist
from models.engine import EngineStopped, JobSpec, SequentialEngine
from models.jobs import FIXED, JobTable
from models.sampling import SamplingEngine
from smoothing import checkpoint_schedule, clopper_pearson_lower, lower_bound

SIGMA = 0.25
K = 10
EASY = 2  # a trouser: pA ~ 1 for class 1


@pytest.fixture(scope="module")
def images():
    return load_fashion_mnist().x_test[:64].copy()


class Recording(SamplingEngine):
    """Logs ("launch", n) / ("result", n) events; ``hold`` keeps results back until ``release()``."""

    def __init__(self, backend, batch_size: int):
        super().__init__(backend, sigma=SIGMA, num_classes=K, batch_size=batch_size)
        self.events: list[tuple[str, int]] = []
        self.sizes: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def launch(self, images, sizes, rng):
        n = len(self.sizes)
        self.sizes.append([int(s) for s in sizes])
        self.events.append(("launch", n))
        inner = super().launch(images, sizes, rng)
        outer = self

        class Held:
            model_seconds = 0.0

            def result(self):
                outer.gate.wait()
                counts = inner.result()
                self.model_seconds = inner.model_seconds
                outer.events.append(("result", n))
                return counts

        return Held()


def start(sampler, **kw) -> SequentialEngine:
    return SequentialEngine(sampler, seed=kw.pop("seed", 0), **kw).start()


def bound_hits(p_lower: float, trials: int, bound) -> int:
    """The integer hit count whose bound equals p_lower (fails if none does)."""
    values = np.asarray(bound(np.arange(trials + 1)), dtype=np.float64)
    s = int(np.argmin(np.abs(values - p_lower)))
    assert float(bound(s)) == pytest.approx(p_lower, rel=1e-12, abs=1e-15)
    return s


def fail_first_certificate(monkeypatch) -> None:
    """From now on the engine's first certificates() call raises RuntimeError; later calls work."""
    import models.engine as engine_module

    calls = []
    real = engine_module.certificates

    def first_call_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("certificate computation failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "certificates", first_call_fails)


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


def test_submit_refuses_a_class_outside_the_model_and_a_second_image_shape(backend, images):
    """A bad job is refused at submit with a message saying what was expected, before it can reach the job table
    (where a tested class >= the model's classes raised IndexError in the engine thread, failing every live job,
    and in the deadline watcher, which died). Run against the code without these checks: the first submit was
    accepted and this test failed."""
    engine = SequentialEngine(SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=256), seed=0)
    deadline = time.monotonic() + 60
    try:
        for bad in (K, -1, 1.0, True):
            with pytest.raises(ValueError, match=r"tested_class must be an integer in \[0, 10\)"):
                engine.submit(JobSpec(images[0], 0.01, 100, deadline, tested_class=bad))
        engine.submit(JobSpec(images[0], 0.01, 100, deadline, kind="cohen", tested_class=K))  # cohen selects its own
        with pytest.raises(ValueError, match=r"the first job's shape \(1, 28, 28\), got \(1, 28, 27\)"):
            engine.submit(JobSpec(images[0][:, :, :27], 0.01, 100, deadline, tested_class=1))
        assert engine.live_jobs == 1
    finally:
        engine.stop(0.0)


def test_deadline_watcher_survives_a_job_it_cannot_answer(backend, images, monkeypatch):
    """If answering one job at its deadline raises, that job gets the exception and later deadlines are still
    answered. Run against the watcher without its exception handler: the thread died on the first job and the
    second job was never answered (its result() timed out); this test failed."""
    fail_first_certificate(monkeypatch)
    sampler = Recording(backend, batch_size=256)
    sampler.gate.clear()  # nothing lands: both jobs are answered by the watcher
    engine = start(sampler)
    try:
        now = time.monotonic()
        first = engine.submit(JobSpec(images[EASY], 0.01, 256, now + 0.2, kind="fixed", tested_class=1))
        second = engine.submit(JobSpec(images[EASY], 0.01, 256, now + 0.5, kind="fixed", tested_class=1))
        with pytest.raises(RuntimeError, match="certificate computation failed"):
            first.result(timeout=30)
        res = second.result(timeout=30)
        assert res.stopped_by == "deadline" and res.samples == 0
    finally:
        sampler.gate.set()
        engine.stop(0.0)


def test_a_model_call_that_fails_to_launch_fails_its_jobs_and_the_engine_goes_on(backend, images):
    """A launch that raises at once (a device out of memory when the noise is drawn) fails the live jobs like a failed
    batch, and the engine thread keeps serving: a later job gets a real certificate. Run against the engine before
    2026-12-05: the exception killed the engine thread, submit still accepted work, and the later job was answered
    only at its deadline with 0 samples; this test failed."""

    class FailsOnce(Recording):
        def launch(self, images_, sizes, rng):
            if len(self.sizes) == 1:
                self.sizes.append([])
                raise RuntimeError("CUDA out of memory")
            return super().launch(images_, sizes, rng)

    engine = start(FailsOnce(backend, batch_size=64))
    try:
        spec = JobSpec(images[EASY], 0.01, 256, time.monotonic() + 60, kind="fixed", tested_class=1)
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            engine.submit(spec).result(timeout=30)
        assert engine.alive
        later = engine.submit(JobSpec(images[EASY], 0.01, 256, time.monotonic() + 60, kind="fixed", tested_class=1))
        res = later.result(timeout=30)
        assert res.stopped_by == "budget" and res.samples == 256 and res.class_index == 1
    finally:
        engine.stop(0.0)


def test_submit_refuses_work_once_the_engine_thread_is_gone(backend, images, monkeypatch):
    """Jobs submitted to an engine whose thread has died would wait for their deadline with no sampling: refused.
    Run against the engine before 2026-12-05 (thread killed by a fault in its loop): submit accepted; this failed."""
    def broken(self, inflight):
        raise SystemError("engine loop fault")

    monkeypatch.setattr(SequentialEngine, "_prepare", broken)
    engine = start(Recording(backend, batch_size=64))
    engine._thread.join(timeout=30)
    assert not engine.alive
    with pytest.raises(EngineStopped):
        engine.submit(JobSpec(images[EASY], 0.01, 64, time.monotonic() + 60, kind="fixed", tested_class=1))


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


def test_stop_answers_at_its_stop_time_without_waiting_for_a_batch_still_running(backend, images):
    """At the stop time every remaining job is answered at once from the samples counted, even while a batch of it is
    still running (the cut is the clock's). Run against the engine before 2026-12-05: it let the batches in flight
    land first, so on a busy CPU the answers came after the HTTP drain window (uvicorn's plain 500s); with the batch
    held, the job was not answered; this test failed."""
    sampler = Recording(backend, batch_size=256)
    engine = start(sampler)
    try:
        job = engine.submit(JobSpec(images[EASY], 0.01, 100_000, time.monotonic() + 60, kind="fixed", tested_class=1))
        time.sleep(0.3)
        sampler.gate.clear()  # the batches launched from now on do not land
        time.sleep(0.1)
        engine.stop(0.1, wait=False)
        res = job.result(timeout=10)
        assert res.stopped_by == "shutdown" and 0 < res.samples < 100_000
    finally:
        sampler.gate.set()
        engine.stop(0.0)


def test_a_job_that_cannot_be_answered_at_the_stop_time_fails_alone(backend, images, monkeypatch):
    """At the stop time the watcher answers every job; one whose certificate raises gets the exception and the others
    are still answered (nothing is left unanswered once the engine is gone). Run against the engine before this fix
    (2026-12-05, same day): the exception killed the watcher after the jobs were marked not running, and neither job
    was ever answered; this test failed (found by review)."""
    sampler = Recording(backend, batch_size=256)
    engine = start(sampler)
    try:
        jobs = [engine.submit(JobSpec(images[EASY], 0.01, 100_000, time.monotonic() + 60, kind="fixed",
                                      tested_class=1)) for _ in range(2)]
        time.sleep(0.3)
        sampler.gate.clear()  # a batch held: the engine thread cannot answer at the stop time, the watcher does
        time.sleep(0.1)
        fail_first_certificate(monkeypatch)
        engine.stop(0.1, wait=False)
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(job.result(timeout=10).stopped_by)
            except RuntimeError as exc:
                outcomes.append(str(exc))
        assert sorted(outcomes) == ["certificate computation failed", "shutdown"]
    finally:
        sampler.gate.set()
        engine.stop(0.0)


def test_submit_refuses_jobs_after_the_stop_time(backend, images):
    """A drain accepts jobs until its stop time, not after: a later job would be answered at once with no sample.
    Run against the engine before 2026-12-05: while a batch was running it was accepted (0-sample 'shutdown')."""
    sampler = Recording(backend, batch_size=256)
    engine = start(sampler)
    try:
        first = engine.submit(JobSpec(images[EASY], 0.01, 100_000, time.monotonic() + 60, kind="fixed", tested_class=1))
        time.sleep(0.3)
        sampler.gate.clear()
        engine.stop(0.05, wait=False, accept=True)
        time.sleep(0.2)
        with pytest.raises(EngineStopped):
            engine.submit(JobSpec(images[EASY], 0.01, 64, time.monotonic() + 60, kind="fixed", tested_class=1))
        assert first.result(timeout=10).stopped_by == "shutdown"
    finally:
        sampler.gate.set()
        engine.stop(0.0)


def test_a_drain_accepts_jobs_until_its_stop_time_and_is_never_postponed(backend, images):
    """SIGTERM's drain (server.serve) is stop(drain, accept=True): requests already on their way may still submit
    until the stop time, then nothing; a later stop() with a longer grace does not postpone it. Run against a
    drain that stopped accepting at once: the auto requests of tests/test_ops_faults.py's SIGTERM test that were
    still in their surrogate pass got 503 draining (seen once in a full run), and this test failed."""
    engine = start(SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=256))
    stop_at = time.monotonic() + 1.5
    engine.stop(1.5, wait=False, accept=True)
    try:
        spec = JobSpec(images[EASY], 0.01, 256, time.monotonic() + 60, kind="fixed", tested_class=1)
        assert engine.submit(spec).result(timeout=30).stopped_by == "budget"
        time.sleep(max(0.0, stop_at - time.monotonic()) + 0.3)
        with pytest.raises(EngineStopped):
            engine.submit(spec)
    finally:
        t0 = time.monotonic()
        engine.stop(30.0)
        assert time.monotonic() - t0 < 5.0
    assert not engine.alive


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
    bound_hits(res.p_lower, res.samples, lambda s: lower_bound(s, res.samples, 0.001, 0.5, 0.5))
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
    elif stale == "checkpoint_moved":
        table.advance_checkpoint(np.array([slot]))
    elif stale == "not_at_checkpoint":
        table.est_done[slot] -= 1
    elif stale == "hits_beyond":
        table.est_counts[slot, 1] += 1
    codes, found = tables.lookup(table, np.array([slot]))
    assert found[0] == (stale == "none")
