"""Builds and loads of one bundle directory, side by side: an advisory lock (``flock`` on the directory itself) and
the clean-up of what a killed build leaves.

A build (:func:`models.bundle.create_bundle`) holds the lock exclusively from before its staging directory is made
until its files are swapped in, so a second build of the same directory waits for the first (two interleaved swaps
left one build's manifest over the other's models, while the other reported success). A load holds it shared while
it reads, so it never reads a manifest and models from two builds. The lock dies with its process: a killed build
never blocks the next one, which removes the staging directory the killed one left (it made a fresh directory look
not empty, and lingered inside the bundle). A wait for the lock is logged (a build stopped with Ctrl-Z held a
server's start-up without a word); a file system without ``flock`` (NFS refuses an exclusive one on a directory)
builds and loads without it, as before the lock, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger("certserve.bundle")

STAGING_PREFIX = ".staging-"
ARTIFACT_FILES = {"base": "base.onnx", "surrogate": "surrogate.onnx", "meta": "meta.onnx"}
# a build's staging directory: tempfile.mkdtemp's 8 characters (or, before it, the builder's pid), holding no more
# than the files a build stages; anything else of that name (a user's ".staging-notes" directory) is not one
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"(?:[a-z0-9_]{8}|[0-9]+)")
_STAGED_FILES = {*ARTIFACT_FILES.values(), "manifest.json"}


def _flock(fd: int, op: int, path: Path, who: str) -> bool:
    """Take the lock (``op``), logging a wait for another process's; False where the file system has no flock."""
    try:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s of bundle directory %s waits for a build of it (another process holds its lock)", who,
                        path)
            fcntl.flock(fd, op)
            log.warning("%s of bundle directory %s: the build ended, going on", who, path)
    except OSError as exc:
        log.warning("bundle directory %s cannot be locked (%s): the %s goes on without the lock; run no other build "
                    "of it meanwhile", path, exc.strerror or exc, who)
        return False
    return True


@contextlib.contextmanager
def build_lock(out: Path):
    """Hold ``out``'s lock exclusively (waits for another build of ``out``) and clear what killed builds left in it.
    Raises FileNotFoundError when ``out`` was removed while waiting (the build that created it failed)."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _flock(fd, fcntl.LOCK_EX, out, "build"):
            if os.stat(out).st_ino != os.fstat(fd).st_ino or os.fstat(fd).st_nlink == 0:
                raise FileNotFoundError(f"{out} was removed by another build of it while this one waited: rerun")
            clear_leftovers(out)  # only under the lock: unlocked, a staging directory may be another build's, live
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def read_lock(root: Path):
    """Hold ``root``'s lock shared while a loader reads it (waits for a build's swap). Best effort: a directory that
    cannot be opened or locked (a file system without ``flock``) is read without it."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        fd = None
    try:
        if fd is not None:
            _flock(fd, fcntl.LOCK_SH, root, "load")
        yield
    finally:
        if fd is not None:
            os.close(fd)


def clear_leftovers(out: Path) -> None:
    """Remove the staging directories of killed builds of ``out`` (call holding :func:`build_lock`: none is live):
    only a real directory named as a build names one that holds nothing but files a build stages."""
    for entry in out.iterdir():
        if not (_STAGING_NAME.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()):
            continue
        inside = list(entry.iterdir())
        if all(p.name in _STAGED_FILES and p.is_file() and not p.is_symlink() for p in inside):
            shutil.rmtree(entry, ignore_errors=True)
