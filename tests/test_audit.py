"""The audit log (:mod:`certification.audit`): one complete JSON line per record, nothing lost, nothing torn.

The crash test is real: a child process appends from several threads as fast as it can (with rotation) and reports
each record on stdout only after ``append`` returned -- as the server answers a certificate only after its line is
written -- and is killed with SIGKILL mid-load. Every reported record must be there, every complete line must parse,
and after the restart (reopening the log) every line of every file must parse, with no exception for a torn tail.
The disk-full test uses a real file-size limit (RLIMIT_FSIZE) in a child process, which produces the short write a
full disk produces. Run against the bug it guards against: without the ``ftruncate`` undo of a short write
(``AuditLog._undo`` a no-op), ``test_full_disk_leaves_no_torn_line_and_raises`` fails on the unterminated last line;
with appends buffered in memory and written in 100 kB chunks, the kill -9 test fails on missing answered records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from certification.audit import AuditError, AuditLog, read_records

REPO = Path(__file__).resolve().parents[1]


def test_append_writes_one_parseable_line_per_record(tmp_path):
    with AuditLog(tmp_path / "audit.jsonl") as log:
        for i in range(5):
            log.append({"seq": i, "text": "line\nbreak \u00e9"})
    data = (tmp_path / "audit.jsonl").read_bytes()
    assert data.count(b"\n") == 5 and data.endswith(b"\n")
    records = read_records(tmp_path / "audit.jsonl")
    assert [r["seq"] for r in records] == list(range(5)) and records[0]["text"] == "line\nbreak \u00e9"
    assert all(isinstance(r["logged_at"], float) for r in records)
    assert (tmp_path / "audit.jsonl").stat().st_mode & 0o077 == 0


def test_append_json_takes_encoded_objects_and_refuses_anything_else(tmp_path):
    with AuditLog(tmp_path / "audit.jsonl") as log:
        log.append_json(b'{"certificate":{"radius":0.5}}')
        log.append_json(b"{}")
        for bad in (b"[1]", b'{"a":\n1}', b'"x"', b""):
            with pytest.raises(ValueError, match="one JSON object"):
                log.append_json(bad)
    records = read_records(tmp_path / "audit.jsonl")
    assert records[0]["certificate"] == {"radius": 0.5} and set(records[1]) == {"logged_at"} and len(records) == 2


def test_rotation_by_size_keeps_order_and_bounded_backups(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_bytes=2000, backups=100) as log:
        for i in range(60):
            log.append({"seq": i, "pad": "p" * 250})
    files = [path] + sorted(tmp_path.glob("audit.jsonl.*"))
    assert len(files) > 5 and all(f.stat().st_size <= 2000 for f in files)
    assert [r["seq"] for r in read_records(path)] == list(range(60))
    small = tmp_path / "small" / "audit.jsonl"
    with AuditLog(small, max_bytes=2000, backups=2) as log:
        for i in range(60):
            log.append({"seq": i, "pad": "p" * 250})
    assert sorted(p.name for p in small.parent.iterdir()) == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    kept = [r["seq"] for r in read_records(small)]
    assert kept == list(range(60 - len(kept), 60))  # the newest records, contiguous
    with pytest.raises(ValueError, match="backups"):
        AuditLog(tmp_path / "x.jsonl", max_bytes=10, backups=0)


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=0)

    def worker(t):
        for i in range(150):
            log.append({"thread": t, "seq": i, "pad": "z" * ((t * 7919 + i * 104729) % 70_000)})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    records = read_records(path)
    assert len(records) == 900
    for t in range(6):
        assert [r["seq"] for r in records if r["thread"] == t] == list(range(150))


def test_file_moved_away_is_reopened_and_a_path_that_cannot_be_opened_raises(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append({"seq": 0})
    path.rename(tmp_path / "audit.jsonl.shipped")  # what logrotate does
    log.append({"seq": 1})
    assert [r["seq"] for r in read_records(path)] == [1]
    path.unlink()
    path.mkdir()  # the path can no longer be opened as a file (works as root, unlike chmod)
    with pytest.raises(AuditError, match="audit log"):
        log.append({"seq": 2})
    path.rmdir()
    log.append({"seq": 3})  # recovers once the path is writable again
    assert [r["seq"] for r in read_records(path)] == [3]
    log.close()


FULL_DISK_CHILD = r"""
import json, resource, signal, sys
from certification.audit import AuditError, AuditLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG / a short write instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
log = AuditLog(sys.argv[1], max_bytes=0)
n = 0
try:
    while True:
        log.append({"seq": n, "pad": "y" * 700})
        n += 1
