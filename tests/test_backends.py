"""The inference backends: host-noise and in-graph-noise sampling agree in distribution, and the wrapper is sound."""

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from calibration.data import load_fashion_mnist
from models.backends import NOISY_IMAGES, NOISY_INDEX, OnnxBackend, noisy_argmax_model
from models.bundle import load_bundle


@pytest.fixture(scope="module")
def bundle():
    return load_bundle()


@pytest.fixture(scope="module")
def images():
    return load_fashion_mnist().x_test[:6]


def test_in_graph_noise_matches_host_noise_in_distribution(bundle, images):
    """The CUDA-path wrapper (Gather -> RandomNormalLike -> model -> ArgMax), run on the CPU provider, yields the same
    class distribution per image as numpy noise: a chi-square test per image does not reject at 1e-4."""
    host = bundle.backend("base", threads=2, device="cpu")
    graph = bundle.backend("base", threads=2, device="cpu", noise_in_graph=True, seed=3)
    reps = np.full(len(images), 3000)
    a = host.noisy_predictions(images, reps, 0.25, np.random.default_rng(0)).reshape(len(images), -1)
    b = graph.noisy_predictions(images, reps, 0.25, np.random.default_rng(1)).reshape(len(images), -1)
    for i in range(len(images)):
        table = np.stack([np.bincount(a[i], minlength=10), np.bincount(b[i], minlength=10)])
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[1] < 2:  # both put every sample on one class
            assert np.array_equal(np.flatnonzero(np.bincount(a[i], minlength=10)),
                                  np.flatnonzero(np.bincount(b[i], minlength=10)))
            continue
        assert chi2_contingency(table).pvalue > 1e-4, f"image {i}: {table}"


def test_in_graph_noise_is_fresh_each_call_and_scaled_by_sigma(bundle, images):
    graph = bundle.backend("base", threads=1, device="cpu", noise_in_graph=True, seed=5)
    x = images[:1]
    first = graph.noisy_predictions(x, np.array([500]), 0.25, None)
    second = graph.noisy_predictions(x, np.array([500]), 0.25, None)
    assert first.shape == (500,) and not np.array_equal(first, second)
    with pytest.raises(ValueError, match="sigma"):
        graph.noisy_predictions(x, np.array([10]), 0.5, None)


def test_wrapper_with_tiny_sigma_reproduces_the_clean_prediction(bundle, images):
    model = noisy_argmax_model(str(bundle.path("base")), 1e-6, seed=0)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    labels = sess.run(None, {NOISY_IMAGES: images, NOISY_INDEX: np.arange(len(images), dtype=np.int64)})[0]
    clean = OnnxBackend(bundle.path("base"), threads=1).forward(images).argmax(axis=1)
    assert np.array_equal(labels, clean)


def test_in_graph_noise_is_refused_on_a_cpu_session_unless_seeded_for_a_test(bundle):
    """onnxruntime's CPU RandomNormalLike repeats after ~2^31 values and every unseeded CPU kernel of a process starts
    from one seed (two sessions drew identical noise): never a serving path. Run against the code before 2026-12-05:
    the unseeded CPU in-graph backend was built and served noise shared with every other such session."""
    with pytest.raises(ValueError, match="CUDA provider only"):
        OnnxBackend(bundle.path("base"), threads=1, device="cpu", noise_sigma=0.25, noise_in_graph=True)
    OnnxBackend(bundle.path("base"), threads=1, device="cpu", noise_sigma=0.25, noise_in_graph=True, seed=1)


def test_in_graph_wrapper_accepts_a_base_graph_named_like_its_own_tensors(tmp_path, images):
    """A base model whose input is 'images' and output 'labels' (the wrapper's old tensor names) still wraps: the
    wrapper's names are prefixed. Run against the code before 2026-12-05: onnx.checker refused the wrapper ('images'
    used as an output name twice), so such a bundle could not start on a GPU."""
    import torch

    from models.export import export_onnx

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    path = export_onnx(net, torch.zeros(1, 1, 28, 28), tmp_path / "m.onnx", input_name="images", output_name="labels")
    graph = OnnxBackend(path, threads=1, device="cpu", noise_sigma=1e-6, noise_in_graph=True, seed=0)
    clean = OnnxBackend(path, threads=1).forward(images).argmax(axis=1)
    assert np.array_equal(graph.noisy_predictions(images, np.ones(len(images), np.int64), 1e-6, None), clean)


def test_in_graph_noise_needs_sigma(bundle):
    with pytest.raises(ValueError, match="noise_sigma"):
        OnnxBackend(bundle.path("base"), noise_in_graph=True)


def _eleven_output_model(path, *, dynamic_width: bool):
    """A real ONNX classifier over 1x28x28 with 11 logits whose last one always wins."""
    import torch

    class Eleven(torch.nn.Module):
        def forward(self, x):
            flat = x.reshape(x.shape[0], -1)
            logits = torch.zeros(x.shape[0], 11) + flat.mean(dim=1, keepdim=True)
            if dynamic_width:  # width from a runtime shape: exported as a symbolic output dimension
                logits = logits[:, : flat.shape[1] // 784 * 11]
            return logits + torch.nn.functional.one_hot(torch.tensor(10), 11).float() * 5

    torch.onnx.export(Eleven(), torch.zeros(2, 1, 28, 28), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch", 1: "classes"} if dynamic_width
                                    else {0: "batch"}}, dynamo=False)
    return path


@pytest.mark.parametrize("dynamic_width", [False, True])
def test_bundle_refuses_a_model_wider_than_its_classes(tmp_path, dynamic_width):
    """11 outputs declared as 10 classes would let a prediction '10' be counted for the next job: refused at load,
    also when the output width is symbolic (probed with one forward pass)."""
    from models.bundle import BundleError, create_bundle

    model = _eleven_output_model(tmp_path / "m.onnx", dynamic_width=dynamic_width)
    with pytest.raises(BundleError, match="11 outputs"):
        create_bundle(tmp_path / "b", base=model, sigma=0.25, input_shape=(1, 28, 28), classes=[str(i) for i in range(10)])


def test_sampling_engine_refuses_predictions_outside_the_classes(tmp_path, images):
    from models.sampling import SamplingEngine

    model = _eleven_output_model(tmp_path / "m.onnx", dynamic_width=False)
    engine = SamplingEngine(OnnxBackend(model, threads=1), sigma=0.25, num_classes=10, batch_size=64)
    with pytest.raises(ValueError, match="predicted class 10"):
        engine.count_chunks(images[:2], np.array([5, 5]), np.random.default_rng(0))
