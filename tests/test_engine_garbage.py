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
from models.jobs import queue_if_cancelled
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
    """The weak reference does not lose a cancellation: the job of a cancelled future is queued for the engine."""
    queue, future = collections.deque(), concurrent.futures.Future()
    job = type("Job", (), {})()  # any object that can be weakly referenced: the callback only queues it
    future.add_done_callback(queue_if_cancelled(queue, job))
    assert future.cancel() and list(queue) == [job]
