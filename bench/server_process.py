"""``certserve serve`` as a child process on a free loopback port: the one spawner of the benchmarks and the tests.

Spawn (settings through ``CERTSERVE_*`` variables, as in production), wait for /readyz, read metrics and RSS, then
SIGTERM (drain) or kill. Output goes to a log file (a full pipe would block the server). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import CpuMeter, proc_status, thread_cpu_seconds


def free_port() -> int:
    return free_ports(1)[0]


# Below Linux's ephemeral range (32768-60999) and above Ray's worker ports (10002-19999): a port chosen here is never
# handed out by a later bind(0) or connect() of another process (e.g. one of Ray's own servers) before ours binds it.
_PORT_RANGE = (20000, 32767)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that are free now, outside the ephemeral range (see ``_PORT_RANGE``)."""
    rng = random.Random()
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < n:
            port = rng.randint(*_PORT_RANGE)
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
        return ports


def certserve_command() -> list[str]:
    """The installed ``certserve`` console script, or the CLI module with this interpreter."""
    exe = Path(sys.executable).parent / "certserve"
    found = str(exe) if exe.exists() else shutil.which("certserve")
    return [found] if found else [sys.executable, "-m", "cli.main"]


class ServerProc:
    """``certserve serve --host 127.0.0.1 --port <free> *args`` with ``env`` added to this process's environment."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None, tag: str = "server",
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [*certserve_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"serve-{tag}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop()/close())
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, **(env or {})}, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        CpuMeter.pids.add(self.proc.pid)

    @classmethod
    def for_bench(cls, args, workdir: Path, tag: str) -> ServerProc:
        """The server the benchmark sections measure: ``--serve-device``, ``--bundle`` and ``--threads`` of ``args``."""
        extra = ["--device", args.serve_device]
        extra += ["--bundle", args.bundle] if args.bundle else []
        extra += ["--threads", str(args.threads)] if args.threads else []
        return cls(workdir, *extra, tag=tag)

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds from spawn to the first GET /readyz answered 200 (polled every 10 ms)."""
        import httpx

        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() - self.t0 < timeout:
                if self.proc.poll() is not None:
                    raise AssertionError(f"certserve serve exited with {self.proc.returncode} before ready:\n"
                                         f"{self.log_tail()}")
                try:
                    if client.get(self.url + "/readyz").status_code == 200:
                        return time.perf_counter() - self.t0
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
        raise AssertionError(f"certserve serve not ready after {timeout} s:\n{self.log_tail()}")

    def refused_start(self, what: str, timeout: float = 90.0) -> tuple[int, str]:
        """Wait for a server that must refuse to start; (exit code, log). Fails if it keeps running."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"a server with {what} kept running") from None
        return code, self.log()

    def sigterm_and_wait(self, threads=(), drain: float = 0.0) -> tuple[int, float]:
        """SIGTERM, let the client threads finish, wait for the exit; (exit code, seconds from signal to exit)."""
        t_term = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=drain + 30)
        try:
            code = self.proc.wait(timeout=drain + 15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server still running {drain + 15}s after SIGTERM") from None
        return code, time.monotonic() - t_term

    def loop_cpu_seconds(self) -> float:
        """CPU seconds used so far by the server's main thread, where uvicorn runs the event loop (one process:
        parsing, the surrogate's clean pass, responses and logging; not the engine's or the sampler's threads)."""
        return thread_cpu_seconds(self.proc.pid, self.proc.pid)

    def rss(self) -> dict:
        return proc_status(self.proc.pid)

    def metrics(self) -> dict[str, float]:
        """Every ``certserve_*`` sample of /metrics by its full name (labels included)."""
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("certserve_") and " " in line:
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def metric(self, name: str) -> float:
        return self.metrics()[name]

    def stop(self) -> float:
        """SIGTERM (kill after 60 s); seconds until the process exited."""
        t = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close()
        return time.perf_counter() - t

    def close(self) -> None:
        """Kill if still running (no drain) and release the log file."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        CpuMeter.pids.discard(self.proc.pid)
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-n:])
