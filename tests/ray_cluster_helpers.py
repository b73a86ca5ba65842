"""The harness of tests/test_ray_serve.py: ``Cluster`` runs ``certserve serve --replicas 2`` in a private network
namespace (bench/netns.py) with its Ray files in a temp dir and reads HAProxy's access log; ``png`` encodes a test
image for /certify."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench import netns
from bench.server_process import ServerProc, free_ports

REPLICA = "x-certserve-replica"
ENV = {"CERTSERVE_THREADS": "1", "CERTSERVE_DRAIN_SECONDS": "5", "RAY_USAGE_STATS_ENABLED": "0",
       "RAY_metrics_report_interval_ms": "1000"}


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.rint(image[0] * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


class Cluster:
    """``certserve serve --replicas 2`` in the private namespace this thread is in; its Ray files in a temp dir."""

    def __init__(self, workdir: Path, namespace: str, ingress: str):
        self.namespace, self.ingress = namespace, ingress
        port, self.metrics_port = free_ports(2)  # distinct: a port chosen twice in a row can repeat
        self.ray_tmp = tempfile.mkdtemp(prefix="ray")  # short: Ray's unix socket paths must fit 107 bytes
        # HAProxy's access log (when it runs): syslog datagrams to a socket of this namespace, read by the tests
        self.haproxy_log = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.haproxy_log.bind(("127.0.0.1", 0))
        self.haproxy_lines: list[str] = []  # read as they come (a full socket buffer would drop lines)
        self.haproxy_reader = threading.Thread(target=self._read_haproxy_log, name="haproxy-log-reader", daemon=True)
        self.haproxy_reader.start()
        log_target = f"127.0.0.1:{self.haproxy_log.getsockname()[1]}"
        env = {**ENV, "RAY_TMPDIR": self.ray_tmp, "RAY_SERVE_HAPROXY_LOG_TARGET": log_target}
        self.t0 = time.monotonic()
        self.server = ServerProc(workdir, "--replicas", "2", "--ingress", ingress, "--ray-metrics-port",
                                 str(self.metrics_port), env=env, tag="ray", port=port)
        self.url = self.server.url
        self.started_s = None

    def wait_ready(self, timeout: float = 240.0) -> set[str]:
        """/readyz through the ingress, then both replicas answering; the set of replica ids."""
        self.server.wait_ready(timeout=timeout)
        seen: set[str] = set()
        with httpx.Client(base_url=self.url, timeout=30) as client:
            end = time.monotonic() + 60
            while len(seen) < 2 and time.monotonic() < end:
                seen.add(client.get("/readyz").headers.get(REPLICA, ""))
        seen.discard("")
        self.started_s = time.monotonic() - self.t0
        return seen

    def replica_pids(self) -> list[int]:
        pids = []
        for pid in netns.processes_in(self.namespace):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"ServeReplica:certserve:Certserve" in cmdline:
                pids.append(pid)
        return pids

    def serve_log_tail(self, lines: int = 40, pattern: str = "proxy_*.log") -> str:
        """The last ``lines`` of Ray Serve's log files matching ``pattern`` (its proxy's, by default), for failure
        messages: what the ingress saw when a client got a 500 or a dropped connection."""
        out = []
        for path in sorted(Path(self.ray_tmp).glob(f"ray/session_latest/logs/serve/{pattern}")):
            out.append(f"--- {path.name}")
            out.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out) or f"(no {pattern} under {self.ray_tmp}/ray/session_latest/logs/serve)"

    def _read_haproxy_log(self) -> None:
        while True:
            try:
                data = self.haproxy_log.recv(65536)
            except OSError:  # closed
                return
            if not data:  # shut down by close() (HAProxy sends no empty datagram)
                return
            self.haproxy_lines.append(data.decode(errors="replace"))

    def haproxy_config(self) -> str:
        """The config file the running HAProxy of this cluster was started with (its ``-f`` argument)."""
        for pid in netns.processes_in(self.namespace):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if Path(args[0]).name == "haproxy" and "-f" in args:
                return Path(args[args.index("-f") + 1]).read_text()
        raise AssertionError("no HAProxy process in the cluster's namespace")

    def close(self) -> None:
        """Last resort (a failed test): stop the command, then kill whatever is left in the namespace."""
        if self.server.proc.poll() is None:
            self.server.stop()
        for pid in netns.processes_in(self.namespace):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.server.close()
        # close() alone does not wake a recv blocked in another thread: the reader stayed blocked for the rest of
        # the session (one thread per cluster); shutdown() makes its recv return b""
        try:
            self.haproxy_log.shutdown(socket.SHUT_RDWR)
        except OSError:  # ENOTCONN for an unconnected UDP socket, after waking the reader all the same
            pass
        self.haproxy_reader.join(timeout=5)
        self.haproxy_log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