except AuditError as exc:
    first = str(exc)
try:
    log.append({"seq": n, "pad": ""})
    again = "written"
except AuditError as exc:
    again = str(exc)
print(json.dumps({"written": n, "first": first, "again": again}))
"""


def test_full_disk_leaves_no_torn_line_and_raises(tmp_path):
    path = tmp_path / "audit.jsonl"
    out = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(path)], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    data = path.read_bytes()
    assert data.endswith(b"\n") and len(data) <= 20_000
    # every record written before the failure, then the small one written after it; nothing of the failed one
    assert [r["seq"] for r in read_records(path)] == list(range(report["written"] + 1)) and report["written"] > 10
    assert "audit log" in report["first"] and report["again"] == "written"  # a small line still fits: not sticky


CRASH_CHILD = r"""
import os, random, sys, threading
from certification.audit import AuditLog
log = AuditLog(sys.argv[1], max_bytes=int(sys.argv[2]), backups=10_000)
def worker(t):
    rng, i = random.Random(t), 0
    while True:
        log.append({"thread": t, "seq": i, "pad": "x" * rng.randrange(0, 12_000)})
        os.write(1, f"{t} {i}\n".encode())  # 'answered': only after the line is written
        i += 1
threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(int(sys.argv[3]))]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


@pytest.mark.parametrize("kill_after", [300, 1500, 4000])
def test_kill_9_under_load_loses_no_answered_record_and_tears_no_line(tmp_path, kill_after):
    path = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(path), str(256 * 1024), "6"], cwd=REPO,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    reported: list[bytes] = []
    try:
        deadline = time.monotonic() + 120
        while len(reported) < kill_after and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            reported.append(line)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        reported.extend(proc.stdout.read().splitlines(keepends=True))  # answered before the kill, still in the pipe
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL and len(reported) >= kill_after
    answered = {tuple(map(int, line.split())) for line in reported}
    # right after the crash: every terminated line of every file parses (rotated files must be whole); the newest
    # file may end in the unterminated part of the one record being written when the kill came (never answered)
    records = read_records(path, skip_torn_tail=True)
    logged = {(r["thread"], r["seq"]) for r in records}
    assert answered <= logged, f"{len(answered - logged)} answered records missing"
    assert len(logged) == len(records)  # nothing written twice
    assert len(list(tmp_path.glob("audit.jsonl.*"))) >= 1  # the crash load went through rotations
    for t in range(6):  # each thread's records are a prefix 0..k: nothing lost in the middle either
        seqs = sorted(s for th, s in logged if th == t)
        assert seqs == list(range(len(seqs)))
    # the restart: opening the log drops such a tail; then every line of every file parses, strictly
    data = path.read_bytes()
    with AuditLog(path, max_bytes=256 * 1024, backups=10_000) as log:
        assert log.repaired_bytes == len(data) - (data.rfind(b"\n") + 1)
        log.append({"thread": -1, "seq": 0})
    after = read_records(path)
    assert {(r["thread"], r["seq"]) for r in after} == logged | {(-1, 0)}


