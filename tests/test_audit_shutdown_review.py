"""Audit log at shutdown and after a failed undo (review).

- A closed log (``AuditLog.close()``, run by ``Sealer.close()`` at the app's shutdown) was reopened by a health
  check (``AuditLog.healthy()`` probes an unhealthy log by opening ``PATH``; Ray Serve's ``check_health`` and /readyz
  ask it through ``Sealer.audit_available()``), and by an append made after close (``Sealer.seal_async`` writes
  inline once its writer stopped), and never closed again: a descriptor leaked per stopped service.
- If the ``ftruncate`` undoing a refused line failed too, a COMPLETE line (after a failed fsync) survived: the repair
  on reopen drops only an unterminated tail.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import certification.audit as audit_module
from certification.audit import AuditError, AuditLog, read_records
from server.app import create_app
from server.settings import Settings


def open_fds(path: Path) -> int:
    """Descriptors of this process open on ``path``."""
    target, count = str(path.resolve()), 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:
            pass
    return count


@pytest.fixture(autouse=True)
def no_hold(monkeypatch):
    monkeypatch.setattr(audit_module, "HOLD_SECONDS", 0.0)


def fail_once(real, exc):
    calls = []

    def wrapper(*args):
        if not calls:
            calls.append(args)
            raise exc
        return real(*args)
    return wrapper


def test_a_health_check_after_close_does_not_reopen_the_log(tmp_path, monkeypatch):
    """Bug: after a failed append and close(), healthy() probed by reopening PATH and kept the descriptor (and said
    healthy). A closed log now answers from its last state without touching the file. Failed on the unfixed code:
    yes."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append({"seq": 0})
    monkeypatch.setattr(audit_module.os, "write", fail_once(os.write, OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(AuditError):
        log.append({"seq": 1})
    log.close()
    assert open_fds(path) == 0
    answers = [log.healthy(), log.healthy()]
    assert open_fds(path) == 0  # unfixed: 1 (reopened by the probe, never closed)
    assert answers == [False, False]  # the last state of a closed log: the failure, unprobed
    assert [r["seq"] for r in read_records(path)] == [0]


def test_readiness_after_the_apps_shutdown_leaks_no_audit_descriptor(tmp_path, monkeypatch):
    """Bug, through the real app's lifespan: a certificate refused for its audit record makes the log unhealthy;
    after shutdown (Sealer.close) the sealer's audit_available() -- what /readyz and Ray Serve's check_health ask --
    reopened the audit file and never closed it. Failed on the unfixed code: yes."""
    path = tmp_path / "audit.jsonl"
    with TestClient(create_app(Settings(max_samples=2000, cohen_n0=100, audit_log=str(path)), seed=0)) as client:
        sealer = client.app.state.service.sealer
        image = np.full(client.app.state.service.shape, 0.5).tolist()
        assert client.post("/certify", json={"image": image, "mode": "cohen"}).status_code == 200

        def refuse(line):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(sealer.audit, "_write_whole", refuse)
        r = client.post("/certify", json={"image": image, "mode": "cohen"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable", r.text
    assert open_fds(path) == 0  # shutdown closed it
    available = sealer.audit_available()
    assert open_fds(path) == 0  # unfixed: 1 (reopened by the probe, never closed)
    assert not available  # the last state of a closed log: the failure, unprobed
    assert client.get("/readyz").status_code == 503
    assert open_fds(path) == 0


def test_an_append_after_close_writes_its_record_and_closes_the_file_again(tmp_path):
    """Bug: a record written after close() (Sealer.seal_async once the service stopped writes it inline) reopened the
    log and left the descriptor open. The record is still written; the file is closed again. Failed on the unfixed
    code: yes."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append({"seq": 0})
    log.close()
    log.append({"seq": 1})
    assert open_fds(path) == 0
    assert log.healthy()
    assert [r["seq"] for r in read_records(path)] == [0, 1]


def test_a_refused_complete_line_is_cut_on_the_next_append_when_the_undo_failed(tmp_path, monkeypatch):
    """Bug: with fsync on, a failed fsync refused the record, and when the ftruncate undoing it failed too the
    complete line stayed: the reopen only dropped an unterminated tail, so the log claimed a refused certificate.
    Now the size to cut back to is remembered and the next append cuts it first. Failed on the unfixed code: yes."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=True) as log:
        log.append({"seq": 0})
        real_fsync = os.fsync

        def failing_fsync(fd):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(audit_module.os, "fsync", failing_fsync)
        monkeypatch.setattr(audit_module.os, "ftruncate", fail_once(os.ftruncate, OSError(errno.EIO, "I/O error")))
        with pytest.raises(AuditError):
            log.append({"seq": 1})
        assert [r["seq"] for r in read_records(path)] == [0, 1]  # the undo failed: the line is still there
        monkeypatch.setattr(audit_module.os, "fsync", real_fsync)
        log.append({"seq": 2})
    assert [r["seq"] for r in read_records(path)] == [0, 2]
    assert log.repaired_bytes > 0


def test_a_refused_line_another_writer_already_followed_is_not_cut_over_its_records(tmp_path, monkeypatch, caplog):
    """Guards the fix above: when another writer (process) appended after the refused line, cutting back to its
    offset would drop that writer's answered records; they stay, and the refused line is logged as an error.
    Failed on the unfixed code: yes, only on the logged error (the unfixed code never cut the line, so it kept
    the records too)."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=True) as log, AuditLog(path) as other:
        log.append({"seq": 0})

        def failing_fsync(fd):
            raise OSError(errno.EIO, "Input/output error")
        with monkeypatch.context() as m:
            m.setattr(audit_module.os, "fsync", failing_fsync)
            m.setattr(audit_module.os, "ftruncate", fail_once(os.ftruncate, OSError(errno.EIO, "I/O error")))
            with pytest.raises(AuditError):
                log.append({"seq": 1})
        other.append({"seq": 2})
        log.append({"seq": 3})
    assert [r["seq"] for r in read_records(path)] == [0, 1, 2, 3]
    assert "could not be removed" in caplog.text
