"""Bugs found by a review of models/ (backends, bundle, sampling, surrogate), each with the test that failed before
its fix."""

from __future__ import annotations

import numpy as np
import pytest

import models.backends as backends
from models.backends import OnnxBackend
from models.sampling import SamplingEngine


# ------------------------------------------------------------------------ in-graph noise on an old (opset < 9) graph
def _flatten_matmul_onnx(opset: int, ir_version: int) -> bytes:
    """(N, 3, 2, 2) -> Flatten -> MatMul (12, 5) logits, in ``opset`` (IR 3: initializers listed as graph inputs)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 2, 2])]
    if ir_version < 4:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [12, 5]))
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["output"])],
        "m", inputs, [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version).SerializeToString()


class _ClaimsCuda:
    """A real CPU onnxruntime session that reports the CUDA provider, as onnxruntime-gpu's session does on a GPU."""

    def __init__(self, session):
        self._session = session

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture
def cuda_sessions(monkeypatch):
    real = backends._session
    monkeypatch.setattr(backends, "_session", lambda ort, source, opts, providers, nice, device: _ClaimsCuda(
        real(ort, source, opts, ["CPUExecutionProvider"], nice, "cpu")))


@pytest.mark.parametrize("opset, ir_version", [(7, 3), (8, 3), (8, 4)])
def test_an_opset_8_base_model_serves_on_onnxruntimes_cuda_provider_with_host_noise(cuda_sessions, opset, ir_version):
    """A base model of ONNX opset <= 8 (IR 3 or 4: the model zoo's older classifiers) passes every bundle check, which
    runs on the CPU, but on a GPU host onnxruntime-gpu's session wraps it in the in-graph noise model, whose IsNaN and
    Where need opset 9 (and whose IR-3 copy lists no initializer as an input): OnnxBackend raised onnx's
    ValidationError ("No Op registered for IsNaN with domain_version of 8", "W in initializer but not in graph
    input") and the service could not start. Now such a graph draws its noise on the host (from the caller's
    generator: the same counts as the CPU backend's). Failed on the old code (ValidationError at construction)."""
    raw = _flatten_matmul_onnx(opset, ir_version)
    gpu = OnnxBackend(raw, device="auto", threads=1, noise_sigma=0.3)
    assert gpu.device == "cuda" and gpu._noisy_session is None
    cpu = OnnxBackend(raw, device="cpu", threads=1, noise_sigma=0.3)
    images = np.random.default_rng(1).random((3, 3, 2, 2), dtype=np.float32)
    sizes = np.array([300, 0, 200])
    got = SamplingEngine(gpu, sigma=0.3, num_classes=5, batch_size=512).count_chunks(
        images, sizes, np.random.default_rng(7))
    want = SamplingEngine(cpu, sigma=0.3, num_classes=5, batch_size=512).count_chunks(
        images, sizes, np.random.default_rng(7))
    assert np.array_equal(got, want) and np.array_equal(got.sum(axis=1), sizes)


def test_an_opset_9_base_model_still_draws_its_noise_in_the_graph(cuda_sessions):
    """The fix above keeps the in-graph noise for every graph the wrapper can wrap (opset >= 9)."""
    gpu = OnnxBackend(_flatten_matmul_onnx(9, 4), device="auto", threads=1, noise_sigma=0.3)
    assert gpu.device == "cuda" and gpu._noisy_session is not None
    labels = gpu.noisy_predictions(np.full((2, 3, 2, 2), 0.5, np.float32), np.array([4, 3]), 0.3, None)
    assert labels.shape == (7,) and set(labels.tolist()) <= set(range(5))


def test_the_in_graph_wrapper_refuses_an_opset_8_graph_saying_why():
    """Asked explicitly for in-graph noise on an opset-8 graph, the wrapper says why it cannot (it raised onnx's
    ValidationError from deep inside the checker). Failed on the old code (no ValueError)."""
    with pytest.raises(ValueError, match="opset 8 is below 9"):
        OnnxBackend(_flatten_matmul_onnx(8, 4), device="cpu", threads=1, noise_sigma=0.3, noise_in_graph=True, seed=1)


