"""Device backends run each batch at a bucketed size (models.backends.padded_batch_size), so cuDNN tunes its
convolution algorithms for a few shapes instead of one per batch size; the padding rows are drawn and discarded.

What must hold: at most a few dozen shapes for every batch up to 16,384; never fewer rows than asked; and the
padding never reaches a count: with the same generator, a padded batch's counts and labels are exactly the unpadded
batch's (torch backend on the CPU, forced to pad), and onnxruntime's in-graph path returns one label per asked copy.
Each test was run once against the bug it guards against and failed then: counts taken over the padded rows (the
padding counted for chunk 0's job), labels not cut back to the asked copies, buckets of one size per batch size.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.backends import padded_batch_size
from models.sampling import tally_chunks
from tests.engine_helpers import tiny_linear_model

K = 10
IMAGES = np.random.default_rng(3).random((4, 3, 2, 2), dtype=np.float32)


def test_buckets_are_few_and_never_smaller_than_the_batch():
    sizes = np.arange(0, 16_385)
    padded = np.array([padded_batch_size(int(n)) for n in sizes])
    assert padded[0] == 0 and np.all(padded >= sizes)
    assert len(set(padded[1:].tolist())) <= 26
    assert np.all(padded[1:1025] < 2 * sizes[1:1025]) and np.all(padded[1025:] - sizes[1025:] < 1024)
    assert [padded_batch_size(n) for n in (1, 2, 3, 1000, 1024, 1025, 16_384)] == [1, 2, 4, 1024, 1024, 2048, 16_384]


def _linear_onnx() -> bytes:
    """(N, 3, 2, 2) -> flatten -> MatMul (12, 5): a tiny ONNX classifier for the in-graph noise path."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], ["output"])],
        "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 2, 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([-1, 12], np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def _in_graph_recording(sigma: float):
    """(onnxruntime backend with seeded in-graph noise, forced to pad; the list of index lengths each run saw)."""
    from models.backends import OnnxBackend

    backend = OnnxBackend(_linear_onnx(), device="cpu", threads=1, noise_sigma=sigma, noise_in_graph=True, seed=5,
                          pad_batches=True)
    runs, session = [], backend._noisy_session
    backend._noisy_session = type("Recorder", (), {"run": lambda self, out, feeds: runs.append(
        len(feeds["certserve_index"])) or session.run(out, feeds)})()
    return backend, runs


@pytest.mark.parametrize("sizes", [[3, 0, 700, 2], [1025], [1, 1, 1], [0, 0]])
def test_torch_padding_changes_no_count_and_no_label(sizes):
    """Forced on the CPU (where the noise comes from the caller's generator), a padded batch gives exactly the
    counts and labels of the unpadded one: the padding rows are drawn after the batch's own and never counted."""
    torch = pytest.importorskip("torch")
    from models.torch_backend import TorchBackend

    sizes = np.array(sizes, dtype=np.int64)
    seen_pad, seen_plain = [], []
    padded = TorchBackend(tiny_linear_model(torch, record=seen_pad), device="cpu", pad_batches=True)
    plain = TorchBackend(tiny_linear_model(torch, record=seen_plain), device="cpu")
    assert padded.pad_batches and not plain.pad_batches  # the default pads on CUDA only
    images = IMAGES[:len(sizes)]
    got = padded.launch_counts(images, sizes, 0.25, np.random.default_rng(11), K).result()
    want = plain.launch_counts(images, sizes, 0.25, np.random.default_rng(11), K).result()
    np.testing.assert_array_equal(got, want)
    assert got.sum() == sizes.sum()
    labels = padded.noisy_predictions(images, sizes, 0.25, np.random.default_rng(12))
    np.testing.assert_array_equal(labels, plain.noisy_predictions(images, sizes, 0.25, np.random.default_rng(12)))
    np.testing.assert_array_equal(tally_chunks(labels, sizes, K), plain.launch_counts(
        images, sizes, 0.25, np.random.default_rng(12), K).result())
    total = int(sizes.sum())
    assert len(seen_pad[0]) == padded_batch_size(total) and len(seen_plain[0]) == total


