"""Test isolation: what one test changes in process-global state does not reach the next (tests/conftest.py).

The pair below runs in file order: the first test changes the state as product code run in-process does, the second
checks that it was put back. Without the conftest fixture, the second fails."""

from __future__ import annotations

import logging

UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
_before: dict = {}


def _state() -> dict:
    return {name: (lg.level, [h for h in lg.handlers if not type(h).__module__.startswith("_pytest")], lg.propagate)
            for name in UVICORN for lg in [logging.getLogger(name)]}


def test_a_test_that_runs_uvicorns_logging_config():
    import uvicorn

    _before.update(_state())
    uvicorn.Config(app=None, log_level="critical")  # its dictConfig, as every server run in-process applies it
    assert logging.getLogger("uvicorn.error").level == logging.CRITICAL and _state() != _before


def test_leaves_the_loggers_as_it_found_them_to_the_next_test():
    assert _before, "run after the test above (file order)"
    assert _state() == _before
