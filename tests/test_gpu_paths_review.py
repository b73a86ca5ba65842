"""Review of the code paths that run only on a GPU, forced on the CPU and checked against the CPU path.

1. The engine's decision tables (models.decisions.DecisionTables), on only where the sampler's device is not the CPU:
   a deterministic replay of the engine thread's loop (SequentialEngine._prepare / _launch_next / precompute /
   _land_oldest, the deadline watcher's answer and cancellations at fixed steps) over a seeded mix of every job kind
   and policy, with speculation, slot reuse, deadlines, cancellations and a shutdown: every job's answer, every
   decision (codes) and every batch must be the same with the tables as without them.
2. The PyTorch backend's device-side counts (launch_counts) on the CPU: the host tally (models.sampling.tally_chunks)
   of the same labels, for zero-size, single and many chunks and NaN logits; its noise i.i.d. N(0, sigma^2), never
   clipped, fresh between calls and chunks; TF32 off before a CUDA module is built.
3. onnxruntime's in-graph noise on the opset >= 18 graphs (ReduceMax takes its axes as an input there), and the
   device choice ``auto`` on a host whose onnxruntime-gpu lists a CUDA provider that no GPU backs.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections import deque

import numpy as np
import pytest

from models.engine import JobSpec, SequentialEngine
from models.jobs import resolve_futures
from models.sampling import SamplingEngine, tally_chunks
from tests.engine_helpers import BernoulliModel, engine_turn, tiny_linear_model

K, SIGMA = 10, 0.25
HAS_TORCH = importlib.util.find_spec("torch") is not None


# ------------------------------------------------------------------------------------ 1. the engine's decision tables
class _Logged(SamplingEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []

    def launch(self, images, sizes, rng):
        self.log.append((tuple(int(s) for s in sizes), float(images[:, 0, 0, 0].sum())))
        return super().launch(images, sizes, rng)


def _specs(rng, n):
    out = []
    for _ in range(n):
        img = np.zeros((3, 2, 2), np.float32)
        img[0, 0, 0] = rng.choice([0.3, 0.55, 0.7, 0.85, 0.95, 0.99, 1.0, float(rng.uniform(0.4, 1))])
        img[0, 0, 1] = rng.integers(K)
        img[0, 1, 0] = float(rng.random() < 0.15)
        kind = str(rng.choice(["sequential"] * 6 + ["cohen", "fixed"]))
        kw = {}
        if kind == "sequential":
            policy = rng.choice(["best", "proposal", "target"])
            kw["prior"] = (float(rng.uniform(0.5, 30)), float(rng.uniform(0.5, 3)))
            if policy == "target":
                kw["target_radius"] = float(rng.choice([0.05, 0.2, 0.5]))
            elif policy == "proposal":
                kw["proposal_radius"] = float(rng.choice([0.05, 0.2, 0.5]))
            if policy != "target" and rng.random() < 0.5:
                kw["min_gain"] = float(rng.choice([0.0, 1e-5, 1e-3]))
        elif kind == "cohen":
            kw["n0"] = int(rng.choice([10, 100]))
        out.append(JobSpec(img, float(rng.choice([0.001, 0.01, 0.1])), int(rng.choice([50, 200, 1000, 3000, 20000])),
                           float("inf"), kind=kind, tested_class=int(img[0, 0, 1]), **kw))
    return out


def _replay(device: str, seed: int, *, batch_size: int, max_live: int, njobs: int = 40, depth: int = 2):
    """The engine thread's loop (SequentialEngine._run) driven step by step, with submissions, cancellations,
    deadline answers (as the watcher gives them) and a shutdown at steps drawn from ``seed`` alone: (answers,
    decisions, batches, table lookups found)."""
    specs, events = _specs(np.random.default_rng(1000 + seed), njobs), np.random.default_rng(2000 + seed)
    sampler = _Logged(BernoulliModel(device), sigma=SIGMA, num_classes=K, batch_size=batch_size)
    engine = SequentialEngine(sampler, seed=seed, max_live_jobs=max_live, depth=depth, speculate=True)
    tables, decisions, found = engine._tables, [], [0]
    decide, lookup = tables.decide, tables.lookup

    def logged_decide(table, due, sigma, settled=None):
        codes, lower = decide(table, due, sigma, settled)
        decisions.append([(int(table.gen[s]), int(table.est_done[s]), int(c)) for s, c in zip(due, codes)])
        return codes, lower

    def counted_lookup(table, due):
        codes, hit = lookup(table, due)
        found[0] += int(hit.sum())
        return codes, hit

    tables.decide, tables.lookup = logged_decide, counted_lookup
    inflight, futures, queue, step = deque(), [], list(specs), 0
    stop_step = int(events.integers(30, 400)) if events.random() < 0.3 else None
    try:
        while True:
            while queue and engine.live_jobs < max_live and events.random() < 0.7:
                futures.append(engine.submit(queue.pop(0)))
            if futures and events.random() < 0.05:
                futures[int(events.integers(len(futures)))].cancel()
            if futures and events.random() < 0.05:
                future = futures[int(events.integers(len(futures)))]
                job = next((d[2] for d in engine._deadlines if d[2].future is future), None)
                if job is not None:
                    with engine._state:
                        answers = engine._answer_job(job, "deadline")
                    resolve_futures(answers)
            if step == stop_step:
                engine._stop_at = time.monotonic() - 1.0
            if engine_turn(engine, inflight, more_to_come=bool(queue)):
                break
            step += 1
            assert step < 50_000
    finally:
        sampler.close()
    answers = []
    for future in futures:
        if future.cancelled():
            answers.append("cancelled")
            continue
        r = future.result(timeout=0)  # raises a job's exception
        answers.append((r.class_index, r.radius, r.p_lower, r.samples, r.stopped_by))
    return answers, decisions, sampler.log, found[0]


@pytest.mark.parametrize("seed,batch_size,max_live,depth", [
    (0, 64, 8, 2), (1, 256, 8, 2), (2, 1024, 8, 2), (3, 100, 30, 3), (4, 37, 5, 1), (5, 4000, 64, 2),
    (6, 512, 20, 2), (7, 16384, 16, 2)])
def test_decision_tables_change_no_answer_decision_or_batch(seed, batch_size, max_live, depth):
    """The engine as on a GPU (its sampler's device 'cuda': decisions tabulated while a chunk is in flight, looked up
    when it lands) against the CPU engine, same seed, same events: identical answers (class, radius, p_lower, samples,
    stopped_by), decisions and batches, over a mix of every kind and policy with speculation, slot reuse, deadlines,
    cancellations and shutdowns; and the tables were used. Run against three bugs, each made this test fail:
    stop_bounds computing no bound for a stop looked up with samples in flight (the certificate fell back to the
    later counts), a lookup one hit off (h = hits - base - 1), and tables tabulated at the counted samples instead
    of the checkpoint (t = est_done)."""
    kw = dict(batch_size=batch_size, max_live=max_live, depth=depth)
    cpu, gpu = _replay("cpu", seed, **kw), _replay("cuda", seed, **kw)
    assert cpu[3] == 0 and gpu[3] > 10, "the tables must be used on 'cuda' only"
    assert gpu[0] == cpu[0]
    assert gpu[1] == cpu[1]
    assert gpu[2] == cpu[2]
    assert sum(a[4] in ("certified", "target", "futility") for a in cpu[0] if a != "cancelled") >= 3


def test_precompute_follows_the_backends_device():
    for device, on in (("cpu", False), ("cuda", True), ("cuda:1", True)):
        sampler = SamplingEngine(BernoulliModel(device), sigma=SIGMA, num_classes=K)
        assert SequentialEngine(sampler).precompute is on


# ------------------------------------------------------------------------------------ 2. the PyTorch backend
@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


IMAGES = np.random.default_rng(0).random((5, 3, 2, 2), dtype=np.float32)


@pytest.mark.parametrize("sizes", [[0, 5, 0, 3], [7], [0, 0, 0, 9], [1, 1, 1, 1, 1], [300, 0, 200, 1000, 64],
                                   [0, 0], []])
def test_device_counts_are_the_host_tally_of_the_same_labels(torch, sizes):
    """launch_counts (the (J, K) counts reduced on the device by scatter_add) == tally_chunks of the labels
    noisy_predictions draws from the same seeded generator: zero-size chunks, one chunk, many chunks, an empty batch,
    and NaN logits (about a third of the copies here), counted for no class."""
    from models.torch_backend import TorchBackend

    backend = TorchBackend(tiny_linear_model(torch, nan_above=1.2), device="cpu")
    sizes = np.array(sizes, dtype=np.int64)
    images = IMAGES[:len(sizes)]
    counts = backend.launch_counts(images, sizes, 0.5, np.random.default_rng(3), K).result()
    labels = backend.noisy_predictions(images, sizes, 0.5, np.random.default_rng(3))
    assert counts.dtype == np.int64 and np.array_equal(counts, tally_chunks(labels, sizes, K))
    if sizes.sum() > 100:
        assert 0 < np.mean(labels == -1) < 0.9 and counts.sum() == np.count_nonzero(labels >= 0)


def test_device_counts_refuse_a_class_beyond_the_bundles(torch):
    """A model with more outputs than the bundle's classes: a label >= K raises at result() (the host tally refuses
    it too); a label == K exactly is the boundary (it would be the next chunk's first class in a flat tally)."""
    from models.torch_backend import TorchBackend

    backend = TorchBackend(tiny_linear_model(torch, k=K + 1), device="cpu")
    images, sizes = IMAGES, np.full(5, 200)
    labels = backend.noisy_predictions(images, sizes, 0.5, np.random.default_rng(1))
    assert labels.max() == K  # the model does predict the extra class
    with pytest.raises(ValueError, match=f"class >= {K}"):
        backend.launch_counts(images, sizes, 0.5, np.random.default_rng(1), K).result()
    with pytest.raises(ValueError, match="predicted class"):
        tally_chunks(labels, sizes, K)
    narrow = TorchBackend(tiny_linear_model(torch, k=K - 3), device="cpu")  # fewer outputs: counted, the rest zero
    counts = narrow.launch_counts(images, sizes, 0.5, np.random.default_rng(1), K).result()
    assert counts.shape == (5, K) and counts.sum() == 1000 and not counts[:, K - 3:].any()


def test_device_noise_is_iid_gaussian_unclipped_and_fresh(torch):
    """The model's input minus the chunk's image: N(0, sigma^2) per coordinate (mean, variance, a KS test), not
    clipped to [0, 1], float32, uncorrelated between copies of one chunk, between chunks of one image and between
    calls (the generator advances)."""
    from scipy import stats

    from models.torch_backend import TorchBackend

    seen = []
    backend = TorchBackend(tiny_linear_model(torch, record=seen), device="cpu")
    rng, sigma = np.random.default_rng(7), 0.5
    image = np.repeat(IMAGES[:1], 2, axis=0)  # one image as two chunks
    sizes = np.array([3000, 3000])
    backend.launch_counts(image, sizes, sigma, rng, K).result()
    backend.launch_counts(image, sizes, sigma, rng, K).result()
    assert [x.dtype for x in seen] == [torch.float32] * 2
    batches = [x.numpy() for x in seen]
    noise = [(b - IMAGES[0]) / sigma for b in batches]
    flat = np.concatenate([e.reshape(-1) for e in noise]).astype(np.float64)
    assert abs(flat.mean()) < 4 / np.sqrt(flat.size) and abs(flat.var() - 1) < 0.03
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    assert min(b.min() for b in batches) < -0.5 and max(b.max() for b in batches) > 1.5  # x + e, never clipped
    first, second = noise[0].reshape(6000, -1), noise[1].reshape(6000, -1)
    for u, v in ((first[:3000], first[3000:]), (first, second), (first[:-1], first[1:])):
        r = np.corrcoef(u.ravel(), v.ravel())[0, 1]
        assert abs(r) < 5 / np.sqrt(u.size), r


def test_tf32_is_off_before_a_cuda_module_is_built(torch):
    """TorchBackend(device='cuda') turns TF32 off (cuDNN convolutions and cuBLAS matmuls) before the module is moved
    to the device: the certificate is about the bundle's fp32 model. Checked on a module whose .to() records the
    flags (a CPU-only torch then fails at the CUDA generator, after the flags). Global flags: restored after."""
    from models.torch_backend import TorchBackend

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark)
    flags, module = [], tiny_linear_model(torch)

    def to(device):
        flags.append((device, cudnn.allow_tf32, matmul.allow_tf32))
        return module

    module.to = to
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True
        try:
            TorchBackend(module, device="cuda")
        except (RuntimeError, AssertionError):
            pass  # no CUDA here
        assert flags == [("cuda", False, False)]
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark = saved


