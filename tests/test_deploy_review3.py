"""Deploying as an operator (review 3): the image's SIGTERM drain against the stop timeouts of what runs it (Docker's
default, compose's stop_grace_period), a SIGTERM while the server starts as PID 1 (the image's), the CERTSERVE_
variables every deploy file sets, and a signing key directory that the image's user may not list."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from server.serve import stop_seconds
from server.settings import Settings
from tests.deploy_helpers import RAYSERVICE_YAML, ROOT, load, pod_templates
from tests.test_deploy_images import dockerfile_instructions

COMPOSE_YML = ROOT / "docker" / "compose.yml"
SERVE_YAML = ROOT / "deploy" / "ray" / "serve.yaml"
#: `docker stop` without -t: SIGKILL this many seconds after SIGTERM (the image format has no stop timeout of its own)
DOCKER_STOP_TIMEOUT = 10
#: what the process still needs after uvicorn's graceful-shutdown timeout (lifespan shutdown, interpreter exit)
EXIT_MARGIN = 1


def image_environment() -> dict[str, str]:
    """The variables the Dockerfile's final stage sets with ENV (``NAME=value`` pairs, continuation lines joined)."""
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            env = {}  # a new stage: only the final one runs
        elif word == "ENV":
            env.update({k: v.strip('"') for k, v in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', rest)})
    return env


def settings_under(monkeypatch, env: dict[str, str]) -> Settings:
    """Settings as a process with exactly these CERTSERVE_ variables reads them (the test run's own are dropped)."""
    for name in [k for k in os.environ if k.upper().startswith("CERTSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("CERTSERVE_"):
            monkeypatch.setenv(name, str(value))
    return Settings()


def _seconds(duration: str) -> float:
    """A compose duration (``30s``, ``1m30s``, ``90``) in seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", duration):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert "".join(a + b for a, b in parts) == duration, duration
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(a) * scale[b] for a, b in parts)


def test_the_image_drains_within_docker_stops_default_timeout(monkeypatch):
    """`docker stop` kills 10 s after SIGTERM; the process exits stop_seconds(drain) after it at the latest. Run against
    the image before this test (no CERTSERVE_DRAIN_SECONDS, so the server's 20 s: 23 s): a request in flight lost its
    answer (curl: empty reply) and the container exited 137 (measured with `docker run --read-only ... certserve:smoke`
    and a cohen request of 10^8 samples); with 5 s it got its certificate (stopped_by shutdown) and exit 0 in 5.6 s."""
    drain = settings_under(monkeypatch, image_environment()).drain_seconds
    assert stop_seconds(drain) + EXIT_MARGIN < DOCKER_STOP_TIMEOUT, (
        f"the image drains {drain} s (+ {stop_seconds(drain) - int(drain)} s): `docker stop` kills it first")
    assert drain >= 3  # still a drain: a request admitted just before SIGTERM gets a few seconds of samples


def test_compose_gives_its_drain_time_to_finish(monkeypatch):
    compose = load(COMPOSE_YML)["services"]["certserve"]
    env = {**image_environment(), **{k: str(v) for k, v in compose.get("environment", {}).items()}}
    drain = settings_under(monkeypatch, env).drain_seconds
    grace = _seconds(str(compose.get("stop_grace_period", DOCKER_STOP_TIMEOUT)))
    assert stop_seconds(drain) + EXIT_MARGIN < grace, (drain, grace)


def _deploy_environments() -> dict[str, dict[str, str]]:
    """Every environment a deploy file gives a certserve process: the image, compose, the RayService's pods (over the
    image's), and the Serve applications' runtime_env (over those)."""
    image = image_environment()
    envs = {"Dockerfile": image,
            "docker/compose.yml": {**image, **{k: str(v) for k, v in
                                               load(COMPOSE_YML)["services"]["certserve"]["environment"].items()}}}
    rs = load(RAYSERVICE_YAML)
    for i, template in enumerate(pod_templates(rs)):
        pod = {e["name"]: e.get("value", "") for c in template["spec"]["containers"] for e in c.get("env", [])}
        envs[f"rayservice pod template {i}"] = {**image, **pod}
        for name, config in (("rayservice serveConfigV2", yaml.safe_load(rs["spec"]["serveConfigV2"])),
                             ("deploy/ray/serve.yaml", load(SERVE_YAML))):
            for app in config["applications"]:
                extra = app.get("runtime_env", {}).get("env_vars", {})
                envs[f"{name} {app['name']} on pod template {i}"] = {**image, **pod, **extra}
    return envs


@pytest.mark.parametrize("where", list(_deploy_environments()))
def test_every_certserve_variable_of_the_deploy_files_is_accepted(monkeypatch, where):
    """An unknown CERTSERVE_ variable refuses the start (a crash loop under Kubernetes): each deploy file's loads."""
    settings_under(monkeypatch, _deploy_environments()[where])


def test_a_key_directory_the_server_cannot_list_is_named_as_such():
    """`certserve keys generate` makes its directory 0700; mounted into the image (`-v keys:/keys:ro`), whose user
    (10001) is not its owner, it could not be listed. Run against the code before this test: glob() swallowed the
    permission error and the server refused to start with "signing key directory /keys holds no *.pem file" (measured
    in the image), sending the operator to look for missing files that are there."""
    from certification.signing import generate_key_files

    base = Path(tempfile.mkdtemp(prefix="certserve-keys-"))  # not under pytest's 0700 base: nobody must reach it
    try:
        base.chmod(0o755)
        keys = base / "keys"
        generate_key_files(keys)
        assert oct(keys.stat().st_mode & 0o777) == "0o700"
        if os.getuid() != 0:
            keys.chmod(0o000)  # without root, the test's own user stands for the image's
        # imported as the test's user, then (as root) dropped to nobody, who owns nothing here
        code = textwrap.dedent("""
            import os, sys
            from certification.signing import Signer, SigningKeyError
            if os.getuid() == 0:
                os.setgroups([]); os.setgid(65534); os.setuid(65534)
            try:
                Signer.from_paths(sys.argv[1])
            except SigningKeyError as exc:
                print(exc)
            else:
                print("loaded")
        """)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("CERTSERVE_")}, "PYTHONPATH": str(ROOT)}
        result = subprocess.run([sys.executable, "-c", code, str(keys)], capture_output=True, text=True, timeout=60,
                                env=env)
        keys.chmod(0o700)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout.strip()
    assert "cannot be listed" in message and str(keys) in message and "holds no" not in message, message
    assert f"uid {65534 if os.getuid() == 0 else os.getuid()}" in message, message


def _sigterm_caught(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (its SigCgt mask)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except OSError:
        pass
    return False


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("unshare") is None,
                    reason="a PID namespace needs root and unshare")
def test_sigterm_during_start_up_stops_the_server_when_it_runs_as_pid_1(tmp_path):
    """The image runs `certserve serve` as PID 1 (exec form, no init), where the kernel drops a signal with the default
    action. Run against the code before this test: a SIGTERM while the server started (imports, bundle verification,
    warm-up) was ignored, the server came up and answered /readyz, and `docker stop` killed it 10 s later (measured:
    `docker run ... certserve:smoke` stopped 0.3 s after its start took 10.1 s, exit 137). Now it exits at once."""
    import httpx

    from bench.server_process import certserve_command, free_port

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CERTSERVE_")}, "PYTHONPATH": str(ROOT),
           "CERTSERVE_THREADS": "1"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--", *certserve_command(), "serve",
                                 "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline, child = time.monotonic() + 10, None
        while child is None:  # the server: PID 1 of the new namespace, unshare's child
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-2000:]
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            child = int(kids[0]) if kids else None
            time.sleep(0.005)
        # where the fix is in: as soon as main() has installed its handler; before it: 0.3 s into its imports (the
        # server takes ~1.5 s to start), as the docker stop of the measurement above
        catch_by = time.monotonic() + 0.3
        while not _sigterm_caught(child) and time.monotonic() < catch_by:
            time.sleep(0.005)
        os.kill(child, signal.SIGTERM)
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
            except httpx.HTTPError as exc:
                ready = repr(exc)
            raise AssertionError(f"still running 5 s after SIGTERM during start-up (/readyz: {ready}):\n"
                                 f"{log.read_text()[-1500:]}") from None
        assert code == 128 + signal.SIGTERM, (code, log.read_text()[-1500:])
    finally:
        if proc.poll() is None:
            proc.kill()  # --kill-child: the server dies with unshare
            proc.wait(timeout=10)
