"""Mutation audit, round 4: the engine's turn (landing, answers, stop and failure paths), the decision tables as a GPU
engine uses them, sampling tallies, the clean-input prior and surrogate, sealing, verification and the service.

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. Engine tests drive one engine's turn functions
(``_prepare``, ``_launch_next``, ``_land_oldest``, ``_answer``) directly, on an engine whose threads were never
started, so an interleaving that the threaded engine reaches only by chance (a client cancelling while the deadline
watcher resolves, a stop while a batch is in flight) happens here on purpose, every run. All randomness is seeded.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque

import numpy as np
import pytest

from models.engine import JobSpec, SequentialEngine
from models.jobs import resolve_futures
from models.sampling import SamplingEngine
from smoothing import lower_bound

SIGMA, ALPHA = 0.25, 0.1
IMAGE = np.zeros((1, 2, 2), np.float32)


class _Always:
    """A backend whose every noisy copy is classified ``label`` (or a scripted list of labels per call)."""

    device = "cpu"

    def __init__(self, label: int = 1, fail: bool = False):
        self.label, self.fail, self.calls = label, fail, 0

    def noisy_predictions(self, images, repeats, sigma, rng):
        self.calls += 1
        if self.fail:
            raise RuntimeError("the model call failed")
        return np.full(int(np.sum(repeats)), self.label, dtype=np.int64)


def _engine(backend=None, *, batch_size: int = 64, **kw) -> SequentialEngine:
    """An engine that is never started: the test runs its turn functions itself (no engine thread, no watcher)."""
    sampler = SamplingEngine(backend or _Always(), sigma=SIGMA, num_classes=2, batch_size=batch_size)
    return SequentialEngine(sampler, seed=0, **kw)


def _spec(**kw) -> JobSpec:
    args = dict(image=IMAGE, alpha=ALPHA, budget=2000, deadline=time.monotonic() + 60, tested_class=1)
    args.update(kw)
    return JobSpec(**args)


def _job_of(engine: SequentialEngine, future):
    table = engine._table
    return next(j for j in table.jobs if j is not None and j.future is future)


# ------------------------------------------------------------------------------------------ models/engine.py
def test_a_late_cancellation_of_an_answered_job_never_stops_the_job_that_reused_its_slot():
    """A job answered by the deadline watcher is resolved after the state lock is released; its client may cancel the
    future in between (the cancel wins, the answer is dropped), and the job goes to the engine's cancelled queue.
    By the time the engine reads that queue, the job's slot can be free and reused by a new job. Bug (the generation
    check removed from _prepare's cancelled loop, ``table.gen[job.slot] == job.order``): the new job was marked not
    running, so it drew no sample until its own deadline."""
    engine = _engine()
    try:
        first = engine.submit(_spec())
        engine._prepare(deque())  # admitted
        a = _job_of(engine, first)
        slot = a.slot
        with engine._state:  # the watcher answers A at its deadline ...
            pending_answers = engine._answer(np.array([slot]), "deadline")
        engine._prepare(deque())  # ... the engine frees A's slot (nothing of A in flight) ...
        second = engine.submit(_spec())
        engine._prepare(deque())  # ... and B takes it
        b = _job_of(engine, second)
        assert b.slot == slot and engine._table.running[slot]
        assert first.cancel()  # A's client gives up before the watcher has resolved A's future
        resolve_futures(pending_answers)  # (dropped: A's future is cancelled)
        engine._prepare(deque())  # the engine reads its cancelled queue: A is finished already
        assert engine._table.running[slot], "the cancellation of answered job A stopped job B in A's old slot"
        inflight = deque()
        assert engine._launch_next(inflight) and inflight[0][0].slots.tolist() == [slot]  # B samples
        engine._land_oldest(inflight)
    finally:
        engine.stop(0.0)
        engine.sampler.close()


def test_a_failed_batch_frees_its_slots():
    """A model call that fails answers every running job with the error; its chunks never land, so _fail_all takes
    them off the in-flight count, and the finished jobs' slots (their images) are freed at the next turn. Bug
    (``table.inflight[batch.slots] -= batch.sizes`` dropped from _fail_all): the slots stayed occupied forever, one
    image and job per failure, and the table doubled as failures accumulated."""
    engine = _engine(_Always(fail=True))
    try:
        futures = [engine.submit(_spec()) for _ in range(3)]
        engine._prepare(deque())
        inflight = deque()
        assert engine._launch_next(inflight)
        engine._land_oldest(inflight)  # the batch's counts raise: every job gets the error
        for f in futures:
            with pytest.raises(RuntimeError, match="model call failed"):
                f.result(timeout=5)
        engine._prepare(deque())
        table = engine._table
        assert table.occupied == 0 and not table.live.any() and (table.inflight == 0).all()
    finally:
        engine.stop(0.0)
        engine.sampler.close()


def test_a_stop_counts_the_batches_already_launched_before_answering():
    """At the stop time the engine thread lets the batches it launched land (their samples count), then answers every
    job with its certificate, marked shutdown. Bug (the landing loop skipped in _prepare): the jobs were answered
    without the samples already drawn for them (a weaker certificate than the one paid for)."""
    engine = _engine(batch_size=1024)
    try:
        fut = engine.submit(_spec(min_gain=0.0))  # never stops by itself before its budget
        engine._prepare(deque())
        inflight = deque()
        assert engine._launch_next(inflight)
        drawn = inflight[0][0].samples
        inflight[0][1].wait()  # the model call has finished; its counts are not counted yet
        engine._stop_at = time.monotonic() - 1.0  # the stop time has come, the batch is launched (not yet landed)
        assert engine._prepare(inflight) is True
        res = fut.result(timeout=5)
        assert res.stopped_by == "shutdown" and res.samples == drawn, res
        assert res.p_lower == lower_bound(drawn, drawn, ALPHA)
    finally:
        engine.sampler.close()


def test_an_engine_whose_thread_ended_on_a_fault_refuses_new_jobs():
    """When the engine thread ends on a fault it answers every job it holds (marked shutdown) and stops accepting
    before it exits. Bug (``self._accepting = False`` dropped from _answer_unanswered): a job submitted between that
    answer and the thread's exit was queued with nobody to sample it, and waited for its deadline."""
    engine = _engine()
    try:
        held = engine.submit(_spec())
        engine._answer_unanswered()  # what the engine thread does on its way out after a fault
        assert held.result(timeout=5).stopped_by == "shutdown"
        with pytest.raises(RuntimeError, match="accepts no new work"):
            engine.submit(_spec())
    finally:
        engine.sampler.close()


