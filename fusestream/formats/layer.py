"""The one small interface every layer of a backing chain implements.

A layer may be a local raw file, a QED image, and later qcow2 or a remote source; the chain
and the stream job only ever use what is here, so a slow or failing source fits in too.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import stat
from typing import Protocol

log = logging.getLogger(__name__)


class BlockStatus(enum.Enum):
    """QEMU's lookup results for a range of one layer."""

    FOUND = "found"  # the layer holds data for the range
    ZERO = "zero"  # the layer says the range reads as zeros (hides anything below)
    UNALLOCATED = "unallocated"  # the layer has nothing: look further down the chain


class Layer(Protocol):
    path: str
    format_name: str
    size: int

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Return exactly `length` bytes of a range that lies within `size`."""

    def read_into(self, view: memoryview, offset: int, direct: bool = False) -> int:
        """Fill `view`, zeros included, from a range within `size`; returns how many bytes were
        filled, fewer only on a short read. For bulk reads: no copies under the GIL. `direct`:
        read exactly this, bypassing the page cache and its readahead where the alignment of
        `view` allows (the stream, while it gives way to the guest)."""

    def prefetch(self, offset: int, length: int) -> None:
        """Start reading the data of a range within `size` into the page cache, without
        waiting for it (posix_fadvise WILLNEED; the kernel may still block while it queues the
        reads): the reads that follow find it there. For reads of many scattered clusters: the
        device fetches them all at once, where the reads alone would wait for one cluster at a
        time. A hint: it never fails (see ReadAdvice)."""

    def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        """Status of the run starting at `offset` and how many bytes (<= length) share it."""

    def close(self) -> None: ...


def read_into_from(layer: Layer | None, view: memoryview, offset: int, direct: bool = False) -> int:
    """read_into through an optional backing layer; past its end (or with none) zeros. Returns
    how many bytes are right, len(view) unless a read was short."""
    inside = 0 if layer is None else max(0, min(len(view), layer.size - offset))
    if inside:
        filled = layer.read_into(view[:inside], offset, direct)
        if filled < inside:
            return filled
    fill_zeros(view[inside:])
    return len(view)


def prefetch_from(layer: Layer | None, offset: int, length: int) -> None:
    """Layer.prefetch through an optional backing layer, for the part of the range inside it."""
    inside = 0 if layer is None else max(0, min(length, layer.size - offset))
    if inside:
        layer.prefetch(offset, inside)


ZEROS = bytes(1 << 20)
_ZEROS_VIEW = memoryview(ZEROS)


def fill_zeros(view: memoryview) -> None:
    """Zero `view` in place (buffers are reused, so nothing can count on them being zeroed)."""
    for start in range(0, len(view), len(ZEROS)):
        chunk = view[start : start + len(ZEROS)]
        chunk[:] = _ZEROS_VIEW[: len(chunk)]


def read_from(layer: Layer | None, offset: int, length: int) -> bytes | bytearray:
    """Read through an optional backing layer: no layer, or past its end, reads as zeros."""
    if layer is None or offset >= layer.size:
        return bytes(length)
    inside = min(length, layer.size - offset)
    data = layer.read(offset, inside)
    return data if inside == length else data + bytes(length - inside)


def open_regular_file(path: str, flags: int, allow_block_device: bool = False) -> int:
    """Open an image file, refusing anything but a regular file (or, when the user asked for
    it, a block device): a directory, device, FIFO or socket named by a possibly hostile image is
    an error, and O_NONBLOCK keeps a FIFO from hanging the open."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or (allow_block_device and stat.S_ISBLK(mode))):
        os.close(fd)
        if stat.S_ISDIR(mode):
            problem = "is a directory, not a regular file"
        elif stat.S_ISBLK(mode):
            problem = "is a block device (allowed only with -o allow_devices)"
        else:
            problem = "is a device, FIFO or socket, not a regular file"
        raise OSError(errno.EINVAL, problem)
    return fd


class ReadAdvice:
    """posix_fadvise(WILLNEED) for one file. It is a hint, so where the kernel (or a sandbox's
    system call filter) refuses it, a warning says so once and reads go on without prefetching."""

    def __init__(self, fd: int, path: str):
        self._fd, self._path = fd, path
        self._refused = False

    def willneed(self, offset: int, length: int) -> None:
        if self._refused or length <= 0:  # a length of 0 would mean "to the end of the file"
            return
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError as err:
            self._refused = True
            log.warning("%s: the kernel refuses read-ahead advice (%s); reading without prefetching",
                        self._path, err.strerror or err)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_punch_refused: set[int] = set()  # st_dev of filesystems that refused a punch (warned once)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the space of a file range back to the filesystem (fallocate PUNCH_HOLE, the range
    then reads zeros). Only space is at stake: where the filesystem cannot punch, a warning says
    so once and the range keeps its blocks."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    device = os.fstat(fd).st_dev
    if device not in _punch_refused:
        _punch_refused.add(device)
        log.warning("the filesystem of device %#x cannot punch holes: discarded space is not given back", device)


DIRECT_ALIGNMENT = 4096  # O_DIRECT offsets, lengths and buffer addresses that any common device takes


class DirectTwin:
    """A second descriptor with O_DIRECT for the file of `fd`, opened on first use (reopened
    through /proc, so it cannot be another file by now); -1 where the filesystem refuses
    O_DIRECT.

    For the stream's bulk I/O. Its writes: each byte is written once, and through the page cache
    it only costs a copy, dirty pages to write back at the step's flush, and pages pushed out
    that the guest may still want (QEMU's cache=none, for the stream alone). Its reads, only
    while the guest is busy: then the stream reads exactly its small steps, where readahead
    would put megabytes in the device's queue ahead of the guest's next read.
    """

    def __init__(self, fd: int, writable: bool):
        self._fd = fd
        self._flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_DIRECT | os.O_CLOEXEC
        self._direct: int | None = None

    @property
    def fd(self) -> int:
        if self._direct is None:
            try:
                self._direct = os.open(f"/proc/self/fd/{self._fd}", self._flags)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self._direct = -1
        return self._direct

    def close(self) -> None:
        if self._direct is not None and self._direct >= 0:
            os.close(self._direct)
        self._direct = -1


def direct_io_allowed(view: memoryview, offset: int) -> bool:
    """Whether O_DIRECT takes `view` at file `offset`: every one of them aligned."""
    if view.readonly or not len(view) or (offset | len(view)) % DIRECT_ALIGNMENT:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGNMENT == 0


def pread_into(fd: int, view: memoryview, offset: int, direct_fd: int = -1) -> int:
    """Fill `view` from file `offset` until it is full or the file ends; returns the bytes read.
    With a `direct_fd`, each aligned read goes through it; the rest (a file end that is not
    block-aligned) through `fd`."""
    filled = 0
    while filled < len(view):
        part = view[filled:]
        aligned = direct_fd >= 0 and direct_io_allowed(part, offset + filled)
        n = os.preadv(direct_fd if aligned else fd, [part], offset + filled)
        if n == 0:
            break
        filled += n
    return filled
