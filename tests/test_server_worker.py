"""The sequential worker (:class:`models.engine.SequentialEngine`) driven directly, without HTTP, on the real default
bundle's base model (onnxruntime CPU) through :class:`models.sampling.SamplingEngine`. (The two behaviours of the
engine that are only visible through HTTP are in tests/test_server_worker_http.py; the fixtures and ``check_result``
in tests/worker_helpers.py.)

What must hold: hundreds of concurrent jobs all resolve with valid certificates (and share model calls); earliest
deadline first, so a late-submitted urgent job finishes first and no job starves; a cancelled future drops its job;
a deadline yields the valid partial certificate at the samples counted so far (p_lower equals the confidence
sequence at those counts); a full engine raises QueueFull; stop(grace) answers what is left with 'shutdown'.
All engines are seeded. Timing bounds are generous (a slow, noisy 2-core machine).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from models.engine import EngineStopped, JobSpec, QueueFull
from smoothing import lower_bound
from tests import worker_helpers
from tests.worker_helpers import EASY, SlowModel, check_result, deadline, hits_behind, wait_until

# the fixtures (module-scoped ones: this module's own copies)
bundle = worker_helpers.bundle
backend = worker_helpers.backend
images = worker_helpers.images
clean_classes = worker_helpers.clean_classes
make_engine = worker_helpers.make_engine


# ---------------------------------------------------------------------------------------------------- many jobs
def test_hundreds_of_concurrent_jobs_all_resolve_validly(make_engine, images, clean_classes):
    engine = make_engine(seed=11)
    rng = np.random.default_rng(11)
    specs = []
    for i in range(300):
        img, c = images[i], int(clean_classes[i])
        alpha = float(rng.choice([1e-3, 1e-2, 0.1]))
        if i % 3 == 2:
            specs.append(JobSpec(img, alpha, 24, deadline(120), kind="cohen", n0=8))
        else:
            prior = (0.5, 0.5) if i % 2 else (20.0, 1.0)
            target = 0.2 if i % 5 == 0 else None
            budget = 100 if i % 3 == 0 else 40  # several checkpoints / a single chunk
            specs.append(JobSpec(img, alpha, budget, deadline(120), tested_class=c, prior=prior, target_radius=target))
    futures = [engine.submit(spec) for spec in specs]
    results = [f.result(timeout=120) for f in futures]
    for res, spec in zip(results, specs):
        check_result(res, spec)
        assert res.stopped_by in {"certified", "target", "futility", "budget"}
    wait_until(lambda: engine.live_jobs == 0, 10, "the engine to retire every job")
    # every sample drawn belongs to a job, and the jobs shared model calls (batching across jobs)
    assert engine.samples_processed == sum(r.samples for r in results)
    assert engine.batches < len(specs) / 3
    # on real images most sequential jobs certify their clean class
    seq = [r for r, s in zip(results, specs) if s.kind == "sequential"]
    assert np.mean([r.class_index >= 0 for r in seq]) > 0.6


def test_jobs_submitted_from_many_threads(make_engine, images, clean_classes):
    engine = make_engine(seed=12)
    futures: list = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(k * 10, k * 10 + 10):
            fut = engine.submit(JobSpec(images[i], 0.01, 100, deadline(120), tested_class=int(clean_classes[i])))
            with lock:
                futures.append(fut)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(futures) == 80
    for fut in futures:
        assert fut.result(timeout=120).stopped_by in {"certified", "futility", "budget"}


# ---------------------------------------------------------------------------------------------------- scheduling
def test_earliest_deadline_first_urgent_job_submitted_last_finishes_first(make_engine, images):
    engine = make_engine(batch_size=256, seed=13, start=False)
    finished: list[str] = []
    background = []
    for i in range(10):
        fut = engine.submit(JobSpec(images[i], 0.001, 500, deadline(120), kind="cohen", n0=100))
        fut.add_done_callback(lambda f, name=f"bg{i}": finished.append(name))
        background.append(fut)
    urgent_spec = JobSpec(images[EASY], 0.001, 1000, deadline(60), kind="cohen", n0=100)
    urgent = engine.submit(urgent_spec)  # submitted LAST, earliest deadline
    urgent.add_done_callback(lambda f: finished.append("urgent"))
    engine.start()
    res = urgent.result(timeout=120)
    check_result(res, urgent_spec)
    assert res.stopped_by == "budget" and res.samples == 1100
    for fut in background:
        assert fut.result(timeout=120).stopped_by == "budget"
    assert finished[0] == "urgent", f"completion order: {finished}"
    assert len(finished) == 11  # all jobs finish


def test_no_starvation_by_a_stream_of_newer_jobs(make_engine, images):
    """An old job is not delayed by a continuous stream of newer jobs with the same relative deadline (absolute
    deadlines: the oldest is the most urgent), even though the stream alone would fill every batch; and every job of
    the stream finishes too."""
    engine = make_engine(batch_size=256, seed=14)
    finished: list[str] = []
    old_spec = JobSpec(images[EASY], 0.001, 1024, deadline(30), kind="cohen", n0=64)
    old = engine.submit(old_spec)
    old.add_done_callback(lambda f: finished.append("old"))
    stream = []
    give_up = time.monotonic() + 30
    while not old.done() and time.monotonic() < give_up:  # one new job every 10 ms: more demand than capacity
        k = len(stream)
        fut = engine.submit(JobSpec(images[k % 50], 0.001, 128, deadline(30), kind="cohen", n0=128))
        fut.add_done_callback(lambda f, k=k: finished.append(f"new{k}"))
        stream.append(fut)
        time.sleep(0.01)
    res = old.result(timeout=60)
    check_result(res, old_spec)
    assert res.stopped_by == "budget" and res.samples == 1088
    assert len(stream) >= 3, "the stream never competed with the old job"
    for fut in stream:
        assert fut.result(timeout=60).stopped_by == "budget"
    assert finished[0] == "old", f"completion order: {finished[:10]}"
    wait_until(lambda: engine.live_jobs == 0, 30, "the engine to drain")


# ---------------------------------------------------------------------------------------------------- cancel / deadline
def test_cancelled_job_is_dropped_and_engine_keeps_serving(make_engine, images, clean_classes):
    engine = make_engine(batch_size=256, seed=15)
    # best-radius policy with a huge budget: ~1e5 samples before it would stop by itself
    long = engine.submit(JobSpec(images[EASY], 0.001, 10**7, deadline(120), tested_class=1))
    wait_until(lambda: engine.samples_processed > 0, 30, "the long job to start sampling")
    assert long.cancel() and long.cancelled()
    assert engine.live_jobs == 0  # its place is free at once (tests/test_overload_review2.py)
    table = engine._table  # the engine thread drops it at its next turn; its batches in flight then land
    wait_until(lambda: not table.running.any() and not table.inflight.any(), 10, "the cancelled job to be dropped")
    before = engine.samples_processed
    time.sleep(0.3)
    assert engine.samples_processed == before, "the engine kept sampling for a cancelled job"
    spec = JobSpec(images[0], 0.01, 200, deadline(60), tested_class=int(clean_classes[0]))
    check_result(engine.submit(spec).result(timeout=60), spec)


def test_job_cancelled_before_the_engine_starts_never_samples(make_engine, images):
    engine = make_engine(seed=16, start=False)
    fut = engine.submit(JobSpec(images[EASY], 0.001, 10**6, deadline(60), tested_class=1))
    assert fut.cancel()
    engine.start()
    wait_until(lambda: engine.live_jobs == 0, 10, "the cancelled job to be dropped")
    assert engine.samples_processed == 0


def test_deadline_returns_a_valid_partial_certificate(make_engine, images):
    engine = make_engine(batch_size=64, seed=17)
    engine.sampler.backend = SlowModel(engine.sampler.backend)  # <= 64 samples per 0.1 s: < 700 by the deadline
    spec = JobSpec(images[EASY], 0.001, 10**7, deadline(1.0), tested_class=1, prior=(0.5, 0.5))
    t0 = time.monotonic()
    res = engine.submit(spec).result(timeout=60)
    assert res.stopped_by == "deadline"
    assert 0 < res.samples < spec.budget
    assert time.monotonic() - t0 < 30
    check_result(res, spec)  # p_lower == lower_bound(S, samples) for an integer S: the anytime-valid bound
    s = hits_behind(res.p_lower, res.samples, lambda k: lower_bound(k, res.samples, spec.alpha, 0.5, 0.5))
    assert s > 0.95 * res.samples  # an easy image: nearly every noisy sample hits the trouser class
    assert res.class_index == 1 and res.radius > 0.3  # partial but useful


def test_cohen_deadline_is_a_valid_clopper_pearson_bound(make_engine, images):
    engine = make_engine(batch_size=256, seed=18)
    spec = JobSpec(images[EASY], 0.001, 10**7, deadline(1.5), kind="cohen", n0=100)
    res = engine.submit(spec).result(timeout=60)
    assert res.stopped_by == "deadline" and 100 < res.samples < spec.n0 + spec.budget
    check_result(res, spec)
    assert res.class_index == 1


# ---------------------------------------------------------------------------------------------------- admission / stop
def test_queue_full_raises_and_frees_up(make_engine, images):
    engine = make_engine(max_live_jobs=3, seed=19, start=False)
    futures = [engine.submit(JobSpec(images[i], 0.01, 100, deadline(60), kind="cohen", n0=10)) for i in range(3)]
    with pytest.raises(QueueFull, match="3"):
        engine.submit(JobSpec(images[3], 0.01, 100, deadline(60), kind="cohen", n0=10))
    assert engine.live_jobs == 3
    engine.start()
    for fut in futures:
        fut.result(timeout=60)
    wait_until(lambda: engine.live_jobs == 0, 10, "jobs to retire")
    engine.submit(JobSpec(images[3], 0.01, 100, deadline(60), kind="cohen", n0=10)).result(timeout=60)


def test_a_job_answered_no_longer_counts_against_max_live_jobs(make_engine, images):
    """Replacing a job from its future's done callback at max_live_jobs is accepted: the answered job's slot may
    still wait for the engine's next turn (or a chunk in flight) before it is freed, but the job no longer counts as
    live. Run once against the bug (live_jobs counting occupied slots): the replacement raised QueueFull."""
    engine = make_engine(max_live_jobs=1, seed=23)
    outcome: dict = {}

    def replace(_fut):
        try:
            outcome["next"] = engine.submit(JobSpec(images[1], 0.01, 100, deadline(60), kind="cohen", n0=10))
        except QueueFull as exc:
            outcome["error"] = exc

    engine.submit(JobSpec(images[0], 0.01, 100, deadline(60), kind="cohen", n0=10)).add_done_callback(replace)
    wait_until(lambda: outcome, 60, "the first job's answer")
    assert "error" not in outcome, outcome.get("error")
    assert outcome["next"].result(timeout=60).samples == 110


def test_decisions_are_not_tabulated_ahead_on_a_cpu_sampler(make_engine):
    """On a CPU the decision tables (one policy evaluation per possible hit count, computed while the model runs)
    would take the cores the model runs on: the engine evaluates decisions at landing there (docs/benchmarks.md (a):
    efficiency 0.61 -> 0.68 at 1 job, 0.93 -> 0.97 at 8). Their equality with direct evaluation is tested in
    test_engine_pipeline / test_proposal, where the tables are driven directly."""
    assert make_engine(start=False).precompute is False


def test_invalid_job_is_refused(make_engine, images):
    """Refused at submit with a message saying what was expected. The engine evaluates the validated entry points of
    smoothing.stopping at every step, so alpha, the prior and the target must be checked here: run once without
    those checks, the NaN prior and alpha = 1.5 jobs were accepted (and would have been decided on NaN bounds)."""
    engine = make_engine(start=False)
    bad = [(dict(budget=0), "budget"), (dict(kind="cohen", n0=0), "n0"), (dict(alpha=0.0), "alpha"),
           (dict(alpha=1.5), "alpha"), (dict(alpha=float("nan")), "alpha"), (dict(prior=(float("nan"), 1.0)), "prior"),
           (dict(prior=(0.5, -1.0)), "prior"), (dict(prior=(0.5,)), "prior"),
           (dict(target_radius=-0.1), "target_radius"), (dict(target_radius=float("inf")), "target_radius")]
    for change, expected in bad:
        spec = dict(image=images[0], alpha=0.01, budget=100, deadline=deadline(60)) | change
        with pytest.raises(ValueError, match=expected):
            engine.submit(JobSpec(**spec))
    assert engine.live_jobs == 0


def test_stop_answers_remaining_jobs_with_shutdown(make_engine, images):
    engine = make_engine(batch_size=256, seed=20)
    # jobs that would run for ~1e5 samples each: still live when stop() comes
    specs = [JobSpec(images[EASY], 0.001, 10**7, deadline(120), tested_class=1),
             JobSpec(images[EASY], 0.001, 10**7, deadline(120), kind="cohen", n0=100),
             JobSpec(images[EASY], 0.01, 10**7, deadline(120), tested_class=1, prior=(50.0, 1.0))]
    futures = [engine.submit(s) for s in specs]
    wait_until(lambda: engine.samples_processed > 2000, 60, "the jobs to make progress")
    t0 = time.monotonic()
    engine.stop(grace=0.3)
    assert time.monotonic() - t0 < 30
    for fut, spec in zip(futures, specs):
        res = fut.result(timeout=1)
        assert res.stopped_by == "shutdown" and res.samples < spec.budget
        check_result(res, spec)
    with pytest.raises(EngineStopped):
        engine.submit(JobSpec(images[0], 0.01, 100, deadline(60)))


def test_stop_with_grace_lets_short_jobs_finish(make_engine, images, clean_classes):
    engine = make_engine(seed=21)
    spec = JobSpec(images[0], 0.01, 300, deadline(60), tested_class=int(clean_classes[0]))
    fut = engine.submit(spec)
    t0 = time.monotonic()
    engine.stop(grace=60.0)  # returns as soon as the job is done, not after the grace period
    assert time.monotonic() - t0 < 30
    res = fut.result(timeout=1)
    assert res.stopped_by != "shutdown"
    check_result(res, spec)


def test_stop_answers_jobs_of_an_engine_that_never_started(make_engine, images):
    """stop() promises to answer every remaining job with 'shutdown'; that must hold for a job submitted to an
    engine whose thread was never started (otherwise its future hangs forever)."""
    engine = make_engine(start=False)
    fut = engine.submit(JobSpec(images[EASY], 0.01, 100, deadline(60), tested_class=1))
    engine.stop(0.0)
    res = fut.result(timeout=2)
    assert res.stopped_by == "shutdown" and res.samples == 0 and res.class_index == -1


def test_unreachable_target_radius_does_not_break_the_engine(make_engine, images, clean_classes):
    """A target radius whose probability Phi(r / sigma) rounds to 1 in float64 (r = 3 at sigma = 0.25; the HTTP
    schema allows up to 100) must get a valid certificate (futility or budget), and must not fail the other jobs
    that share its batch."""
    engine = make_engine(seed=22, start=False)
    good_spec = JobSpec(images[0], 0.01, 300, deadline(60), tested_class=int(clean_classes[0]))
    bad_spec = JobSpec(images[EASY], 0.01, 300, deadline(60), tested_class=1, target_radius=3.0)
    good, bad = engine.submit(good_spec), engine.submit(bad_spec)
    engine.start()
    check_result(good.result(timeout=60), good_spec)
    res = bad.result(timeout=60)
    check_result(res, bad_spec)
    assert res.stopped_by in {"futility", "budget"} and res.radius < 3.0
