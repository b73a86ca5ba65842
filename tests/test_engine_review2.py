"""Engine concurrency, second review pass: memory the engine keeps after it has answered a job.

Fake sampler (tests/test_engine_races.py's LabelSampler): every sample of a chunk is counted for the image's first
entry, so the answers are known exactly. Each test says what it guards and that it failed on the old code.
"""

from __future__ import annotations

import gc
import time
import weakref

import numpy as np
import pytest

from models.engine import JobSpec, SequentialEngine
from models.jobs import resolve_futures
from tests.test_engine_races import LabelSampler, fixed_job, wait_until


def test_answered_jobs_do_not_keep_their_images_until_their_deadline():
    """Every job waits in the deadline watcher's heap until its deadline reaches the head (default 30 s), answered
    or not, and the heap held the whole job: its JobSpec and so the caller's decoded image (C x H x W float32). So an
    answered request's image stayed in memory up to its deadline, up to 2 max_live_jobs + 64 of them (the heap's
    compaction bound: ~650 MB at 512 live jobs of 3 x 224 x 224), long after the caller had dropped it. An answered
    (or cancelled, or failed) job now lets go of its spec. Failed on the old code: all 12 images were still alive."""
    engine = SequentialEngine(LabelSampler(), max_live_jobs=16, seed=0).start()
    try:
        far = time.monotonic() + 60
        specs = [fixed_job(k, far, budget=64 if k < 8 else 10**7) for k in range(12)]  # 4 to cancel while sampling
        futures = [engine.submit(spec) for spec in specs]
        assert all(future.cancel() for future in futures[8:])
        assert all(future.result(timeout=30).samples == 64 for future in futures[:8])
        refs = [weakref.ref(spec.image) for spec in specs]
        del specs, futures
        gc.collect()
        assert wait_until(lambda: all(r() is None for r in refs), timeout=5.0), \
            f"{sum(r() is not None for r in refs)} answered jobs' images still held by the engine"
        assert len(engine._deadlines) >= 8  # still in the heap (their deadlines are far): only the images went
    finally:
        engine.stop(0.0)


def test_a_job_answered_before_its_admission_does_not_break_the_admission():
    """The job table is created at the first admission; the first job taken may have been answered meanwhile (its
    deadline, by the watcher) and so no longer holds its spec: the table takes the engine's image shape instead.
    (Guards the fix above: built from that job's spec, the engine thread died here.)"""
    engine = SequentialEngine(LabelSampler(), max_live_jobs=8, seed=0)
    first = engine.submit(fixed_job(0, time.monotonic() - 1.0, budget=64))  # past its deadline
    second = engine.submit(fixed_job(1, time.monotonic() + 60, budget=64))
    with engine._state:  # what the deadline watcher does at the first job's deadline, before any admission
        answers = engine._answer_job(engine._pending[0], "deadline")
    resolve_futures(answers)
    engine.start()
    try:
        assert first.result(timeout=5).stopped_by == "deadline"
        res = second.result(timeout=10)
        assert res.samples == 64 and res.class_index == 1 and engine.alive
    finally:
        engine.stop(0.0)


@pytest.mark.parametrize("deadline", [float("nan"), "soon"])
def test_a_job_without_a_deadline_value_is_refused_at_submit(deadline):
    """A NaN deadline (the engine's API; HTTP deadlines are checked) was accepted: answered at once, and it broke the
    deadline heap's order for every later job (inf, no deadline, stays valid). Run against the old check_spec: both
    cases failed."""
    from models.jobs import check_spec

    with pytest.raises(ValueError, match="deadline must be a time.monotonic"):
        check_spec(JobSpec(np.zeros((1, 4, 4), np.float32), 0.01, 100, deadline, kind="fixed", tested_class=0), 10)
