"""Bug hunt of the deployment artifacts (Dockerfile, docker/, deploy/): regression tests for the defects found.

Each test's docstring says how it behaved against the file before its fix.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import pytest

from tests.deploy_helpers import ROOT
from tests.test_deploy_images import dockerfile_instructions, dockerfile_run


def _workdir_of(marker: str) -> str:
    """The WORKDIR in effect for the RUN instruction holding ``marker`` (the last one before it in its stage)."""
    workdir = "/"
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            workdir = "/"
        elif word == "WORKDIR":
            workdir = rest
        elif word == "RUN" and marker in rest:
            return workdir
    raise AssertionError(f"no RUN with {marker!r}")


def _build_check(tmp_path: Path, with_bundle: bool) -> subprocess.CompletedProcess:
    """The Dockerfile's build check (the RUN after the install), run as the build runs it: in its WORKDIR, /src (the
    build context's copy of the sources: here the repository root) or another directory (here an empty one), with an
    "installed" ``models`` package (a copy on PYTHONPATH, standing for /opt/venv's site-packages) that holds the
    embedded bundle or not."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "models", site / "models",
                    ignore=None if with_bundle else shutil.ignore_patterns("bundles", "__pycache__"))
    script = dockerfile_run("packages_distributions").replace("/opt/venv/bin/python", sys.executable)
    script = script.replace("/opt/venv/lib/python3*/site-packages", sysconfig.get_paths()["purelib"])
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    cwd = ROOT if _workdir_of("packages_distributions") == "/src" else elsewhere
    env = {**os.environ, "ORT_PACKAGE": "onnxruntime", "PYTHONPATH": str(site)}
    return subprocess.run(["sh", "-eu", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, check=False)


def test_build_check_looks_for_the_bundle_in_the_installed_package(tmp_path):
    """The build check's "the embedded bundle is missing" assertion must look at the installed package: it ran with
    the build stage's WORKDIR /src as its working directory, where ``python -c`` imports ``models`` from the copied
    source tree (the current directory comes first on sys.path), so an image whose installed package lacked the bundle
    (package-data not matching it) passed the build and failed at start-up. Run against the unfixed Dockerfile: failed
    (the check passed with the installed package's bundle missing)."""
    missing = _build_check(tmp_path / "without", with_bundle=False)
    assert missing.returncode != 0 and "the embedded bundle is missing" in missing.stderr, \
        missing.stdout + missing.stderr
    present = _build_check(tmp_path / "with", with_bundle=True)
    assert present.returncode == 0, present.stdout + present.stderr


def _healthcheck_command() -> list[str]:
    [rest] = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    command = json.loads(rest.partition(" CMD ")[2])
    assert command[0] == "python3"
    return [sys.executable, *command[1:]]


@contextlib.contextmanager
def _healthz_server(host: str):
    """A stand-in for the server: 200 on GET /healthz, listening on ``host`` only."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1", "127.0.0.2"])
def test_healthcheck_reaches_the_address_the_server_listens_on(host):
    """The image's HEALTHCHECK must reach the server wherever CERTSERVE_HOST (which docker/compose.yml exposes as a
    variable) makes it listen: it always connected to 127.0.0.1, so a server told to listen on one address (with
    host networking: a host's own interface address, here 127.0.0.2, which 127.0.0.1 does not reach) left the
    container unhealthy for ever while it served. The wildcard and 127.0.0.1 keep working. Run against the unfixed
    Dockerfile: failed (127.0.0.2: connection refused, exit 1)."""
    with _healthz_server(host) as port:
        env = {**os.environ, "CERTSERVE_HOST": host, "CERTSERVE_PORT": str(port)}
        proc = subprocess.run(_healthcheck_command(), env=env, capture_output=True, text=True, timeout=30,
                              check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
