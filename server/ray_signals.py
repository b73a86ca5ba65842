"""SIGTERM/SIGINT of ``certserve serve --replicas N`` (server.ray_serve.run_local), as uvicorn handles them for one
process: the first signal stops gracefully (the replicas drain their ongoing requests), a second one stops at once.

:class:`StopSignals` is the handler's state machine. Imports no Ray: it only interrupts what the main thread is doing
by raising from the handler (Python runs signal handlers in the main thread, between bytecodes; Ray's blocking calls
check for them while they wait).

- First signal while the cluster or the replicas still start: :class:`StopRequested` is raised there (``serve.run``
  may wait for ever for a replica Ray cannot place); the caller deletes what started and shuts down.
- First signal once serving (or during the clean-up after a start-up failure): only :attr:`StopSignals.requested` is
  set; the caller's loop sees it and drains.
- Any later signal (the drain, or the graceful clean-up, is in progress): :class:`ForceStop` is raised once, which
  cuts the drain short; the caller then skips Serve's graceful shutdown and stops Ray at once (:data:`FORCED_EXIT`).
- After that, and while Ray itself stops (:meth:`StopSignals.shield`), signals are logged and ignored: interrupting
  ``ray.shutdown`` would leave Ray's processes running.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("certserve")

#: The exit status of a stop forced by a second signal: requests still draining were cut (their clients got a closed
#: connection or an error instead of an answer), so it is not the clean exit 0 of a drained stop.
FORCED_EXIT = 1
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """The first SIGTERM/SIGINT while ``run_local`` is still starting the cluster or the replicas (a BaseException,
    as KeyboardInterrupt: Ray's own ``except Exception`` while it waits for its proxies must not turn it into another
    error)."""


class ForceStop(BaseException):
    """A second SIGTERM/SIGINT while the first one's drain (or clean-up) is in progress: stop at once (a
    BaseException for the same reason as :class:`StopRequested`)."""


class StopSignals:
    """The SIGTERM/SIGINT handler of ``run_local`` and its state (module docstring). ``starting`` is True until the
    caller says the replicas are up (:meth:`serving`)."""

    def __init__(self) -> None:
        self.requested = threading.Event()  # a first signal arrived (a graceful stop was asked for)
        self.forced = False  # a second signal arrived: ForceStop was raised
        self.starting = True
        self._shielded = False
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        """Handle SIGTERM and SIGINT here (call from the main thread), remembering the handlers it replaces."""
        for sig in SIGNALS:
            self._previous.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self.handle)
        return self

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def serving(self) -> None:
        """The replicas are up: a first signal now only sets :attr:`requested` (the caller drains)."""
        self.starting = False

    def shield(self) -> None:
        """From now on (Ray is being stopped) every signal is logged and ignored."""
        self.starting, self._shielded = False, True

    def handle(self, signum, frame) -> None:
        """The signal handler: the state machine of the module docstring."""
        if self._shielded or self.forced:
            log.warning("certserve: signal %d ignored: Ray is stopping", signum)
            return
        if self.requested.is_set():
            self.forced = True
            log.warning("certserve: second signal (%d): stopping now, without waiting for the drain", signum)
            raise ForceStop
        self.requested.set()
        if self.starting:  # serve.run may wait for ever (a replica Ray cannot place): stop waiting
            self.starting = False
            raise StopRequested