# ------------------------------------------------------------------------ the tested class where the surrogate has NaN
def _nan_surrogate_onnx() -> bytes:
    """(N, 1, 28, 28) -> sqrt(x - 0.6) -> flatten -> MatMul (784, 10): NaN logits on an image of pixels below 0.6."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((784, 10)).astype(np.float32)
    nodes = [helper.make_node("Sub", ["input", "shift"], ["d"]), helper.make_node("Sqrt", ["d"], ["r"]),
             helper.make_node("Flatten", ["r"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["output"])]
    graph = helper.make_graph(
        nodes, "nan_surrogate", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(0.6, np.float32), "shift")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def test_a_surrogate_without_an_arg_max_leaves_the_tested_class_to_the_base_model():
    """Where the surrogate's clean logits hold a NaN (or a +inf), its answer abstains (models.surrogate) and ``auto``
    falls back to sampling with the class of models.priors.class_and_prior: the softmax row is all NaN, and numpy's
    arg-max of it, the first NaN, made the tested class 0 for every such image (here: the base model says 8 for an
    all-0.5 image, and the sequential job tested class 0, spending its budget on a class the base model does not
    predict). Now such a row gets the base model's class, as tested_class's docstring says ("the surrogate's arg-max
    when there is one, else the base model's"); finite rows keep the surrogate's. Failed on the old code (class 0)."""
    from models.bundle import load_bundle
    from models.priors import class_and_prior, softmax

    bundle = load_bundle()
    base, meta = (bundle.backend(role, threads=1, device="cpu") for role in ("base", "meta"))
    surrogate = OnnxBackend(_nan_surrogate_onnx(), device="cpu", threads=1)
    x = np.stack([np.full((1, 28, 28), 0.5, np.float32), np.full((1, 28, 28), 0.9, np.float32)])
    base_class = base.forward(x).argmax(axis=1)
    logits = surrogate.forward(x)
    assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all() and base_class[0] != 0
    with np.errstate(invalid="ignore"):
        tested, prior = class_and_prior(base, surrogate, meta, x)
        assert tested[0] == base_class[0] and tested[1] == logits[1].argmax()  # the service passes softmax(logits)
        assert np.array_equal(class_and_prior(base, surrogate, meta, x, softmax(logits))[0], tested)
        inf = np.zeros((1, 10), np.float32)
        inf[0, 3] = np.inf  # a float32 overflow: softmax gives NaN
        assert class_and_prior(base, None, meta, x[:1], softmax(inf))[0][0] == base_class[0]
    assert np.all(np.isfinite(prior)) and np.all(prior > 0)


# ------------------------------------------------------------------------ the manifest's JSON types
@pytest.mark.parametrize("where, value", [
    (("calibration", "levels", 0, "alpha"), "0.1"),  # a string read as the level
    (("calibration", "levels", 0, "q_hat", 0), "1.5"),  # a string read as a bin's quantile
    (("calibration", "levels", 0, "bin_sizes"), [True, 6975]),  # true read as a count of 1
    (("calibration", "num_calibration"), 6976.0),  # a float read as a count
    (("input", "shape"), ["1", 28, 28]),  # a string read as the channels
])
def test_a_manifest_number_of_another_json_type_is_refused(tmp_path, where, value):
    """The loader validated the manifest in pydantic's lax mode: "alpha": "0.1", "q_hat": ["1.5", ...], a bin size
    true, a count 6976.0 or a shape ["1", 28, 28] loaded as the numbers they spell, where another JSON reader of the
    manifest (whose sha256 every certificate states) reads a string or a boolean; only sigma was strict ("sigma":
    true had loaded as 1.0), and a request's JSON is parsed strictly for the same reason. Now the manifest is
    validated with JSON's own types (an integer is still a valid float). Failed on the old code (each loaded)."""
    import json
    import shutil

    from models.bundle import DEFAULT_BUNDLE_DIR, BundleError, load_bundle

    root = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, root)
    manifest = json.loads((root / "manifest.json").read_text())
    node = manifest
    for key in where[:-1]:
        node = node[key]
    original, node[where[-1]] = node[where[-1]], value
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"(?s)does not match the bundle schema.*(valid number|valid integer)"):
        load_bundle(root, check_models=False)
    node[where[-1]], manifest["sigma"] = original, 1  # a JSON integer is a number: still loads
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(root, check_models=False).manifest.sigma == 1.0
