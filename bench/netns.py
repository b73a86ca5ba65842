"""A private network namespace for local Ray clusters in tests and benchmarks.

Ray binds its servers on all interfaces and connects to the host's address even when told 127.0.0.1 (seen with Ray
2.60: gcs_server, raylet and the agents listen on ``*`` and talk over the host address). Inside a fresh network
namespace only the loopback interface exists, so a test cluster can neither be reached from nor send to the network.

:func:`private_network` moves the CALLING THREAD into a new namespace (``unshare(CLONE_NEWNET)``, loopback up) and
back on exit (``setns`` to the saved one). Processes started from that thread meanwhile (Ray's, a server under test)
stay in the private namespace; a namespace disappears with its last process, so :func:`processes_in` after the exit
is a leak check. Needs CAP_SYS_ADMIN (root, as CI runs); :func:`available` says whether it works here.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import socket
import struct

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = "16sH14x"  # struct ifreq: interface name, then the flags (short) of the union
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack(_IFREQ, fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0)))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))


def current() -> str:
    """The calling thread's network namespace, e.g. ``net:[4026531833]``."""
    return os.readlink("/proc/thread-self/ns/net")


@contextlib.contextmanager
def private_network():
    """Run the body (and every process it starts) in a new network namespace with only loopback; yields its id."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            _loopback_up()
            yield current()
        finally:
            _check(_libc.setns(original, CLONE_NEWNET), "setns back to the original network namespace")
    finally:
        os.close(original)


def available() -> tuple[bool, str]:
    """(True, "") when :func:`private_network` works in this process, else (False, why)."""
    try:
        with private_network():
            pass
    except OSError as exc:
        return False, str(exc)
    return True, ""


def processes_in(namespace: str) -> list[int]:
    """Pids of the processes whose (main thread's) network namespace is ``namespace``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == namespace:
                    pids.append(int(entry))
            except OSError:
                continue  # gone meanwhile, or not ours to inspect
    return pids
