"""Review of the model backends (second pass): the PyTorch conversion must run the bundle's model, and the in-graph
noise wrapper must keep every part of the base graph."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models.backends import OnnxBackend
from models.sampling import SamplingEngine

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("onnx2torch") is not None
K = 10


def _nearest_resize_classifier(nearest_mode: str = "round_prefer_ceil") -> bytes:
    """(N, 1, 28, 28) -> Resize x1.5 (nearest, half_pixel, ``nearest_mode``) -> Flatten -> Gemm -> (N, 10) logits.
    ONNX's rounding modes are what TensorFlow exporters write for a nearest upsampling."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((K, 42 * 42)).astype(np.float32)
    nodes = [helper.make_node("Resize", ["input", "", "scales"], ["up"], mode="nearest", nearest_mode=nearest_mode,
                              coordinate_transformation_mode="half_pixel"),
             helper.make_node("Flatten", ["up"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w"], ["output"], transB=1, alpha=0.05)]
    graph = helper.make_graph(
        nodes, "resize_classifier", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", K])],
        initializer=[helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 1.5, 1.5]),
                     helper.make_tensor("w", TensorProto.FLOAT, list(weights.shape), weights.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.skipif(not HAS_TORCH, reason="torch and onnx2torch are not installed")
def test_a_torch_conversion_that_computes_another_function_is_refused():
    """The GPU path without onnxruntime-gpu runs the bundle's base.onnx converted by onnx2torch; the certificate names
    base.onnx's sha256. onnx2torch converts a nearest-mode Resize with ONNX's round_prefer_ceil rounding to torch's
    floor rounding (with only a UserWarning): for the same noise, about half of the noisy labels differed from
    onnxruntime's, so the counts (and certificates) were those of another classifier. TorchBackend.from_onnx now
    checks the converted module's logits against onnxruntime and refuses it. Run against the old code: no error;
    this test failed."""
    from models.torch_backend import TorchBackend, _onnx2torch_convert

    raw = _nearest_resize_classifier()
    ort = OnnxBackend(raw, device="cpu", threads=1)
    unchecked = TorchBackend(_onnx2torch_convert()(onnx.load_from_string(raw)), device="cpu")
    images = np.random.default_rng(1).random((8, 1, 28, 28), dtype=np.float32)
    sizes = np.full(8, 100, dtype=np.int64)
    same_noise = [b.noisy_predictions(images, sizes, 0.25, np.random.default_rng(2)) for b in (ort, unchecked)]
    assert np.mean(same_noise[0] != same_noise[1]) > 0.05  # the mismatch is real, on the smoothed classifier's inputs
    with pytest.raises(RuntimeError, match="does not compute its logits"):
        TorchBackend.from_onnx(raw, device="cpu")


@pytest.mark.skipif(not HAS_TORCH, reason="torch and onnx2torch are not installed")
def test_a_faithful_torch_conversion_is_accepted_and_counts_as_onnxruntime():
    """The check passes a conversion that is exact (torch's own rounding: round_prefer_floor with half_pixel), and
    that backend's counts equal onnxruntime's for the same seeded noise."""
    from models.torch_backend import TorchBackend

    raw = _nearest_resize_classifier("round_prefer_floor")
    backend = TorchBackend.from_onnx(raw, device="cpu")
    ort = OnnxBackend(raw, device="cpu", threads=1)
    images = np.random.default_rng(3).random((5, 1, 28, 28), dtype=np.float32)
    sizes = np.array([40, 0, 25, 100, 7])
    counts = [SamplingEngine(b, sigma=0.25, num_classes=K).count_chunks(images, sizes, np.random.default_rng(4))
              for b in (backend, ort)]
    assert counts[0].sum(axis=1).tolist() == sizes.tolist()
    assert np.abs(counts[0] - counts[1]).sum() <= 2  # fp32 rounding may flip a near-tie, nothing more


def test_in_graph_noise_keeps_the_base_models_local_functions():
    """A base model whose graph calls an ONNX model-local function (as onnxscript and newer exporters write) loads,
    verifies and serves on the CPU, but the in-graph noise wrapper (the CUDA provider's sampler) dropped the model's
    functions: onnxruntime refused the wrapped graph ("custom:Lin(-1) is not a registered function/op") and the
    service could not start on a GPU. Run here on the seeded CPU kernel (the same wrapper). Run against the old code:
    that error; this test failed."""
    rng = np.random.default_rng(5)
    lin = helper.make_function("custom", "Lin", ["x", "w", "b"], ["y"],
                               [helper.make_node("MatMul", ["x", "w"], ["t"]),
                                helper.make_node("Add", ["t", "b"], ["y"])],
                               opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("Lin", ["flat", "W", "B"], ["output"],
                                                                            domain="custom")],
        "with_function", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", K])],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, [784, K], rng.standard_normal(784 * K)),
                     helper.make_tensor("B", TensorProto.FLOAT, [K], np.zeros(K))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                              functions=[lin])
    model.ir_version = 8
    raw = model.SerializeToString()
    images = rng.random((3, 1, 28, 28), dtype=np.float32)
    clean = OnnxBackend(raw, device="cpu", threads=1).forward(images).argmax(1)
    wrapped = OnnxBackend(raw, device="cpu", threads=1, noise_sigma=1e-6, noise_in_graph=True, seed=3)
    labels = wrapped.noisy_predictions(images, np.array([4, 0, 6]), 1e-6, np.random.default_rng(0))
    assert labels.tolist() == [clean[0]] * 4 + [clean[2]] * 6


def _classifier_with_input(elem_type: int, *, second_input: bool = False) -> onnx.ModelProto:
    """(N, 1, 28, 28) of ``elem_type`` -> Cast to float -> Flatten -> MatMul -> (N, 10); optionally a second input."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Cast", ["input"], ["x32"], to=TensorProto.FLOAT),
             helper.make_node("Flatten", ["x32"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input", elem_type, ["N", 1, 28, 28])]
    if second_input:
        inputs.append(helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [1]))
        nodes.append(helper.make_node("Mul", ["logits", "temperature"], ["output"]))
    else:
        nodes.append(helper.make_node("Identity", ["logits"], ["output"]))
    graph = helper.make_graph(nodes, "typed", inputs, [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                                                                      ["N", K])],
                              initializer=[helper.make_tensor("W", TensorProto.FLOAT, [784, K],
                                                              rng.standard_normal(784 * K))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("elem_type, second_input", [(TensorProto.FLOAT16, False), (TensorProto.DOUBLE, False),
                                                     (TensorProto.UINT8, False), (TensorProto.FLOAT, True)])
def test_a_model_whose_input_is_not_one_float32_tensor_is_refused_saying_so(tmp_path, elem_type, second_input):
    """The server feeds the base model float32 pixels in [0, 1] plus float32 noise. A float16, float64 or uint8 input
    (or a second input) was refused at load as "a forward pass on a batch of 2 input(s) failed (the model needs a
    dynamic batch axis)": the wrong cause, for a model whose batch axis is dynamic. The refusal now names the input
    types found and the one expected. Run against the old code: the batch-axis message; this test failed."""
    from models.bundle import BundleError, create_bundle

    path = tmp_path / "typed.onnx"
    onnx.save(_classifier_with_input(elem_type, second_input=second_input), path)
    with pytest.raises(BundleError) as info:
        create_bundle(tmp_path / "bundle", base=path, sigma=0.25, input_shape=(1, 28, 28),
                      classes=[str(i) for i in range(K)])
    message = str(info.value)
    assert "expected exactly one float32 input" in message and "dynamic batch axis" not in message
    assert "'input' tensor(" in message
    assert not (tmp_path / "bundle" / "manifest.json").exists()


def test_a_float32_model_with_a_dynamic_batch_still_loads(tmp_path):
    from models.bundle import create_bundle

    path = tmp_path / "typed.onnx"
    onnx.save(_classifier_with_input(TensorProto.FLOAT), path)
    bundle = create_bundle(tmp_path / "bundle", base=path, sigma=0.25, input_shape=(1, 28, 28),
                           classes=[str(i) for i in range(K)])
    assert bundle.backend("base", device="cpu", threads=1).forward(np.zeros((3, 1, 28, 28), np.float32)).shape == (3, K)
