"""The machine a server benchmark runs on: description, code version, CPU load during a section, process memory, and
the Debian load tools (hey, wrk)."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np


def proc_status(pid: int) -> dict:
    """VmRSS / VmHWM of a live process in MiB (from /proc/<pid>/status)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return out


def proc_cpu_seconds(pid: int) -> float:
    stat = _proc_stat(pid)
    return stat[1] if stat else 0.0


def _proc_stat(pid: int, tid: int | None = None) -> tuple[int, float, int] | None:
    """(parent pid, CPU seconds, start time in ticks) of a live process, from /proc/<pid>/stat, or of its thread
    ``tid`` (/proc/<pid>/task/<tid>/stat: that thread's own CPU seconds); None if gone."""
    try:
        with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat", encoding="utf-8") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """CPU seconds (user + system) that thread ``tid`` of the live process ``pid`` has used (NaN if gone)."""
    stat = _proc_stat(pid, tid)
    return float("nan") if stat is None else stat[1]


class CpuMeter:
    """Machine CPU use during a section (/proc/stat) and how much of it was this benchmark's own process tree
    (self, waited-for children, and the processes registered in ``pids``), to expose concurrent work.

    A registered process is read every ``poll_s`` while the meter runs, so that one which ends before the section
    does (e.g. Ray's processes, not our children, when their server stops) keeps the CPU it used (up to its last
    reading) instead of turning into "other processes"; one that is our own child is counted by the waited-for
    children's usage once it is reaped."""

    pids: ClassVar[set[int]] = set()
    poll_s = 0.25

    def __init__(self):
        self._seen: dict[tuple[int, int], list] = {}  # (pid, start time) -> [CPU s at start, last CPU s, our child]
        self._lock = threading.Lock()
        self._poll(first=True)
        self.start = self._snapshot(self._registered(first=True))
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bench-cpu-meter", daemon=True)
        self._thread.start()

    def _poll(self, first: bool = False) -> set[tuple[int, int]]:
        alive = set()
        with self._lock:
            for pid in list(self.pids):
                stat = _proc_stat(pid)
                if stat is None:
                    continue
                key = (pid, stat[2])
                alive.add(key)
                entry = self._seen.setdefault(key, [stat[1] if first else 0.0, stat[1], stat[0] == os.getpid()])
                entry[1] = stat[1]
        return alive

    def _registered(self, alive=None, first: bool = False) -> float:
        """CPU seconds of the registered processes: at the start, those alive; later, all seen (a child that is
        gone is left to RUSAGE_CHILDREN, which has it once reaped)."""
        with self._lock:
            if first:
                return sum(e[0] for e in self._seen.values())
            return sum(e[1] for key, e in self._seen.items() if key in alive or not e[2])

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            self._poll()

    @classmethod
    def _snapshot(cls, registered: float) -> dict:
        try:
            with open("/proc/stat", encoding="utf-8") as fh:
                vals = [int(v) for v in fh.readline().split()[1:]]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            busy = (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        try:
            load1 = os.getloadavg()[0]
        except OSError:
            load1 = float("nan")
        return {"t": time.monotonic(), "busy": busy, "own": own + registered, "load1": load1}

    def stop(self) -> dict:
        self._stopped.set()
        self._thread.join()
        end = self._snapshot(self._registered(self._poll()))
        dt = max(end["t"] - self.start["t"], 1e-9)
        machine = (end["busy"] - self.start["busy"]) / dt
        own = (end["own"] - self.start["own"]) / dt
        return {"seconds": dt, "machine_cores": machine, "own_cores": own, "other_cores": max(0.0, machine - own),
                "load1_start": self.start["load1"], "load1_end": end["load1"]}


def combine_loads(a: dict, b: dict) -> dict:
    """Time-weighted mean of two CpuMeter results (load averages: first start, last end)."""
    ta, tb = a["seconds"], b["seconds"]
    mix = {k: (a[k] * ta + b[k] * tb) / (ta + tb) for k in ("machine_cores", "own_cores", "other_cores")}
    return dict(mix, seconds=ta + tb, load1_start=a["load1_start"], load1_end=b["load1_end"])


def describe_load(cpu: dict) -> str:
    return (f"machine CPU busy {cpu['machine_cores']:.2f} of {os.cpu_count()} cores on average, of which this "
            f"benchmark's processes (bench, server, load generator) {cpu['own_cores']:.2f} and **other processes "
            f"about {cpu['other_cores']:.2f} cores**; 1-min load average {cpu['load1_start']:.2f} at the start, "
            f"{cpu['load1_end']:.2f} at the end")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    mem = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
        with open("/proc/meminfo", encoding="utf-8") as fh:
            kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal"))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    import onnxruntime

    return (f"{platform.platform()}; CPU {cpu}, {os.cpu_count()} logical CPUs{mem}; Python "
            f"{platform.python_version()}, numpy {np.__version__}, onnxruntime {onnxruntime.__version__} "
            f"(providers {', '.join(onnxruntime.get_available_providers())})")


def code_version() -> str:
    """The commit of the working tree and which code files differ from it (the benchmark measures the tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=False, capture_output=True,
                             text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "server", "models", "smoothing", "calibration",
                                "bench", "pyproject.toml"], cwd=root, check=False, capture_output=True, text=True,
                               timeout=20).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    changed = sorted(line[3:] for line in dirty if line.strip())
    if not sha:
        return "unknown (not a git checkout)"
    return f"git {sha}" + (f" with uncommitted changes in {', '.join(changed)}" if changed else " (clean)")


def tool_version(name: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], check=False, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown version"
    except (OSError, subprocess.SubprocessError):
        return "unknown version"


def ensure_tool(name: str) -> str | None:
    """Path of a Debian load tool, installing it with apt-get when missing and running as root."""
    path = shutil.which(name)
    if path or os.geteuid() != 0 or not shutil.which("apt-get"):
        return path
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-qq", name], ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", name]):
        subprocess.run(cmd, check=False, env=env, capture_output=True, timeout=600)
        if cmd[1] == "install" and shutil.which(name):
            break
    return shutil.which(name)
