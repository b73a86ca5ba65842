"""Shared machinery for the validity tests of :mod:`smoothing`.

* ``size``: a parametrized fixture with a fast variant (default run) and a big variant marked ``slow``
  (``pytest -m slow``), so that every simulation test has one body and two sizes.
* ``sim``: the Monte-Carlo / exact harness (Bernoulli paths monitored after every sample, exact dynamic programs,
  rate assertions with binomial standard errors, and an independent mpmath computation of the e-process's
  rejection region, so that exact rates can be compared with an independent reference, not only with alpha).
* ``backend``: the embedded bundle's base model (CPU onnxruntime) for the engine and sampler tests.
* ``record_rate``: every observed error rate is recorded and printed in the terminal summary (and as a junit
  property), so the numbers of a run can be quoted without ``-s``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import mpmath as mp
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


def exact_ever_probability_boundary(boundary: np.ndarray, p: float) -> float:
    """Exact P(exists t <= len(boundary): S_t >= boundary[t-1]) for a Bernoulli(p) walk (rejection region = up-set)."""
    mass = np.array([1.0])
    absorbed = 0.0
    for t in range(1, len(boundary) + 1):
        new = np.zeros(t + 1)
        new[:-1] += mass * (1.0 - p)
        new[1:] += mass * p
        lo = int(boundary[t - 1])
        absorbed += float(new[lo:].sum())
        new[lo:] = 0.0
        mass = new
    return absorbed


def mp_log_e(s: int, t: int, p0, alpha, components) -> mp.mpf:
    """Exact (mpmath) log E_t(p0) - log(1/alpha) for the mixture sum_k w_k Beta(a_k, b_k) (``components`` = list of
    (w, a, b)): log sum_k w_k B(a_k + S, b_k + F) / B(a_k, b_k) - S log p0 - F log(1 - p0) + log alpha.
    Written from the definition (mp.beta), sharing no code with smoothing."""
    f = t - s
    p0 = mp.mpf(p0)
    m = mp.fsum(mp.mpf(w) * mp.beta(mp.mpf(a) + s, mp.mpf(b) + f) / mp.beta(mp.mpf(a), mp.mpf(b))
                for w, a, b in components if w > 0)
    return mp.log(m) - s * mp.log(p0) - f * mp.log1p(-p0) + mp.log(mp.mpf(alpha))


def mp_rejection_boundary(p0: float, alpha: float, components, horizon: int, dps: int = 30) -> np.ndarray:
    """For t = 1..horizon, the smallest S in the exact rejection region {S >= p0 t and log E_t(p0) >= log(1/alpha)}
    (t + 1 where it is empty), in mpmath. The region is an up-set in S: log E_t(p0) is convex in S (log-gamma terms
    are convex, a log-sum-exp of convex functions is convex, the null terms are linear) and below log(1/alpha) at
    S = ceil(p0 t) (the marginal likelihood never exceeds the maximized one, which is within a factor ~e^(1/t) of
    the null's there), so a walk from the previous boundary finds the exact one."""
    with mp.workdps(dps):
        inside = lambda s, t: s >= p0 * t and mp_log_e(s, t, p0, alpha, components) >= 0  # noqa: E731
        out = np.empty(horizon, dtype=np.int64)
        c = 1
        for t in range(1, horizon + 1):
            lo = max(0, math.ceil(p0 * t - 1e-12))
            c = min(max(c, lo), t + 1)
            while c > lo and inside(c - 1, t):
                c -= 1
            while c <= t and not inside(c, t):
                c += 1
            out[t - 1] = c
        return out


def mp_rejection_boundary_at(p0: float, alpha: float, components, ts, dps: int = 30) -> dict[int, int]:
    """{t: smallest S in the exact mpmath rejection region at t} for the given t's, by bisection over the up-set (see
    :func:`mp_rejection_boundary`); t + 1 where the region is empty."""
    out = {}
    with mp.workdps(dps):
        for t in (int(x) for x in ts):
            lo, hi = max(0, math.ceil(p0 * t - 1e-12)), t + 1  # region is [answer, t]; hi = t + 1 means empty
            while lo < hi:
                mid = (lo + hi) // 2
                if mid >= p0 * t and mp_log_e(mid, t, p0, alpha, components) >= 0:
                    hi = mid
                else:
                    lo = mid + 1
            out[t] = lo
    return out


def implementation_boundary(fn, horizon: int) -> np.ndarray:
    """For t = 1..horizon, the smallest S with fn(S, t) True (t + 1 if none), checking that fn's set is an up-set."""
    out = np.empty(horizon, dtype=np.int64)
    for t in range(1, horizon + 1):
        hit = np.asarray(fn(np.arange(t + 1), t), dtype=bool)
        first = int(np.argmax(hit)) if hit.any() else t + 1
        assert hit[first:].all(), f"rejection set at t={t} is not an up-set in S"
        out[t - 1] = first
    return out


def exact_policy_violation(decide, bound, p: float, checkpoints, envelope=None) -> tuple[float, float, float]:
    """Exact (P(stopped with bound(S, t) > p), P(stopped by the last checkpoint), P(stopped after ``envelope`` has
    exceeded p at some checkpoint up to and including the stop)) for a policy evaluated at ``checkpoints`` on a
    Bernoulli(p) walk: dynamic program over (S, crossed yet) with binomial steps between checkpoints. ``envelope``
    (default ``bound``) is the confidence sequence: a certificate that IS the sequence at the stopping time can only be
    wrong on paths where the sequence has crossed, so the first value can never exceed the third.
    ``decide(S, t)``, ``bound(S, t)`` receive the array of all reachable S at checkpoint t."""
    from scipy.stats import binom

    envelope = bound if envelope is None else envelope
    fresh, crossed, prev = np.array([1.0]), np.array([0.0]), 0
    violated = stopped = crossed_stopped = 0.0
    for c in (int(x) for x in checkpoints):
        step = binom.pmf(np.arange(c - prev + 1), c - prev, p)
        fresh, crossed, prev = np.convolve(fresh, step), np.convolve(crossed, step), c
        s = np.arange(len(fresh))
        over = np.asarray(envelope(s, np.full_like(s, c))) > p
        crossed[over] += fresh[over]
        fresh[over] = 0.0
        stop = np.asarray(decide(s, np.full_like(s, c))) != 0
        wrong = stop & (np.asarray(bound(s, np.full_like(s, c))) > p)
        violated += float(fresh[wrong].sum() + crossed[wrong].sum())
        stopped += float(fresh[stop].sum() + crossed[stop].sum())
        crossed_stopped += float(crossed[stop].sum())
        fresh[stop] = crossed[stop] = 0.0
    return violated, stopped, crossed_stopped


def exact_crossing(bound, p: float, checkpoints) -> float:
    """Exact P(exists checkpoint t: bound(S_t, t) > p): the envelope of the violation rate of ANY stopping rule that
    reports ``bound`` at one of these checkpoints (a valid certificate can never exceed it)."""
    return exact_policy_violation(lambda s, t: np.asarray(bound(s, t)) > p, bound, p, checkpoints)[0]


def assert_rate_at_most(rate: float, bound: float, runs: int, what: str) -> None:
    """rate <= bound + 3 binomial standard errors computed at the bound (the null-hypothesis rate)."""
    limit = bound + 3.0 * binomial_se(bound, runs)
    assert rate <= limit, f"{what}: observed rate {rate:.5f} > {bound} + 3 SE = {limit:.5f} over {runs} runs"


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``): the tiny
    trainings of the pipeline tests are per-step-overhead bound (e.g. 1500 full-batch steps of the meta fit on 20
    rows); with two threads on a busy 2-core machine they were measured 3-10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backend():
    """The embedded bundle's base model on CPU onnxruntime, 2 threads (engine and sampler tests)."""
    from models.bundle import load_bundle

    return load_bundle().backend("base", device="cpu", threads=2)


