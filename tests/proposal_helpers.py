"""Shared by the proposal tests (tests/test_proposal.py, tests/test_proposal_engine.py): the constants, real
Fashion-MNIST test images (``images``, a module-scoped fixture: each test module that binds it loads its own copy) and
the job spec the tests submit."""

from __future__ import annotations

import time

import pytest

from calibration.data import load_fashion_mnist
from models.engine import JobSpec

SIGMA, K, EASY = 0.25, 10, 2  # test image 2 is a trouser: pA ~ 1 for class 1


@pytest.fixture(scope="module")
def images():
    return load_fashion_mnist().x_test[:8].copy()


def _spec(image, **kw) -> JobSpec:
    return JobSpec(image, kw.pop("alpha", 0.001), kw.pop("budget", 2048), time.monotonic() + 120,
                   tested_class=kw.pop("tested_class", 1), **kw)
