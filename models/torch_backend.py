"""PyTorch backend for any bundle: the bundle's ``base.onnx`` converted to a torch module (onnx2torch), or a
TorchScript file, on a CUDA device (or the CPU, where the tests check it against onnxruntime).

On the device, one batch is: gather the chunk images, draw e ~ N(0, sigma^2 I) (on CUDA by a Philox generator
reseeded per batch from the caller's generator; on the CPU by the caller's numpy generator itself), run the
model in float32 (TF32 off: the certificate is about the bundle's fp32 model, not a lower-precision twin), arg-max,
and reduce the labels to per-chunk counts with one ``scatter_add``; only the (J, K) counts are copied back, into
pinned memory, asynchronously. :meth:`TorchBackend.launch_counts` returns at once; the engine overlaps its
bookkeeping with the device and reads the counts when it needs them. On CUDA a batch runs at a bucketed size
(:func:`models.backends.padded_batch_size`, at most the engine's batch size: the extra copies are drawn and
discarded), so ``cudnn.benchmark`` tunes a few shapes instead of one per batch size.

torch is optional for serving (the CPU image has none): it is imported when this backend is built, never before.
"""

from __future__ import annotations

import os
import sys
import time
import types

import numpy as np

from models.backends import padded_batch_size


class TorchBackend:
    """A torch module on ``device``; see the module docstring. ``name`` is ``torch-<device>``."""

    def __init__(self, module, *, device: str, pad_batches: bool | None = None):
        import torch

        self.torch = torch
        self.device = device
        #: batches run at models.backends.padded_batch_size (default on CUDA: cudnn.benchmark tunes once per shape)
        self.pad_batches = device.startswith("cuda") if pad_batches is None else bool(pad_batches)
        self.pad_limit: int | None = None  # at most this many rows (models.sampling.SamplingEngine: its batch size)
        self.name = f"torch-{device}"
        self.num_outputs = None
        if device.startswith("cuda"):
            torch.backends.cudnn.allow_tf32 = False  # exact fp32 convolutions and matmuls: the bundle's model
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
        self.module = module.to(device).eval()
        self._gen = torch.Generator(device=device) if device.startswith("cuda") else None  # CPU noise: see _noise

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_onnx(cls, path: str | os.PathLike | bytes, *, device: str = "cuda") -> TorchBackend:
        """The ONNX graph (a file, or its bytes) converted op by op by onnx2torch; weights are copied exactly. The
        converted module must compute the graph's logits (:func:`verify_conversion`, against onnxruntime on the CPU),
        else RuntimeError: a certificate names the sha256 of the ONNX model, so it must be that model that is run."""
        convert = _onnx2torch_convert()
        if isinstance(path, bytes):
            import onnx

            backend = cls(convert(onnx.load_from_string(path)), device=device)
        else:
            backend = cls(convert(str(path)), device=device)
        from models.backends import OnnxBackend

        verify_conversion(backend, OnnxBackend(path, threads=1, device="cpu"))
        return backend

    @classmethod
    def from_torchscript(cls, path: str | os.PathLike, *, device: str = "cuda") -> TorchBackend:
        import torch

        return cls(torch.jit.load(str(path), map_location=device), device=device)

    # ------------------------------------------------------------------------------------------ inference
    def forward(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.module(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=self.device))
            return out.float().cpu().numpy()

    def noisy_predictions(self, images: np.ndarray, repeats: np.ndarray, sigma: float, rng) -> np.ndarray:
        """Arg-max class of each of sum(repeats) noisy copies (images[j] repeated repeats[j] times, in order)."""
        with self.torch.inference_mode():
            _, labels = self._noisy_labels(images, np.asarray(repeats, dtype=np.int64), sigma, rng)
            return labels.cpu().numpy()

    def launch_counts(self, images: np.ndarray, sizes: np.ndarray, sigma: float, rng, num_classes: int):
        """Start one batch; returns a pending whose ``result()`` is the (J, K) counts. A label outside [0, K) is
        tallied in an extra column and refused at ``result()`` (never counted for another chunk's job)."""
        torch = self.torch
        cuda = self.device.startswith("cuda")
        t0 = time.perf_counter()
        start = end = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        with torch.inference_mode():
            owner, labels = self._noisy_labels(images, sizes, sigma, rng)
            k = int(num_classes)
            # columns: the K classes, then k: a class >= K (refused at read), then k + 1: no class (NaN logits; a
            # miss for every class, as models.sampling.tally_chunks counts it)
            flat = owner * (k + 2) + torch.where(labels < 0, k + 1, torch.clamp(labels, max=k))
            counts = torch.zeros(len(sizes) * (k + 2), dtype=torch.int64, device=self.device)
            counts.scatter_add_(0, flat, torch.ones_like(flat))
            host = torch.empty(counts.shape, dtype=torch.int64, pin_memory=cuda)
            host.copy_(counts, non_blocking=cuda)
        if cuda:
            end.record()
        return _TorchPending(host, (len(sizes), k), end, start, time.perf_counter() - t0)

    def _noisy_labels(self, images, sizes, sigma, rng):
        torch = self.torch
        x = self._to_device(np.ascontiguousarray(images, dtype=np.float32))
        total = int(sizes.sum())
        owner = torch.repeat_interleave(torch.arange(len(sizes), device=self.device),
                                        self._to_device(np.ascontiguousarray(sizes, dtype=np.int64)),
                                        output_size=total)  # output_size: no device -> host sync
        rows = padded_batch_size(total, self.pad_limit) if self.pad_batches else total
        noise = self._noise((rows, *x.shape[1:]), rng)  # rows beyond total: copies of image 0, discarded below
        index = owner if rows == total else torch.nn.functional.pad(owner, (0, rows - total))  # padding: image 0
        batch = noise.mul_(float(sigma)).add_(x.index_select(0, index))
        logits = self.module(batch)[:total]  # a row with a NaN has no class (torch.argmax would pick the NaN's): -1
        return owner, logits.argmax(dim=1).masked_fill_(logits.isnan().any(dim=1), -1)

    def _noise(self, shape: tuple, rng):
        """N(0, I) noise of ``shape`` for one batch. On CUDA: drawn on the device by a Philox generator reseeded per
        batch from ``rng`` (63 bits, all kept by Philox), read at launch, so reseeding for the next batch never alters
        this one. On the CPU: drawn from ``rng`` itself on the host, as onnxruntime's backend does (torch's CPU
        generator, mt19937, keeps only 32 bits of a seed: batches reseeded from 63-bit draws would share 2^32 streams,
        and one repeats after ~77k batches)."""
        torch = self.torch
        if not self.device.startswith("cuda"):
            gen = rng if rng is not None else np.random.default_rng()
            return torch.from_numpy(gen.standard_normal(shape, dtype=np.float32))
        seed = int(rng.integers(0, 2**63 - 1)) if rng is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self._gen.manual_seed(seed)
        return torch.randn(shape, generator=self._gen, device=self.device)

    def _to_device(self, array: np.ndarray):
        """Host array -> device tensor without blocking the host: a pageable copy would wait for every kernel
        already queued (the previous batch), so copies go through pinned memory, asynchronously."""
        t = self.torch.from_numpy(array)
        if self.device.startswith("cuda"):
            return t.pin_memory().to(self.device, non_blocking=True)
        return t


