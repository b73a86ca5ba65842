"""The shared noise -> model -> counts engine and the resumable Monte-Carlo counts of the calibration pipeline.

Real components only: the embedded default bundle's base model in a real onnxruntime session and real
Fashion-MNIST test images. The only wrapper is a spy that records the sizes of the batches the engine hands to the
real backend (it forwards every call unchanged).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.counts import compute_counts, images_digest, load_counts, refine_confident_counts
from calibration.data import load_fashion_mnist
from models.backends import OnnxBackend
from models.bundle import DEFAULT_BUNDLE_DIR, sha256_file
from models.sampling import SamplingEngine

SIGMA = 0.25
K = 10
BASE = DEFAULT_BUNDLE_DIR / "base.onnx"


@pytest.fixture(scope="module")
def backend() -> OnnxBackend:
    return OnnxBackend(BASE, threads=2, device="cpu")


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    ds = load_fashion_mnist()
    return ds.x_test[:64].copy(), ds.y_test[:64].copy()


@pytest.fixture(scope="module")
def base_sha() -> str:
    return sha256_file(BASE)


class Spy:
    """Forwards to the real backend and records sum(repeats) of every model call."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.batches: list[int] = []
        self.chunks: list[list[int]] = []

    def noisy_predictions(self, images, repeats, sigma, rng):
        repeats = np.asarray(repeats)
        assert len(images) == len(repeats)
        assert np.all(repeats > 0), "the engine must not send empty chunks to the model"
        self.batches.append(int(repeats.sum()))
        self.chunks.append([int(r) for r in repeats])
        return self.inner.noisy_predictions(images, repeats, sigma, rng)


# ------------------------------------------------------------------------------------------------ SamplingEngine


@pytest.mark.parametrize("batch_size", [7, 64, 1000])
def test_count_totals_exact_for_mixed_sample_counts(backend, test_images, batch_size):
    x = test_images[0][:8]
    n = np.array([0, 5, 0, 67, 1, 130, 0, 33], dtype=np.int64)  # zeros (also leading/trailing-interior), non-multiples
    spy = Spy(backend)
    engine = SamplingEngine(spy, sigma=SIGMA, num_classes=K, batch_size=batch_size)
    seen = []
    counts = engine.count(x, n, np.random.default_rng(0), on_batch=seen.append)
    assert counts.shape == (8, K) and counts.dtype == np.int64
    np.testing.assert_array_equal(counts.sum(axis=1), n)
    assert np.all(counts >= 0)
    total = int(n.sum())
    # packed: every model call is a full batch except the last one
    assert sum(spy.batches) == total
    assert all(b == batch_size for b in spy.batches[:-1])
    assert 0 < spy.batches[-1] <= batch_size
    assert len(spy.batches) == -(-total // batch_size)
    assert seen == spy.batches  # on_batch reports the samples of each call


def test_count_trailing_zero_and_all_zero(backend, test_images):
    x = test_images[0][:4]
    engine = SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=16)
    counts = engine.count(x, np.array([16, 0, 0, 0]), np.random.default_rng(1))
    np.testing.assert_array_equal(counts.sum(axis=1), [16, 0, 0, 0])
    zero = engine.count(x, 0, np.random.default_rng(1))
    np.testing.assert_array_equal(zero, np.zeros((4, K), dtype=np.int64))
    empty = engine.count(x[:0], 10, np.random.default_rng(1))
    assert empty.shape == (0, K)


def test_count_scalar_num_samples_broadcasts(backend, test_images):
    x = test_images[0][:5]
    engine = SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=32)
    counts = engine.count(x, 50, np.random.default_rng(2))
    np.testing.assert_array_equal(counts.sum(axis=1), np.full(5, 50))


def test_count_rejects_negative_and_bad_engine_arguments(backend, test_images):
    engine = SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=32)
    with pytest.raises(ValueError, match=">= 0"):
        engine.count(test_images[0][:2], np.array([3, -1]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="sigma"):
        SamplingEngine(backend, sigma=0.0, num_classes=K)
    with pytest.raises(ValueError, match="batch_size"):
        SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=0)


