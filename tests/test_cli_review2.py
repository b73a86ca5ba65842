"""The command line and configuration (review 2): each test fails on the code before it (2026-12-06).

- ``certserve serve`` with a partial or corrupt bundle, or ``--device cuda`` where no CUDA backend can run: one line
  ``certserve: error: ...`` and exit 2 before uvicorn starts (was: the app's start-up traceback, exit 3);
- ``certserve bundle create`` refused (bad sigma, a model that does not match the classes) leaves an existing bundle
  at ``--out --overwrite`` intact and creates no new ``--out`` (was: its base.onnx replaced, or its surrogate, meta
  and manifest deleted);
- a path that is not a directory (any OSError, not only a missing file): one line, exit 2 (was: a traceback);
- ``certserve calibrate all`` refuses values no run can use before any work, naming the flag (was: hours of training
  and counts first, then a traceback, or a silently different run: ``--calibration-scale foo`` built a bundle with the
  additive scores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ",".join("abcdefghij")


def run_cli(*argv) -> int:
    from cli.main import main

    return main([str(a) for a in argv])


def _copy_bundle(tmp_path: Path, name: str = "bundle") -> Path:
    return Path(shutil.copytree(DEFAULT_BUNDLE_DIR, tmp_path / name))


# --------------------------------------------------------------------------------------------- serve


def _serve(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "CERTSERVE_DEVICE": "cpu", "CERTSERVE_THREADS": "1", "CERTSERVE_PORT": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cli.main", "serve", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("case", ["no base.onnx", "manifest not JSON", "flipped byte"])
def test_serve_refuses_a_partial_or_corrupt_bundle_in_one_line(tmp_path, case):
    """Port 1 (privileged): never reached when the check works."""
    bundle = _copy_bundle(tmp_path)
    if case == "no base.onnx":
        (bundle / "base.onnx").unlink()
    elif case == "manifest not JSON":
        (bundle / "manifest.json").write_text("{not json")
    else:
        data = bytearray((bundle / "surrogate.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bundle / "surrogate.onnx").write_bytes(bytes(data))
    r = _serve("--bundle", bundle)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certserve: error: "), r.stderr[-3000:]
    assert {"no base.onnx": "base.onnx is missing", "manifest not JSON": "is not valid JSON",
            "flipped byte": "sha256 of surrogate.onnx"}[case] in lines[0]


def test_serve_refuses_cuda_where_no_cuda_backend_runs(monkeypatch):
    import models.backends as backends
    from server.serve import check_configuration
    from server.settings import Settings

    monkeypatch.setattr(backends, "_ort_has_cuda", lambda: False)
    monkeypatch.setattr(backends, "_torch_cuda_missing", lambda: "torch.cuda.is_available() is False")
    with pytest.raises(ValueError, match=r"device \(CERTSERVE_DEVICE\) is cuda, but .*use auto or cpu"):
        check_configuration(Settings(device="cuda"))
    check_configuration(Settings(device="cpu"))  # the default bundle and a CPU device pass


# --------------------------------------------------------------------------------------------- bundle create


@pytest.mark.parametrize("bad", [["--sigma", "-1"], ["--classes", "a,b"]])
def test_refused_bundle_create_leaves_the_existing_bundle_intact(tmp_path, capsys, bad):
    """--classes a,b: the 10-output model does not match (found by loading); --sigma -1: by the manifest schema."""
    bundle = _copy_bundle(tmp_path)
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    flags = {"--sigma": "0.25", "--classes": CLASSES, "--input-shape": "1,28,28"}
    flags.update(dict([bad]))
    argv = [a for kv in flags.items() for a in kv]
    assert run_cli("bundle", "create", "--base", bundle / "base.onnx", *argv, "--out", bundle, "--overwrite") == 2
    assert capsys.readouterr().err.startswith("certserve: error: ")
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    assert load_bundle(bundle).manifest.calibration is not None
    assert run_cli("bundle", "create", "--base", bundle / "base.onnx", *argv, "--out", tmp_path / "new") == 2
    assert not (tmp_path / "new").exists()


def test_bundle_create_overwrite_replaces_a_bundle_with_a_verified_one(tmp_path):
    bundle = _copy_bundle(tmp_path)
    assert run_cli("bundle", "create", "--base", bundle / "base.onnx", "--sigma", "0.5", "--input-shape", "1,28,28",
                   "--classes", CLASSES, "--out", bundle, "--overwrite") == 0
    assert sorted(p.name for p in bundle.iterdir()) == ["base.onnx", "manifest.json"]  # no stale surrogate, staging
    loaded = load_bundle(bundle)
    assert loaded.manifest.sigma == 0.5 and loaded.manifest.calibration is None


# --------------------------------------------------------------------------------------------- any OSError


def test_a_path_under_a_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert run_cli("bundle", "create", "--base", DEFAULT_BUNDLE_DIR / "base.onnx", "--sigma", "0.25", "--input-shape",
                   "1,28,28", "--classes", CLASSES, "--out", tmp_path / "afile" / "bundle") == 2
    err = capsys.readouterr().err
    assert err.startswith("certserve: error: ") and "Not a directory" in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------------- calibrate all


@pytest.mark.parametrize("flag, value, message", [
    ("--sigma", "-1", "--sigma must be a finite number > 0"),
    ("--sigma", "nan", "--sigma must be a finite number > 0"),
    ("--calibration-scale", "foo", "--calibration-scale must be 'spread' or 'unit'"),
    ("--cal-samples", "0", "--cal-samples must be an integer >= 1"),
    ("--train-samples", "0", "--train-samples must be an integer >= 1"),
    ("--meta-fraction", "1.5", "--meta-fraction must be strictly between 0 and 1"),
    ("--gamma", "2", "--gamma must be strictly between 0 and 1"),
    ("--levels", "0.1,2", "--levels must be one or more comma-separated risk levels strictly between 0 and 1"),
    ("--device", "gpu", "--device must be 'auto', 'cpu' or 'cuda'"),
    ("--max-bins", "0", "--max-bins must be an integer >= 1"),
])
def test_calibrate_all_refuses_unusable_values_before_any_work(tmp_path, capsys, monkeypatch, flag, value, message):
    import calibration.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: pytest.fail("the pipeline must not start"))
    assert run_cli("calibrate", "all", flag, value, "--out", tmp_path / "b", "--work", tmp_path / "w") == 2
    err = capsys.readouterr().err
    assert err.startswith("certserve: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------- settings


def test_threads_beyond_1024_are_refused_at_start():
    """CERTSERVE_THREADS=100000 (a typo for 10) was accepted: onnxruntime then created ~32,000 threads at start-up
    and the server hung there for over ten minutes (seen on the 2-core machine) instead of refusing the value."""
    from pydantic import ValidationError

    from server.settings import Settings

    with pytest.raises(ValidationError, match="less than or equal to 1024"):
        Settings(threads=100_000)
    assert Settings(threads=1024).threads == 1024


@pytest.mark.parametrize("classes", [["a", "a", "b"], ["a", " ", "b"], ["a", "", "b"], ["a", "a ", "b"]])
def test_bundle_create_refuses_duplicate_or_blank_class_names(tmp_path, classes):
    """A certificate names its class (class_name): two classes with one name, or a blank name, make it ambiguous.
    Run against the code before: the bundle was created and loaded; this test failed."""
    from models.bundle import DEFAULT_BUNDLE_DIR, BundleError, create_bundle, load_bundle

    default = load_bundle(DEFAULT_BUNDLE_DIR)
    with pytest.raises((BundleError, ValueError), match="distinct, non-blank"):
        create_bundle(tmp_path / "b", base=default.path("base"), sigma=0.25, input_shape=[1, 28, 28],
                      classes=classes + [f"c{i}" for i in range(7)])

@pytest.mark.parametrize("name, hint", [("CERTSERVE_API_KEY", "did you mean CERTSERVE_API_KEYS?"),
                                        ("certserve_max_sample", "did you mean CERTSERVE_MAX_SAMPLES?"),
                                        ("CERTSERVE_NO_SUCH_THING", "unset or rename it")])
def test_a_misspelled_variable_is_refused_at_start(monkeypatch, capsys, name, hint):
    """A misspelled ``CERTSERVE_API_KEY=secret`` (for CERTSERVE_API_KEYS) was ignored, and the server started
    without authentication: ``serve`` now exits 2 naming the variable and the nearest real one (2026-12-06; run against the
    code before, all three cases failed: the settings were accepted and the start-up checks reached)."""
    import server.serve

    monkeypatch.setenv(name, "secret")
    monkeypatch.setattr(server.serve, "check_configuration", lambda *a, **k: pytest.fail("the server would start"))
    assert run_cli("serve", "--port", "0") == 2
    err = capsys.readouterr().err
    assert name in err and hint in err and "secret" not in err, err


def test_the_variables_read_outside_settings_are_not_refused(monkeypatch):
    """certserve verify's CERTSERVE_JWKS and the harness's switches are real variables, not typos."""
    from server.settings import OTHER_VARIABLES, Settings

    for name in OTHER_VARIABLES:
        monkeypatch.setenv(name, "1")
    assert Settings().port == 8000
