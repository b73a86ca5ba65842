"""Review of the bound of a *settled* job (stopped by its policy with samples in flight, answered once they land),
computed since 41fa8ab in the policies' kernel call of the landing step (DecisionTables.decide(settled=...)) and
passed to the certificate as ``known_lower``.

The reference is the computation before that commit: the same engine, whose decide is given no settled jobs (their
bound NaN), so that models.decisions.certificates computes it with smoothing.lower_bound at the final counts. A
deterministic replay of the engine thread's loop (no threads: SequentialEngine._prepare / _launch_next / precompute /
_land_oldest driven step by step) over many best-radius, proposal and target-radius jobs with speculation, on the CPU
engine and on the engine as on a GPU (decision tables): every answer (class, radius, p_lower, samples, stopped_by)
must be bit-identical, and steps with several settled jobs at once must occur (so that an alignment bug shows).

Run against these bugs (each applied alone to models/engine.py or models/decisions.py), and it failed on each:
(a) the settled bounds scattered to the wrong slots (``known[np.concatenate([due, settled[::-1]])]``, and
``np.roll(settled, 1)``, and ``[settled, due]``): a settled job answered with another job's bound, too large for some;
(b) decide returning ``lower[:n]`` (the engine step raises, every live job fails);
(c) decide's codes not cut to the due jobs (the step raises);
(d) the settled jobs' codes applied to them (``due = np.concatenate([due, settled])`` after decide, codes uncut):
a job stopped as 'certified' answered as 'budget' or 'futility' (same bound, wrong stopped_by).
Two variants change no answer and pass, as they should: decide returning NaN for the settled bounds (certificates
computes them, as before the commit) and advance_checkpoint on the settled jobs (answered in that same step).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import pytest

from models.decisions import STOP_NAMES
from models.engine import JobSpec, SequentialEngine
from models.jobs import SEQUENTIAL, JobTable
from models.sampling import SamplingEngine
from tests.engine_helpers import BernoulliModel, engine_turn

K, SIGMA = 10, 0.25


def _specs(seed: int, n: int) -> list[JobSpec]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = np.zeros((3, 2, 2), np.float32)
        img[0, 0, 0] = rng.choice([0.55, 0.6, 0.7, 0.85, 0.95, 0.99, float(rng.uniform(0.5, 1))])
        img[0, 0, 1] = rng.integers(K)
        kw = {"prior": (float(rng.uniform(0.5, 30)), float(rng.uniform(0.5, 3)))}
        policy = ("best", "best", "best", "proposal", "target")[i % 5]
        if policy == "target":
            kw["target_radius"] = float(rng.choice([0.05, 0.2]))
        elif policy == "proposal":
            kw["proposal_radius"] = float(rng.choice([0.05, 0.2, 0.5]))
        if policy != "target":
            kw["min_gain"] = float(rng.choice([0.0, 5e-5, 2e-4, 1e-3]))
        out.append(JobSpec(img, float(rng.choice([0.001, 0.01, 0.1])), int(rng.choice([200, 1000, 3000])),
                           float("inf"), tested_class=int(img[0, 0, 1]), **kw))
    return out


def _replay(device: str, seed: int, *, reference: bool, batch_size: int, max_live: int):
    """(answers, settled counts per step, the first stop reason of each stopped job) of the engine loop run step by
    step on ``_specs(seed)``; ``reference``: decide is given no settled job (their bounds NaN: computed by
    certificates, as before 41fa8ab)."""
    sampler = SamplingEngine(BernoulliModel(device), sigma=SIGMA, num_classes=K, batch_size=batch_size)
    engine = SequentialEngine(sampler, seed=seed, max_live_jobs=max_live, depth=2, speculate=True)
    tables, settled_sizes = engine._tables, []
    decide = tables.decide

    def logged_decide(table, due, sigma, settled=None):
        settled = due[:0] if settled is None else settled
        settled_sizes.append(len(settled))
        if not reference:
            return decide(table, due, sigma, settled)
        codes, lower = decide(table, due, sigma)
        return codes, np.concatenate([lower, np.full(len(settled), np.nan)])

    tables.decide = logged_decide
    first_stop = {}  # future -> STOP_NAMES of the code its policy first stopped it with

    class Logged(JobTable):
        def settle(self, slots, codes, lower=None):
            for slot, code in zip(slots, codes):
                first_stop.setdefault(self.jobs[slot].future, STOP_NAMES[int(code)])
            return super().settle(slots, codes, lower)

    table_for = engine._table_for

    def logged_table_for(admit):
        if engine._table is None and admit:
            table = table_for(admit)
            table.__class__ = Logged
        return table_for(admit)

    engine._table_for = logged_table_for
    inflight, futures, queue = deque(), [], _specs(500 + seed, 48)
    try:
        for _ in range(20_000):
            while queue and engine.live_jobs < max_live:
                futures.append(engine.submit(queue.pop(0)))
            if engine_turn(engine, inflight, more_to_come=bool(queue)):
                break
        engine._stop_at = time.monotonic() - 1.0
        engine._prepare(inflight)
    finally:
        sampler.close()
    answers = []
    for future in futures:
        exc = future.exception(timeout=0)
        r = None if exc is not None else future.result(timeout=0)
        answers.append(repr(exc) if exc is not None else (r.class_index, r.radius, r.p_lower, r.samples, r.stopped_by))
    return answers, settled_sizes, [first_stop.get(f) for f in futures]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("seed,batch_size,max_live", [(0, 512, 24), (1, 1024, 48), (2, 256, 16)])
def test_settled_jobs_bounds_are_the_certificates_own_bound(device, seed, batch_size, max_live):
    got, sizes, stops = _replay(device, seed, reference=False, batch_size=batch_size, max_live=max_live)
    assert sum(s >= 2 for s in sizes) >= 1, "no step with several settled jobs: the alignment is not exercised"
    assert [a[4] for a in got] == stops, "a job is answered with the reason its policy stopped it for"
    want, _, _ = _replay(device, seed, reference=True, batch_size=batch_size, max_live=max_live)
    assert all(isinstance(a, tuple) for a in want)
    assert got == want
    assert any(a[4] == "certified" for a in got)


def test_settled_and_due_are_disjoint():
    """A job is due only while not stopping, settled only while stopping: no job is both in one step."""
    table = JobTable((3, 2, 2), K, capacity=4)
    table.kind[:] = SEQUENTIAL
    table.running[:] = True
    table.est_done[:] = table.cp[:] = 10
    table.inflight[:] = 0
    table.stopping[:] = [True, False, True, False]
    slots = np.arange(4)
    due, settled = table.at_checkpoint(slots), table.settled(slots)
    assert due.tolist() == [1, 3] and settled.tolist() == [0, 2]
