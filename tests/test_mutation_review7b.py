"""Mutation audit, round 7b: noise, samples and the audit record -- the noise draws and the per-chunk tally
(models.sampling), the sampling backends (models.backends: onnxruntime's host and in-graph noise, its NaN rule;
models.torch_backend, run on the CPU), where a batch's counts land (models.jobs.JobTable.land), and the audit log
(certification.audit: one complete line per certificate, rotation, repair, health).

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. Real components: onnxruntime sessions over
tiny ONNX graphs built here, the torch backend on the CPU, real files for the audit log. Every generator is
seeded; each test takes well under a second or two.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.backends import NAN_LABEL, OnnxBackend, padded_batch_size
from models.sampling import SamplingEngine, tally_chunks

K = 5


def _first_logit_sqrt_onnx(opset: int = 17) -> bytes:
    """(N, 3, 2, 2) -> logits (N, 5): column 0 is 100 + sqrt(first pixel), columns 1-4 a linear map of the pixels.
    Class 0 wins every copy whose first noisy pixel is >= 0; a copy whose first pixel is negative has ONE NaN logit
    (column 0) and four finite ones."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["flat"]),
             helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["first"]),
             helper.make_node("Sqrt", ["first"], ["root"]),
             helper.make_node("Add", ["root", "hundred"], ["logit0"]),
             helper.make_node("MatMul", ["flat", "W"], ["rest"]),
             helper.make_node("Concat", ["logit0", "rest"], ["output"], axis=1)]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([-1, 12], np.int64), "shape"),
             numpy_helper.from_array(np.array([0], np.int64), "starts"),
             numpy_helper.from_array(np.array([1], np.int64), "ends"),
             numpy_helper.from_array(np.array([1], np.int64), "axes"),
             numpy_helper.from_array(np.array([100.0], np.float32), "hundred")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 2, 2])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", K])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=8 if opset < 19 else 9).SerializeToString()


# ------------------------------------------------------------------------------------ NaN logits: no class
@pytest.mark.parametrize("in_graph", [False, True], ids=["host-noise", "in-graph-noise"])
def test_a_copy_with_a_single_nan_logit_counts_for_no_class(in_graph):
    """A noisy copy whose logits hold ONE NaN (the others finite) has no arg-max: it must count for no class (a miss
    for the tested class), never for the NaN's class or the best finite one. Here class 0 wins every finite copy and
    is the NaN's column, so a copy misattributed to class 0 inflates the tested class's hits. Bugs guarded against
    (each run, this test failed): the host path's ``np.isnan(logits).any(axis=1)`` as ``.all(axis=1)`` (numpy's
    argmax then picks the NaN's class 0), and the in-graph wrapper's opset<18 ReduceMax over the NaN flags as
    ReduceMin (onnxruntime's ArgMax then skips the NaN: a finite class). The existing NaN tests use models whose
    NaN reaches every logit of the row."""
    raw = _first_logit_sqrt_onnx(17)
    kwargs = dict(noise_sigma=0.3, noise_in_graph=True, seed=5) if in_graph else {}
    backend = OnnxBackend(raw, device="cpu", threads=1, **kwargs)
    images = np.zeros((2, 3, 2, 2), dtype=np.float32)
    images[1] += 1.0  # first pixel 1: sqrt never NaN at sigma 0.3 (3.3 sigma: P ~ 4e-4 per copy)
    sizes = np.array([600, 400])
    counts = SamplingEngine(backend, sigma=0.3, num_classes=K).count_chunks(images, sizes,
                                                                           np.random.default_rng(7))
    nan_rows = sizes[0] - counts[0].sum()
    assert 220 <= nan_rows <= 380  # about half of image 0's copies have a negative first pixel
    assert counts[0, 0] == sizes[0] - nan_rows and not counts[0, 1:].any()  # finite rows: class 0, NaN rows: none
    assert counts[1, 0] >= 395
    labels = backend.noisy_predictions(images[:1], np.array([300]), 0.3, np.random.default_rng(8))
    assert set(np.unique(labels)) == {NAN_LABEL, 0}


