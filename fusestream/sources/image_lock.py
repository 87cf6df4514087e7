"""QEMU's image locks: byte-range OFD locks that say which permissions a process holds on an
image file and which it refuses to share with others.

QEMU's file driver (block/file-posix.c) locks one byte per permission: byte 100 + i while it
holds permission bit i, byte 200 + i while it does not let anyone else hold it. Only shared
(read) locks are ever taken; a conflict is found by testing whether another open file
description holds a lock on the byte that matters (F_OFD_GETLK with a write lock). Taking the
same locks makes QEMU, qemu-img and qemu-io refuse to write an image that fusestream uses, and
makes fusestream refuse an image that a QEMU process writes. `qemu-img -U` takes no lock that
conflicts with readers, so it still reads a mounted image.

The locks belong to the open file description: they survive the daemonizing fork, are not
dropped when another descriptor of the same file is closed (as POSIX record locks would be), and
go away when the descriptor is closed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import struct

from ..errors import ImageBusyError

log = logging.getLogger(__name__)

# QEMU's permission bits (include/block/block-common.h) and the names its messages use.
BLK_PERM_CONSISTENT_READ = 0x01
BLK_PERM_WRITE = 0x02
BLK_PERM_WRITE_UNCHANGED = 0x04
BLK_PERM_RESIZE = 0x08
PERM_NAMES = {
    BLK_PERM_CONSISTENT_READ: "consistent read",
    BLK_PERM_WRITE: "write",
    BLK_PERM_WRITE_UNCHANGED: "write unchanged",
    BLK_PERM_RESIZE: "resize",
}
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200

# What a QEMU writer of an image holds (measured on qemu-storage-daemon 7.2 with /proc/locks):
# read, write and resize, sharing neither write nor resize. A reader holds read and shares
# neither: while fusestream reads a backing file, nobody may change it under the chain.
WRITER = (BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE, BLK_PERM_WRITE | BLK_PERM_RESIZE)
READER = (BLK_PERM_CONSISTENT_READ, BLK_PERM_WRITE | BLK_PERM_RESIZE)

# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
# (l_pid must be 0 for OFD locks).
_FLOCK = struct.Struct("@hhqqi4x")
# Filesystems without byte-range locks (some network and FUSE filesystems): QEMU's
# locking=auto goes on without them, and so do we, with a warning.
_UNSUPPORTED = {errno.ENOTSUP, errno.ENOLCK, errno.EINVAL, errno.ENOSYS}


def lock_image(fd: int, path: str, writable: bool) -> None:
    """Take the locks of a reader or a writer of the file open on `fd`, as every layer and
    `create` do: fusestream's own flock (exclusive for a writer; scripts wait on it after an
    unmount), then QEMU's locks. ImageBusyError where another process holds a conflicting one,
    naming QEMU's permission for QEMU's locks. The caller closes `fd` on error, which drops what
    was taken."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ImageBusyError(f"{path}: image is in use by another fusestream process") from None
    _lock_qemu(fd, path, writable)


def _lock_qemu(fd: int, path: str, writable: bool) -> None:
    perm, unshared = WRITER if writable else READER
    try:
        for i in _indexes(perm):
            _read_lock(fd, RAW_LOCK_PERM_BASE + i)
        for i in _indexes(unshared):
            _read_lock(fd, RAW_LOCK_SHARED_BASE + i)
        for i in _indexes(perm):  # someone refuses to share what we hold
            if _held_elsewhere(fd, RAW_LOCK_SHARED_BASE + i):
                raise _busy(path, f'"{PERM_NAMES[1 << i]}"')
        for i in _indexes(unshared):  # someone holds what we refuse to share
            if _held_elsewhere(fd, RAW_LOCK_PERM_BASE + i):
                raise _busy(path, f'shared "{PERM_NAMES[1 << i]}"')
    except OSError as err:
        if err.errno not in _UNSUPPORTED:
            raise
        log.warning("%s: the filesystem has no byte-range locks (%s); QEMU's image locks are not taken",
                    path, err.strerror or err)


def _indexes(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask & (1 << i)]


def _busy(path: str, lock: str) -> ImageBusyError:
    """QEMU's wording ('Failed to get "write" lock'), and who may hold it."""
    return ImageBusyError(f"{path}: failed to get {lock} lock: the image is in use by another process "
                          "(QEMU or a fusestream mount)")


def _read_lock(fd: int, byte: int) -> None:
    """A shared lock on one byte. QEMU never takes exclusive ones, so this conflicts with no
    one: the conflicts are found by _held_elsewhere."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, 0, byte, 1, 0))


def _held_elsewhere(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on `byte` (ours never conflict with
    ourselves)."""
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, byte, 1, 0))
    return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK
