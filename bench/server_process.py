"""``certserve serve`` as a child process on a free loopback port: spawn, wait for /readyz, RSS, metrics, stop."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import CpuMeter, proc_status


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    """``certserve serve`` on 127.0.0.1:<free port> as a child process (stdout/stderr to a log file)."""

    def __init__(self, args, workdir: Path, tag: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "certserve"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]
        cmd += ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--device", args.serve_device]
        if args.bundle:
            cmd += ["--bundle", args.bundle]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        self.cmd = cmd
        self.log_path = workdir / f"serve-{tag}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        CpuMeter.pids.add(self.proc.pid)

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds from spawn to the first GET /readyz answered 200 (polled every 10 ms)."""
        import httpx

        with httpx.Client(timeout=1.0) as client:
            while time.perf_counter() - self.t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"certserve serve exited with {self.proc.returncode} before ready:\n"
                                       f"{self.log_tail()}")
                try:
                    if client.get(self.url + "/readyz").status_code == 200:
                        return time.perf_counter() - self.t0
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
        raise RuntimeError(f"certserve serve not ready after {timeout} s:\n{self.log_tail()}")

    def rss(self) -> dict:
        return proc_status(self.proc.pid)

    def metrics(self) -> dict[str, float]:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=5).text
        out = {}
        for line in text.splitlines():
            if line.startswith("certserve_") and " " in line:
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def stop(self) -> float:
        """SIGTERM; seconds until the process exited."""
        t = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        CpuMeter.pids.discard(self.proc.pid)
        self._log.close()
        return time.perf_counter() - t

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
