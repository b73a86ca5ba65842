"""The engine when something goes wrong or it is stopped: bad jobs refused at submit, a model call that fails to
launch, a deadline or stop-time answer that raises, an engine thread that died, and the stop time and drain.

Real components as in tests/test_engine_pipeline.py: the default bundle's base model in a real onnxruntime session
behind the real :class:`models.sampling.SamplingEngine` and real Fashion-MNIST test images; ``Recording``
(tests/engine_helpers.py) logs every launch and result read and can hold a batch's result back (a gate); it changes no
count.

Each soundness test says which bug it was run against (by editing the code once) and that it failed then.
"""

from __future__ import annotations

import time

import pytest

from models.engine import EngineStopped, JobSpec, SequentialEngine
from models.sampling import SamplingEngine
from tests import engine_helpers
from tests.engine_helpers import EASY, SIGMA, K, Recording, start

images = engine_helpers.images  # the module-scoped fixture


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
    try:
        engine._thread.join(timeout=30)
        assert not engine.alive
        with pytest.raises(EngineStopped):
            engine.submit(JobSpec(images[EASY], 0.01, 64, time.monotonic() + 60, kind="fixed", tested_class=1))
    finally:
        engine.stop()  # its deadline watcher outlives the dead engine thread until a stop (it was left running)


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