# ------------------------------------------------------------------------------------ models/decisions.py
class _Bernoulli:
    """Each noisy copy of image j is class 1 with probability p[j] (the image's first pixel), else class 0; drawn
    from the engine's seeded generator, in launch order (the sampler's one runner thread)."""

    device = "cpu"

    def noisy_predictions(self, images, repeats, sigma, rng):
        p = np.repeat(np.asarray(images, dtype=np.float64).reshape(len(images), -1)[:, 0], repeats)
        return (rng.random(len(p)) < p).astype(np.int64)


def _run_jobs(specs, precompute: bool):
    engine = SequentialEngine(SamplingEngine(_Bernoulli(), sigma=SIGMA, num_classes=2, batch_size=256), seed=7)
    engine.precompute = precompute  # as on a GPU device (models.engine: device != "cpu")
    looked_up = []
    lookup = engine._tables.lookup

    def counting(table, due):
        codes, found = lookup(table, due)
        looked_up.append(int(found.sum()))
        return codes, found

    engine._tables.lookup = counting
    futures = [engine.submit(s) for s in specs]  # all queued before the engine starts: one admission, same batches
    engine.start()
    try:
        results = [f.result(timeout=60) for f in futures]
    finally:
        engine.stop(0.0)
    return [(r.class_index, r.radius, r.p_lower, r.samples, r.stopped_by) for r in results], sum(looked_up)


def test_the_gpu_engines_precomputed_decisions_give_the_cpu_engines_certificates():
    """On a GPU the engine tabulates each job's decision while its chunk is in the model (DecisionTables) and looks it
    up at landing; on a CPU it evaluates the policy at landing. Both must answer exactly the same certificates: same
    class, radius, p_lower, samples and stop reason, for target-radius, proposal and best-radius jobs with their own
    alpha, prior and lambda, some stopping with speculative samples in flight. No engine test ran the tables before
    (CPU engines never precompute). Bugs: a looked-up job's L_t reported as its certificate's bound without its
    stop bound (stop_bounds not computing L_t for looked-up codes), tabulating at a shifted sigma or hit count."""
    rng = np.random.default_rng(11)
    specs = []
    for i in range(12):
        img = np.full((1, 2, 2), float(rng.choice([0.55, 0.8, 0.93, 0.99, 1.0])), np.float32)
        kind = i % 3
        specs.append(_spec(image=img, alpha=float(rng.choice([0.1, 0.01, 0.001])), budget=int(rng.choice([500, 3000])),
                           prior=(float(rng.uniform(0.5, 20)), float(rng.uniform(0.5, 3))),
                           target_radius=0.3 if kind == 0 else None, proposal_radius=0.5 if kind == 1 else None,
                           min_gain=float(rng.choice([0.0, 1e-4, 1e-3])) if kind else None))
    direct, none = _run_jobs(specs, precompute=False)
    tabled, used = _run_jobs(specs, precompute=True)
    assert none == 0 and used >= 12, (none, used)  # the tables were used for most decisions
    assert tabled == direct