def verify_conversion(backend: TorchBackend, reference, *, rtol: float = 1e-3) -> None:
    """RuntimeError unless ``backend`` (a converted module) gives the logits of ``reference`` (onnxruntime on the
    CPU, the same ONNX model) on probe inputs: clean ones in [0, 1] and noisy ones (the smoothed classifier's
    inputs), within ``rtol`` of the logits' scale (far above fp32 rounding across devices, far below a different
    function). onnx2torch converts some ops to another function with only a UserWarning: a nearest-mode Resize whose
    rounding is not torch's (round_prefer_ceil; round_prefer_floor with asymmetric coordinates) moved logits by
    ~0.9 and flipped classes."""
    shape = tuple(reference.input_shape[1:])
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise RuntimeError(f"cannot check the PyTorch conversion of a model whose input shape {shape} is not fixed")
    rng = np.random.default_rng(0)
    clean = rng.random((6, *shape), dtype=np.float32)
    sigma = np.array([0.12, 0.25, 0.5, 1.0, 0.25, 0.5], dtype=np.float32).reshape(-1, *[1] * len(shape))
    noisy = clean + rng.standard_normal(clean.shape, dtype=np.float32) * sigma
    probes = np.concatenate([clean, noisy, np.zeros((1, *shape), np.float32), np.ones((1, *shape), np.float32)])
    want = np.asarray(reference.forward(probes), dtype=np.float64)
    got = np.asarray(backend.forward(probes), dtype=np.float64)
    finite = want[np.isfinite(want)]
    scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=rtol * scale, equal_nan=True):
        gap = f"shape {got.shape} vs {want.shape}"
        if got.shape == want.shape:
            diff = np.abs(got - want)
            diff[np.isnan(got) != np.isnan(want)] = np.inf  # NaN on one side only
            gap = float(np.nanmax(diff))
        raise RuntimeError(f"the PyTorch conversion (onnx2torch) of this ONNX model does not compute its logits "
                           f"(largest difference from onnxruntime on probe inputs: {gap}; logits up to {scale:.3g}): "
                           "it would certify another classifier than the bundle's. Run the model with onnxruntime "
                           "(onnxruntime-gpu on a GPU, or device cpu)")


class _TorchPending:
    """Counts on their way to pinned host memory; ``result()`` waits for the copy (CUDA event) and checks them."""

    def __init__(self, host, shape, end, start, launch_seconds: float):
        self._host, self._shape, self._end, self._start = host, shape, end, start
        self.model_seconds = launch_seconds

    def done(self) -> bool:
        return self._end is None or self._end.query()

    def wait(self) -> None:
        if self._end is not None:
            self._end.synchronize()

    def result(self) -> np.ndarray:
        self.wait()
        if self._end is not None:
            self.model_seconds = self._start.elapsed_time(self._end) / 1e3
        j, k = self._shape
        counts = self._host.numpy().reshape(j, k + 2)
        if counts[:, k].any():
            raise ValueError(f"the model predicted a class >= {k}, but the bundle declares {k} classes")
        return np.ascontiguousarray(counts[:, :k])


def _onnx2torch_convert():
    """onnx2torch's ``convert``. onnx2torch imports torchvision at module level only for its NMS and RoiAlign
    converters; where no torchvision matching the installed torch exists (the CPU development machine), a stand-in
    module lets it import, and those two ops (never in a classifier) raise if ever used."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or built for another torch: it raises RuntimeError, not ImportError
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stand_in, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

        def _unsupported(*args, **kwargs):
            raise NotImplementedError("torchvision ops (NMS, RoiAlign) are not available without torchvision")

        ops.nms = ops.roi_align = ops.box_convert = _unsupported
        stand_in.ops = ops
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stand_in, ops
    from onnx2torch import convert

    return convert
