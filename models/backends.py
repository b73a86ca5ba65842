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

    def __init__(self, path: str | os.PathLike | bytes, *, threads: int | None = None, device: str = "auto"):
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

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def noisy_predictions(self, images: np.ndarray, repeats: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
        """Arg-max class of each of sum(repeats) noisy copies (images[j] repeated repeats[j] times, in order)."""
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


def load_backend(path: str | os.PathLike, *, device: str = "auto", threads: int | None = None):
    """Backend for ``path``: ``.onnx`` -> onnxruntime, ``.pt``/``.ts`` (TorchScript) -> torch."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return OnnxBackend(path, threads=threads, device=device)
    if suffix in (".pt", ".ts"):
        return TorchScriptBackend(path, device=device)
    raise ValueError(f"unknown model format {suffix!r} for {path}: expected .onnx (onnxruntime) or .pt (TorchScript)")
