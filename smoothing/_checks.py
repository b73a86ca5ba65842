"""Argument validation shared by every public function of :mod:`smoothing`.

Each check raises :class:`ValueError` with a message that names the argument and says what was expected,
so that a caller (the server, the calibration pipeline) can pass it on unchanged.
"""

from __future__ import annotations

import numpy as np


def check_alpha(alpha, name: str = "alpha") -> np.ndarray:
    """Return ``alpha`` as a float array; every entry must lie strictly inside (0, 1)."""
    arr = _floats(alpha, name)
    if arr.size == 0 or not np.isfinite(arr).all() or (arr <= 0.0).any() or (arr >= 1.0).any():
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {_show(alpha)}")
    return arr


def check_sigma(sigma) -> np.ndarray:
    """Return ``sigma`` (the noise level) as a float array; every entry must be finite and > 0."""
    arr = _floats(sigma, "sigma")
    if arr.size == 0 or not np.isfinite(arr).all() or (arr <= 0.0).any():
        raise ValueError(f"sigma must be a finite number > 0, got {_show(sigma)}")
    return arr


def check_prior(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Return the Beta prior parameters as float arrays; both must be finite and > 0."""
    a_arr, b_arr = _floats(a, "Beta prior parameter a"), _floats(b, "Beta prior parameter b")
    for name, arr, raw in (("a", a_arr, a), ("b", b_arr, b)):
        if arr.size == 0 or not np.isfinite(arr).all() or (arr <= 0.0).any():
            raise ValueError(f"Beta prior parameter {name} must be finite and > 0, got {_show(raw)}")
    return a_arr, b_arr


def check_probability(p, name: str, *, open_interval: bool = True) -> np.ndarray:
    """Return ``p`` as a float array inside (0, 1) (or [0, 1] when ``open_interval`` is False)."""
    arr = _floats(p, name)
    bad = ~np.isfinite(arr)
    bad |= (arr <= 0.0) | (arr >= 1.0) if open_interval else (arr < 0.0) | (arr > 1.0)
    if arr.size == 0 or bad.any():
        interval = "strictly between 0 and 1" if open_interval else "in [0, 1]"
        raise ValueError(f"{name} must lie {interval}, got {_show(p)}")
    return arr


def check_counts(successes, trials) -> tuple[np.ndarray, np.ndarray]:
    """Return (successes, trials) as int64 arrays; both must be whole numbers with 0 <= successes <= trials < 2^62
    (integers and whole floats alike; booleans and strings are refused)."""
    s = _as_count(successes, "successes")
    t = _as_count(trials, "trials")
    if (s > t).any():
        raise ValueError(f"successes must not exceed trials, got successes={_show(successes)}, trials={_show(trials)}")
    return s, t


def check_nonneg_int(value, name: str) -> np.ndarray:
    """Return ``value`` as an int64 array of whole numbers in [0, 2^62)."""
    return _as_count(value, name)


def check_one_nonneg_int(value, name: str, expected: str = "one whole number >= 0") -> int:
    """Return ``value``, ONE whole number in [0, 2^62), as an int (an array is refused: ``name`` must be
    ``expected``)."""
    out = _as_count(value, name, expected)
    if out.ndim:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(out)


def _as_count(value, name: str, expected: str | None = None) -> np.ndarray:
    """``value`` as int64 counts in [0, 2^62); a negative one is refused with ``expected`` where given (the caller's
    own range, e.g. ">= 1"), else ">= 0"."""
    arr = np.asarray(value)
    if arr.dtype.kind in "iu":  # the same limit as float counts (a uint64 >= 2^63 would wrap negative in the cast)
        if (arr >= 2**62).any():
            raise ValueError(f"{name} must be below 2^62, got {_show(value)}")
        out = arr.astype(np.int64, copy=False)
    elif arr.dtype.kind == "f":
        f = arr.astype(np.float64, copy=False)
        if not np.isfinite(f).all() or (f != np.round(f)).any():
            raise ValueError(f"{name} must be whole numbers, got {_show(value)}")
        if (np.abs(f) >= 2.0**62).any():
            raise ValueError(f"{name} must be below 2^62, got {_show(value)}")
        out = f.astype(np.int64)
    else:
        raise ValueError(f"{name} must be whole numbers, got {_show(value)}")
    if (out < 0).any():
        raise ValueError(f"{name} must be {expected or '>= 0'}, got {_show(value)}")
    return out


def _floats(value, name: str) -> np.ndarray:
    """``value`` as a float64 array; numbers only (booleans, strings, complex and other objects are refused: numpy
    would turn True into 1.0, "0.05" into 0.05 and drop an imaginary part)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a number (or an array of numbers), got {_show(value)}")
    return arr.astype(np.float64, copy=False)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