class _Slotted:
    def __init__(self, order, spec):
        self.spec, self.order, self.slot = spec, order, -1


def test_a_table_of_an_earlier_checkpoint_is_never_looked_up_at_a_later_one():
    """A decision table holds the codes at ONE checkpoint; a job that reached a later checkpoint with a hit count that
    happens to fall inside the old table's range must be evaluated directly. The existing stale-table test moves the
    checkpoint without counting up to it, so its case is refused by the counted == checkpoint guard as well. Bug
    (DecisionTables.lookup without ``cp == table.cp[slot]``): the code tabulated for 64 samples was served at 71."""
    from models.decisions import DecisionTables
    from models.jobs import SEQUENTIAL, JobTable
    from smoothing import checkpoint_schedule

    table = JobTable(IMAGE.shape, 2, capacity=2)
    spec = _spec(budget=3000)
    slot = table.admit(_Slotted(3, spec), SEQUENTIAL, checkpoint_schedule(spec.budget))
    first = table.allocate(100_000, speculate=False)  # 64 samples, up to the first checkpoint
    tables = DecisionTables(max_points=10_000)
    tables.precompute(table, SIGMA)
    table.land(first, np.array([[24, 40]]))  # its decision was taken elsewhere (the table not consumed) ...
    table.advance_checkpoint(np.array([slot]))  # ... and the job went on to the checkpoint 71
    second = table.allocate(100_000, speculate=False)
    assert table.cp[slot] == 71 and second.samples == 7
    table.land(second, np.array([[7, 0]]))  # 40 hits in 71: inside the old table's range (0 .. 64 extra hits)
    assert table.est_done[slot] == table.cp[slot] == 71
    codes, found = tables.lookup(table, np.array([slot]))
    assert not found[0], "a table computed for the checkpoint 64 was used at 71"


def test_a_bound_of_exactly_one_half_certifies_nothing():
    """Certified only where p_lower > 1/2 (radius sigma Phi^-1(p_lower) > 0): at exactly 1/2 the answer abstains
    (class -1), as the verifier requires (``certified`` needs p_lower > 1/2). Bug (``p >= 0.5`` in
    models.decisions.certificates): class 1 with radius 0, a certificate the verifier calls inconsistent."""
    from models.decisions import certificates
    from models.jobs import SEQUENTIAL, JobTable
    from smoothing import checkpoint_schedule

    table = JobTable(IMAGE.shape, 2, capacity=2)
    slot = table.admit(_Slotted(0, _spec()), SEQUENTIAL, checkpoint_schedule(2000))
    batch = table.allocate(64)
    table.land(batch, np.array([[10, 54]]))
    known = np.array([0.5])  # the bound a policy computed at these counts, as _land passes it
    cls, radius, p = certificates(table, np.array([slot]), SIGMA, known)
    assert (int(cls[0]), float(radius[0]), float(p[0])) == (-1, 0.0, 0.5)
    cls, radius, p = certificates(table, np.array([slot]), SIGMA, np.array([0.5 + 1e-9]))
    assert int(cls[0]) == 1 and radius[0] > 0


