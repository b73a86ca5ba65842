"""ONNX export with a dynamic batch axis, checked against torch before the file is accepted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.backends import OnnxBackend


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, *, input_name: str = "input",
                output_name: str = "output", atol: float = 1e-4) -> Path:
    """Export ``module`` (eval mode, CPU) to ``path`` and verify onnxruntime matches torch on random inputs."""
    module = module.eval().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(module, example.cpu(), str(path), input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=17,
                      dynamo=False)
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 7):
        x = torch.rand((batch, *example.shape[1:]), generator=gen)
        with torch.no_grad():
            want = module(x).numpy()
        got = OnnxBackend(path, threads=1).forward(x.numpy())
        if got.shape != want.shape:
            raise RuntimeError(f"ONNX export of {path.name} does not match torch: output shape {got.shape} at batch "
                               f"{batch}, torch gives {want.shape}")
        if not np.allclose(got, want, atol=atol, rtol=1e-4):
            raise RuntimeError(f"ONNX export of {path.name} does not match torch (max diff {np.abs(got - want).max()})")
    return path
