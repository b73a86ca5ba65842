"""Audit-log health: once an audit record could not be written, the server says so (/readyz 503 audit_unavailable,
certserve_ready 0) and refuses certification requests up front (503 audit_unavailable + Retry-After, no noise
sampled) until the log is writable again; then it is ready and certifies without a restart.

Real components: the app through its lifespan (fastapi TestClient, onnxruntime, the engine), a real log file whose
directory is removed (the audit volume going away) and, where the test may mount one, a real full filesystem (a
256 KiB tmpfs filled to the last byte; skipped where mounting is not permitted).
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

from certification.audit import AuditError, AuditLog, read_records
from server.app import create_app
from server.settings import Settings


def counter(client: TestClient, name: str) -> float:
    return sum(float(line.split()[-1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def post(client: TestClient, batch: bool = False):
    image = np.full(client.app.state.service.shape, 0.5).tolist()
    body = {"images": [image, image]} if batch else {"image": image}
    return client.post("/certify/batch" if batch else "/certify", json={**body, "mode": "cohen"})


@pytest.fixture(autouse=True)
def no_hold(monkeypatch):
    """These tests are about the probe: no hold after a failure (test_a_failure_no_probe_sees_holds_... sets its own)."""
    import certification.audit as audit_module

    monkeypatch.setattr(audit_module, "HOLD_SECONDS", 0.0, raising=False)


def assert_refused(r) -> None:
    assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable", r.text
    assert "radius" not in r.text and r.headers["retry-after"] == "5"


def test_log_is_unhealthy_after_a_failed_append_until_a_probe_opens_it(tmp_path):
    """AuditLog.healthy(): True until an append fails, then False while the path cannot be opened for appending,
    True again as soon as it can (the probe reopens it; no append needed). Run against the code before 2026-12-05:
    failed (AuditLog had no health at all: AttributeError)."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append({"seq": 0})
        assert log.healthy()
        path.unlink()
        path.mkdir()  # the path can no longer be opened as a file
        with pytest.raises(AuditError):
            log.append({"seq": 1})
        assert not log.healthy() and not log.healthy()
        path.rmdir()
        assert log.healthy()
        log.append({"seq": 2})
    assert [r["seq"] for r in read_records(path)] == [2]


def test_readyz_and_admission_refuse_while_the_audit_directory_is_gone(tmp_path):
    """The finding: with the audit directory gone, /readyz said ready and every request (and every client retry)
    sampled in full before its 503. Now the first failed append makes the server not ready and later requests are
    refused before any sample; recreating the directory brings it back. Run against the code before 2026-12-05:
    failed (/readyz answered 200 after the failed append)."""
    logdir = tmp_path / "logs"
    settings = Settings(max_samples=2000, cohen_n0=100, audit_log=str(logdir / "audit.jsonl"))
    with TestClient(create_app(settings, seed=0)) as client:
        assert post(client).status_code == 200 and client.get("/readyz").status_code == 200
        shutil.rmtree(logdir)  # the audit volume goes away
        sampled = counter(client, "certserve_samples_processed_total")
        assert_refused(post(client))  # the append that finds out: this one sampled
        assert counter(client, "certserve_samples_processed_total") > sampled
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable" and r.headers["retry-after"]
        assert counter(client, "certserve_ready") == 0.0
        sampled = counter(client, "certserve_samples_processed_total")
        for batch in (False, True, False):
            assert_refused(post(client, batch))
        assert counter(client, "certserve_samples_processed_total") == sampled  # refused before any sampling
        assert counter(client, "certserve_audit_write_failures_total") == 1.0  # no append was even tried
        assert counter(client, 'certserve_rejected_requests_total') >= 4.0
        logdir.mkdir()  # the volume is back
        assert client.get("/readyz").status_code == 200 and counter(client, "certserve_ready") == 1.0
        answered = post(client)
        assert answered.status_code == 200
    assert [r["certificate"]["request_id"] for r in read_records(logdir / "audit.jsonl")] == \
        [answered.json()["request_id"]]


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (needs root / CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path) -> None:
    """Write ``path`` until the filesystem is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_keeps_the_server_unready_until_space_is_freed(tiny_fs):
    """A full filesystem: the log still opens for appending, so the probe also asks for free space; the server
    stays not ready (no request samples) until space is freed. Run against the code before 2026-12-05: failed
    (/readyz answered 200 on the full disk)."""
    settings = Settings(max_samples=2000, cohen_n0=100, audit_log=str(tiny_fs / "audit.jsonl"))
    with TestClient(create_app(settings, seed=0)) as client:
        fill(tiny_fs / "filler")
        assert_refused(post(client))
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
        sampled = counter(client, "certserve_samples_processed_total")
        assert_refused(post(client))
        assert counter(client, "certserve_samples_processed_total") == sampled
        (tiny_fs / "filler").unlink()
        assert client.get("/readyz").status_code == 200
        assert post(client).status_code == 200
    assert len(read_records(tiny_fs / "audit.jsonl")) == 1


def test_a_failure_no_probe_sees_holds_the_log_unhealthy_then_lets_one_append_try(tmp_path):
    """A file-size limit (EFBIG; also a quota, a read-only remount, EIO) leaves the file openable with free space, so
    the probe passed at once and every request sampled in full before its 503 while /readyz said ready. Now the log
    stays unhealthy HOLD_SECONDS after each failure, then lets one append try (half-open). A real RLIMIT_FSIZE in a
    child process. Run against the code before this fix (2026-12-05, same day): healthy() was True right after the
    EFBIG failure; this test failed (found by review)."""
    script = f"""
import resource, time
import certification.audit as audit
from certification.audit import AuditError, AuditLog
audit.HOLD_SECONDS = 0.5
log = AuditLog({str(tmp_path / 'audit.jsonl')!r})
log.append({{"seq": 0}})
size = (log.path).stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
try:
    log.append({{"seq": 1}})
    raise SystemExit("the append past the file-size limit succeeded")
except AuditError:
    pass
held = [log.healthy() for _ in range(3)]
time.sleep(0.6)
half_open = log.healthy()
try:
    log.append({{"seq": 2}})
except AuditError:
    pass
print(held, half_open, log.healthy())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[False, False, False] True False"


def test_the_health_check_never_waits_for_an_append_in_progress(tmp_path):
    """healthy() runs on the event loop (/readyz, admission): while an append holds the log's lock (a stalled write or
    fsync, the usual reason the log failed) it answers "unhealthy" at once instead of waiting, so /healthz and every
    other request keep being served. Run against the code before this fix (2026-12-05, same day): healthy() waited
    the full 1 s the lock was held (a reviewer's server answered /healthz after 1.8 s); this test failed."""
    import threading
    import time

    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        path.unlink()
        path.mkdir()
        with pytest.raises(AuditError):
            log.append({"seq": 0})
        path.rmdir()
        held, release = threading.Event(), threading.Event()

        def stalled_append():
            with log._lock:  # what an append in a stalled write holds
                held.set()
                release.wait(1.0)

        worker = threading.Thread(target=stalled_append)
        worker.start()
        held.wait(5)
        t0 = time.monotonic()
        answer = log.healthy()
        waited = time.monotonic() - t0
        release.set()
        worker.join()
        assert answer is False and waited < 0.5, waited
        assert log.healthy()  # the lock free again (and no hold in these tests): the check runs and passes