@pytest.fixture(scope="session")
def sim():
    return SimpleNamespace(
        ever_rate=ever_rate,
        tabulated=tabulated,
        exact_ever_probability=exact_ever_probability,
        exact_ever_probability_boundary=exact_ever_probability_boundary,
        mp_log_e=mp_log_e,
        mp_rejection_boundary=mp_rejection_boundary,
        mp_rejection_boundary_at=mp_rejection_boundary_at,
        implementation_boundary=implementation_boundary,
        exact_policy_violation=exact_policy_violation,
        exact_crossing=exact_crossing,
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


@pytest.fixture
def restore_signals():
    """The SIGTERM / SIGINT handlers as they were before the test (tests of commands that install their own)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def restore_environment():
    """Every test leaves os.environ as it found it. The process environment is inherited by every subprocess a later
    test starts: ``server.ray_serve.run_local`` sets Ray's ingress variables with os.environ.setdefault, and its
    stubbed tests (tests/test_ray_review2.py) left RAY_SERVE_ENABLE_HA_PROXY=1 behind, so the "proxy" cluster of
    tests/test_ray_serve.py ran HAProxy in whole-suite runs (its replays and bare 500s failed the Python proxy's
    checks; the file alone passed)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


# uvicorn's loggers exist from the start, so that restore_logging below also puts back the first configuration
for _name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
    logging.getLogger(_name)


def _ours(handler) -> bool:
    """pytest attaches its capture handlers to the root and every non-propagating logger in each phase: not ours."""
    return not type(handler).__module__.startswith("_pytest")


@pytest.fixture(autouse=True)
def restore_logging():
    """Every test leaves the loggers' levels, handlers, propagate and disabled flags as it found them. A uvicorn
    server run in-process (tests/serve_harness.py, the connection tests) applies uvicorn's logging dictConfig: it left
    "uvicorn.error"/"uvicorn.access" at the last test's level (CRITICAL from the connection tests: later tests'
    uvicorn tracebacks were dropped from their captured logs) and replaced their handlers with streams of that test."""
    manager = logging.root.manager
    loggers = [logging.root] + [lg for lg in list(manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    saved = [(lg, lg.level, [h for h in lg.handlers if _ours(h)], lg.propagate, lg.disabled) for lg in loggers]
    disable = manager.disable
    yield
    for lg, level, handlers, propagate, disabled in saved:
        now = [h for h in lg.handlers if _ours(h)]
        if lg.level != level:
            lg.setLevel(level)
        if now != handlers:
            for h in now:
                if h not in handlers:
                    lg.removeHandler(h)
            for h in handlers:
                if h not in lg.handlers:
                    lg.addHandler(h)
        lg.propagate, lg.disabled = propagate, disabled
    if manager.disable != disable:
        logging.disable(disable)


# Threads that live as long as the process by design (tqdm's monitor, started once by the first progress bar).
_PROCESS_LIFETIME_THREADS = ("tqdm_monitor",)
_module_start: dict = {}


def _child_processes() -> dict[int, str]:
    """This process's descendants that are still running (not zombies), pid -> command line."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = {}, [os.getpid()]
    while todo:
        for pid in parents.get(todo.pop(), []):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
            except OSError:
                continue
            todo.append(pid)
    return out


def _left_running(start: dict) -> list[str]:
    threads = [f"thread {t.name!r}" for t in threading.enumerate()
               if t.ident not in start["threads"] and t.is_alive() and t.name not in _PROCESS_LIFETIME_THREADS]
    children = [f"process {pid} ({cmd})" for pid, cmd in _child_processes().items() if pid not in start["children"]]
    return threads + children


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    if _module_start.get("path") != item.path:  # before the module's fixtures start anything
        _module_start.update(path=item.path, threads={t.ident for t in threading.enumerate()},
                             children=set(_child_processes()))
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test of a module and its module fixtures' finalizers: every thread and child process the module
    started has ended (a few seconds' grace). Engine threads, uvicorn servers, Ray clusters or readers left running
    keep their memory and CPU for the rest of the session and can change what later tests see (thread counts, ports,
    Ray's cluster address). Found this way: an engine's deadline watcher (test_engine_lifecycle) and the HAProxy
    log reader of every Ray cluster (tests/ray_cluster_helpers.py)."""
    result = yield
    if nextitem is None or nextitem.path != item.path:
        start, _module_start["path"] = dict(_module_start), None
        deadline = time.monotonic() + 5
        while (left := _left_running(start)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            pytest.fail(f"{item.path.name} left running after its last test: {'; '.join(left)}", pytrace=False)
    return result
