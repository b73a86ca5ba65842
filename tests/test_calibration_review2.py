"""Calibration statistics review (second round): the sizes a level needs, checked before any work as the fit
applies them, and computed without a search that hangs on tiny levels. Each test failed on the code before it."""

from __future__ import annotations

import math
import signal
from contextlib import contextmanager

import numpy as np
import pytest

import smoothing as sm
from calibration.config import PipelineConfig
from calibration.conformal_fit import fit_calibration, level_min_images
from calibration.pipeline import _checked_tune_size
from models.bundle import ConformalLevel


@contextmanager
def _within(seconds: float):
    """Fail (instead of hanging the suite) where the body takes longer than ``seconds``."""
    def expired(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_fit_messages: list[str] = []


def _fits(num_calibration: int, levels) -> bool:
    """Whether fit_calibration makes a block from ``num_calibration`` calibration images (seeded synthetic data)."""
    rng = np.random.default_rng(5301)
    n = 1000
    g_t, g_c = rng.normal(4, 2, 60), rng.normal(4, 2, num_calibration)
    try:
        fit_calibration(g_t, rng.binomial(n, 0.99, 60), g_c, rng.binomial(n, 0.99, num_calibration), n, levels=levels)
    except ValueError as exc:
        assert "too few for any level" in str(exc)
        _fit_messages.append(str(exc))
        return False
    return True


@pytest.mark.parametrize("levels, limits", [
    ((0.1, 0.05, 0.01, 0.005, 0.001), (21, 22, 23, 24)),  # --limit smoke runs: 10 to 12 images calibrate
    ((0.001,), (2221, 2222, 2332, 2333, 2334)),  # level 0.001: 1,111 images give a finite rank, the fit wants 1,167
])
def test_the_checks_before_any_work_refuse_exactly_what_the_fit_refuses(levels, limits, tmp_path):
    """calibrate all checks the calibration split's size before training and counting (README: "checked before any
    training"), but it checked the conformal minimum (min_calibration_size) while the fit leaves a level out below
    ceil(1.05 x that): --limit 22 (11 tune, 11 calibrate) or --levels 0.001 with 1,111..1,166 calibration images
    passed the check, then trained both models, counted every image and failed in the fit ("too few for any
    level", naming the smaller number as what it needs). Now one rule (level_min_images) serves both."""
    verdicts, messages = [], []
    _fit_messages.clear()
    for limit in limits:
        cfg = PipelineConfig(out=str(tmp_path / "out"), levels=levels, limit=limit)
        tune = min(cfg.tune_size, limit // 2)
        try:
            assert _checked_tune_size(cfg) == tune
            checked = True
        except ValueError as exc:
            checked = False
            messages.append(str(exc))
        verdicts.append((limit - tune, checked, _fits(limit - tune, levels)))
    assert all(checked == fits for _, checked, fits in verdicts), verdicts
    assert any(checked for _, checked, _ in verdicts) and not all(checked for _, checked, _ in verdicts)
    assert all(f"needs at least {level_min_images(max(levels))} calibration images" in m for m in messages)
    assert _fit_messages and all(f"needs {level_min_images(max(levels))})" in m for m in _fit_messages)


@pytest.mark.parametrize("delta", [1e-25, 1e-60, 1e-300, 5e-324, 0.09, 0.045, 0.0009, 0.5, 0.999])
def test_min_calibration_size_is_exact_and_immediate_for_any_delta(delta):
    """The smallest m whose conformal rank ceil((m+1)(1-delta)) is <= m, in closed form. The search upward from
    floor(1/delta) - 2 took one Fraction step per integer between the float 1/delta and the exact value: it hung
    (~10^9 steps at 1e-25, without end at 1e-300) and returned a non-minimal m at 1e-22."""
    with _within(2.0):
        m = sm.min_calibration_size(delta)
    assert sm.conformal_rank(m, delta) <= m
    assert m == 1 or sm.conformal_rank(m - 1, delta) > m - 1
    assert sm.min_calibration_size(1e-22) == 9999999999999999514032  # ceil(1/delta - 1) for the float 1e-22


def test_tiny_levels_are_refused_or_left_out_at_once(tmp_path):
    """A level of 1e-25 is a configuration no split supports: calibrate all refuses it before any work with the
    size it needs, the fit leaves it out of the ladder, and a manifest level with it (and abstaining bins) loads;
    each hung before (the bundle loader at server start)."""
    with _within(5.0):
        with pytest.raises(ValueError, match="needs at least"):
            _checked_tune_size(PipelineConfig(out=str(tmp_path / "out"), levels=(1e-25,)))
        rng = np.random.default_rng(5302)
        g = rng.normal(4, 2, 400)
        block = fit_calibration(g[:100], rng.binomial(1000, 0.99, 100), g[100:], rng.binomial(1000, 0.99, 300),
                                1000, levels=(0.1, 1e-25))
        assert [lv["alpha"] for lv in block["levels"]] == [0.1]
        delta, alpha_1 = sm.level_split(1e-25)
        level = ConformalLevel(alpha=1e-25, delta=delta, alpha_1=alpha_1, knots=[0.0], values=[1.0], scale=[1.0],
                               edges=[], q_hat=[None], bin_sizes=[300])
        assert level.q_hat == [None]
        assert level_min_images(1e-320) > 10**300  # beyond floats: exact, no OverflowError
    assert math.isinf(sm.conformal_quantile(np.arange(300.0), delta))
