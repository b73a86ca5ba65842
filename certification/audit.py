"""The audit log: every issued certificate as one JSON line, written before the certificate is answered.

Durability: each record is ONE ``os.write`` of a complete line (``\\n``-terminated) to a file descriptor opened with
``O_APPEND``, under a lock. When :meth:`AuditLog.append` returns, the line is in the kernel's page cache, so a
``kill -9`` of the server cannot lose it: every certificate answered has its complete line.

A ``kill -9`` DURING a write can stop it between two pages (Linux checks for a fatal signal before copying each page
of a buffered write; measured: 1 run in 40 with 1.5-3 kB records on ext4 left an unterminated tail). That tail is the
record of a certificate that was never answered (``append`` had not returned). Opening the log -- the server's next
start -- truncates it to the last complete line (logged as a warning, counted in ``repaired_bytes``), so a restarted
log holds only complete lines; :func:`read_records` reports such a tail unless told to skip it.

A short write while running (disk full, file-size limit), or a failed ``fsync`` of a complete line, is undone with
``ftruncate`` to the size before the write, so no line of a refused record survives an error, and
:class:`AuditError` is raised: the caller must not answer the certificate (the server answers 503
``audit_unavailable`` and counts the failure). ``fsync=True`` additionally survives power
loss, at the cost of one disk flush per certificate.

If that ``ftruncate`` fails too, the descriptor is closed and the next append reopens the file, which first cuts
the refused line (the size to cut back to is remembered: a complete line, e.g. after a failed ``fsync``, is cut too,
while it is still the file's last line; one that another process's record already follows is logged as an error),
then drops any unterminated tail (or refuses that append too), so a torn line is never glued to the next record.

:meth:`AuditLog.close` is final for health checks: a closed log answers :meth:`AuditLog.healthy` from its last state
without probing (a probe would reopen the file). An append after ``close`` still writes its record (the service
stopping under a request) and closes the file again.

Health: after an append fails the log is *unhealthy* (:meth:`AuditLog.healthy` is False; the server's /readyz answers
503 ``audit_unavailable`` and certification requests are refused before any sampling) for at least ``HOLD_SECONDS``
after each failure, then until the next successful append or a probe (run by :meth:`AuditLog.healthy` itself) finds
``PATH`` openable for appending on a filesystem with at least ``PROBE_FREE_BYTES`` free.

Rotation is by size: when the next line would push the file over ``max_bytes``, ``PATH`` becomes ``PATH.1``
(``PATH.1`` -> ``PATH.2`` ... up to ``backups``; ``PATH.<backups>`` is deleted) and a new ``PATH`` is started.
Only ``PATH.1`` ... ``PATH.<backups>`` are the log's files: any other ``PATH.<digits>`` (an operator's
``audit.jsonl.2024``) is never renamed, deleted or read. ``max_bytes=0`` never rotates. A file moved away by an
external tool (logrotate) is noticed and ``PATH`` reopened. A symlinked ``PATH`` is resolved when the log is opened:
records, rotation and backups live next to the link's target (the link then keeps naming the current file).
Several processes may append to one log (two servers on a shared volume, an old and a new pod of a rolling
update): each append, rotation and tail repair holds an exclusive ``flock`` on the current ``PATH``, taken after the
file was checked to still be ``PATH`` (a writer that waited through another's rotation reopens the new file), so no
process drops another's record in progress as a torn tail or renames over another's rotated file. The tail check
runs under that lock before every append, so a line torn by a writer that died mid-write is dropped before the next
record from any process. (One log per replica still keeps each replica's records together.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path

from certification.signing import canonical_json

log = logging.getLogger("certserve.audit")

#: a probe of an unhealthy log needs this much free space on its filesystem (a full disk stays unhealthy)
PROBE_FREE_BYTES = 64 * 1024
#: After a failed append the log stays unhealthy at least this long, whatever the probe says: failures a probe cannot
#: see (a file-size limit, a quota, a read-only remount, EIO) then let through at most one request per HOLD_SECONDS
#: (half-open), instead of every request sampling in full before its 503.
HOLD_SECONDS = 5.0


class AuditError(OSError):
    """The audit record could not be written completely (nothing partial is left in the file)."""


class AuditLog:
    """Append-only JSON-lines audit log with size-based rotation; thread-safe.

    ``log.append({"certificate": {...}})`` writes one line (a ``logged_at`` UNIX time is added) or raises
    :class:`AuditError`.
    """

    def __init__(self, path: str | os.PathLike, *, max_bytes: int = 100 * 2**20, backups: int = 10,
                 fsync: bool = False):
        if max_bytes < 0 or backups < 0:
            raise ValueError("max_bytes and backups must be >= 0")
        if max_bytes and not backups:
            raise ValueError("rotation (max_bytes > 0) needs backups >= 1; max_bytes=0 disables rotation")
        self.path = Path(path).resolve()  # a symlink: rotate next to its target, never rename the link itself
        self.max_bytes, self.backups, self.fsync = max_bytes, backups, fsync
        self._lock = threading.Lock()
        self._no_locks = False  # the filesystem refused flock: one writing process is assumed
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self.repaired_bytes = 0
        self._failed = False  # an append failed and no append or probe has succeeded since
        self._failed_at = 0.0  # time.monotonic() of the latest failed append
        self._closed = False  # close() was called: no probe reopens the file, an append closes it again
        self._refused: tuple | None = None  # (file id, offset, line) of a refused line an undo could not cut
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._lock_current()
            try:
                self._repair()
            except OSError:
                os.close(self._fd)  # never append after a tail that could not be dropped
                self._fd = None
                raise
            self._unlock()

    def append(self, record: dict) -> None:
        """Write ``record`` as one line; return only once it is in the file (raise :class:`AuditError` if not)."""
        self.append_json(canonical_json(record))

    def append_json(self, obj: bytes) -> None:
        """Like :meth:`append`, for a record already encoded as one JSON object (no newline), e.g. by pydantic."""
        obj = obj.strip()
        if not (obj.startswith(b"{") and obj.endswith(b"}")) or b"\n" in obj:
            raise ValueError("an audit record must be one JSON object on one line")
        with self._lock:
            try:
                self._lock_current()  # other processes writing this log wait here (and we for them)
                try:  # stamped under both locks: logged_at never decreases along the file, whichever process wrote
                    line = obj[:-1] + (b',' if obj != b"{}" else b"") + b'"logged_at":%.3f}\n' % time.time()
                    self._cut_refused()
                    self._repair()
                    size = self._size() if self.max_bytes else 0
                    if self.max_bytes and size + len(line) > self.max_bytes and size > 0:
                        self._rotate()
                    self._write_whole(line)
                finally:
                    self._unlock()
                    if self._closed and self._fd is not None:  # closed meanwhile (shutdown): stays closed
                        os.close(self._fd)
                        self._fd = None
            except OSError as exc:
                self._failed, self._failed_at = True, time.monotonic()
                raise AuditError(exc.errno, f"audit log {self.path}: {exc.strerror or exc}") from None
            self._failed = False

    def healthy(self) -> bool:
        """True unless the last append failed and either less than ``HOLD_SECONDS`` have passed since, or a probe made
        now still cannot open ``PATH`` for appending (or its filesystem has less than ``PROBE_FREE_BYTES`` free); a
        passing probe makes the log healthy again (half-open: the next append decides). Never waits: called on the
        event loop, it answers "unhealthy" while an append holds the lock (a slow disk must not stall the probes)."""
        if not self._failed or self._closed:  # closed: the last state, no probe (it would reopen the file)
            return not self._failed
        if time.monotonic() - self._failed_at < HOLD_SECONDS or not self._lock.acquire(blocking=False):
            return False
        try:
            try:
                self._reopen_if_moved()
                st = os.fstatvfs(self._fd)
            except OSError:
                self._failed_at = time.monotonic()  # probe again after another hold, not on every call
                return False
            free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
            self._failed = free < PROBE_FREE_BYTES
            if self._failed:
                self._failed_at = time.monotonic()
            return not self._failed
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, max_bytes={self.max_bytes}, backups={self.backups})"

    # ------------------------------------------------------------------------------------------------ internals

    def _open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._ino = fd, (st.st_dev, st.st_ino)

    def _lock_current(self) -> None:
        """Open ``PATH`` if needed and hold an exclusive flock on it, re-checked to still be ``PATH`` once held (a
        process rotating the log holds the lock until the new ``PATH`` exists); the caller then calls
        :meth:`_unlock`."""
        while True:
            if self._fd is None:
                self._open()
            self._flock(fcntl.LOCK_EX)
            try:
                if self._path_is_ours():
                    return
            except BaseException:  # a failed stat (EIO on a shared volume): never keep the lock past it, or every
                self._unlock()  # other process appending to this log waits until this one appends again
                raise
            os.close(self._fd)  # moved (logrotate) or rotated by another process: drops the lock; open PATH again
            self._fd = None

    def _path_is_ours(self) -> bool:
        """Whether ``PATH`` is still the file this writer has open (False once it was moved, rotated or deleted)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._ino

    def _unlock(self) -> None:
        if self._fd is not None:  # a failed undo closed it (which released the lock)
            self._flock(fcntl.LOCK_UN)

    def _flock(self, operation: int) -> bool:
        """flock the current descriptor; False on a filesystem without locks (then one writer is assumed, warned)."""
        if self._no_locks:
            return False
        try:
            fcntl.flock(self._fd, operation)
            return True
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            self._no_locks = True
            log.warning("audit log %s: the filesystem has no file locks (%s): only one process may write this log",
                        self.path, exc.strerror or exc)
            return False

    def _repair(self) -> None:
        """Drop an unterminated tail (a writer, this process or another, died or failed during its write); under the
        lock, so never another process's record in progress."""
        dropped = _drop_unterminated_tail(self._fd)
        if dropped:
            self.repaired_bytes += dropped
            log.warning("audit log %s: dropped an unterminated last record (%d bytes) left by a crash during its "
                        "write; its certificate was never answered", self.path, dropped)

    def _size(self) -> int:
        return os.fstat(self._fd).st_size

    def _reopen_if_moved(self) -> None:
        if self._fd is None:
            self._open()
            return
        if not self._path_is_ours():
            os.close(self._fd)
            self._fd = None
            self._open()

    def _write_whole(self, line: bytes) -> None:
        start = self._size()
        try:
            written = os.write(self._fd, line)
        except OSError:
            self._undo(start, line)
            raise
        if written != len(line):  # short write: disk full or file-size limit; leave no torn line
            self._undo(start, line)
            raise OSError(28, f"short write ({written} of {len(line)} bytes; disk full?)")
        if self.fsync:
            try:
                os.fsync(self._fd)
            except OSError:  # not persisted: refused, so its line must not stay (the log holds answered ones)
                self._undo(start, line)
                raise

    def _undo(self, start: int, line: bytes) -> None:
        try:
            os.ftruncate(self._fd, start)
        except OSError:  # the line (or part) stays for now: closed, the next append reopens and cuts it first
            self._refused = (self._ino, start, line)
            os.close(self._fd)
            self._fd = None

    def _cut_refused(self) -> None:
        """Cut a refused line that :meth:`_undo` could not, if it is still the end of the current file (under the
        lock); a torn part of it is left to :meth:`_repair`. Raises (the append is refused) if the cut fails."""
        if self._refused is None:
            return
        ino, start, line = self._refused
        size = self._size()
        if ino == self._ino and size >= start + len(line) and os.pread(self._fd, len(line), start) == line:
            if size > start + len(line):  # another process appended after it: cutting would drop its records
                log.error("audit log %s: a refused record (%d bytes at offset %d) could not be removed: other "
                          "records follow it; its certificate was never answered", self.path, len(line), start)
            else:
                os.ftruncate(self._fd, start)
                self.repaired_bytes += len(line)
                log.warning("audit log %s: removed a refused record (%d bytes) that a failed undo had left; its "
                            "certificate was never answered", self.path, len(line))
        self._refused = None

    def _rotate(self) -> None:
        """PATH.i -> PATH.(i+1) newest last (the oldest beyond ``backups`` deleted), PATH -> PATH.1, new PATH, all
        under the flock of the old PATH, released only once the new PATH is open and locked."""
        for i in range(self.backups, 0, -1):  # only the log's own files: PATH.1 ... PATH.<backups>
            src = _backup(self.path, i)
            if not src.exists():
                continue
            if i == self.backups:
                src.unlink()
            else:
                os.replace(src, _backup(self.path, i + 1))
        os.replace(self.path, _backup(self.path, 1))
        old = self._fd
        self._fd = None
        try:
            self._open()
            self._flock(fcntl.LOCK_EX)  # (a process that created it meanwhile holds no lock between appends)
        finally:
            os.close(old)