# ------------------------------------------------------------------------------- models/torch_backend.py, sampling
def test_torch_counts_a_copy_with_one_nan_logit_for_no_class():
    """A noisy copy whose logits hold a NaN in ONE column has no class (NAN_LABEL): torch's argmax would pick the NaN's
    column, a hit for that class that the model never gave. The existing NaN test's model is NaN in every column.
    Bug (``logits.isnan().all(dim=1)`` for ``any``): copies with a NaN in column 1 only were counted for class 1 (pA
    inflated: an unsound bound)."""
    torch = pytest.importorskip("torch")
    from models.torch_backend import TorchBackend

    class HalfNaN(torch.nn.Module):  # logits [0, sqrt(mean x) - 100]: class 0 where mean x >= 0, else NaN in column 1
        def forward(self, x):
            m = x.flatten(1).mean(dim=1)
            return torch.stack([torch.zeros_like(m), torch.sqrt(m) - 100.0], dim=1)

    backend = TorchBackend(HalfNaN(), device="cpu")
    engine = SamplingEngine(backend, sigma=1.0, num_classes=2, batch_size=256)
    images = np.zeros((2, 1, 2, 2), np.float32)
    counts = engine.count(images, np.array([300, 200]), np.random.default_rng(5))  # launch_counts (device tally)
    assert counts[:, 1].sum() == 0, counts
    assert 0 < counts[:, 0].sum() < 500  # about half of the copies had a NaN: counted for no class
    labels = backend.noisy_predictions(images[:1], np.array([200]), 1.0, np.random.default_rng(6))
    assert set(np.unique(labels).tolist()) == {-1, 0}


# ------------------------------------------------------------------------------------------ models/priors.py
class _Forward:
    def __init__(self, out):
        self.out = np.asarray(out, dtype=np.float32)

    def forward(self, x):
        return np.repeat(self.out, len(x), axis=0)


def test_the_tested_class_is_the_surrogates_where_the_two_models_disagree():
    """The class a sequential job tests is the calibrated surrogate's arg-max when the bundle has one (its proposal
    and its meta features are about that class), else the base model's. Bug (tested_class taking the base model's
    arg-max always): where they disagree the job tested another class than the one its proposal and prior were for;
    no test had the two models disagree."""
    from models.priors import class_and_prior, meta_features, softmax

    base = _Forward([[3.0, 1.0, 0.0]])  # base: class 0
    surrogate_logits = np.array([[0.0, 0.5, 2.0]])  # surrogate: class 2
    tested, prior = class_and_prior(base, _Forward(surrogate_logits), None, np.zeros((2, 1, 2, 2), np.float32))
    assert tested.tolist() == [2, 2] and prior.tolist() == [[0.5, 0.5]] * 2
    feats, c = meta_features(base.forward(np.zeros(1)), softmax(surrogate_logits))
    assert c.tolist() == [2] and feats[0, 3] == 0.0  # base_agrees: no
    assert feats[0, 0] == pytest.approx(softmax(surrogate_logits)[0, 2])
    assert class_and_prior(base, None, None, np.zeros((1, 1, 2, 2), np.float32))[0].tolist() == [0]


# ------------------------------------------------------------------------------ certification/seal.py, verify.py
def test_the_audit_record_is_the_sealed_certificate_for_both_seal_paths(tmp_path):
    """Sealing runs hash -> sign -> audit, so the audit record is the certificate as answered: input hashes and
    signature included, and it verifies as a document. Only the event loop's seal_async was checked (through the
    server). Bug (Sealer.seal writing the audit record before stamping the certificate): its records had no input
    hashes and no signature, so no audited certificate could be verified from the log."""
    import asyncio
    import hashlib
    import json

    from certification.audit import AuditLog
    from certification.certificate import ModelInfo, Timings, build_certificate
    from certification.seal import Sealer
    from certification.signing import Signer, generate_key_files
    from certification.verify import verify_document
    from models.bundle import load_bundle

    bundle = load_bundle()
    generate_key_files(tmp_path / "keys")
    signer = Signer.from_paths(tmp_path / "keys")
    log_path = tmp_path / "audit.jsonl"
    sealer = Sealer(bundle, signer=signer, audit=AuditLog(log_path, max_bytes=0))
    image = np.random.default_rng(3).random(tuple(bundle.manifest.input.shape), dtype=np.float32)
    raw = b"the uploaded file"
    model = ModelInfo(name=bundle.manifest.name, version=bundle.manifest.version, sha256=bundle.model_sha256,
                      manifest_sha256=bundle.manifest_sha256)

    def cert(request_id):
        return build_certificate(route="sequential", class_index=1, radius=0.5, p_lower=0.98, samples=500,
                                 stopped_by="certified", guarantee_alpha=0.001, classes=list(bundle.manifest.classes),
                                 timings=Timings(decode_ms=0.0, total_ms=1.0), model=model, request_id=request_id, preprocessing=[])

    try:
        args = dict(input_sha256=hashlib.sha256(raw).hexdigest(), input_encoding="file")
        answered = [sealer.seal(cert("sync"), image, **args),
                    asyncio.run(sealer.seal_async(cert("async"), image, **args))]
    finally:
        sealer.close()
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["certificate"]["request_id"] for r in records] == ["sync", "async"]
    for record, issued in zip(records, answered):
        assert record["certificate"]["signature"] == issued.signature is not None
        assert record["certificate"]["input"]["sha256"] == args["input_sha256"]
        claims = verify_document(record, signer.jwks(), image_bytes=raw, image_tensor=image)
        assert claims["certificate"]["request_id"] == issued.request_id


