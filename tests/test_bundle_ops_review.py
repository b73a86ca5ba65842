"""Bundles as operations (review): a killed build, two builds of one directory at once, a load during a build's
swap. Real ONNX files (the embedded default bundle's, copied), real files under ``tmp_path``; a killed build is a
real process killed with SIGKILL while it verifies its staged bundle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from models.bundle import DEFAULT_BUNDLE_DIR, create_bundle, load_bundle

CLASSES = json.loads((DEFAULT_BUNDLE_DIR / "manifest.json").read_text())["classes"]
BASE, SURROGATE = DEFAULT_BUNDLE_DIR / "base.onnx", DEFAULT_BUNDLE_DIR / "surrogate.onnx"
ROOT = Path(__file__).resolve().parents[1]

_KILLED_BUILD = """
import sys, time
from pathlib import Path
import models.bundle as mb
def stall(bundle):  # the build has staged and is verifying its bundle: say so, and wait to be killed
    Path(sys.argv[2]).write_text("staged")
    time.sleep(120)
mb._check_shapes = stall
mb.create_bundle(sys.argv[1], base=sys.argv[3], sigma=0.5, input_shape=(1, 28, 28), classes=sys.argv[4].split("|"),
                 overwrite=True)
"""


def _kill_a_build_while_it_verifies(out: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(out), str(ready), str(SURROGATE),
                             "|".join(CLASSES)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "the build ended before it staged its bundle"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_killed_build_of_a_new_directory_neither_blocks_nor_lingers_in_the_next(tmp_path):
    out = tmp_path / "new"
    _kill_a_build_while_it_verifies(out, tmp_path)
    assert not (out / "manifest.json").exists()  # nothing loadable: the build never finished
    # the next build without --overwrite: the directory holds no bundle, only what the killed build left
    create_bundle(out, base=BASE, sigma=0.25, input_shape=(1, 28, 28), classes=CLASSES)
    assert sorted(p.name for p in out.iterdir()) == ["base.onnx", "manifest.json"]
    assert load_bundle(out).manifest.sigma == 0.25


def test_a_killed_rebuild_keeps_the_old_bundle_and_leaves_nothing_in_the_next(tmp_path):
    out = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE_DIR, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _kill_a_build_while_it_verifies(out, tmp_path)
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
    assert load_bundle(out).manifest.calibration is not None  # the old bundle, intact
    create_bundle(out, base=BASE, sigma=0.25, input_shape=(1, 28, 28), classes=CLASSES, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["base.onnx", "manifest.json"]  # no staging copy of the models


def _pause_first_swap(monkeypatch, thread_name: str) -> tuple[threading.Event, threading.Event]:
    """Make the build running in ``thread_name`` stop after its first rename into the output (mid-swap) until
    released; returns (paused, release)."""
    paused, release, real = threading.Event(), threading.Event(), os.replace

    def replace(src, dst):
        real(src, dst)
        if threading.current_thread().name == thread_name and not paused.is_set():
            paused.set()
            assert release.wait(30)

    monkeypatch.setattr(os, "replace", replace)
    return paused, release


def _thread(name: str, results: dict, fn, *args, **kwargs) -> threading.Thread:
    def run():
        try:
            results[name] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            results[name] = exc
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


def test_two_builds_of_one_directory_at_once_end_with_the_later_one_whole(tmp_path, monkeypatch):
    out = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE_DIR, out)
    paused, release = _pause_first_swap(monkeypatch, "first")
    results = {}
    kw = dict(input_shape=(1, 28, 28), classes=CLASSES, overwrite=True)
    first = _thread("first", results, create_bundle, out, base=SURROGATE, sigma=0.5, **kw)
    assert paused.wait(30)  # the first build is mid-swap: its manifest is gone, its base renamed in
    second = _thread("second", results, create_bundle, out, base=BASE, sigma=0.25, **kw)
    time.sleep(2)  # the second build runs (before: all of it, over the first's staging directory) or waits
    release.set()
    first.join(60), second.join(60)
    assert not isinstance(results["first"], BaseException), results["first"]
    assert not isinstance(results["second"], BaseException), results["second"]
    loaded = load_bundle(out)  # what the operator serves: whole, and the build that reported last
    assert loaded.manifest.sigma == 0.25 and loaded.model_sha256 == results["second"].model_sha256
    assert sorted(p.name for p in out.iterdir()) == ["base.onnx", "manifest.json"]


def test_a_load_during_a_builds_swap_gets_a_whole_bundle(tmp_path, monkeypatch):
    out = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE_DIR, out)
    paused, release = _pause_first_swap(monkeypatch, "build")
    results = {}
    build = _thread("build", results, create_bundle, out, base=SURROGATE, sigma=0.5, input_shape=(1, 28, 28),
                    classes=CLASSES, overwrite=True)
    assert paused.wait(30)
    load = _thread("load", results, load_bundle, out)  # a server starting now (before: manifest.json missing)
    time.sleep(1)
    release.set()
    build.join(60), load.join(60)
    assert not isinstance(results["load"], BaseException), results["load"]
    assert results["load"].manifest.sigma == 0.5 and results["load"].model_sha256 == results["build"].model_sha256


@pytest.mark.parametrize("existing", [False, True])
def test_a_refused_build_still_leaves_the_directory_as_it_was(tmp_path, existing):
    out = tmp_path / "b"
    if existing:
        shutil.copytree(DEFAULT_BUNDLE_DIR, out)
    before = sorted(p.name for p in out.iterdir()) if existing else None
    with pytest.raises(ValueError):
        create_bundle(out, base=BASE, sigma=0.25, input_shape=(1, 28, 28), classes=CLASSES[:3], overwrite=True)
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before
