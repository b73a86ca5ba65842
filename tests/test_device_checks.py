"""The GPU checks of bench/device_run.sh, run here on the CPU with real components: the backend-agreement test
(bench/backend_agreement.py) on real onnxruntime sessions, the serve smoke (bench/serve_smoke.py) on a real
``certserve serve`` process, and the test-split loader the device host needs (it is carried the test set only)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import bench.backend_agreement as agreement
import bench.serve_smoke as smoke
from calibration.data import FASHION_MNIST_DIR, load_fashion_mnist, load_fashion_mnist_test

ROOT = Path(__file__).resolve().parents[1]


def test_equal_rate_p_values_are_the_exact_conditional_binomial_test():
    """Mutants: a one-sided p-value (m1 > m2 only); 0 instead of 1 where neither backend missed; the rates compared
    unconditionally (a z test, whose tails near p = 1 are far too heavy)."""
    p = agreement.equal_rate_p_values(np.array([0, 10, 0, 40, 3]), np.array([0, 10, 40, 0, 0]))
    assert p[0] == 1.0 and p[1] == pytest.approx(1.0)
    assert p[2] == pytest.approx(2 * 0.5**40) and p[3] == pytest.approx(2 * 0.5**40)  # two-sided, symmetric
    assert p[4] == pytest.approx(0.25)  # 3 vs 0 misses: 2 * (1/2)^3, no evidence at all


def test_backend_agreement_passes_for_the_same_model_and_fails_for_a_backend_with_wrong_noise(monkeypatch):
    """The check on real onnxruntime sessions: the bundle's base model against itself passes (clean logits equal,
    no image's miss rate differs at p < 1e-4); a "device" backend that draws its noise at 1.3 sigma (the bug class
    this check exists for: clipped, scaled or reused noise, a mis-converted layer) fails it. Checked that the
    second half fails when the p-value threshold is dropped (P_LIMIT = 0: every image passes)."""
    ok = agreement.run("cpu", 8, 4096, seed=3)
    assert ok["ok"] and ok["argmax_agree"] == 8 and ok["logits_max_abs_diff"] == 0.0 and ok["min_p_value"] > 1e-4

    from models.bundle import Bundle

    real_backend = Bundle.backend

    class LoudNoise:
        def __init__(self, inner):
            self.inner, self.name = inner, "loud-noise"

        def forward(self, x):
            return self.inner.forward(x)

        def noisy_predictions(self, images, repeats, sigma, rng):
            return self.inner.noisy_predictions(images, repeats, 1.3 * sigma, rng)

    def backend(self, role, *, device="auto", **kwargs):
        inner = real_backend(self, role, device="cpu", **kwargs)
        return LoudNoise(inner) if device == "cuda" else inner

    monkeypatch.setattr(Bundle, "backend", backend)
    bad = agreement.run("cuda", 8, 4096, seed=3)
    assert bad["backend"] == "loud-noise" and bad["argmax_agree"] == 8  # same clean model ...
    assert not bad["ok"] and bad["images_below_p_limit"] >= 1  # ... but not the same smoothed classifier


def test_serve_smoke_certifies_by_every_route_on_a_real_server(tmp_path):
    """One real ``certserve serve --device cpu``: ready, 200 with a certificate from auto (the surrogate: 0
    samples), sequential and Cohen (10,100 samples), the sampler it logged, a clean exit on SIGTERM."""
    result = smoke.run("cpu", tmp_path)
    assert result["ok"], result
    assert result["sampler"] == "onnxruntime-cpu" and result["exit_code"] == 0
    answers = result["answers"]
    assert answers["auto"]["body"]["method"] == "surrogate" and answers["auto"]["body"]["samples"] == 0
    assert answers["sequential"]["body"]["method"] == "sequential" and answers["sequential"]["body"]["samples"] > 0
    assert answers["cohen"]["body"]["samples"] == 10_100
    assert "test image 9" in smoke.summary(result)


def test_a_cuda_smoke_fails_on_a_cpu_sampler_or_a_refused_answer():
    """Mutants: smoke_ok ignoring the device (a `--device cuda` server that fell back to the CPU would pass the
    GPU smoke); a 4xx/5xx answer, or an error envelope without a certificate, counted as answered; a server that
    did not exit 0 on SIGTERM passed."""
    good = {"status": 200, "body": {"certified": True}}
    result = {"device": "cuda", "sampler": "torch-cuda", "answers": {"auto": good}, "exit_code": 0}
    assert smoke.smoke_ok(result)
    assert not smoke.smoke_ok(dict(result, sampler="onnxruntime-cpu"))
    assert not smoke.smoke_ok(dict(result, answers={"auto": {"status": 503, "body": {"error": {}}}}))
    assert not smoke.smoke_ok(dict(result, answers={"auto": {"status": 200, "body": {"error": {}}}}))
    assert not smoke.smoke_ok(dict(result, exit_code=1))
    log = "x\nINFO certserve ready: bundle fmnist-sigma0.25, sampler torch-cuda\n"
    assert smoke.logged_sampler(log) == "torch-cuda"
    assert smoke.logged_sampler("no such line") == ""


def test_the_test_split_loads_alone_and_equals_the_full_loaders(tmp_path):
    """A directory with the two t10k files only (what `make device-pack` carries) gives the same test images and
    labels as the full loader; a missing file is named. Failed before: the benchmarks required the training files
    too (FileNotFoundError on the device host)."""
    full = load_fashion_mnist()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(FASHION_MNIST_DIR / name)
    images, labels = load_fashion_mnist_test(tmp_path)
    assert np.array_equal(images, full.x_test) and np.array_equal(labels, full.y_test)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist_test(tmp_path)


def test_device_run_script_parses_and_names_modules_that_exist():
    """bench/device_run.sh is valid bash and every ``-m bench.X`` it runs is a module of this checkout (a renamed
    module would cost a device lease to find out)."""
    script = ROOT / "bench" / "device_run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    modules = {line.split(" -m ", 1)[1].split()[0] for line in script.read_text().splitlines()
               if " -m bench." in line and not line.lstrip().startswith("#")}
    assert modules == {"bench.backend_agreement", "bench.server_bench", "bench.serve_smoke"}
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
