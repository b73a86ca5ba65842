"""Observability and audit truth (bug hunt): the audit log holds exactly the certificates the server answered, in
time order, also when several writers share one log.

- ``test_a_refused_certificate_leaves_no_audit_line_when_fsync_fails``: with CERTSERVE_AUDIT_FSYNC=true, an fsync
  that fails (EIO: the disk could not persist the line) refused the certificate with 503 audit_unavailable, but its
  complete line stayed in the log: the audit record claimed a certificate the client was refused.
- ``test_logged_at_never_decreases_when_two_writers_share_a_log``: ``logged_at`` was stamped under the writer's own
  thread lock but before the file lock (flock) that orders the processes sharing a log, so a writer that waited for
  the flock wrote an earlier time after another process's later one (a real 4-process run: 13 decreases in 1,200
  lines).
"""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
from fastapi.testclient import TestClient

from certification.audit import AuditError, AuditLog, read_records
from server.app import create_app
from server.settings import Settings


def test_a_refused_certificate_leaves_no_audit_line_when_fsync_fails(tmp_path, monkeypatch):
    """Guards against: a failed fsync refused the certificate (503 audit_unavailable) but left its complete line in
    the audit log (only a short write was undone). The line must go, as for any failed append, and the next
    successful append must follow the earlier records directly. Failed on the unfixed code: yes."""
    path = tmp_path / "audit.jsonl"
    with TestClient(create_app(Settings(audit_log=str(path), audit_fsync=True, max_samples=200), seed=3)) as c:
        image = np.full(c.app.state.service.shape, 0.5).tolist()
        ok = c.post("/certify", json={"image": image, "mode": "cohen", "max_samples": 100})
        assert ok.status_code == 200, ok.text

        def failing_fsync(fd):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing_fsync)
        refused = c.post("/certify", json={"image": image, "mode": "cohen", "max_samples": 100})
        monkeypatch.undo()
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "audit_unavailable", refused.text
        records = read_records(path)
        assert [r["certificate"]["request_id"] for r in records] == [ok.json()["request_id"]], \
            "the refused certificate's line stayed in the audit log"
        assert "certserve_audit_write_failures_total 1.0" in c.get("/metrics").text

    log = AuditLog(path, fsync=True)  # the log itself: a later append follows the earlier records directly
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    try:
        log.append({"certificate": {"n": 2}})
        raise AssertionError("a failed fsync must raise AuditError")
    except AuditError:
        pass
    monkeypatch.undo()
    log.append({"certificate": {"n": 3}})
    log.close()
    assert [r["certificate"].get("n") for r in read_records(path)] == [None, 3]


def test_logged_at_never_decreases_when_two_writers_share_a_log(tmp_path):
    """Guards against: ``logged_at`` stamped before the flock that orders the processes sharing one log (README:
    "Several processes may share one log"), so the file was not in time order. Two AuditLog objects on one file take
    the flock against each other as two processes do; writer A is held 0.3 s on its way to the flock (as a process
    that waits for it, or is descheduled), while writer B appends meanwhile. Failed on the unfixed code: yes."""
    path = tmp_path / "audit.jsonl"
    first, second = AuditLog(path), AuditLog(path)
    real_lock = first._lock_current
    waiting = threading.Event()

    def slow_lock():
        waiting.set()
        time.sleep(0.3)
        real_lock()

    first._lock_current = slow_lock
    writer = threading.Thread(target=first.append, args=({"certificate": {"writer": "A"}},))
    writer.start()
    assert waiting.wait(5)
    time.sleep(0.01)  # (A has taken its time stamp, if it takes it before the flock)
    second.append({"certificate": {"writer": "B"}})
    writer.join(5)
    first.close()
    second.close()
    records = read_records(path)
    assert [r["certificate"]["writer"] for r in records] == ["B", "A"]
    stamps = [r["logged_at"] for r in records]
    assert stamps == sorted(stamps), f"logged_at decreases along the file: {stamps}"


def test_replica_audit_logs_live_where_the_start_up_check_looked(tmp_path):
    """Guards against: with ``certserve serve --replicas N`` and a symlinked CERTSERVE_AUDIT_LOG, the start-up check
    (server.serve.check_configuration) checked that the link's TARGET directory is writable, as README says the log
    lives next to its target, but each replica wrote ``audit.replica-<id>.jsonl`` next to the LINK: a link in a
    read-only directory (an image's /app) passed the check and then failed every replica's start. Failed on the
    unfixed code: yes."""
    from server.ray_serve import replica_settings
    from server.serve import check_configuration

    volume, app_dir = tmp_path / "volume", tmp_path / "app"
    volume.mkdir()
    app_dir.mkdir()
    (app_dir / "audit.jsonl").symlink_to(volume / "audit.jsonl")
    settings = Settings(audit_log=str(app_dir / "audit.jsonl"))
    app_dir.chmod(0o555)  # the link's directory is read-only; the volume it points to is writable
    try:
        check_configuration(settings, replicas=2)  # passes: the target's directory is writable
        replica = replica_settings(settings, "ab12cd34")
        assert replica.audit_log == str(volume / "audit.replica-ab12cd34.jsonl")
        if os.geteuid() != 0:  # (root writes into a 0555 directory anyway)
            AuditLog(replica.audit_log).close()
    finally:
        app_dir.chmod(0o755)
