"""Bundle loading review: what the loader must refuse (with a message that says so) and what the CPU samplers must
never count. Every model here is a small hand-built ONNX graph (onnx.helper) or a tiny torch export; everything is
seeded. Every test below failed on the loader/backends before this review (2026-12-06) but two guards that passed
before and after: the in-graph wrapper's labels on finite logits (its NaN guard changes nothing there) and the
statistical check of the noise (scale, independence, per-chunk counts) on both CPU paths.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.bundle import DEFAULT_BUNDLE_DIR, BundleError, create_bundle, load_bundle
from models.sampling import SamplingEngine

CLASSES = [str(i) for i in range(10)]
HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("onnx2torch") is not None


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, dst)
    return dst


def _edit_manifest(root: Path, edit=None, text=None) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    if edit is not None:
        edit(manifest)
    body = json.dumps(manifest, indent=2)
    path.write_text(text(body) if text else body)


def _model(path: Path, *, k: int = 10, sqrt: bool = False, out_type=None, extra_output: bool = False,
           output_shape=("N", 10), seed: int = 0) -> Path:
    """input (N, 1, 28, 28) -> [sqrt] -> flatten -> MatMul (784, k) -> [Squeeze] -> [Cast] -> output; ``sqrt``: NaN
    logits as soon as one noisy pixel is negative; ``output_shape=None``: squeezed, an output of unknown rank."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((784, k)).astype(np.float32) * 0.05
    x, nodes = "input", []
    if sqrt:
        nodes.append(helper.make_node("Sqrt", [x], ["root"]))
        x = "root"
    nodes += [helper.make_node("Reshape", [x, "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["z"])]
    y = "z"
    if output_shape is None:  # Squeeze without axes: every axis of size 1 goes, the batch axis too at N = 1; the
        nodes.append(helper.make_node("Squeeze", [y], ["squeezed"]))  # output's rank is unknown to onnxruntime
        y = "squeezed"
    if out_type is not None:
        nodes.append(helper.make_node("Cast", [y], ["cast"], to=out_type))
        y = "cast"
    nodes.append(helper.make_node("Identity", [y], ["output"]))
    outs = [helper.make_tensor_value_info("output", out_type or TensorProto.FLOAT,
                                          None if output_shape is None else list(output_shape))]
    if extra_output:
        nodes.append(helper.make_node("Identity", ["flat"], ["pixels"]))
        outs.append(helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 784]))
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])], outs,
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([-1, 784], np.int64), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


# ----------------------------------------------------------------------------------------------------- the manifest
@pytest.mark.parametrize("value, fragment", [("1e999", "finite number"), ("Infinity", "finite number"),
                                             ("true", "valid number"), ('"0.25"', "valid number")])
def test_sigma_must_be_a_finite_json_number(bundle_copy, value, fragment):
    """sigma = 1e999 (inf) verified and then failed the server at start-up inside its engine ("sigma must be a finite
    number > 0"); "sigma": true loaded as sigma 1.0. Both loaded on the old loader."""
    _edit_manifest(bundle_copy, text=lambda body: body.replace('"sigma": 0.25', f'"sigma": {value}'))
    with pytest.raises(BundleError, match=fragment):
        load_bundle(bundle_copy, check_models=False)


def test_a_key_twice_in_the_manifest_is_refused(bundle_copy):
    """json keeps the last of two equal keys ("sigma": 0.25, "sigma": 0.5 served sigma 0.5) while the first is what a
    reader sees, and other JSON readers keep the first: the manifest's sha256 then vouches for two readings. The old
    loader served the last."""
    _edit_manifest(bundle_copy, text=lambda body: body.replace('"sigma": 0.25', '"sigma": 0.25, "sigma": 0.5'))
    with pytest.raises(BundleError, match="'sigma' appears twice"):
        load_bundle(bundle_copy, check_models=False)


@pytest.mark.parametrize("value_range", [[0, 255], [-1, 1], [1, 0]])
def test_a_value_range_the_server_does_not_feed_is_refused(bundle_copy, value_range):
    """The server checks and feeds pixels in [0, 1] whatever input.value_range says: a manifest declaring [0, 255]
    loaded and was served [0, 1] pixels. The old loader accepted any pair."""
    _edit_manifest(bundle_copy, lambda m: m["input"].__setitem__("value_range", value_range))
    with pytest.raises(BundleError, match=r"value_range must be \[0, 1\]"):
        load_bundle(bundle_copy, check_models=False)


# ------------------------------------------------------------------------------------------------------ the models
@pytest.mark.parametrize("kind, fragment", [("two_outputs", "has 2 outputs"), ("int64", "int64 values"),
                                            ("bool", "bool values")])