def test_in_graph_noise_pads_the_index_and_returns_one_label_per_copy():
    """onnxruntime's in-graph noise path (the CUDA provider's; seeded here to run on the CPU), forced to pad: the
    session runs the bucketed number of copies and the caller gets exactly one label per copy it asked for, with
    the class rates of the unpadded path."""
    from models.backends import OnnxBackend

    backend, runs = _in_graph_recording(0.3)
    sizes = np.array([700, 0, 1400])
    labels = backend.noisy_predictions(IMAGES[:3], sizes, 0.3, None)
    assert runs == [padded_batch_size(2100)] == [3072]
    assert labels.shape == (2100,)
    host = OnnxBackend(_linear_onnx(), device="cpu", threads=1).noisy_predictions(IMAGES[:3], sizes, 0.3,
                                                                                  np.random.default_rng(0))
    ca, cb = tally_chunks(labels, sizes, 5), tally_chunks(host, sizes, 5)
    assert ca.sum(axis=1).tolist() == sizes.tolist()
    for chunk in (0, 2):
        pa, pb = ca[chunk] / sizes[chunk], cb[chunk] / sizes[chunk]
        se = np.sqrt((pa * (1 - pa) + pb * (1 - pb)) / sizes[chunk]) + 1e-9
        assert np.all(np.abs(pa - pb) <= 5 * se), (pa, pb)


def test_warm_up_runs_every_bucket_once_on_a_padding_backend_and_nothing_on_the_cpu():
    """SamplingEngine.warm_up (called by CertificationService.start before the engine takes a job): one call per
    bucket up to the batch size on a backend that pads (a device backend: cuDNN tunes then, not in a request), none
    on a host backend. Failed once with the buckets taken from 1..batch_size - 1 (the full batch's shape missing)."""
    torch = pytest.importorskip("torch")
    from models.backends import OnnxBackend
    from models.bundle import load_bundle
    from models.sampling import SamplingEngine
    from models.torch_backend import TorchBackend

    batches: list = []
    device_like = TorchBackend(tiny_linear_model(torch, record=batches), device="cpu", pad_batches=True)
    engine = SamplingEngine(device_like, sigma=0.25, num_classes=K, batch_size=2049)
    assert engine.warm_up(IMAGES[0], np.random.default_rng(0)) == 13
    assert [len(x) for x in batches] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 2049]  # the batch size: the last bucket
    host = OnnxBackend(load_bundle().path("base"), threads=1, device="cpu")
    assert not host.pad_batches
    assert SamplingEngine(host, sigma=0.25, num_classes=K).warm_up(np.zeros((1, 28, 28), np.float32),
                                                                   np.random.default_rng(0)) == 0


@pytest.mark.parametrize("batch_size", [20_000, 1_100, 600])
def test_padding_never_runs_more_rows_than_the_engines_batch_size(batch_size):
    """The operator sizes CERTSERVE_BATCH_SIZE to the device's memory: a padded batch (and the warm-up's largest
    bucket) must not exceed it. Failed before: batch_size 20,000 ran 20,480 rows, 1,100 ran 2,048 and 600 ran 1,024
    (nearly twice the memory; the warm-up at start-up ran out of it first), in the engine's full batches as in the
    warm-up; now the batch size itself is the last bucket (one more shape at most)."""
    torch = pytest.importorskip("torch")
    from models.backends import OnnxBackend
    from models.sampling import SamplingEngine
    from models.torch_backend import TorchBackend

    batches: list = []
    backend = TorchBackend(tiny_linear_model(torch, record=batches), device="cpu", pad_batches=True)
    engine = SamplingEngine(backend, sigma=0.25, num_classes=K, batch_size=batch_size)
    buckets = engine.warm_up(IMAGES[0], np.random.default_rng(0))
    seen = [len(x) for x in batches]
    assert max(seen) == batch_size and len(seen) == buckets == len(set(seen))
    batches.clear()
    counts = engine.count(IMAGES[:2], np.array([batch_size - 7, 7 + batch_size // 3]), np.random.default_rng(1))
    assert counts.sum() == batch_size + batch_size // 3 and max(len(x) for x in batches) <= batch_size
    ort, runs = _in_graph_recording(0.25)
    sampler = SamplingEngine(ort, sigma=0.25, num_classes=5, batch_size=batch_size)
    assert sampler.count(IMAGES[:1], batch_size, None).sum() == batch_size
    assert runs == [batch_size]
