"""The I/O priority class of the calling thread (Linux ioprio_set(2)).

The stream gives way to a busy guest with small steps, one I/O at a time; at the device a guest
read that arrives behind one of them still waits for it. In the idle class, the stream's reads
also give way in the kernel's I/O scheduler: mq-deadline (and BFQ) dispatch no idle-class
request while a request of a higher class is in flight, and serve a starved one after
`prio_aging_expire` (10 s by default). With no scheduler ("none") the class changes nothing.
Only reads that hold no lock go in the idle class: a populate holds the image's allocation lock
across its write, and guest writes and flushes that wait for that lock must not wait for an
idle-class request as well.

ioprio_set has no wrapper in Python or glibc: it is called through syscall(2), by number.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
from collections.abc import Iterator

log = logging.getLogger(__name__)

IOPRIO_WHO_PROCESS = 1  # with who == 0: the calling thread
IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_IDLE = 3
IDLE = IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT
# (ioprio_set, ioprio_get) by machine; the generic table's numbers serve the newer ports.
_SYSCALL_NUMBERS = {
    "x86_64": (251, 252),
    "i686": (289, 290),
    "aarch64": (30, 31),
    "riscv64": (30, 31),
    "ppc64le": (273, 274),
    "s390x": (282, 283),
}

_NUMBERS = _SYSCALL_NUMBERS.get(platform.machine())
_syscall = ctypes.CDLL(None, use_errno=True).syscall
_warned = False


def get() -> int | None:
    """The calling thread's I/O priority (0: none set, it follows the nice value), or None
    where it cannot be asked."""
    if _NUMBERS is None:
        return None
    value = _syscall(_NUMBERS[1], IOPRIO_WHO_PROCESS, 0)
    return None if value < 0 else value


def _set(value: int) -> bool:
    return _NUMBERS is not None and _syscall(_NUMBERS[0], IOPRIO_WHO_PROCESS, 0, value) == 0


# The class the daemon started with (0 unless it runs under ionice): what threads that a block
# in the idle class happens to start are given back (inherit_started).
STARTED_WITH = get()


@contextlib.contextmanager
def idle_class(enabled: bool = True) -> Iterator[None]:
    """The calling thread's I/O in the idle class within the block (when `enabled`), then back
    to what it was: a worker thread goes on to serve other requests. A thread started inside
    the block inherits the idle class: pools that may start threads there take
    inherit_started as their initializer."""
    global _warned
    before = get() if enabled else None
    if before is None or before == IDLE:
        yield
        return
    if not _set(IDLE):
        if not _warned:
            _warned = True
            log.warning("cannot put the stream's gentle reads in the idle I/O class: %s",
                        os.strerror(ctypes.get_errno()))
        yield
        return
    try:
        yield
    finally:
        if not _set(before):
            log.error("cannot give a thread its I/O class back (%d): %s", before, os.strerror(ctypes.get_errno()))


def inherit_started() -> None:
    """A pool thread's initializer: the I/O class the daemon started with, whatever the class of
    the thread that started it (a thread in idle_class, say)."""
    if STARTED_WITH is not None and get() != STARTED_WITH:
        _set(STARTED_WITH)