# ------------------------------------------------------------------------------------ 3. onnxruntime on a GPU host
def _sqrt_linear_onnx(opset: int) -> bytes:
    """(N, 3, 2, 2) -> sqrt -> flatten -> MatMul (12, 5): NaN logits where a noisy pixel is negative."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    nodes = [helper.make_node("Sqrt", ["input"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["output"])]
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 2, 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([-1, 12], np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=8 if opset < 19 else 9).SerializeToString()


@pytest.mark.parametrize("opset", [17, 18, 21])
def test_in_graph_noise_labels_match_the_host_path_on_every_opset(opset):
    """The in-graph wrapper (the CUDA provider's noise; seeded here to run on the CPU) on base graphs of opset 17
    (ReduceMax with an axes attribute) and 18+ (axes as an input): NaN rows get NAN_LABEL, finite rows the arg-max,
    zero-size chunks nothing, and the rates agree with the host path within 5 binomial SE."""
    from models.backends import NAN_LABEL, OnnxBackend

    raw = _sqrt_linear_onnx(opset)
    images = np.random.default_rng(1).random((3, 3, 2, 2), dtype=np.float32) * 0.5 + 0.5
    sizes = np.array([2000, 0, 1500])
    graph = OnnxBackend(raw, device="cpu", threads=1, noise_sigma=0.3, noise_in_graph=True, seed=5)
    host = OnnxBackend(raw, device="cpu", threads=1)
    a = graph.noisy_predictions(images, sizes, 0.3, None)
    b = host.noisy_predictions(images, sizes, 0.3, np.random.default_rng(0))
    assert a.dtype == np.int64 and a.shape == (3500,) and set(np.unique(a)) <= {NAN_LABEL, *range(5)}
    ca, cb = tally_chunks(a, sizes, 5), tally_chunks(b, sizes, 5)
    assert not ca[1].any()
    for chunk in (0, 2):
        n = sizes[chunk]
        pa = np.append(ca[chunk], n - ca[chunk].sum()) / n  # the last entry: no class (NaN)
        pb = np.append(cb[chunk], n - cb[chunk].sum()) / n
        se = np.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n) + 1e-9
        assert np.all(np.abs(pa - pb) <= 5 * se), (pa, pb)
        assert pa[-1] > 0.02  # NaN rows occur


def test_auto_runs_on_the_cpu_where_onnxruntime_gpu_has_no_gpu(monkeypatch):
    """onnxruntime-gpu lists CUDAExecutionProvider on any host, and its session starts on the CPU where no GPU (or no
    CUDA library) backs it. The old chooser then asked OnnxBackend for device='cuda' even under ``auto``, which
    refused the CPU session: the service (CERTSERVE_DEVICE defaults to auto) failed to start on a CPU node running
    the GPU or Ray image. Now ``auto`` gives the CPU session with host noise; ``cuda`` still fails, saying why."""
    import onnxruntime as ort

    from models.backends import onnx_backend
    from models.bundle import load_bundle

    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    model = load_bundle().model_bytes("base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime: the CUDA provider is not available
        backend = onnx_backend(model, device="auto", noise_sigma=SIGMA, threads=1)
        assert backend.device == "cpu" and backend._noisy_session is None
        sampler = SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=64)
        one = sampler.count_chunks(np.zeros((1, 1, 28, 28), np.float32), np.array([50]), np.random.default_rng(0))
        two = sampler.count_chunks(np.zeros((1, 1, 28, 28), np.float32), np.array([50]), np.random.default_rng(0))
        assert one.sum() == 50 and np.array_equal(one, two)  # host noise from the caller's generator
        with pytest.raises(RuntimeError, match="device='cuda' requested"):
            onnx_backend(model, device="cuda", noise_sigma=SIGMA, threads=1)


def test_a_gpu_host_whose_onnxruntime_cuda_cannot_start_runs_pytorch_on_the_gpu(monkeypatch):
    """onnxruntime-gpu's CUDA provider can fail to start on a host that has a GPU (its CUDA or cuDNN libraries of
    another version): its session then runs on the CPU. The chooser then takes PyTorch on the GPU where that can run
    (``auto`` and ``cuda`` alike), and ``cuda`` without it fails naming both reasons. Failed before: ``auto`` kept
    the CPU session on a GPU host, and ``cuda`` refused at once without trying PyTorch."""
    import onnxruntime as ort

    import models.backends as backends
    import models.torch_backend as torch_backend
    from models.bundle import load_bundle

    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    model = load_bundle().model_bytes("base")
    chosen = object()
    monkeypatch.setattr(torch_backend.TorchBackend, "from_onnx", classmethod(lambda cls, path, device: chosen))
    monkeypatch.setattr(backends, "_torch_cuda_missing", lambda: None)
    monkeypatch.setattr(backends.Path, "exists", lambda self: str(self) == "/proc/driver/nvidia/version")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime: the CUDA provider is not available
        assert backends.onnx_backend(model, device="auto", threads=1) is chosen
        assert backends.onnx_backend(model, device="cuda", threads=1) is chosen
        monkeypatch.setattr(backends, "_torch_cuda_missing", lambda: "torch.cuda.is_available() is False")
        with pytest.raises(RuntimeError, match="started its session on the CPU.*torch.cuda.is_available"):
            backends.onnx_backend(model, device="cuda", threads=1)
        assert backends.onnx_backend(model, device="auto", threads=1).device == "cpu"


def test_the_configuration_check_does_not_trust_onnxruntime_gpus_provider_list(monkeypatch):
    """``serve`` checks ``device: cuda`` before start-up (server.serve.check_configuration, one-line exit 2). The
    check trusted onnxruntime-gpu's provider list, which names CUDA on any host: on a host with no NVIDIA driver and
    no PyTorch CUDA it passed, and start-up then failed with a traceback. Failed before: no error raised."""
    import onnxruntime as ort

    import models.backends as backends
    from server.serve import check_configuration
    from server.settings import Settings

    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    monkeypatch.setattr(backends, "_torch_cuda_missing", lambda: "torch is not installed")
    monkeypatch.setattr(backends.Path, "exists", lambda self: False if str(self).startswith("/proc/driver") else
                        type(self).is_file(self) or type(self).is_dir(self))
    with pytest.raises(ValueError, match=r"cuda, but onnxruntime-gpu is installed but no NVIDIA driver .*torch is not installed"):
        check_configuration(Settings(device="cuda"))
    monkeypatch.setattr(backends.Path, "exists", lambda self: True)
    assert backends.cuda_unavailable() is None  # a driver and onnxruntime-gpu: its provider can run


def test_the_cuda_check_does_not_import_torch_where_onnxruntime_can_run_cuda(monkeypatch):
    """A GPU host with onnxruntime-gpu and its driver: ``cuda`` can run, and finding that out must not import torch
    (seconds, and hundreds of MiB of RSS the service would then keep for nothing)."""
    import onnxruntime as ort

    import models.backends as backends

    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    monkeypatch.setattr(backends.Path, "exists", lambda self: True)
    monkeypatch.setattr(backends, "_torch_cuda_missing", lambda: pytest.fail("torch was consulted"))
    assert backends.cuda_unavailable() is None
