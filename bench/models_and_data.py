"""Test images and the base model that the worker and certs sections sample."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np


def load_test_images(limit: int) -> tuple[np.ndarray, np.ndarray]:
    from calibration.data import load_fashion_mnist_test

    images, labels = load_fashion_mnist_test()
    return images[:limit], labels[:limit]


def load_sampler_backend(args):
    """(bundle, backend, description) of the base model the worker/certs sections sample."""
    from models.backends import OnnxBackend, load_backend
    from models.bundle import load_bundle

    bundle = load_bundle(args.bundle) if args.bundle else load_bundle()
    threads = args.threads or None
    if args.sampler and Path(args.sampler).suffix.lower() == ".onnx":
        # not load_backend(): it does not pass noise_sigma, which the CUDA provider's in-graph noise requires
        backend = OnnxBackend(args.sampler, threads=threads, device=args.device, noise_sigma=bundle.manifest.sigma,
                              spin=False)  # as the server's sampler
        source = args.sampler
    elif args.sampler:
        backend = load_backend(args.sampler, device=args.device, threads=threads)
        source = args.sampler
    else:
        backend = bundle.backend("base", device=args.device, threads=threads, spin=False)  # as the server's sampler
        source = f"{bundle.root.name}/base.onnx"
    if backend.device == "cuda":
        source += f"` on `{gpu_name()}"
    return bundle, backend, source


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check=False,
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown GPU"


def make_sampling_engine(args, bundle, backend):
    from models.sampling import SamplingEngine

    from models.defaults import default_batch_size

    batch = args.batch_size or default_batch_size(backend.device)
    engine = SamplingEngine(backend, sigma=bundle.manifest.sigma, num_classes=len(bundle.manifest.classes),
                            batch_size=batch)
    shape = tuple(bundle.manifest.input.shape)
    engine.warm_up(np.full(shape, 0.5, dtype=np.float32), np.random.default_rng(0))  # as the service: every shape
    return engine


def clean_argmax(backend, images: np.ndarray, chunk: int = 1000) -> np.ndarray:
    return np.concatenate([backend.forward(images[i:i + chunk]).argmax(axis=1) for i in range(0, len(images), chunk)])


def server_class_and_prior(bundle, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The service's tested class and Beta prior (:func:`models.priors.class_and_prior`), from clean passes only."""
    from models.priors import class_and_prior

    base, sur, meta = (bundle.backend(role, threads=1, device="cpu") if bundle.path(role) else None
                       for role in ("base", "surrogate", "meta"))
    return class_and_prior(base, sur, meta, images)