def test_count_is_reproducible_for_a_seed(backend, test_images):
    x = test_images[0][:6]
    engine = SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=50)
    n = np.array([40, 0, 75, 10, 3, 99])
    a = engine.count(x, n, np.random.default_rng(123))
    b = engine.count(x, n, np.random.default_rng(123))
    np.testing.assert_array_equal(a, b)


def test_chunk_counts_agree_with_per_image_predictions(backend, test_images):
    """count_chunks tallies each chunk's own predictions: the same noise through predictions() gives the same counts."""
    x = test_images[0][:3]
    sizes = np.array([5, 11, 2])
    engine = SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=1024)
    chunk_counts = engine.count_chunks(x, sizes, np.random.default_rng(9))
    preds = backend.noisy_predictions(x, sizes, SIGMA, np.random.default_rng(9))
    owner = np.repeat(np.arange(3), sizes)
    want = np.stack([np.bincount(preds[owner == j], minlength=K) for j in range(3)])
    np.testing.assert_array_equal(chunk_counts, want)


def test_top_class_rate_statistically_stable(backend, test_images):
    """A clearly classified image: its top-class rate under noise agrees between independent seeded runs (and the
    ordered prediction stream) within binomial noise, and the top class is the clean prediction."""
    x, _ = test_images
    probs = backend.forward(x)
    logits = probs - probs.max(axis=1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    j = int(np.argmax(p.max(axis=1)))  # the most confidently classified of the 64 images
    clean_class = int(p[j].argmax())
    n = 2000
    engine = SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=512)
    # image j packed among other images in run A, alone in run B, as a stream in run C (all independent seeds)
    n_vec = np.zeros(len(x), dtype=np.int64)
    n_vec[[0, j, len(x) - 1]] += 300
    n_vec[j] = n
    a = engine.count(x, n_vec, np.random.default_rng(11))[j]
    b = engine.count(x[j:j + 1], n, np.random.default_rng(12))[0]
    stream = engine.predictions(x[j], n, np.random.default_rng(13))
    assert stream.shape == (n,) and stream.dtype == np.int64
    c = np.bincount(stream, minlength=K)
    for counts in (a, b, c):
        assert counts.sum() == n
        assert counts.argmax() == clean_class
    ra, rb, rc = a[clean_class] / n, b[clean_class] / n, c[clean_class] / n
    assert ra > 0.9  # "clearly classified" under sigma = 0.25
    pooled = (ra + rb + rc) / 3
    se = np.sqrt(max(pooled * (1 - pooled), 1e-4) * 2 / n)  # SE of a difference of two rates
    assert abs(ra - rb) <= 5 * se and abs(ra - rc) <= 5 * se and abs(rb - rc) <= 5 * se, (ra, rb, rc)


# ------------------------------------------------------------------------------------------------ resumable counts


def _engine(backend, batch_size=64):
    return SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=batch_size)


def test_resume_after_interruption_gives_identical_totals(backend, test_images, base_sha, tmp_path):
    x = test_images[0][:10]
    kw = dict(seed=7, model_sha256=base_sha, shard_size=4, progress=False)  # 3 shards: 4 + 4 + 2 images
    full = compute_counts(_engine(backend), x, 50, out_dir=tmp_path / "full", **kw)
    assert full.shape == (10, K)
    np.testing.assert_array_equal(full.sum(axis=1), np.full(10, 50))

    part = tmp_path / "part"
    assert compute_counts(_engine(backend), x, 50, out_dir=part, max_shards=1, **kw) is None
    assert sorted(p.name for p in part.iterdir()) == ["meta.json", "shard-000000.npy"]
    assert not list(part.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="2 of 3 shards missing.*resume"):
        load_counts(part)

    assert compute_counts(_engine(backend), x, 50, out_dir=part, max_shards=1, **kw) is None  # one more shard
    assert len(list(part.glob("shard-*.npy"))) == 2
    # a different batch size does not change the result: noise per shard is seeded, not per batch layout
    resumed = compute_counts(_engine(backend), x, 50, out_dir=part, **kw)
    np.testing.assert_array_equal(resumed, full)
    np.testing.assert_array_equal(load_counts(part), full)
    assert not list(part.glob("*.tmp"))
    assert sorted(p.name for p in part.iterdir()) == ["meta.json", "shard-000000.npy", "shard-000001.npy",
                                                      "shard-000002.npy"]

    # a complete directory is reused as-is (nothing recomputed)
    spy = Spy(backend)
    again = compute_counts(_engine(spy), x, 50, out_dir=part, **kw)
    np.testing.assert_array_equal(again, full)
    assert spy.batches == []