def test_reopening_drops_an_unterminated_tail_and_keeps_complete_lines(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq":0}\n{"seq":1}\n{"seq":2,"pa')
    with pytest.raises(ValueError, match="not terminated"):
        read_records(path)
    assert [r["seq"] for r in read_records(path, skip_torn_tail=True)] == [0, 1]
    with AuditLog(path) as log:
        assert log.repaired_bytes == len(b'{"seq":2,"pa')
        log.append({"seq": 3})
    assert [r["seq"] for r in read_records(path)] == [0, 1, 3]
    assert "never answered" in caplog.text
    path.write_bytes(b"x" * 70_000)  # a fragment longer than the backward scan's chunk, and no newline at all
    with AuditLog(path) as log:
        assert log.repaired_bytes == 70_000
    assert path.read_bytes() == b""


def test_rotation_and_reading_leave_other_numbered_files_alone(tmp_path):
    """Only PATH.1 ... PATH.<backups> are the log's: an operator's archive next to it (audit.jsonl.2024, logrotate's
    dateext audit.jsonl.20250101) is neither deleted by rotation nor read as a backup. Run against the code before
    2026-12-05: failed (read_records returned the archives' records; the first rotation deleted both archives)."""
    path = tmp_path / "audit.jsonl"
    archives = {tmp_path / "audit.jsonl.2024": b'{"archived":"last year"}\n' * 100,
                tmp_path / "audit.jsonl.20250101": b'{"archived":"dateext"}\n'}
    for file, data in archives.items():
        file.write_bytes(data)
    assert read_records(path) == []
    with AuditLog(path, max_bytes=2000, backups=3) as log:
        for i in range(40):
            log.append({"seq": i, "pad": "p" * 200})
    assert all(file.read_bytes() == data for file, data in archives.items())
    assert sorted(p.name for p in tmp_path.glob("audit.jsonl.?")) == ["audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    for kept in (read_records(path), read_records(path, backups=3)):
        assert [r["seq"] for r in kept] == list(range(40 - len(kept), 40)) and "archived" not in str(kept)


def test_a_symlinked_log_rotates_next_to_its_target(tmp_path):
    """The path is resolved at open: rotation renames the target, never the link, so the link keeps naming the
    current file on the data volume and every record stays there. Run against the code before 2026-12-05: failed
    (the first rotation renamed the link itself; later records went to a new regular file next to it)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "logs").mkdir()
    link = tmp_path / "logs" / "audit.jsonl"
    link.symlink_to(tmp_path / "data" / "audit.jsonl")
    with AuditLog(link, max_bytes=3000, backups=50) as log:
        for i in range(40):
            log.append({"seq": i, "pad": "x" * 200})
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["audit.jsonl"] and link.is_symlink()
    assert link.resolve() == tmp_path / "data" / "audit.jsonl"
    assert len(list((tmp_path / "data").glob("audit.jsonl.*"))) >= 2
    assert [r["seq"] for r in read_records(link)] == list(range(40))


UNDO_FAILS_CHILD = r"""
import json, os, resource, signal, sys
import certification.audit as audit
from certification.audit import AuditError, AuditLog
log = AuditLog(sys.argv[1], max_bytes=0)
log.append({"seq": 0})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
real, calls = os.ftruncate, []
def failing_twice(fd, size):  # the undo of the short write and the next repair fail (EIO); later ones work
    calls.append(size)
    if len(calls) <= 2:
        raise OSError(5, "Input/output error")
    return real(fd, size)
audit.os.ftruncate = failing_twice
resource.setrlimit(resource.RLIMIT_FSIZE, (60, resource.RLIM_INFINITY))  # the next line is written in part only
try:
    log.append({"seq": 1, "pad": "x" * 100})
except AuditError as exc:
    refused = str(exc)
torn = os.path.getsize(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
again = "written"
try:
    log.append({"seq": 2})  # the reopen cannot cut the torn prefix: refused, nothing appended after it
except AuditError as exc:
    again = str(exc)
log.append({"seq": 3})
print(json.dumps({"refused": refused, "again": again, "torn": torn, "repaired": log.repaired_bytes}))
"""


def test_a_failed_undo_does_not_glue_the_next_record_to_the_torn_line(tmp_path):
    """A short write whose ftruncate undo fails (EIO, injected; the short write is real, RLIMIT_FSIZE): the
    descriptor is dropped and the next append reopens the log, which cuts the torn prefix first (and if that fails
    too, refuses that append rather than write after the prefix). Run against the
    code before 2026-12-05: failed (the next record was appended to the torn prefix: read_records raised "not a JSON
    line")."""
    path = tmp_path / "audit.jsonl"
    out = subprocess.run([sys.executable, "-c", UNDO_FAILS_CHILD, str(path)], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert [r["seq"] for r in read_records(path)] == [0, 3]  # strict: every line parses
    report = json.loads(out.stdout)
    assert "audit log" in report["refused"] and "audit log" in report["again"]
    assert report["torn"] == 60 and report["repaired"] == 60 - len(path.read_bytes().split(b"\n")[0]) - 1


def test_logged_at_never_decreases_along_the_file(tmp_path):
    """logged_at is stamped under the lock, so file order is time order. Run against the code before 2026-12-05:
    failed (stamped before the lock: records written later carried earlier times)."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=20_000, backups=10_000)

    def worker(t):
        for i in range(300):
            log.append({"thread": t, "seq": i, "pad": "z" * ((t * 31 + i * 17) % 3000)})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    stamps = [r["logged_at"] for r in read_records(path)]
    assert len(stamps) == 4800
    assert not [(a, b) for a, b in zip(stamps, stamps[1:]) if a > b]
