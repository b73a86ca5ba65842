"""Inference backends: onnxruntime (CUDA provider when present, CPU otherwise) and TorchScript on a GPU.

A backend does two things: ``forward`` (clean logits for a batch) and ``noisy_predictions`` (arg-max classes of
``x_j + N(0, sigma^2 I)`` for a batch assembled from several images, noise drawn where the model runs). The noise
of each call comes from the caller's generator, so sampling is i.i.d. across calls and, for a seeded generator,
reproducible (the calibration pipeline's resumable counts rely on that).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class OnnxBackend:
    """onnxruntime session over an ONNX classifier with input (N, C, H, W) float32 pixels in [0, 1]."""

    def __init__(self, path: str | os.PathLike | bytes, *, threads: int | None = None, device: str = "auto",
                 noise_sigma: float | None = None, noise_in_graph: bool | None = None, seed: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        if device == "cuda" and not want_cuda:
            raise RuntimeError("device='cuda' requested but onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        source = str(path) if isinstance(path, (str, os.PathLike)) else path
        self.session = ort.InferenceSession(source, opts, providers=providers)
        self.device = "cuda" if want_cuda else "cpu"
        self.name = f"onnxruntime-{self.device}"
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(inp.shape)  # (batch-dim name, C, H, W)
        out = self.session.get_outputs()[0]
        self.output_name = out.name
        self.num_outputs = out.shape[-1] if isinstance(out.shape[-1], int) else None
        # On a GPU the noise is drawn inside the graph, on the device: only clean images and indices cross the bus.
        in_graph = (self.device == "cuda" and noise_sigma is not None) if noise_in_graph is None else noise_in_graph
        self._noisy_session = None
        if in_graph:
            if noise_sigma is None:
                raise ValueError("noise_sigma is required to draw the noise inside the graph")
            model = noisy_argmax_model(source, noise_sigma, seed=seed)
            self._noisy_session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
            self._noise_sigma = float(noise_sigma)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def noisy_predictions(self, images: np.ndarray, repeats: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
        """Arg-max class of each of sum(repeats) noisy copies (images[j] repeated repeats[j] times, in order).

        Host noise comes from ``rng`` (reproducible for a seeded generator). In-graph noise (CUDA) comes from the
        session's own generator, seeded once at load: i.i.d. and fresh on every call, but not replayable from ``rng``.
        """
        if self._noisy_session is not None:
            if float(sigma) != self._noise_sigma:
                raise ValueError(f"this session draws noise at sigma={self._noise_sigma}, asked for {sigma}")
            index = np.repeat(np.arange(len(images), dtype=np.int64), repeats)
            return self._noisy_session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32),
                                                  "index": index})[0]
        batch = np.repeat(np.asarray(images, dtype=np.float32), repeats, axis=0)
        batch += rng.standard_normal(batch.shape, dtype=np.float32) * np.float32(sigma)
        return self.forward(batch).argmax(axis=1)


class TorchScriptBackend:
    """A TorchScript classifier on CUDA (or CPU); noise is generated on the device with torch's generator."""

    def __init__(self, path: str | os.PathLike, *, device: str = "auto"):
        import torch

        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.name = f"torch-{device}"
        self.module = torch.jit.load(str(path), map_location=device).eval()
        self.num_outputs = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.module(self.torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)).float().cpu().numpy()

    def noisy_predictions(self, images: np.ndarray, repeats: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
        torch = self.torch
        gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(0, 2**63 - 1)))
        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(images, dtype=np.float32), device=self.device)
            idx = torch.as_tensor(np.repeat(np.arange(len(images)), repeats), device=self.device)
            batch = x[idx]
            batch += torch.randn(batch.shape, generator=gen, device=self.device) * sigma
            return self.module(batch).argmax(dim=1).cpu().numpy()


def noisy_argmax_model(source, sigma: float, *, seed: int | None = None):
    """ONNX graph (images (J,C,H,W), index (B,)) -> arg-max labels (B,) of f(images[index] + N(0, sigma^2 I)).

    The base graph is embedded unchanged after a Gather and a RandomNormalLike; ArgMax follows its logits.
    RandomNormalLike draws fresh i.i.d. noise on every run (its generator advances between calls).
    """
    import onnx
    from onnx import TensorProto, helper

    base = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    graph = base.graph
    initializer_names = {init.name for init in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in initializer_names]
    if len(real_inputs) != 1 or len(graph.output) != 1:
        raise ValueError("the base model must have exactly one input and one output")
    inp, out = real_inputs[0], graph.output[0]
    shape = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    prefix = "certserve_noise_"
    attrs = {"dtype": TensorProto.FLOAT, "mean": 0.0, "scale": float(sigma)}
    if seed is not None:
        attrs["seed"] = float(seed % (2**24))
    nodes = [
        helper.make_node("Gather", ["images", "index"], [prefix + "clean"], axis=0),
        helper.make_node("RandomNormalLike", [prefix + "clean"], [prefix + "noise"], **attrs),
        helper.make_node("Add", [prefix + "clean", prefix + "noise"], [inp.name]),
        *graph.node,
        helper.make_node("ArgMax", [out.name], ["labels"], axis=1, keepdims=0),
    ]
    new_graph = helper.make_graph(
        nodes, "certserve_noisy_argmax",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["J", *shape[1:]]),
         helper.make_tensor_value_info("index", TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info("labels", TensorProto.INT64, ["B"])],
        initializer=list(graph.initializer), value_info=list(graph.value_info))
    model = helper.make_model(new_graph, opset_imports=list(base.opset_import), ir_version=base.ir_version)
    onnx.checker.check_model(model)
    return model


def load_backend(path: str | os.PathLike, *, device: str = "auto", threads: int | None = None):
    """Backend for ``path``: ``.onnx`` -> onnxruntime, ``.pt``/``.ts`` (TorchScript) -> torch."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return OnnxBackend(path, threads=threads, device=device)
    if suffix in (".pt", ".ts"):
        return TorchScriptBackend(path, device=device)
    raise ValueError(f"unknown model format {suffix!r} for {path}: expected .onnx (onnxruntime) or .pt (TorchScript)")
