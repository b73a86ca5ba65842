"""Inference backends: onnxruntime (CUDA provider when present, CPU otherwise) and PyTorch (:mod:`models.torch_backend`:
the ONNX graph converted by onnx2torch, or TorchScript) on a GPU. :func:`onnx_backend` picks the best for a device.

A backend does two things: ``forward`` (clean logits for a batch) and ``noisy_predictions`` (arg-max classes of
``x_j + N(0, sigma^2 I)`` for a batch assembled from several images, noise drawn where the model runs). The noise
of each call comes from the caller's generator, so sampling is i.i.d. across calls and, for a seeded generator,
reproducible (the calibration pipeline's resumable counts rely on that); the exception is onnxruntime's in-graph
noise on CUDA, drawn by the session's own generator (i.i.d. and fresh each call, not replayable from the caller's).
The noise is added to the model's own input, the [0, 1] pixels (normalization, if any, is inside the graph), and
x + e is never clipped: the smoothed classifier, and the L2 radius of a certificate, are those of that input space.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


#: exists exactly where an NVIDIA kernel driver is loaded
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
_NO_ORT_CUDA = "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"


class OnnxBackend:
    """onnxruntime session over an ONNX classifier with input (N, C, H, W) float32 pixels in [0, 1]."""

    def __init__(self, path: str | os.PathLike | bytes, *, threads: int | None = None, device: str = "auto",
                 noise_sigma: float | None = None, noise_in_graph: bool | None = None, seed: int | None = None,
                 priority: ThreadPriority | None = None, spin: bool = True, pad_batches: bool | None = None):
        """``priority``: the session's intra-op threads run at that lower priority (they are created by a thread
        that lowered its own; Linux threads inherit it), so the request path keeps the CPU when both want it.
        ``spin=False``: its pool threads sleep instead of spinning between runs, leaving the cores to the engine's
        bookkeeping, which overlaps the model call (on 2 cores: worker efficiency 0.85 -> 0.94 at 8 jobs)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        if device == "cuda" and not want_cuda:
            raise RuntimeError(f"device='cuda' requested but {_NO_ORT_CUDA}")
        # use_tf32=0: the certificate is about the bundle's fp32 model, not a lower-precision twin
        providers = ([("CUDAExecutionProvider", {"use_tf32": "0"})] if want_cuda else []) + ["CPUExecutionProvider"]
        source = str(path) if isinstance(path, (str, os.PathLike)) else path
        if isinstance(source, bytes):  # a bundle's verified bytes: weights in other files (ONNX external data), which
            # no hash covers, are never looked up (onnxruntime would search the working directory for them)
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", os.devnull)
        self.session = _session(ort, source, opts, providers, priority, device)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.name = f"onnxruntime-{self.device}"
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(inp.shape)  # (batch-dim name, C, H, W)
        out = self.session.get_outputs()[0]
        self.output_name = out.name
        self.num_outputs = out.shape[-1] if out.shape and isinstance(out.shape[-1], int) else None  # [] : rank unknown
        # On a GPU the noise is drawn inside the graph, on the device: only clean images and indices cross the bus
        # (a graph older than the wrapper's ops, opset 9: on the host, as on the CPU).
        in_graph = (self.device == "cuda" and noise_sigma is not None) if noise_in_graph is None else noise_in_graph
        self._noisy_session = None
        base = _onnx_model(source) if in_graph else None
        if in_graph and noise_in_graph is None and _in_graph_unsupported(base):
            in_graph = False
        if in_graph:
            if noise_sigma is None:
                raise ValueError("noise_sigma is required to draw the noise inside the graph")
            if self.device == "cpu" and seed is None:
                raise ValueError("in-graph noise runs on the CUDA provider only: onnxruntime's CPU RandomNormalLike "
                                 "repeats its stream after ~2^31 values (~2.7 M noisy 28x28 images) and every "
                                 "unseeded CPU kernel of a process starts from the same seed. A CPU session draws "
                                 "its noise on the host; pass a seed only to test the graph itself")
            model = noisy_argmax_model(base, noise_sigma, seed=seed)
            self._noisy_session = _session(ort, model.SerializeToString(), opts, providers, priority,
                                           self.device)
            self._noise_sigma = float(noise_sigma)
        #: in-graph noise batches run at :func:`padded_batch_size` (on CUDA: cuDNN tunes once per input shape), at
        #: most ``pad_limit`` rows (set by models.sampling.SamplingEngine: its batch size)
        self.pad_batches = self.device == "cuda" if pad_batches is None else bool(pad_batches)
        self.pad_limit: int | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def noisy_predictions(self, images: np.ndarray, repeats: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
        """Arg-max class of each of sum(repeats) noisy copies (images[j] repeated repeats[j] times, in order).

        Host noise comes from ``rng`` (reproducible for a seeded generator). In-graph noise (CUDA) comes from the
        session's own generator, seeded once at load: i.i.d. and fresh on every call, but not replayable from ``rng``.
        """
        return self.prepare_noisy(images, repeats, sigma, rng)()

    def prepare_noisy(self, images: np.ndarray, repeats: np.ndarray, sigma: float,
                      rng: np.random.Generator) -> Callable[[], np.ndarray]:
        """:meth:`noisy_predictions` in two parts: the host's part now (the noisy copies assembled, host noise drawn
        from ``rng``), and the model call, returned as a function to run later (it gives the arg-max classes). The
        sampler draws the next batch's noise while the current model call runs (:class:`models.sampling._HostRunner`)."""
        if self._noisy_session is not None:
            if float(sigma) != self._noise_sigma:
                raise ValueError(f"this session draws noise at sigma={self._noise_sigma}, asked for {sigma}")
            index = np.repeat(np.arange(len(images), dtype=np.int64), repeats)
            total = len(index)
            if self.pad_batches:  # rows beyond total: copies of image 0, drawn and discarded (shape buckets)
                index = np.concatenate([index, np.zeros(padded_batch_size(total, self.pad_limit) - total,
                                                          dtype=np.int64)])
            feed = {NOISY_IMAGES: np.ascontiguousarray(images, dtype=np.float32), NOISY_INDEX: index}
            return lambda: self._noisy_session.run(None, feed)[0][:total]
        batch = np.repeat(np.asarray(images, dtype=np.float32), repeats, axis=0)
        batch += rng.standard_normal(batch.shape, dtype=np.float32) * np.float32(sigma)
        return lambda: _labels(self.forward(batch))


def _labels(logits: np.ndarray) -> np.ndarray:
    """Arg-max class of each row of ``logits``; NAN_LABEL where a row holds a NaN (numpy would take the first NaN
    as the maximum: such a row has no class)."""
    nan = np.isnan(logits).any(axis=1)
    labels = logits.argmax(axis=1)
    return np.where(nan, NAN_LABEL, labels) if nan.any() else labels


def padded_batch_size(n: int, limit: int | None = None) -> int:
    """The batch size a device backend runs ``n`` noisy copies at: the next power of two up to 1,024, then the next
    multiple of 1,024 (the extra copies are drawn and discarded, never counted), but never above ``limit`` (the
    engine's batch size, which the operator sizes to the device's memory) where ``n`` fits in it: ``limit`` itself
    is then the last bucket. cuDNN tunes its convolution algorithms once per input shape (torch's
    ``cudnn.benchmark``, onnxruntime's default exhaustive search), and the engine's batches take hundreds of
    distinct sizes (116-215 in 127-282 batches of a 16,384-sample run), so nearly every batch paid a tuning run;
    with these buckets a run up to 16,384 sees at most 26 shapes, at a cost of < 2x
    rows below 1,024 (small batches are latency-bound on a GPU) and < 1,024 rows above."""
    if n <= 1024:
        bucket = 0 if n <= 0 else 1 << (int(n) - 1).bit_length()
    else:
        bucket = -(-int(n) // 1024) * 1024
    return bucket if limit is None or n > limit else min(bucket, int(limit))


#: The label of a noisy copy whose logits hold a NaN (no arg-max: numpy and torch would pick the NaN's class,
#: onnxruntime's ArgMax skips it): counted for no class, a miss for the tested one (models.sampling.tally_chunks)
NAN_LABEL = -1

#: Tensor names of the in-graph-noise model (prefixed: a base graph may itself use "images" or "labels")
NOISY_IMAGES, NOISY_INDEX, NOISY_LABELS = "certserve_images", "certserve_index", "certserve_labels"


def _session(ort, source, opts, providers, priority: ThreadPriority | None, device: str):
    """An InferenceSession that never falls back silently: asked for CUDA explicitly, it must run on CUDA; and a
    CUDA session's runtime fallback to the CPU is off (a failing run raises instead of switching providers, which
    would also restart an in-graph noise stream)."""
    session = in_thread_with_priority(lambda: ort.InferenceSession(source, opts, providers=providers), priority)
    on_cuda = "CUDAExecutionProvider" in session.get_providers()
    if device == "cuda" and not on_cuda:
        raise RuntimeError("device='cuda' requested but onnxruntime created the session on the CPU "
                           f"(providers {session.get_providers()}): check the CUDA installation")
    if on_cuda:
        session.disable_fallback()
    return session


def noisy_argmax_model(source, sigma: float, *, seed: int | None = None):
    """ONNX graph (images (J,C,H,W), index (B,)) -> arg-max labels (B,) of f(images[index] + N(0, sigma^2 I)), with
    the tensor names NOISY_IMAGES, NOISY_INDEX, NOISY_LABELS.

    The base graph is embedded unchanged after a Gather and a RandomNormalLike; ArgMax follows its logits.
    RandomNormalLike draws fresh i.i.d. noise on every run (its generator advances between calls). For the CUDA
    provider only (Philox, seeded from the clock): onnxruntime's CPU kernel repeats after ~2^31 values.
    """
    import onnx
    from onnx import TensorProto, helper

    base = source if isinstance(source, onnx.ModelProto) else _onnx_model(source)
    if (why := _in_graph_unsupported(base)) is not None:
        raise ValueError(f"the in-graph noise wrapper cannot wrap this model: {why}; draw its noise on the host")
    graph = base.graph
    initializer_names = {init.name for init in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in initializer_names]
    if len(real_inputs) != 1 or len(graph.output) != 1:
        raise ValueError("the base model must have exactly one input and one output")
    inp, out = real_inputs[0], graph.output[0]
    shape = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    prefix = "certserve_noise_"
    opset = next((o.version for o in base.opset_import if o.domain in ("", "ai.onnx")), 13)
    any_nan = ([helper.make_node("ReduceMax", [prefix + "nan_f", prefix + "axis"], [prefix + "any_nan_f"], keepdims=0)]
               if opset >= 18 else
               [helper.make_node("ReduceMax", [prefix + "nan_f"], [prefix + "any_nan_f"], axes=[1], keepdims=0)])
    attrs = {"dtype": TensorProto.FLOAT, "mean": 0.0, "scale": float(sigma)}
    if seed is not None:
        attrs["seed"] = float(seed % (2**24))
    nodes = [
        helper.make_node("Gather", [NOISY_IMAGES, NOISY_INDEX], [prefix + "clean"], axis=0),
        helper.make_node("RandomNormalLike", [prefix + "clean"], [prefix + "noise"], **attrs),
        helper.make_node("Add", [prefix + "clean", prefix + "noise"], [inp.name]),
        *graph.node,
        helper.make_node("ArgMax", [out.name], [prefix + "argmax"], axis=1, keepdims=0),
        # a row with a NaN logit has no class: NAN_LABEL (onnxruntime's ArgMax would skip the NaN)
        helper.make_node("IsNaN", [out.name], [prefix + "nan"]),
        helper.make_node("Cast", [prefix + "nan"], [prefix + "nan_f"], to=TensorProto.FLOAT),
        *any_nan,
        helper.make_node("Cast", [prefix + "any_nan_f"], [prefix + "any_nan"], to=TensorProto.BOOL),
        helper.make_node("Where", [prefix + "any_nan", prefix + "nan_label", prefix + "argmax"], [NOISY_LABELS]),
    ]
    constants = [helper.make_tensor(prefix + "nan_label", TensorProto.INT64, [], [NAN_LABEL])]
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18
        constants.append(helper.make_tensor(prefix + "axis", TensorProto.INT64, [1], [1]))
    new_graph = helper.make_graph(
        nodes, "certserve_noisy_argmax",
        [helper.make_tensor_value_info(NOISY_IMAGES, TensorProto.FLOAT, ["J", *shape[1:]]),
         helper.make_tensor_value_info(NOISY_INDEX, TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info(NOISY_LABELS, TensorProto.INT64, ["B"])],
        initializer=[*graph.initializer, *constants], value_info=list(graph.value_info))
    model = helper.make_model(new_graph, opset_imports=list(base.opset_import), ir_version=base.ir_version,
                              functions=list(base.functions))  # the base graph's model-local functions
    onnx.checker.check_model(model)
    return model


def _onnx_model(source):
    """The ONNX ModelProto of a file or of its bytes."""
    import onnx

    return onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))


def _in_graph_unsupported(base) -> str | None:
    """Why :func:`noisy_argmax_model` cannot wrap ``base``, or None: its IsNaN and Where need the default domain's
    opset >= 9, and an IR version below 4 lists every initializer as a graph input (the wrapper's inputs are its own).
    Such a graph (ONNX 1.3 or older: the model zoo's opset-7/8 classifiers) loads and runs everywhere else, so the
    CUDA provider draws its noise on the host instead (it failed the service's start with onnx's ValidationError)."""
    opset = next((o.version for o in base.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < 9:
        return f"its opset {opset} is below 9 (IsNaN, Where)"
    if base.ir_version < 4:
        return f"its IR version {base.ir_version} is below 4 (initializers listed as graph inputs)"
    return None


def onnx_backend(path: str | os.PathLike | bytes, *, device: str = "auto", threads: int | None = None,
                 noise_sigma: float | None = None, seed: int | None = None, priority: ThreadPriority | None = None,
                 spin: bool = True):
    """The best backend for the ONNX model ``path`` on ``device``.

    ``cpu``: onnxruntime on the CPU. ``cuda``: onnxruntime's CUDA provider when onnxruntime-gpu is installed (noise
    drawn in the graph; on the host for a graph below opset 9), else PyTorch on CUDA
    (:class:`models.torch_backend.TorchBackend`, the graph converted by onnx2torch; noise, arg-max and per-chunk
    counts on the device); an error if neither can run. ``auto``: ``cuda``
    where a GPU is usable, else ``cpu``; torch is imported only when an NVIDIA driver is present."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    ort_on_cpu = None
    if device != "cpu" and _ort_has_cuda():
        # onnxruntime-gpu lists its CUDA provider whether or not a GPU can run it (no GPU, no driver, a CUDA or cuDNN
        # library missing or of another version), and its session then starts on the CPU: then PyTorch on CUDA, if
        # it can run, else (auto) that CPU session, with host noise, or (cuda) an error saying both reasons
        ort_on_cpu = OnnxBackend(path, threads=threads, device="auto", noise_sigma=noise_sigma, seed=seed,
                                 priority=priority, spin=spin)
        if ort_on_cpu.device == "cuda":
            return ort_on_cpu
    if device == "cuda" or (device == "auto" and NVIDIA_DRIVER.exists()):
        if (torch_missing := _torch_cuda_missing()) is None:
            from models.torch_backend import TorchBackend

            return TorchBackend.from_onnx(path, device="cuda")
        if device == "cuda":
            ort = ("onnxruntime-gpu's CUDA provider started its session on the CPU (no usable GPU, or its CUDA/cuDNN "
                   "libraries missing)" if ort_on_cpu is not None else _NO_ORT_CUDA)
            raise RuntimeError(f"device='cuda' requested, but {ort} and PyTorch cannot run it either "
                               f"({torch_missing})")
    return ort_on_cpu or OnnxBackend(path, threads=threads, device="cpu", noise_sigma=noise_sigma, seed=seed,
                                     priority=priority, spin=spin)


def cuda_unavailable() -> str | None:
    """None when ``device='cuda'`` can run here (PyTorch on CUDA, or onnxruntime's CUDA provider on a host with an
    NVIDIA driver), else why not. onnxruntime-gpu lists its provider on any host, so the list alone is no proof: on
    a host without a driver its session starts on the CPU, which ``cuda`` refuses only once the service starts."""
    ort_cuda = _ort_has_cuda()
    if ort_cuda and NVIDIA_DRIVER.exists():
        return None  # checked first: importing torch to find out costs seconds and hundreds of MiB for nothing
    if (torch_missing := _torch_cuda_missing()) is None:
        return None
    ort = (f"onnxruntime-gpu is installed but no NVIDIA driver is loaded ({NVIDIA_DRIVER} is missing)"
           if ort_cuda else _NO_ORT_CUDA)
    return f"{ort} and PyTorch cannot run it either ({torch_missing})"


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _torch_cuda_missing() -> str | None:
    """None when torch (with onnx2torch) can run on a CUDA device, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    import importlib.util

    return None if importlib.util.find_spec("onnx2torch") else "onnx2torch is not installed"


@dataclass(frozen=True)
class ThreadPriority:
    """How far a thread yields the CPU to the request path; Linux threads inherit it, so a thread that applies it
    before creating a pool (onnxruntime's intra-op threads) lowers the pool too.

    ``idle``: Linux's SCHED_IDLE policy: the thread runs only on CPU time no normal thread wants, and a normal thread
    that wakes up (the event loop, a clean forward pass) preempts it at once instead of waiting for its time slice.
    Where SCHED_IDLE is unavailable or refused, and when ``idle`` is False: ``nice`` (> 0) added to the thread's nice
    value, which only weights the CPU shares. Applying it never fails the caller (a lowered priority is a latency
    optimization, not a guarantee)."""

    nice: int = 0
    idle: bool = False

    @property
    def lowered(self) -> bool:
        return self.idle or self.nice > 0

    def apply_to_current_thread(self) -> None:
        tid = threading.get_native_id()
        if self.idle and hasattr(os, "SCHED_IDLE"):
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                return
            except OSError:
                pass
        if self.nice > 0 and hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, tid, self.nice)
            except OSError:
                pass


def in_thread_with_priority(make, priority: ThreadPriority | None):
    """``make()``, called in a short-lived thread that first applies ``priority`` (threads created inside it, such
    as onnxruntime's pool, inherit it); called directly when ``priority`` lowers nothing."""
    if priority is None or not priority.lowered:
        return make()
    box: dict = {}

    def run():
        priority.apply_to_current_thread()
        try:
            box["value"] = make()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="certserve-session-init")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def load_backend(path: str | os.PathLike, *, device: str = "auto", threads: int | None = None):
    """Backend for ``path``: ``.onnx`` -> :func:`onnx_backend`, ``.pt``/``.ts`` (TorchScript) -> torch."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return onnx_backend(path, threads=threads, device=device)
    if suffix in (".pt", ".ts"):
        from models.torch_backend import TorchBackend

        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return TorchBackend.from_torchscript(path, device=device)
    raise ValueError(f"unknown model format {suffix!r} for {path}: expected .onnx (onnxruntime) or .pt (TorchScript)")
