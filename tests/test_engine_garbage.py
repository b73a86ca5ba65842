"""Answered jobs are freed by reference counting, not left to the cyclic garbage collector.

Under load the engine answers thousands of jobs per second. While each one sat in a reference cycle
(job -> future -> its done callback -> job), the cyclic collector's full passes had ~10^5 dead jobs to trace and held
the interpreter lock for tens of milliseconds: the engine thread and the event loop stood still meanwhile.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import time

from models.engine import SequentialEngine
from models.jobs import job_done_callback
from tests.test_engine_races import LabelSampler, fixed_job


def _garbage_types(run) -> collections.Counter:
    """Types of the objects that only the cyclic collector would free after ``run()``."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        gc.collect()
        return collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_answered_jobs_leave_no_reference_cycles():
    """40 answered jobs of a real engine leave no job or future to the cyclic collector. Failed on the old code
    (the done callback ``lambda f: self._cancelled.append(job) if f.cancelled() else None`` closed over the job):
    40 ``_Job`` and 40 ``Future`` objects in the cyclic garbage."""
    def run():
        engine = SequentialEngine(LabelSampler(), max_live_jobs=64, seed=0).start()
        futures = [engine.submit(fixed_job(i, time.monotonic() + 60, budget=64)) for i in range(40)]
        assert all(f.result(timeout=60).samples == 64 for f in futures)
        engine.stop(0.0)

    garbage = _garbage_types(run)
    assert garbage["_Job"] == 0 and garbage["Future"] == 0, garbage


def test_cancelled_job_still_reaches_the_engine():
    """The weak reference does not lose a cancellation: the job of a cancelled future is queued for the engine, and
    the engine's count of open jobs is told either way."""
    queue, future, closed = collections.deque(), concurrent.futures.Future(), []
    job = type("Job", (), {"finished": False})()  # any object with .finished that can be weakly referenced
    future.add_done_callback(job_done_callback(lambda: closed.append(1), queue, job))
    assert future.cancel() and list(queue) == [job] and closed == [1]


def test_a_job_the_engine_answered_is_not_queued_as_cancelled():
    """A future resolved by the engine (its job marked finished first) closes the count and queues nothing. Failed
    against a callback that returned early for finished jobs before telling the count (checked)."""
    queue, future, closed = collections.deque(), concurrent.futures.Future(), []
    job = type("Job", (), {"finished": True})()
    future.add_done_callback(job_done_callback(lambda: closed.append(1), queue, job))
    future.set_result(None)
    assert not queue and closed == [1]


def test_live_jobs_counts_down_as_futures_finish_or_are_cancelled():
    """live_jobs: +1 per submit, -1 when its future is done, answered or cancelled (one callback does both duties);
    a cancelled job reaches the engine thread, which drops it. Failed against a callback that skipped the count for
    jobs the engine had answered (live_jobs stayed at 2; checked): the engine then refuses work forever."""
    engine = SequentialEngine(LabelSampler(), max_live_jobs=8, seed=0)
    far = time.monotonic() + 60
    futures = [engine.submit(fixed_job(i, far, budget=64)) for i in range(3)]
    assert engine.live_jobs == 3
    assert futures[0].cancel() and engine.live_jobs == 2
    engine.start()
    assert all(f.result(timeout=60).samples == 64 for f in futures[1:])
    assert engine.live_jobs == 0
    engine.stop(0.0)
