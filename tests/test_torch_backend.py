"""The PyTorch backend (:mod:`models.torch_backend`) checked against onnxruntime on the CPU.

The bundle's real base.onnx is converted by onnx2torch (the converter the GPU path uses) and run by torch on the
CPU: logits must match onnxruntime's, device-side counts must be a valid tally of the chunks (and agree in
distribution with onnxruntime's host-noise counts), the engine must run on it through ``launch_counts``, and a class
outside the bundle's must be refused. The CUDA-only parts (pinned copies, events) run only on a GPU host.
"""

from __future__ import annotations

import importlib.util
import math
import time

import numpy as np
import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:  # `make setup` installs it (no torchvision: see Makefile)
    pytest.skip("onnx2torch is not installed", allow_module_level=True)

from calibration.data import load_fashion_mnist  # noqa: E402
from models.backends import OnnxBackend, onnx_backend  # noqa: E402
from models.bundle import load_bundle  # noqa: E402
from models.engine import JobSpec, SequentialEngine  # noqa: E402
from models.sampling import SamplingEngine  # noqa: E402
from models.torch_backend import TorchBackend  # noqa: E402
from tests.worker_helpers import sequential_bound_behind  # noqa: E402

SIGMA = 0.25
K = 10


@pytest.fixture(scope="module")
def bundle():
    return load_bundle()


@pytest.fixture(scope="module")
def images():
    return load_fashion_mnist().x_test[:256].copy()


@pytest.fixture(scope="module")
def torch_cpu(bundle):
    return TorchBackend.from_onnx(bundle.path("base"), device="cpu")


@pytest.fixture(scope="module")
def ort_cpu(bundle):
    return bundle.backend("base", device="cpu", threads=2)


def test_converted_model_matches_onnxruntime(torch_cpu, ort_cpu, images):
    a, b = torch_cpu.forward(images), ort_cpu.forward(images)
    assert a.shape == b.shape == (len(images), K)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert np.array_equal(a.argmax(1), b.argmax(1))


def test_device_counts_tally_each_chunk(torch_cpu, images):
    sampler = SamplingEngine(torch_cpu, sigma=SIGMA, num_classes=K, batch_size=4096)
    sizes = np.array([1, 300, 0 + 7, 1200, 64])
    counts = sampler.launch(images[:5], sizes, np.random.default_rng(0)).result()
    assert counts.shape == (5, K) and counts.dtype == np.int64
    assert counts.sum(axis=1).tolist() == sizes.tolist()
    again = sampler.count_chunks(images[:5], sizes, np.random.default_rng(0))
    assert np.array_equal(counts, again), "a seeded generator must reproduce the same counts"


def test_device_counts_agree_with_onnxruntime_in_distribution(torch_cpu, ort_cpu, images):
    """Top-class rate of a mid-confidence image over 4,000 noisy samples each: within 4.5 binomial SE."""
    clean = ort_cpu.forward(images)
    probs = np.exp(clean - clean.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    j = int(np.argmin(np.abs(probs.max(1) - 0.9)))  # a less-than-certain clean prediction
    n = 4000
    t = SamplingEngine(torch_cpu, sigma=SIGMA, num_classes=K).count_chunks(images[j:j + 1], np.array([n]),
                                                                          np.random.default_rng(1))[0]
    o = SamplingEngine(ort_cpu, sigma=SIGMA, num_classes=K).count_chunks(images[j:j + 1], np.array([n]),
                                                                        np.random.default_rng(2))[0]
    top = int(np.argmax(o))
    p = (t[top] + o[top]) / (2 * n)
    se = math.sqrt(2 * p * (1 - p) / n) + 1e-12
    assert abs(t[top] - o[top]) / n <= 4.5 * se, (t, o)


def test_cpu_noise_comes_from_the_callers_generator(torch_cpu, ort_cpu, images):
    """On the CPU the noise is the caller's numpy generator's, exactly as onnxruntime's host noise: the same seeded
    generator gives the same noisy inputs, so both backends agree on (nearly) every label. Run against the previous
    CPU path (torch's mt19937 reseeded per batch from a 63-bit draw, of which it keeps 32 bits: 2^32 streams, a
    repeat after ~77k batches): the labels agreed only where the image is confident (0.81 of them), and seeds that
    differed above bit 32 drew identical noise."""
    sizes = np.full(8, 500, dtype=np.int64)
    ours = torch_cpu.noisy_predictions(images[:8], sizes, 0.5, np.random.default_rng(11))
    theirs = ort_cpu.noisy_predictions(images[:8], sizes, 0.5, np.random.default_rng(11))
    assert np.mean(ours == theirs) >= 0.999
    again = torch_cpu.noisy_predictions(images[:8], sizes, 0.5, np.random.default_rng(11))
    assert np.array_equal(ours, again)


def test_engine_runs_on_device_counts(torch_cpu, images):
    engine = SequentialEngine(SamplingEngine(torch_cpu, sigma=SIGMA, num_classes=K, batch_size=512), seed=4).start()
    try:
        classes = torch_cpu.forward(images[:12]).argmax(1)
        specs = [JobSpec(images[i], 0.01, 400, time.monotonic() + 120, tested_class=int(classes[i]))
                 for i in range(12)]
        results = [f.result(timeout=120) for f in [engine.submit(s) for s in specs]]
    finally:
        engine.stop(0.0)
    for res, spec in zip(results, specs):
        assert 0 < res.samples <= 400
        # L_t at its counted samples, or at the checkpoint its policy stopped it on if a speculative chunk was in
        # flight and that bound was larger (models.decisions.certificates)
        sequential_bound_behind(res, spec)
    assert engine.samples_processed == sum(r.samples for r in results)
    assert np.mean([r.class_index >= 0 for r in results]) > 0.5


def test_a_class_outside_the_bundle_is_refused(tmp_path, images):
    """An 11-output model sampled as 10 classes: the extra class must raise, not be counted for the next chunk.
    Run against the bug of dropping the overflow column without checking it: no error; this test failed."""
    import torch

    from models.export import export_onnx

    class Eleven(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 11)
            return logits + torch.nn.functional.one_hot(torch.tensor(10), 11).float() * 5

    path = export_onnx(Eleven(), torch.zeros(1, 1, 28, 28), tmp_path / "eleven.onnx")
    backend = TorchBackend.from_onnx(path, device="cpu")
    with pytest.raises(ValueError, match="class >= 10"):
        SamplingEngine(backend, sigma=SIGMA, num_classes=10).count_chunks(images[:2], np.array([5, 5]),
                                                                          np.random.default_rng(0))


def test_device_choice(bundle):
    assert isinstance(onnx_backend(bundle.path("base"), device="cpu"), OnnxBackend)
    import onnxruntime
    import torch

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers() or torch.cuda.is_available():
        pytest.skip("a CUDA backend is available here")
    with pytest.raises(RuntimeError, match="onnxruntime-gpu.*torch.cuda.is_available"):
        onnx_backend(bundle.path("base"), device="cuda")
    assert onnx_backend(bundle.path("base"), device="auto").device == "cpu"
