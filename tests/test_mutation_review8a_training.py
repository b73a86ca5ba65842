"""Mutation audit, round 8a (continued from tests/test_mutation_review8a.py): the training loops
(calibration.train), the meta-learner's objective (calibration.meta), the Monte-Carlo counts where round 5 left them
(calibration.counts) and the data knobs the pipeline records (calibration.pipeline).

Each test names the bug it guards against (injected by editing the code once, in a private clone, never committed)
and was run against it: it failed with the bug and passes without it. Real components: the packaged Fashion-MNIST,
the shipped bundle's base model through onnxruntime, tiny torch models; every draw seeded.
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch
from scipy.special import betaln

import calibration.counts as counts_module
import calibration.train as train
from calibration.config import PipelineConfig
from calibration.counts import compute_counts, labelled_calibration_images
from calibration.data import load_dataset, load_npz, make_splits
from calibration.meta import beta_binomial_nll, fit_meta_prior
from calibration.pipeline import meta_cut as pipeline_meta_cut
from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from models.networks import SmallCNN
from models.sampling import SamplingEngine
from test_mutation_review8a import _npz

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

# ------------------------------------------------------------------------------------------------ training loops
@pytest.fixture
def loop_spy(monkeypatch):
    """calibration.train._loop replaced: each call's arguments recorded, the model returned untrained."""
    calls = []

    def record(model, x, targets, loss_fn, **kw):
        calls.append(dict(model=model, targets=targets, loss_fn=loss_fn, **kw))
        return model

    monkeypatch.setattr(train, "_loop", record)
    return calls


def test_the_base_model_trains_on_noise_of_sigma_with_its_seed(loop_spy):
    """Cohen et al.: the base model trains on x + N(0, sigma^2). Mutants: noise of std 1 (sigma dropped); the noise
    transform not passed (a clean-trained base model); the seed not forwarded to the loop."""
    x, y = np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, 2, 0])
    train.train_base(x, y, num_classes=3, sigma=0.25, epochs=1, seed=7, device="cpu")
    call = loop_spy[0]
    assert call["seed"] == 7 and call["transform"] is not None
    torch.manual_seed(0)
    noise = call["transform"](torch.zeros(4000, 1, 8, 8))
    assert abs(float(noise.std()) - 0.25) < 0.005 and abs(float(noise.mean())) < 0.005


def test_initial_weights_come_from_the_seed_not_the_global_torch_state(loop_spy):
    """A rerun with the same seed must build the same model. Mutants: train_base's or train_surrogate's
    torch.manual_seed removed (initial weights from whatever the global generator held)."""
    x, y, counts = np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, 2, 0]), np.ones((4, 3), np.int64)
    for make in (lambda: train.train_base(x, y, num_classes=3, sigma=0.25, seed=3, device="cpu"),
                 lambda: train.train_surrogate(x, counts, seed=3, device="cpu")):
        models = []
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            models.append(make())
        for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
            assert torch.equal(a, b)


