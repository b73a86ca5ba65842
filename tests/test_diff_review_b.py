"""Review of the bundle-directory lock, the killed-build clean-up and the counts run's meta.json (diff review B).

Real ONNX files (the embedded default bundle's, copied), real directories under ``tmp_path``, a real counts run with
the embedded base model. A file system without ``flock`` or hard links is simulated by the errno Linux returns there
(NFS: an exclusive flock on a descriptor not opened for writing, as a directory's is, fails with EBADF; vfat and some
FUSE file systems refuse ``link`` with EPERM).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time

import numpy as np
import pytest

from calibration.counts import compute_counts, load_counts
from models.bundle import DEFAULT_BUNDLE_DIR, BundleError, create_bundle, load_bundle
from models.sampling import SamplingEngine

CLASSES = json.loads((DEFAULT_BUNDLE_DIR / "manifest.json").read_text())["classes"]
BASE = DEFAULT_BUNDLE_DIR / "base.onnx"


def _build(out, **kw):
    return create_bundle(out, base=BASE, sigma=0.25, input_shape=(1, 28, 28), classes=CLASSES, **kw)


def _users_entries(out):
    """What a user keeps in a directory: a directory named like a staging one, one with a build's 8 random
    characters but the user's files, and a symlink named like one to a directory holding only a model."""
    (out / ".staging-notes").mkdir(parents=True)
    (out / ".staging-notes" / "todo.txt").write_text("precious")
    (out / ".staging-abcd1234").mkdir()
    (out / ".staging-abcd1234" / "results.csv").write_text("a,b\n")
    elsewhere = out.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(BASE, elsewhere / "base.onnx")
    (out / ".staging-link").symlink_to(elsewhere, target_is_directory=True)
    return {".staging-notes/todo.txt", ".staging-abcd1234/results.csv", ".staging-link"}


def _present(out, names):
    return {n for n in names if os.path.lexists(out / n)}


def test_a_build_deletes_no_users_directory_named_like_a_staging_one(tmp_path):
    out = tmp_path / "b"
    kept = _users_entries(out)
    # without --overwrite: refused as not empty (before: the user's directories were deleted, then it built there)
    with pytest.raises(BundleError, match="not empty"):
        _build(out)
    assert _present(out, kept) == kept
    # with --overwrite: the bundle's files are replaced, nothing of the user's is touched
    _build(out, overwrite=True)
    assert _present(out, kept) == kept
    assert (tmp_path / "elsewhere" / "base.onnx").exists()
    assert load_bundle(out).manifest.sigma == 0.25


def test_a_killed_builds_staging_directory_is_still_cleared(tmp_path):
    out = tmp_path / "b"
    for name, files in ((".staging-k3j_h1g0", ("base.onnx", "manifest.json")), (".staging-4242", ()),
                        (".staging-zzzzzzzz", ("surrogate.onnx",))):
        (out / name).mkdir(parents=True)
        for f in files:
            shutil.copyfile(BASE, out / name / f)
    _build(out)  # no --overwrite: only a killed build's leftovers were there
    assert sorted(p.name for p in out.iterdir()) == ["base.onnx", "manifest.json"]


def _nfs_like_flock(monkeypatch):
    real = fcntl.flock

    def flock(fd, op):
        if op & fcntl.LOCK_EX:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)


def test_a_build_on_a_file_system_without_an_exclusive_flock_still_builds(tmp_path, monkeypatch, caplog):
    _nfs_like_flock(monkeypatch)
    out = tmp_path / "nfs" / "b"
    with caplog.at_level(logging.WARNING):
        built = _build(out)  # before: OSError '[Errno 9] Bad file descriptor' (no path), nothing built
    assert built.manifest.sigma == 0.25 and load_bundle(out).model_sha256 == built.model_sha256
    assert any("cannot be locked" in r.getMessage() and str(out) in r.getMessage() for r in caplog.records)


def test_a_load_waiting_for_a_build_of_its_directory_says_so(tmp_path, caplog):
    root = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE_DIR, root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # a build of root holding its lock (stopped with Ctrl-Z, say)
    fcntl.flock(fd, fcntl.LOCK_EX)
    result = {}
    loader = threading.Thread(target=lambda: result.setdefault("bundle", load_bundle(root)), daemon=True)
    try:
        with caplog.at_level(logging.WARNING):
            loader.start()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any("waits for a build" in r.getMessage()
                                                          for r in caplog.records):
                time.sleep(0.05)
            assert loader.is_alive()  # it waits for the build, as it should ...
            said = [r.getMessage() for r in caplog.records if "waits for a build" in r.getMessage()]
            assert said and str(root) in said[0]  # ... and says so (before: a silent hang)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    loader.join(30)
    assert result["bundle"].manifest.name == load_bundle(DEFAULT_BUNDLE_DIR).manifest.name


def test_a_counts_run_on_a_file_system_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst, *a, **kw):
        raise OSError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))

    monkeypatch.setattr(os, "link", no_link)
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    engine = SamplingEngine(bundle.backend("base", device="cpu", threads=1), sigma=0.25, num_classes=10,
                            batch_size=256)
    images = np.random.default_rng(0).random((6, 1, 28, 28), dtype=np.float32)
    kw = dict(seed=7, model_sha256=bundle.model_sha256, shard_size=4, progress=False)
    out = tmp_path / "counts"
    counts = compute_counts(engine, images, 16, out_dir=out, **kw)  # before: PermissionError from os.link
    assert counts.shape == (6, 10) and (counts.sum(axis=1) == 16).all()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "shard-000000.npy", "shard-000001.npy"]
    np.testing.assert_array_equal(compute_counts(engine, images, 16, out_dir=out, **kw), load_counts(out))  # resumes
    with pytest.raises(ValueError, match="different run"):  # and another run's settings are still refused
        compute_counts(engine, images, 32, out_dir=out, **kw)