def _drop_unterminated_tail(fd: int) -> int:
    """Truncate the file after its last newline; return the number of bytes dropped."""
    size = end = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            end = start + cut + 1
            break
        end = start
    os.ftruncate(fd, end)
    return size - end


def _backup(path: Path, i: int) -> Path:
    return path.with_name(f"{path.name}.{i}")


def _backups(path: Path, backups: int | None) -> list[Path]:
    """The log's rotated files, newest first: those of ``PATH.1`` ... ``PATH.<backups>`` that exist, or (``None``)
    ``PATH.1``, ``PATH.2`` ... up to the first missing one."""
    if backups is not None:
        return [_backup(path, i) for i in range(1, backups + 1) if _backup(path, i).exists()]
    found = []
    while _backup(path, len(found) + 1).exists():
        found.append(_backup(path, len(found) + 1))
    return found


def read_records(path: str | os.PathLike, *, skip_torn_tail: bool = False, backups: int | None = None) -> list[dict]:
    """Every record of a log and its rotated files, oldest first (``PATH.N`` ... ``PATH.1``, ``PATH``).

    The rotated files are ``PATH.1`` ... ``PATH.<backups>`` (the log's ``backups``), or without ``backups``
    ``PATH.1``, ``PATH.2`` ... up to the first one missing; other ``PATH.<digits>`` files are not the log's. A
    symlinked ``PATH`` is resolved, as :class:`AuditLog` does. Raises ``ValueError`` naming the file and line if a
    line does not parse or a file does not end with a newline; with ``skip_torn_tail`` an unterminated end of the
    newest file (a crash during its write) is left out instead.
    """
    path = Path(path).resolve()
    rotated = _backups(path, backups)[::-1]
    records = []
    for file in rotated + ([path] if path.exists() else []):
        data = file.read_bytes()
        if data and not data.endswith(b"\n"):
            if not (skip_torn_tail and file == path):
                raise ValueError(f"{file}: the last line is not terminated (torn write)")
            data = data[:data.rfind(b"\n") + 1]
        for number, line in enumerate(data.splitlines(), 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{file}:{number}: not a JSON line") from None
    return records