@pytest.mark.parametrize("changes", [{"radius": 0.0, "p_lower": 0.4}, {"radius": 0.0, "p_lower": None}])
def test_a_certified_claim_without_a_bound_above_one_half_is_inconsistent(changes):
    """``certified`` (class >= 0) needs p_lower > 1/2 even at radius 0 (the radius checks only see radius > 0). Bug
    (that branch of _check_consistent removed): a signed 'certified' class with p_lower 0.4 or none verified VALID."""
    from certification.verify import VerificationError, verify_certificate
    from certification.signing import Signer, generate_key_files
    from tests.test_verify import NOW, sign_certificate

    import tempfile

    with tempfile.TemporaryDirectory() as keys:
        generate_key_files(keys)
        signer = Signer.from_paths(keys)
        doc, token = sign_certificate(signer, **changes)
        assert doc["certified"] is True and doc["class_index"] >= 0
        with pytest.raises(VerificationError) as info:
            verify_certificate(token, signer.jwks(), now=NOW)
    assert info.value.reason == "inconsistent"


# ------------------------------------------------------------------------------------ certification/service.py
@pytest.mark.parametrize("z_hat, proposal", [(-0.3, None), (0.0, None), (1.0, 0.25)])
def test_a_surrogate_estimate_with_no_radius_proposes_nothing(z_hat, proposal):
    """An auto fallback proposes the surrogate's shrunk radius estimate; an estimate of radius 0 (z_hat <= 0) must
    propose nothing (the job keeps the best-radius rule): a proposal of 0 would stop the job at its first L_t > 1/2,
    at a tiny radius. Bug (``proposal if proposal else None`` dropped from _job_spec): JobSpec(proposal_radius=0.0)."""
    from types import SimpleNamespace

    from certification.plan import Plan
    from certification.service import CertificationService
    from models.surrogate import SurrogateAnswer

    service = SimpleNamespace(base=_Forward([[0.0, 2.0]]), surrogate=None, meta=None,
                              manifest=SimpleNamespace(sigma=SIGMA), config=SimpleNamespace(cohen_n0=100))
    plan = Plan(route="sequential", alpha=0.001, budget=1000, deadline=time.monotonic() + 60, target_radius=None,
                fallback_reason="surrogate_below_threshold", proposal=True, per_input_lambda=True)
    answer = SurrogateAnswer(class_index=1, z_hat=z_hat, p_lower=0.0, radius=0.0, level=0.001)
    logits = np.array([[0.0, 1.0]])
    spec = CertificationService._job_spec(service, IMAGE, plan, logits, answer)
    assert spec.tested_class == 1 and spec.proposal_radius == proposal and spec.target_radius is None


@pytest.mark.parametrize("route", ["fixed", "sequential", "cohen"])
def test_every_engine_route_tests_at_the_requests_alpha(route):
    """The certificate states the request's alpha (plan.alpha) for the engine routes, so the job's bound must be
    computed at it, not at the server's default. Bug (the fixed route's JobSpec built with config.default_alpha): a
    request for alpha 0.0001 on a server whose default is 0.01 got a Clopper-Pearson bound at 0.01 under a
    certificate claiming 0.0001 (every routing test asked at the default alpha)."""
    from types import SimpleNamespace

    from certification.plan import Plan
    from certification.service import CertificationService

    service = SimpleNamespace(base=_Forward([[0.0, 2.0]]), surrogate=None, meta=None,
                              manifest=SimpleNamespace(sigma=SIGMA),
                              config=SimpleNamespace(cohen_n0=100, default_alpha=0.01))
    plan = Plan(route=route, alpha=0.0001, budget=5000, deadline=time.monotonic() + 60, target_radius=None)
    spec = CertificationService._job_spec(service, IMAGE, plan, None, None)
    assert spec.kind == route and spec.alpha == 0.0001
    if route != "cohen":
        assert spec.tested_class == 1
