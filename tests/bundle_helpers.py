"""Shared by the bundle tests (tests/test_bundle.py, tests/test_bundle_refusals.py): a private copy of the embedded
default bundle that a test may tamper with (``bundle_copy``), and reading / writing its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.bundle import DEFAULT_BUNDLE_DIR


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    """A private copy of the embedded default bundle that a test may tamper with."""
    dst = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, dst)
    return dst


def _read_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root: Path, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