# ------------------------------------------------------------------------------------ batches and padding
def _linear_onnx() -> bytes:
    """(N, 3, 2, 2) -> flatten -> MatMul (12, 5): a tiny ONNX classifier."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((12, K)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["output"])],
        "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 2, 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", K])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([-1, 12], np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def test_a_backend_shared_by_engines_pads_within_the_largest_batch_size():
    """A padding backend shared by two engines keeps the larger batch size as its padding limit: the engine that
    runs full batches of 1,000 must never run more than 1,000 rows (the operator sized that to the device's memory),
    whichever engine was built last. Bug guarded against (run against it, this test failed): SamplingEngine setting
    ``backend.pad_limit = self.batch_size`` (the last engine's, 256) instead of the max: a 600-copy batch of the
    first engine then ran at the unlimited bucket, 1,024 rows."""
    backend = OnnxBackend(_linear_onnx(), device="cpu", threads=1, noise_sigma=0.25, noise_in_graph=True, seed=3,
                          pad_batches=True)
    runs, session = [], backend._noisy_session
    backend._noisy_session = type("Recorder", (), {"run": lambda self, out, feeds: runs.append(
        len(feeds["certserve_index"])) or session.run(out, feeds)})()
    big = SamplingEngine(backend, sigma=0.25, num_classes=K, batch_size=1000)
    SamplingEngine(backend, sigma=0.25, num_classes=K, batch_size=256)
    images = np.random.default_rng(1).random((2, 3, 2, 2), dtype=np.float32)
    counts = big.count(images, np.array([600, 400]), np.random.default_rng(2))
    assert counts.sum(axis=1).tolist() == [600, 400]
    assert runs and max(runs) <= 1000, runs


# ------------------------------------------------------------------------------------ the audit log
def _audit_line_length(tmp_path) -> int:
    """The length of the line AuditLog writes for {"seq": 1} (logged_at: 10 digits, a point, 3 decimals)."""
    from certification.audit import AuditLog

    probe = tmp_path / "probe" / "audit.jsonl"
    with AuditLog(probe, max_bytes=0) as log:
        log.append({"seq": 1})
    return probe.stat().st_size


def test_a_log_may_fill_to_exactly_max_bytes_before_it_rotates(tmp_path):
    """Rotation happens when the next line would push the file OVER max_bytes: two lines that fill it exactly stay
    in one file. Bug guarded against (run against it, this test failed): ``size + len(line) >= max_bytes``."""
    from certification.audit import AuditLog, read_records

    line = _audit_line_length(tmp_path)
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_bytes=2 * line, backups=2) as log:
        log.append({"seq": 1})
        log.append({"seq": 2})
        assert path.stat().st_size == 2 * line and not (tmp_path / "audit.jsonl.1").exists()
        log.append({"seq": 3})  # this one would go over: rotated first
    assert (tmp_path / "audit.jsonl.1").stat().st_size == 2 * line and path.stat().st_size == line
    assert [r["seq"] for r in read_records(path)] == [1, 2, 3]


def test_a_record_larger_than_max_bytes_never_rotates_an_empty_file_into_the_backups(tmp_path):
    """A record larger than max_bytes goes into a file of its own; an empty PATH (a fresh log, or one logrotate just
    replaced) is never rotated: an empty backup would take a slot and push the oldest records out. Bug guarded
    against (run against it, this test failed): the rotation condition without its ``size > 0`` term."""
    from certification.audit import AuditLog, read_records

    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_bytes=100, backups=2) as log:
        log.append({"seq": 1, "pad": "p" * 200})
        assert not (tmp_path / "audit.jsonl.1").exists()
        log.append({"seq": 2, "pad": "p" * 200})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.1"]
    assert all(p.stat().st_size > 0 for p in tmp_path.iterdir())
    assert [r["seq"] for r in read_records(path)] == [1, 2]


def test_reading_with_the_logs_backups_reads_every_rotated_file(tmp_path):
    """read_records(path, backups=N) reads PATH.N ... PATH.1 and PATH: the same records as the discovery without N
    when no other numbered file is there. Bug guarded against (run against it, this test failed): ``_backups``
    listing ``range(1, backups)``: the oldest file, PATH.<backups>, left out (tests/test_audit.py checks only that
    what is read is contiguous and newest)."""
    from certification.audit import AuditLog, read_records

    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_bytes=600, backups=3) as log:
        for i in range(30):
            log.append({"seq": i, "pad": "p" * 100})
    assert (tmp_path / "audit.jsonl.3").exists()
    everything = [r["seq"] for r in read_records(path)]
    assert [r["seq"] for r in read_records(path, backups=3)] == everything
    assert everything == list(range(30 - len(everything), 30)) and len(everything) > 12


def test_fsync_true_flushes_every_record(tmp_path, monkeypatch):
    """``fsync=True`` (CERTSERVE_AUDIT_FSYNC) promises records that survive a power loss: one fsync of the log per
    append, after its write. Bug guarded against (run against it, this test failed): the fsync dropped from
    ``_write_whole`` (no other test can see a missing flush)."""
    import os as real_os

    from certification import audit as audit_module

    synced = []
    monkeypatch.setattr(audit_module.os, "fsync", lambda fd: synced.append(real_os.fstat(fd).st_size))
    path = tmp_path / "audit.jsonl"
    with audit_module.AuditLog(path, fsync=True) as log:
        log.append({"seq": 1})
        log.append({"seq": 2})
    size = path.stat().st_size
    assert synced == [size // 2, size]  # each after its own line was written
    with audit_module.AuditLog(tmp_path / "plain.jsonl") as log:
        log.append({"seq": 1})
    assert len(synced) == 2  # fsync=False: no flush


def test_every_write_holds_the_flock_of_the_file_it_goes_to_even_right_after_a_rotation(tmp_path, monkeypatch):
    """Several processes may append to one log; each write must hold the exclusive flock of the PATH it writes to,
    including the first write into the new PATH that this writer's rotation just created (another process that
    opens it meanwhile must wait, or it could take the file's tail for a torn line and drop it). Probed from a second
    open file description (flock conflicts between descriptions in one process as between processes). Bug guarded
    against (run against it, this test failed): ``_rotate`` not locking the new PATH it opens."""
    import fcntl
    import os as real_os

    from certification import audit as audit_module

    path = tmp_path / "audit.jsonl"
    log = audit_module.AuditLog(path, max_bytes=200, backups=2)
    locked, write = [], real_os.write

    def probing_write(fd, data):
        if fd == log._fd:
            probe = real_os.open(path, real_os.O_RDONLY)
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked.append(False)
                fcntl.flock(probe, fcntl.LOCK_UN)
            except BlockingIOError:
                locked.append(True)
            finally:
                real_os.close(probe)
        return write(fd, data)

    monkeypatch.setattr(audit_module.os, "write", probing_write)
    with log:
        for i in range(4):
            log.append({"seq": i, "pad": "p" * 100})  # each append after the first rotates
    assert (tmp_path / "audit.jsonl.1").exists() and locked == [True] * 4


def test_an_unprivileged_probe_counts_only_the_space_it_may_use(tmp_path, monkeypatch):
    """The health probe of a failed log needs PROBE_FREE_BYTES that THIS process may write: for a non-root user,
    f_bavail (the blocks reserved for root do not count), f_bfree only for root. Bug guarded against (run against
    it, this test failed): free space taken from f_bfree for everyone (a disk full for the service, root's reserve
    left, probed healthy: every request sampled in full, then answered 503)."""
    import os as real_os
    import types

    from certification import audit as audit_module

    log = audit_module.AuditLog(tmp_path / "audit.jsonl")
    log._failed, log._failed_at = True, 0.0  # an append failed, long ago
    real = real_os.fstatvfs(log._fd)
    full_for_users = types.SimpleNamespace(f_bfree=10_000, f_bavail=0, f_frsize=real.f_frsize)
    monkeypatch.setattr(audit_module.os, "fstatvfs", lambda fd: full_for_users)
    monkeypatch.setattr(audit_module.os, "geteuid", lambda: 1000)
    assert not log.healthy()
    monkeypatch.setattr(audit_module.os, "geteuid", lambda: 0)
    log._failed_at = 0.0
    assert log.healthy()  # root may use the reserve
    log.close()


# ------------------------------------------------------------------------------------ choosing the backend
def test_auto_on_a_host_without_an_nvidia_driver_never_consults_torch(monkeypatch, tmp_path):
    """``device=auto`` (the default) on a CPU host: onnxruntime on the CPU, and torch is never consulted (importing
    it costs seconds and hundreds of MiB the service then keeps for nothing; the CPU image has no torch at all).
    Bug guarded against (run against it, this test failed): onnx_backend's ``device == "auto" and
    NVIDIA_DRIVER.exists()`` reduced to ``device == "auto"``."""
    import models.backends as backends

    monkeypatch.setattr(backends, "NVIDIA_DRIVER", tmp_path / "no-driver")
    monkeypatch.setattr(backends, "_ort_has_cuda", lambda: False)
    monkeypatch.setattr(backends, "_torch_cuda_missing", lambda: pytest.fail("torch was consulted"))
    backend = backends.onnx_backend(_linear_onnx(), device="auto", noise_sigma=0.25, threads=1)
    assert backend.name == "onnxruntime-cpu" and backend._noisy_session is None


# ------------------------------------------------------------------------------------ the torch backend (CPU)
def _torch_module(torch, forward):
    class Module(torch.nn.Module):
        def forward(self, x):
            return forward(x)

    return Module()


def test_torch_device_counts_give_a_copy_with_a_single_nan_logit_no_class():
    """The torch backend's device-side counts and labels: a copy with ONE NaN logit (column 0, the class every finite
    copy wins) counts for no class, as the host tally does. Bug guarded against (run against it, this test failed):
    ``logits.isnan().any(dim=1)`` as ``.all(dim=1)`` (torch's argmax then picks the NaN's class 0: a hit).
    tests/test_gpu_paths_review.py's NaN model makes every logit of the row NaN."""
    torch = pytest.importorskip("torch")
    from models.torch_backend import TorchBackend

    w = torch.randn(12, K - 1, generator=torch.Generator().manual_seed(0))
    module = _torch_module(torch, lambda x: torch.cat([100 + torch.sqrt(x.flatten(1)[:, :1]), x.flatten(1) @ w], 1))
    backend = TorchBackend(module, device="cpu")
    images = np.zeros((2, 3, 2, 2), dtype=np.float32)
    images[1] += 1.0
    counts = backend.launch_counts(images, np.array([600, 400]), 0.3, np.random.default_rng(7), K).result()
    nan_rows = 600 - counts[0].sum()
    assert 220 <= nan_rows <= 380 and counts[0, 0] == 600 - nan_rows and not counts[0, 1:].any()
    assert counts[1, 0] >= 395
    labels = backend.noisy_predictions(images[:1], np.array([300]), 0.3, np.random.default_rng(8))
    assert set(np.unique(labels)) == {NAN_LABEL, 0}


def test_a_conversion_that_differs_only_on_noisy_inputs_is_refused():
    """verify_conversion probes noisy inputs too (pixels outside [0, 1]: the smoothed classifier's inputs): a module
    that agrees with the ONNX model on clean images but clips its input computes another classifier on every noisy
    copy. Bug guarded against (run against it, this test failed): the noisy probes left out of ``probes``."""
    torch = pytest.importorskip("torch")
    from models.torch_backend import TorchBackend, verify_conversion

    reference = OnnxBackend(_linear_onnx(), device="cpu", threads=1)
    w = torch.from_numpy(np.random.default_rng(0).standard_normal((12, K)).astype(np.float32))
    faithful = TorchBackend(_torch_module(torch, lambda x: x.flatten(1) @ w), device="cpu")
    verify_conversion(faithful, reference)  # the same function: accepted
    clipping = TorchBackend(_torch_module(torch, lambda x: x.clamp(0, 1).flatten(1) @ w), device="cpu")
    np.testing.assert_allclose(clipping.forward(np.full((1, 3, 2, 2), 0.5, np.float32)),
                               reference.forward(np.full((1, 3, 2, 2), 0.5, np.float32)), rtol=1e-5)
    with pytest.raises(RuntimeError, match="does not compute its logits"):
        verify_conversion(clipping, reference)


def test_a_conversion_off_by_a_few_percent_of_the_logits_scale_is_refused():
    """verify_conversion's tolerance is 1e-3 of the logits' scale (far above fp32 rounding): logits 2% of the scale
    off are another function (arg-max flips near the boundary). Bug guarded against (run against it, this test
    failed): the absolute tolerance 100 x rtol x scale (10%)."""
    torch = pytest.importorskip("torch")
    from models.torch_backend import TorchBackend, verify_conversion

    reference = OnnxBackend(_linear_onnx(), device="cpu", threads=1)
    w = torch.from_numpy(np.random.default_rng(0).standard_normal((12, K)).astype(np.float32))
    probes = np.random.default_rng(0).random((6, 3, 2, 2), dtype=np.float32)
    shift = 0.02 * max(1.0, float(np.abs(reference.forward(probes)).max()))
    off = TorchBackend(_torch_module(torch, lambda x: x.flatten(1) @ w + shift * torch.arange(K)), device="cpu")
    with pytest.raises(RuntimeError, match="does not compute its logits"):
        verify_conversion(off, reference)


@pytest.mark.parametrize("extra", [1, 2])
def test_torch_device_counts_refuse_any_class_beyond_the_bundles_never_landing_on_another_job(extra):
    """A model that predicts class K + extra (beyond the bundle's K) must be refused at ``result()``, whatever
    the class: not counted as 'no class' (K + 1 is the NaN column) and not for the NEXT chunk's job (K + 2 lands on
    its class 0 in the flattened tally). Bug guarded against (run against it, this test failed): launch_counts
    without ``torch.clamp(labels, max=k)`` (tests/test_gpu_paths_review.py and tests/test_torch_backend.py refuse
    class K only, which lands in the refused column with or without the clamp)."""
    torch = pytest.importorskip("torch")
    from models.torch_backend import TorchBackend

    def logits(x):
        m = x.flatten(1).mean(1, keepdim=True)  # image 0: ~1 -> class K + extra; image 1: ~0 -> class 0
        cols = [100 - 200 * m] + [torch.zeros_like(m)] * (K - 1 + extra) + [200 * m]
        return torch.cat(cols, 1)

    backend = TorchBackend(_torch_module(torch, logits), device="cpu")
    images = np.stack([np.ones((3, 2, 2), np.float32), np.zeros((3, 2, 2), np.float32)])
    assert backend.forward(images).argmax(1).tolist() == [K + extra, 0]
    pending = backend.launch_counts(images, np.array([50, 50]), 0.1, np.random.default_rng(3), K)
    with pytest.raises(ValueError, match=f"predicted a class >= {K}"):
        pending.result()


def test_a_successful_append_makes_a_failed_log_healthy_at_once(tmp_path, monkeypatch):
    """After a failed append the log is unhealthy (readiness and admission refuse); the next append that succeeds
    (a request admitted before the failure) proves it writable again: healthy at once, not only after the hold and
    a probe. Bug guarded against (run against it, this test failed): append not resetting ``_failed`` on success
    (up to HOLD_SECONDS more of 503s for a log that works)."""
    import errno

    from certification import audit as audit_module

    log = audit_module.AuditLog(tmp_path / "audit.jsonl")
    write = audit_module.os.write
    monkeypatch.setattr(audit_module.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    with pytest.raises(audit_module.AuditError):
        log.append({"seq": 1})
    assert not log.healthy()
    monkeypatch.setattr(audit_module.os, "write", write)
    log.append({"seq": 2})
    assert log.healthy()
    log.close()
    assert [r["seq"] for r in audit_module.read_records(tmp_path / "audit.jsonl")] == [2]


def test_a_cohen_jobs_selection_counts_copies_with_no_class_as_drawn():
    """A selection chunk's samples count as drawn whether or not a copy had a class (a copy with a NaN logit counts
    for none: models.backends.NAN_LABEL), so the job selects its class once its n0 selection samples have landed.
    Bug guarded against (run against it, this test failed): ``JobTable.land`` adding ``counts.sum(1)`` instead of the
    chunk's size to ``sel_done``; a Cohen job whose selection draws held NaN copies stayed below n0 forever, drew
    selection samples again and never selected a class (its estimation samples never started)."""
    from models.engine import JobSpec
    from models.jobs import COHEN, Batch, JobTable

    class Job:
        spec = JobSpec(np.zeros((1, 4, 4), np.float32), 0.01, 400, 1e12, kind="cohen", n0=50)
        order, slot = 0, -1

    table = JobTable((1, 4, 4), 3, capacity=1)
    slot = table.admit(Job(), COHEN, None)
    batch = table.allocate(1000)
    assert batch.selection.tolist() == [True] and batch.sizes.tolist() == [50]
    counts = np.array([[10, 37, 0]])  # 3 of the 50 copies counted for no class
    assert table.land(batch, counts).tolist() == [slot]
    assert (int(table.sel_done[slot]), int(table.cls[slot])) == (50, 1)
    assert not table.allocate(1000).selection.any()  # estimation samples next, no more selection