def test_the_surrogate_learns_each_images_own_class_frequencies_from_the_init(loop_spy):
    """RRISE's soft labels are counts / counts.sum(1), the class frequencies of each image under noise, starting
    from the base model's weights. Mutants: counts divided by the grand total; the init's weights not loaded; the
    log-softmax taken over the batch (dim=0) instead of the classes."""
    x = np.zeros((3, 1, 8, 8), np.float32)
    counts = np.array([[90, 10, 0], [0, 25, 75], [1, 1, 2]])
    torch.manual_seed(0)
    init = SmallCNN(1, 3, 8, 8)
    model = train.train_surrogate(x, counts, init=init, seed=4, device="cpu")
    call = loop_spy[0]
    np.testing.assert_allclose(call["targets"], counts / counts.sum(axis=1, keepdims=True), rtol=1e-6)
    for a, b in zip(model.state_dict().values(), init.state_dict().values()):
        assert torch.equal(a, b)
    logits, q = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]])
    want = -(q * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert torch.allclose(call["loss_fn"](logits, q), want)


def test_the_loop_runs_every_step_of_a_ragged_last_batch_and_shuffles():
    """Mutants: the schedule's total steps floor(N / batch) (OneCycleLR fails on the ragged last batch's step);
    batches in index order every epoch (a pool stored by class would train class by class)."""
    seen = []

    def loss(logits, target):
        seen.append(target.clone())
        return nn_loss(logits, target)

    nn_loss = torch.nn.functional.cross_entropy
    x, y = np.zeros((10, 1, 8, 8), np.float32), np.arange(10)
    train._loop(SmallCNN(1, 10, 8, 8, width_mult=2, hidden=4), x, y, loss, epochs=2, batch_size=4, lr=1e-3, seed=0,
                device="cpu", desc="t")
    epochs = [torch.cat(seen[:3]), torch.cat(seen[3:])]
    assert len(seen) == 6 and all(sorted(e.tolist()) == list(range(10)) for e in epochs)
    assert epochs[0].tolist() != list(range(10)) and epochs[0].tolist() != epochs[1].tolist()


# ------------------------------------------------------------------------------------------------ meta-learner
def test_the_objective_is_the_beta_binomial_negative_log_likelihood_per_image():
    """The meta-learner maximizes log B(k + a, n - k + b) - log B(a, b) per image (the e-process's log growth).
    Mutants: the sign flipped; lgamma(a + b) added in log B; n - k replaced by n; the sum over images for the
    mean."""
    ab = torch.tensor([[2.0, 3.0], [0.5, 0.5], [40.0, 1.5]], dtype=torch.float64)
    k, n = torch.tensor([3.0, 0.0, 250.0], dtype=torch.float64), torch.tensor([10.0, 5.0, 256.0], dtype=torch.float64)
    a, b = ab[:, 0].numpy(), ab[:, 1].numpy()
    want = -np.mean(betaln(k.numpy() + a, n.numpy() - k.numpy() + b) - betaln(a, b))
    assert float(beta_binomial_nll(ab, k, n)) == pytest.approx(want, rel=1e-12)


def test_the_fit_reports_its_own_and_the_kt_priors_likelihood_reproducibly():
    """fit_meta_prior's report compares its NLL per image with the KT prior Beta(1/2, 1/2)'s, and a rerun gives the
    same model. Mutants: the reference prior Beta(1, 1); torch.manual_seed(seed) removed; the default seed
    changed; the steps reported as the default whatever was run."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 4)).astype(np.float32)
    n = np.full(40, 64)
    hits = rng.binomial(64, 0.9, 40)
    torch.manual_seed(123)
    model, fit = fit_meta_prior(feats, hits, n, steps=30)
    torch.manual_seed(456)
    again, _ = fit_meta_prior(feats, hits, n, steps=30, seed=2)
    kt = -np.mean(betaln(hits + 0.5, n - hits + 0.5) - betaln(0.5, 0.5))
    assert fit["kt_nll_per_image"] == pytest.approx(kt, rel=1e-12) and fit["steps"] == 30
    assert fit["num_images"] == 40 and fit["nll_per_image"] < fit["kt_nll_per_image"]
    for p, q in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------ Monte-Carlo counts
@pytest.fixture(scope="module")
def shipped_base():
    """(sampling engine over the shipped bundle's base.onnx, its sha256)."""
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    backend = bundle.backend("base", device="cpu", threads=1)
    return SamplingEngine(backend, sigma=0.25, num_classes=10, batch_size=256), bundle.model_sha256


def test_counts_resume_on_another_backend(tmp_path, shipped_base):
    """meta.json records the backend but a run resumes on another (counts started on a GPU host, finished on a CPU
    one: the same model and noise). Mutant: the backend compared too: the resume refused as a different run."""
    engine, sha = shipped_base
    images = np.random.default_rng(0).random((6, 1, 28, 28), dtype=np.float32)
    kw = dict(out_dir=tmp_path, seed=3, model_sha256=sha, shard_size=4, progress=False)
    assert compute_counts(engine, images, 8, max_shards=1, **kw) is None
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "backend": "torchscript-cuda"}))
    counts = compute_counts(engine, images, 8, **kw)
    assert counts.shape == (6, 10) and (counts.sum(axis=1) == 8).all()


