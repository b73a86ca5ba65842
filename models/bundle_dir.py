"""Builds and loads of one bundle directory, side by side: an advisory lock (``flock`` on the directory itself) and
the clean-up of what a killed build leaves.

A build (:func:`models.bundle.create_bundle`) holds the lock exclusively from before its staging directory is made
until its files are swapped in, so a second build of the same directory waits for the first (two interleaved swaps
left one build's manifest over the other's models, while the other reported success). A load holds it shared while
it reads, so it never reads a manifest and models from two builds. The lock dies with its process: a killed build
never blocks the next one, which removes the staging directory the killed one left (it made a fresh directory look
not empty, and lingered inside the bundle).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

STAGING_PREFIX = ".staging-"


@contextlib.contextmanager
def build_lock(out: Path):
    """Hold ``out``'s lock exclusively (waits for another build of ``out``); OSError where it cannot be taken. Raises
    FileNotFoundError when ``out`` was removed while waiting (the build that created it failed)."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.stat(out).st_ino != os.fstat(fd).st_ino or os.fstat(fd).st_nlink == 0:
            raise FileNotFoundError(f"{out} was removed by another build of it while this one waited: rerun")
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
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def clear_leftovers(out: Path) -> None:
    """Remove the staging directories of killed builds of ``out`` (call holding :func:`build_lock`: none is live)."""
    for entry in out.iterdir():
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