def test_refined_counts_add_fresh_samples_to_confident_images_only(backend, test_images, base_sha, tmp_path):
    """Only images whose top count reaches ``min_hits`` get the extra samples, from their own seed (not a replay of
    the first counts' noise), and a rerun reuses the shards. Run against a bug that refines every image, the totals
    check fails."""
    x = test_images[0][:12]
    first = compute_counts(_engine(backend), x, 16, out_dir=tmp_path / "first", seed=1, model_sha256=base_sha,
                           shard_size=4, progress=False)
    confident = first.max(axis=1) >= 16
    assert 0 < confident.sum() < len(x)  # the case is informative: some images are refined, some are not
    kw = dict(min_hits=16, out_dir=tmp_path / "extra", seed=5, model_sha256=base_sha, progress=False)
    refined = refine_confident_counts(_engine(backend), x, first, 48, **kw)
    np.testing.assert_array_equal(refined.sum(axis=1), np.where(confident, 64, 16))
    np.testing.assert_array_equal(refined[~confident], first[~confident])
    extra = compute_counts(_engine(backend), x[confident], 48, out_dir=tmp_path / "direct", seed=5,
                           model_sha256=base_sha, progress=False)
    np.testing.assert_array_equal(refined[confident], first[confident] + extra)
    spy = Spy(backend)
    np.testing.assert_array_equal(refine_confident_counts(_engine(spy), x, first, 48, **kw), refined)
    assert spy.batches == []


def test_meta_records_the_run(backend, test_images, base_sha, tmp_path):
    x = test_images[0][:5]
    compute_counts(_engine(backend), x, 20, out_dir=tmp_path / "c", seed=3, model_sha256=base_sha, shard_size=4,
                   progress=False)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta == {"sigma": SIGMA, "num_samples": 20, "seed": 3, "model_sha256": base_sha, "num_images": 5,
                    "num_classes": K, "shard_size": 4, "images_sha256": images_digest(x), "backend": backend.name}


@pytest.mark.parametrize("change", ["num_samples", "seed", "images", "model", "shard_size"])
def test_directory_of_a_different_run_is_refused(backend, test_images, base_sha, tmp_path, change):
    x = test_images[0][:6]
    out = tmp_path / "c"
    base_kw = dict(out_dir=out, seed=1, model_sha256=base_sha, shard_size=4, progress=False)
    assert compute_counts(_engine(backend), x, 20, max_shards=1, **base_kw) is None
    before = sorted(p.name for p in out.iterdir())
    n, kw, imgs = 20, dict(base_kw), x
    if change == "num_samples":
        n = 21
    elif change == "seed":
        kw["seed"] = 2
    elif change == "images":
        imgs = test_images[0][6:12]
    elif change == "model":
        kw["model_sha256"] = "0" * 64
    elif change == "shard_size":
        kw["shard_size"] = 3
    with pytest.raises(ValueError, match="different run") as info:
        compute_counts(_engine(backend), imgs, n, **kw)
    assert "another --out directory" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written


def test_different_sigma_is_refused(backend, test_images, base_sha, tmp_path):
    x = test_images[0][:4]
    kw = dict(out_dir=tmp_path / "c", seed=1, model_sha256=base_sha, shard_size=4, progress=False)
    compute_counts(_engine(backend), x, 10, **kw)
    other = SamplingEngine(backend, sigma=0.5, num_classes=K, batch_size=64)
    with pytest.raises(ValueError, match=r"different run.*sigma"):
        compute_counts(other, x, 10, **kw)


def test_load_counts_on_incomplete_dir_hints_resume(backend, test_images, base_sha, tmp_path):
    x = test_images[0][:9]
    out = tmp_path / "c"
    compute_counts(_engine(backend), x, 10, out_dir=out, seed=0, model_sha256=base_sha, shard_size=3,
                   progress=False, max_shards=0)  # writes meta.json only
    with pytest.raises(FileNotFoundError) as info:
        load_counts(out)
    msg = str(info.value)
    assert "3 of 3 shards missing" in msg and "rerun" in msg and "resume" in msg