def test_labelled_calibration_images_pair_each_image_with_its_own_label(tmp_path, shipped_base):
    """Recalibration's inputs: the calibration split's images, each with its own label. Mutant: the labels of the
    pool's first positions (every image of a recalibration paired with another image's label)."""
    engine, sha = shipped_base
    x, y = np.random.default_rng(1).integers(0, 256, (60, 28, 28), dtype=np.uint8), np.arange(60) % 10
    path = _npz(tmp_path / "pool.npz", x=x, y=y, x_test=x[:5], y_test=y[:5])  # the pool is x, in order
    splits = make_splits(60, calibration=12, surrogate_train=12, seed=0)
    compute_counts(engine, load_npz(path).x_train[splits.calibration], 4, out_dir=tmp_path / "cal", seed=9,
                   model_sha256=sha, progress=False)
    lab = labelled_calibration_images(tmp_path / "cal", str(path), calibration_size=12, surrogate_size=12,
                                      model_sha256=sha)
    np.testing.assert_array_equal(lab.labels, y[splits.calibration])
    np.testing.assert_array_equal(lab.images[:, 0], x[splits.calibration] / np.float32(255))


def test_an_exclusive_write_without_hard_links_never_replaces_a_file(tmp_path, monkeypatch):
    """meta.json is created only if absent, so two runs started at once cannot both write theirs. Mutant: the
    fallback for file systems without hard links replacing an existing file."""
    def no_link(src, dst, *a, **kw):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "meta.json"
    target.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        counts_module._atomic_write(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


# ------------------------------------------------------------------------------------------------ the pipeline
class _Stop(Exception):
    pass


def test_the_pipeline_scores_aligned_test_images_and_records_its_data_knobs(tmp_path, monkeypatch):
    """run_pipeline with the shipped models as stand-ins (no training), stopped at create_bundle. Mutants: the test
    labels of --limit taken from the end (the build's test accuracy scored images against other images' labels);
    `limit` missing from the provenance (recalibration then rebuilds the unlimited splits); the split seed
    recorded as the pipeline seed; the meta-learner told the calibration's samples per image as its trials."""
    import calibration.pipeline as pipeline
    from models.backends import OnnxBackend
    from models.networks import MetaPrior

    base, seen = OnnxBackend(DEFAULT_BUNDLE_DIR / "base.onnx", device="cpu", threads=1), {}

    def stop_at_bundle(*args, provenance, **kw):
        seen["provenance"] = provenance
        raise _Stop

    monkeypatch.setattr(pipeline, "_base_model", lambda *a: pipeline._Base(DEFAULT_BUNDLE_DIR / "base.onnx", base,
                                                                            base))
    monkeypatch.setattr(pipeline, "_base_quality", lambda b, x, y, s, seed: seen.update(x=x, y=y) or {})
    monkeypatch.setattr(pipeline, "_surrogate", lambda *a, **k: DEFAULT_BUNDLE_DIR / "surrogate.onnx")
    monkeypatch.setattr(pipeline, "compute_counts", lambda engine, images, n, **kw: np.full((len(images), 10), n // 10))
    monkeypatch.setattr(pipeline, "calibrate_surrogate", lambda *a, **k: {"num_tuning": 20})
    monkeypatch.setattr(pipeline, "describe", lambda block: "")
    monkeypatch.setattr(pipeline, "fit_meta_prior", lambda f, hits, trials: seen.update(trials=trials) or (
        MetaPrior(), {}))
    monkeypatch.setattr(pipeline, "create_bundle", stop_at_bundle)
    cfg = PipelineConfig(out=str(tmp_path / "b"), work=str(tmp_path / "w"), calibration_size=40, surrogate_size=100,
                         limit=60, levels=(0.1,), tune_size=20, device="cpu", progress=False, seed=5, split_seed=1,
                         train_samples=200, cal_samples=1000)
    with pytest.raises(_Stop):
        pipeline.run_pipeline(cfg, log=lambda *_: None)
    ds = load_dataset("fashion-mnist")
    np.testing.assert_array_equal(seen["x"], ds.x_test[:60])
    np.testing.assert_array_equal(seen["y"], ds.y_test[:60])
    prov = seen["provenance"]
    assert prov["limit"] == 60 and prov["seeds"] == {"pipeline": 5, "splits": 1}
    assert prov["splits"] == make_splits(60000, calibration=40, surrogate_train=100, seed=1).limited(60).record()
    assert set(seen["trials"]) == {200}


def test_the_meta_learner_always_holds_out_an_image():
    """Mutant: the `max(1, ...)` dropped: a small surrogate-train split gave the meta-learner no image."""
    fit, held = pipeline_meta_cut(3, 0.1, 0)
    assert len(held) == 1 and len(fit) == 2 and not np.intersect1d(fit, held).size