def test_a_base_model_that_is_not_one_float_logits_output_is_refused(tmp_path, kind, fragment):
    """A second graph output (served from the first on the CPU; the CUDA in-graph wrapper refuses it at start-up) and
    integer or boolean "logits" (ties broken by index; ArgMax has no bool kernel) loaded on the old loader."""
    from onnx import TensorProto

    out_type = {"int64": TensorProto.INT64, "bool": TensorProto.BOOL}.get(kind)
    path = _model(tmp_path / "m.onnx", out_type=out_type, extra_output=kind == "two_outputs")
    with pytest.raises(BundleError, match=fragment):
        create_bundle(tmp_path / "b", base=path, sigma=0.25, input_shape=(1, 28, 28), classes=CLASSES)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_a_model_whose_batch_axis_vanishes_at_batch_one_is_refused(tmp_path):
    """torch's ``.squeeze()`` after global pooling exports (dynamic batch) as (N, K) for N > 1 but (K,) for N = 1.
    The probe ran a batch of 2 only: the bundle verified, then the server failed at start-up (its clean pass on one
    image: numpy AxisError in models.priors.softmax). Refused now by a probe of batch 1 too."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.pool = torch.nn.Conv2d(1, 10, 3), torch.nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.conv(x)).squeeze()

    path = tmp_path / "squeeze.onnx"
    torch.onnx.export(Net(), torch.zeros(2, 1, 28, 28), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False, opset_version=17)
    with pytest.raises(BundleError, match=r"a batch of 1 input\(s\) gives outputs of shape \(10,\)"):
        create_bundle(tmp_path / "b", base=path, sigma=0.25, input_shape=(1, 28, 28), classes=CLASSES)


def test_an_output_of_unknown_rank_is_refused_for_its_shape_not_as_external_data(tmp_path):
    """OnnxBackend read ``out.shape[-1]`` of an output whose rank onnxruntime cannot infer (shape []) and raised
    IndexError, which the loader reported as "not a loadable ONNX model (weights in separate files, ONNX external
    data, ...): list index out of range", a reason the model does not have. Its real defect (a Squeeze that drops the
    batch axis at batch 1) is named now; the backend itself loads."""
    from models.backends import OnnxBackend

    path = _model(tmp_path / "m.onnx", output_shape=None)
    assert OnnxBackend(path.read_bytes(), device="cpu", threads=1).num_outputs is None
    with pytest.raises(BundleError) as info:
        create_bundle(tmp_path / "b", base=path, sigma=0.25, input_shape=(1, 28, 28), classes=CLASSES)
    assert "external data" not in str(info.value) and "gives outputs of shape (10,)" in str(info.value)


# ---------------------------------------------------------------------------------------- NaN logits under noise
def _nan_backends(tmp_path):
    """(name, backend) pairs of every CPU path over a model with finite clean logits and NaN noisy logits."""
    from models.backends import OnnxBackend

    path = _model(tmp_path / "sqrt.onnx", sqrt=True, seed=3)
    raw = path.read_bytes()
    found = [("onnxruntime-host", OnnxBackend(raw, device="cpu", threads=1)),
             ("onnxruntime-in-graph-seeded", OnnxBackend(raw, device="cpu", threads=1, noise_sigma=0.25,
                                                         noise_in_graph=True, seed=7))]
    if HAS_TORCH:
        from models.torch_backend import TorchBackend

        found.append(("torch-cpu", TorchBackend.from_onnx(raw, device="cpu")))
    return found


def test_nan_logits_under_noise_count_for_no_class(tmp_path):
    """A base model whose logits are finite on the clean image but NaN under noise (here sqrt of the pixels) was
    counted as class 0 on the host paths (numpy's and torch's argmax take the first NaN as the maximum; onnxruntime's
    ArgMax skips NaN): mode=cohen then certified class 0 at radius 0.55 (sigma 0.25, 500 samples) for an image whose
    clean class is 8 and whose every noisy prediction was NaN. Every CPU path now counts such a copy for no class (a
    miss for the tested class): here both chunks of the batch are all-NaN and count nothing, and Cohen's certify on
    those counts abstains (that finite chunks of the same batch keep their counts is the next test's). Run against
    the old code: class-0 counts; this test failed."""
    from smoothing import certify

    image = np.full((1, 1, 28, 28), 0.5, np.float32)
    for name, backend in _nan_backends(tmp_path):
        assert np.isfinite(backend.forward(image)).all(), name
        engine = SamplingEngine(backend, sigma=0.25, num_classes=10, batch_size=64)
        counts = engine.count(np.repeat(image, 2, axis=0), np.array([50, 30]), np.random.default_rng(0))
        assert counts.shape == (2, 10) and not counts.any(), (name, counts)
        assert certify(counts[0], counts[1], 0.001, 0.25, trials=30).class_index == -1, name


def test_a_nan_copy_is_a_miss_and_finite_copies_of_the_same_batch_still_count():
    """The tally drops NAN_LABEL (-1) for no class and counts every other label for its own chunk; any other
    negative label or one >= K is refused (it would be misattributed)."""
    from models.sampling import tally_chunks

    preds = np.array([2, -1, 2, 0, -1, 1])
    assert tally_chunks(preds, np.array([3, 3]), 3).tolist() == [[0, 0, 2], [1, 1, 0]]
    for bad in (np.array([-2, 0]), np.array([3, 0])):
        with pytest.raises(ValueError, match="predicted class"):
            tally_chunks(bad, np.array([2]), 3)


def test_cohen_certify_counts_samples_of_no_class_as_misses():
    """certify(..., trials=n): n estimation samples of which some counted for no class (NaN logits). Without trials
    the counts' sum (6) would be n, and 6 hits of 6 a bound far above the true rate 6/10."""
    from smoothing import certify, clopper_pearson_lower

    sel, est = np.array([5, 0]), np.array([6, 0])
    assert certify(sel, est, 0.01, 0.25, trials=10).p_lower == clopper_pearson_lower(6, 10, 0.01)
    assert certify(sel, est, 0.01, 0.25).p_lower == clopper_pearson_lower(6, 6, 0.01)
    with pytest.raises(ValueError, match="trials"):
        certify(sel, est, 0.01, 0.25, trials=5)


def test_in_graph_labels_follow_argmax_when_logits_are_finite(tmp_path):
    """The NaN guard of the in-graph wrapper leaves finite rows alone: same labels as the host path at sigma ~0."""
    from models.backends import OnnxBackend

    raw = _model(tmp_path / "m.onnx", seed=5).read_bytes()
    images = np.random.default_rng(1).random((4, 1, 28, 28), dtype=np.float32)
    wrapped = OnnxBackend(raw, device="cpu", threads=1, noise_sigma=1e-7, noise_in_graph=True, seed=3)
    labels = wrapped.noisy_predictions(images, np.array([3, 1, 2, 2]), 1e-7, np.random.default_rng(0))
    clean = OnnxBackend(raw, device="cpu", threads=1).forward(images).argmax(axis=1)
    assert labels.tolist() == np.repeat(clean, [3, 1, 2, 2]).tolist()


# ------------------------------------------------------------------------------------------- the noise (a guard)
def _sum_model() -> bytes:
    """logits (N, 2) = [sum of the 784 pixels, 392]: class 0 iff the noisy sum exceeds 392."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceSum", ["input", "axes"], ["s"], keepdims=0),
             helper.make_node("Unsqueeze", ["s", "one"], ["s1"]),
             helper.make_node("Mul", ["s1", "zero"], ["z"]), helper.make_node("Add", ["z", "c"], ["cc"]),
             helper.make_node("Concat", ["s1", "cc"], ["output"], axis=1)]
    inits = [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.array(392.0, np.float32), "c")]
    graph = helper.make_graph(nodes, "sum",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def test_noise_is_iid_at_sigma_and_each_chunk_gets_its_own_counts():
    """Guard (passed before and after this review). With e ~ N(0, sigma^2 I) i.i.d. over 784 pixels, the noisy sum
    of image j (all pixels v_j) exceeds 392 with probability Phi(d_j), v_j = 0.5 + d_j * 28 sigma / 784; a wrong scale,
    pixels sharing noise, or counts tallied for a neighbouring chunk move these rates by far more than 5 standard
    errors. Chunks straddle batches (batch 700); the dispersion of 200 chunks of 20 copies checks independence
    between copies. Both CPU paths: onnxruntime host noise and torch on the CPU."""
    from scipy.stats import norm

    from models.backends import OnnxBackend

    sigma = 0.25
    d = np.array([-1.0, 0.0, 0.5, 1.5, 2.5])
    v = (0.5 + d * math.sqrt(784) * sigma / 784).astype(np.float32)
    images = np.ones((len(d), 1, 28, 28), np.float32) * v[:, None, None, None]
    want = norm.cdf(d)
    n = np.array([3000, 2000, 4000, 2500, 3000])
    backends = [OnnxBackend(_sum_model(), device="cpu", threads=1)]
    if HAS_TORCH:
        from models.torch_backend import TorchBackend

        backends.append(TorchBackend.from_onnx(_sum_model(), device="cpu"))
    for backend in backends:
        engine = SamplingEngine(backend, sigma=sigma, num_classes=2, batch_size=700)
        counts = engine.count(images, n, np.random.default_rng(1))
        assert counts.sum(axis=1).tolist() == n.tolist(), backend.name
        z = (counts[:, 0] / n - want) / np.sqrt(want * (1 - want) / n)
        assert np.all(np.abs(z) < 5), (backend.name, z)
        order = [4, 0, 2]  # one call, chunks out of order: each row is its own image's
        mixed = engine.count_chunks(images[order], np.array([1500, 1000, 1200]), np.random.default_rng(2))
        sizes = np.array([1500, 1000, 1200])
        z = (mixed[:, 0] / sizes - want[order]) / np.sqrt(want[order] * (1 - want[order]) / sizes)
        assert np.all(np.abs(z) < 5), (backend.name, z)
        same = np.repeat(images[1:2], 200, axis=0)
        hits = engine.count_chunks(same, np.full(200, 20), np.random.default_rng(3))[:, 0]
        ratio = hits.var() / (20 * 0.25)  # binomial variance at p = 1/2; copies that shared noise would inflate it
        assert 0.7 < ratio < 1.35, (backend.name, ratio)