# ------------------------------------------------------------------------------------------------ in-graph noise


def test_in_graph_noise_backend_counts_and_agrees_with_host_noise(backend, test_images):
    """The onnxruntime path that draws noise inside the graph (the GPU default; forced here on CPU) packs chunks the
    same way (exact totals) and samples the same distribution as host-side numpy noise."""
    x = test_images[0]
    graph = OnnxBackend(BASE, threads=2, device="cpu", noise_sigma=SIGMA, noise_in_graph=True, seed=5)
    n = np.array([0, 5, 0, 67, 1, 130, 0, 33], dtype=np.int64)
    counts = SamplingEngine(graph, sigma=SIGMA, num_classes=K, batch_size=64).count(x[:8], n, np.random.default_rng(0))
    np.testing.assert_array_equal(counts.sum(axis=1), n)
    # the least stable of the 64 images under noise (host path), so that the comparison is not trivially 1 == 1
    host = SamplingEngine(backend, sigma=SIGMA, num_classes=K, batch_size=1024)
    j = int(np.argmin(host.count(x, 100, np.random.default_rng(1)).max(axis=1)))
    m = 3000
    a = host.count(x[j:j + 1], m, np.random.default_rng(2))[0] / m
    b = SamplingEngine(graph, sigma=SIGMA, num_classes=K, batch_size=500).count(x[j:j + 1], m, None)[0] / m
    top = int(a.argmax())
    se = np.sqrt(max(a[top] * (1 - a[top]), 1e-3) * 2 / m)
    assert abs(a[top] - b[top]) <= 5 * se, (a, b)
    # successive model calls draw fresh noise (the session's generator advances): three calls are not all identical
    calls = [graph.noisy_predictions(x[j:j + 1], np.array([200]), SIGMA, None) for _ in range(3)]
    if 0.02 < a[top] < 0.98:
        assert not (np.array_equal(calls[0], calls[1]) and np.array_equal(calls[1], calls[2]))


def test_in_graph_noise_backend_argument_checks(test_images):
    with pytest.raises(ValueError, match="noise_sigma is required"):
        OnnxBackend(BASE, threads=1, device="cpu", noise_in_graph=True)
    graph = OnnxBackend(BASE, threads=1, device="cpu", noise_sigma=SIGMA, noise_in_graph=True, seed=1)
    with pytest.raises(ValueError, match="sigma=0.25"):
        graph.noisy_predictions(test_images[0][:1], np.array([4]), 0.5, np.random.default_rng(0))


def test_a_run_started_alongside_another_with_other_settings_is_refused(backend, test_images, base_sha, tmp_path,
                                                                        monkeypatch):
    """Two counts runs with different settings started into one directory at the same instant both see no meta.json
    (simulated: this run's existence check is made to miss the other run's meta.json). The second one's write used
    to replace the first one's meta.json and count on, so one run's shards were later read as the other's (seed 3
    labelled seed 9 here). meta.json is now created only if absent and every run compares itself with the one on
    disk. Checked against the bug: with the old check-then-replace write this test fails (no ValueError, meta.json
    overwritten with seed 3)."""
    x = test_images[0][:6]
    out = tmp_path / "c"
    kw = dict(out_dir=out, model_sha256=base_sha, shard_size=4, progress=False)
    assert compute_counts(_engine(backend), x, 20, seed=9, max_shards=0, **kw) is None  # the other run: meta only
    real_exists = type(out).exists
    monkeypatch.setattr(type(out), "exists", lambda p: False if p.name == "meta.json" else real_exists(p))
    with pytest.raises(ValueError, match=r"different run.*seed"):
        compute_counts(_engine(backend), x, 20, seed=3, **kw)
    assert json.loads((out / "meta.json").read_text())["seed"] == 9
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"]  # no shard, no temp file left


def test_writes_leave_no_temp_files(backend, test_images, base_sha, tmp_path):
    """Every file is written through a temp file of its own (two runs into one directory never share one), and the
    temp files are gone once a run has finished."""
    x = test_images[0][:6]
    compute_counts(_engine(backend), x, 10, out_dir=tmp_path / "c", seed=1, model_sha256=base_sha, shard_size=4,
                   progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["meta.json", "shard-000000.npy", "shard-000001.npy"]
