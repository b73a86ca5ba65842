"""Shared machinery for the validity tests of :mod:`smoothing`.

* ``size``: a parametrized fixture with a fast variant (default run) and a big variant marked ``slow``
  (``pytest -m slow``), so that every simulation test has one body and two sizes.
* ``sim``: the Monte-Carlo / exact harness (Bernoulli paths monitored after every sample, exact dynamic programs,
  rate assertions with binomial standard errors).
* ``record_rate``: every observed error rate is recorded and printed in the terminal summary (and as a junit
  property), so the numbers of a run can be quoted without ``-s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest


@dataclass(frozen=True)
class Size:
    """Simulation size: ``runs`` independent paths (or repetitions), each monitored for ``horizon`` samples."""

    name: str
    runs: int
    horizon: int
    dp_horizon: int  # horizon of the exact dynamic program for ``rejects``
    cs_dp_horizon: int  # horizon of the exact dynamic programs for the confidence sequence (costlier per step)
    reps: int  # repetitions for conformal / Cohen / policy simulations


FAST = Size("fast", runs=2_000, horizon=300, dp_horizon=1_000, cs_dp_horizon=500, reps=2_000)
SLOW = Size("slow", runs=20_000, horizon=2_000, dp_horizon=5_000, cs_dp_horizon=3_000, reps=20_000)


@pytest.fixture(params=[pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)])
def size(request) -> Size:
    return request.param


def binomial_se(rate: float, runs: int) -> float:
    """Standard error of an empirical frequency of an event with probability ``rate`` over ``runs`` trials."""
    return math.sqrt(rate * (1.0 - rate) / runs)


def ever_rate(event, p: float, runs: int, horizon: int, seed: int, block: int = 250) -> float:
    """Fraction of ``runs`` i.i.d. Bernoulli(p) paths on which ``event(S_t, t)`` holds for SOME t in 1..horizon.

    The paths are simulated with cumulative sums (in time blocks to bound memory); ``event`` receives the vector of
    S_t over all runs at each t, i.e. the procedure is monitored after every single sample.
    """
    rng = np.random.default_rng(seed)
    s = np.zeros(runs, dtype=np.int64)
    ever = np.zeros(runs, dtype=bool)
    t = 0
    while t < horizon:
        k = min(block, horizon - t)
        paths = s[:, None] + np.cumsum(rng.random((runs, k)) < p, axis=1)
        for j in range(k):
            ever |= np.asarray(event(paths[:, j], t + j + 1), dtype=bool)
        s = paths[:, -1]
        t += k
    return float(ever.mean())


def tabulated(fn):
    """Turn ``fn(S, t) -> bool array`` into an event that evaluates ``fn`` on every reachable S in 0..t once per t
    and looks each run's S_t up. Identical values to calling ``fn`` on the runs, much cheaper when runs >> t."""

    def event(s_t, t):
        table = np.asarray(fn(np.arange(t + 1), t), dtype=bool)
        return table[s_t]

    return event


def exact_ever_probability(fn, p: float, horizon: int) -> float:
    """Exact P(exists t <= horizon: fn(S_t, t)) for S_t ~ Bernoulli(p) random walk, by dynamic programming over S.

    ``fn(np.arange(t + 1), t)`` gives the absorbing ("event happened") set at time t. Float error is ~1e-13.
    """
    mass = np.array([1.0])
    absorbed = 0.0
    for t in range(1, horizon + 1):
        new = np.zeros(t + 1)
        new[:-1] += mass * (1.0 - p)
        new[1:] += mass * p
        hit = np.asarray(fn(np.arange(t + 1), t), dtype=bool)
        absorbed += float(new[hit].sum())
        new[hit] = 0.0
        mass = new
    return absorbed


def assert_rate_at_most(rate: float, bound: float, runs: int, what: str) -> None:
    """rate <= bound + 3 binomial standard errors computed at the bound (the null-hypothesis rate)."""
    limit = bound + 3.0 * binomial_se(bound, runs)
    assert rate <= limit, f"{what}: observed rate {rate:.5f} > {bound} + 3 SE = {limit:.5f} over {runs} runs"


@pytest.fixture(scope="session")
def sim():
    return SimpleNamespace(
        ever_rate=ever_rate,
        tabulated=tabulated,
        exact_ever_probability=exact_ever_probability,
        assert_rate_at_most=assert_rate_at_most,
        binomial_se=binomial_se,
    )


_RATES: list[tuple[str, str, float, float, int]] = []


@pytest.fixture
def record_rate(request, record_property):
    """record_rate(rate, bound, runs): store an observed error rate for the terminal summary and the junit XML."""

    def record(rate: float, bound: float, runs: int, label: str = "") -> None:
        name = request.node.nodeid.split("::", 1)[-1] + (f" [{label}]" if label else "")
        _RATES.append((request.node.nodeid.split("::", 1)[0], name, float(rate), float(bound), int(runs)))
        record_property(f"rate{(' ' + label) if label else ''}", f"{rate:.6f} (bound {bound}, runs {runs})")

    return record


def pytest_terminal_summary(terminalreporter):
    if not _RATES:
        return
    terminalreporter.section("smoothing: observed rates (runs=0: exact dynamic program)")
    for module, name, rate, bound, runs in _RATES:
        terminalreporter.write_line(f"rate={rate:<9.5f} bound={bound:<7g} runs={runs:<7d} {module.split('/')[-1]}::{name}")
