"""Training loops (torch): the noise-trained base classifier and the RRISE surrogate.

Base (Cohen et al.): cross-entropy on x + e, e ~ N(0, sigma^2 I) in pixel space (no clipping), fresh noise every
step. Surrogate (RRISE): soft-label cross-entropy of the CLEAN image against the Monte-Carlo class distribution
counts / n of the base model under noise, so one forward pass approximates the smoothed classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from models.networks import SmallCNN


def pick_device(device: str = "auto") -> str:
    """``auto``: cuda where torch finds a GPU, else cpu; ``cuda`` without one is a ValueError (it was torch's
    AssertionError "Torch not compiled with CUDA enabled" at the first training step: a traceback)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch finds no usable CUDA GPU (torch.cuda.is_available() is False); "
                         "pass --device cpu or auto")
    return device


def _loop(model: nn.Module, x: np.ndarray, targets: np.ndarray, loss_fn: Callable, *, epochs: int, batch_size: int,
          lr: float, seed: int, device: str, desc: str, transform: Callable | None = None) -> nn.Module:
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    x_dev = torch.as_tensor(x, device=device)
    t_dev = torch.as_tensor(targets, device=device)
    bar = tqdm(total=steps, desc=desc, unit="step", leave=False, mininterval=2.0)
    for _ in range(epochs):
        order = torch.as_tensor(gen.permutation(len(x)), device=device)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            xb = x_dev[idx]
            if transform is not None:
                xb = transform(xb)
            loss = loss_fn(model(xb), t_dev[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


def train_base(x: np.ndarray, y: np.ndarray, *, num_classes: int, sigma: float, epochs: int = 12,
               batch_size: int = 256, lr: float = 3e-3, seed: int = 0, device: str = "auto") -> SmallCNN:
    """A SmallCNN trained with Gaussian noise augmentation at ``sigma`` (Cohen et al. 2019)."""
    device = pick_device(device)
    c, h, w = x.shape[1:]
    torch.manual_seed(seed)  # the initial weights too, so a rerun is reproducible
    model = SmallCNN(c, num_classes, h, w)

    def add_noise(xb):
        return xb + sigma * torch.randn_like(xb)

    return _loop(model, x, y.astype(np.int64), nn.functional.cross_entropy, epochs=epochs, batch_size=batch_size,
                 lr=lr, seed=seed, device=device, desc="base", transform=add_noise)


def train_surrogate(x: np.ndarray, counts: np.ndarray, *, init: nn.Module | None = None, epochs: int = 15,
                    batch_size: int = 256, lr: float = 2e-3, seed: int = 1, device: str = "auto",
                    width_mult: int = 32) -> SmallCNN:
    """Surrogate of the smoothed classifier: soft-label cross-entropy against counts / counts.sum(1) on clean x."""
    device = pick_device(device)
    c, h, w = x.shape[1:]
    num_classes = counts.shape[1]
    torch.manual_seed(seed)
    model = SmallCNN(c, num_classes, h, w, width_mult=width_mult)
    if init is not None:
        model.load_state_dict({k: v.detach().cpu() for k, v in init.state_dict().items()})
    total = counts.sum(axis=1, keepdims=True)
    if not np.all(total > 0):  # a row of no counted sample would be a NaN label: NaN weights, a failed export
        raise ValueError(f"the base model predicted no class on any noisy copy of {int(np.sum(total <= 0))} of the "
                         f"{len(counts)} surrogate-train images (NaN logits: inputs are pixels plus Gaussian noise, "
                         "outside [0, 1]); a base model must give finite logits for noisy inputs")
    soft = (counts / total).astype(np.float32)

    def soft_ce(logits, q):
        return -(q * nn.functional.log_softmax(logits, dim=1)).sum(dim=1).mean()

    return _loop(model, x, soft, soft_ce, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                 desc="surrogate")


def check_trainable(input_shape) -> None:
    """ValueError unless SmallCNN (base and surrogate) can take images of ``input_shape`` (C, H, W): its two 2 x 2
    max-pools need H and W of at least 4 (smaller images failed mid-training with torch's traceback)."""
    if min(input_shape[1:]) < 4:
        raise ValueError(f"images of shape {tuple(input_shape)} (C, H, W) are too small for the networks trained "
                         "here (base, surrogate): H and W must be at least 4")


def save_torchscript(model: nn.Module, example: torch.Tensor, path) -> None:
    model = model.eval()
    device = next(model.parameters()).device
    torch.jit.trace(model, example.to(device)).save(str(path))
