"""A local image file as a byte source: what the operating system offers for one.

Opening refuses anything but a regular file (or, when the user asked for it, a block device)
and takes the image locks (sources/image_lock.py). Reads use preadv straight into the caller's
buffer, through a second O_DIRECT descriptor when asked to bypass the page cache; prefetching is
posix_fadvise(WILLNEED); holes are found with FIEMAP (sources/extents.py) or SEEK_DATA/SEEK_HOLE.
A file opened writable (the QED top image) also writes, flushes (fdatasync), truncates and
punches holes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from collections.abc import Sequence

from ..errors import BackingFileError, InvalidImageError, describe_os_error
from .extents import ExtentMap
from .image_lock import lock_image
from .read_for import ReadFor

log = logging.getLogger(__name__)

IOV_MAX = 1024  # buffers per pwritev call (Linux's UIO_MAXIOV)
DIRECT_ALIGNMENT = 4096  # O_DIRECT offsets, lengths and buffer addresses that any common device takes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_punch_refused: set[int] = set()  # st_dev of filesystems that refused a punch (warned once)

Buffers = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]


class LocalFile:
    """One open image file. `size` is its length at open (a block device's too: lseek to the
    end, since st_size is 0 there); a writable file grows past it, and its writer keeps its own
    account of the end (current_size() asks the file)."""

    remote = False
    bulk_size = 0  # any read size keeps a local file busy

    def __init__(self, path: str, *, writable: bool = False, lock: bool = True, allow_device: bool = False):
        try:
            fd = _open_regular_file(path, os.O_RDWR if writable else os.O_RDONLY, allow_device)
        except OSError as err:
            raise BackingFileError(describe_os_error(path, err)) from None
        self._adopt(fd, path, writable, lock)

    @classmethod
    def create(cls, path: str, overwrite: bool = False) -> LocalFile:
        """A new image file, open for writing and locked as a writer (so that an image in use is
        never truncated); with `overwrite`, an existing one if it is a regular file. Its content
        is left as it was, for the caller to replace."""
        # O_RDWR even to create: QEMU's locks are read locks, taken on a file open for reading.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | (0 if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            raise InvalidImageError(f"{path}: already exists (use --force to overwrite it)") from None
        except OSError as err:
            if err.errno == errno.ENXIO:  # a FIFO that nobody reads, or a socket
                raise InvalidImageError(f"{path}: is a FIFO or socket, not a regular file") from None
            raise InvalidImageError(describe_os_error(path, err)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidImageError(f"{path}: is a device, FIFO or socket, not a regular file")
        file = cls.__new__(cls)
        file._adopt(fd, path, writable=True, lock=True)
        return file

    def _adopt(self, fd: int, path: str, writable: bool, lock: bool) -> None:
        """Lock and size the file open on `fd`; on any error, close it."""
        self.name = path
        self.writable = writable
        self.fd = fd
        try:
            st = os.fstat(fd)
            self.block_device = stat.S_ISBLK(st.st_mode)
            self._identity = (st.st_dev, st.st_ino)
            if lock:
                lock_image(fd, path, writable)
            self.size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as err:  # a "regular file" that cannot be locked or sized, such as /proc/self/mem
            os.close(fd)
            raise BackingFileError(f"{path}: cannot lock it or tell its size: {err.strerror or err}") from None
        except BaseException:
            os.close(fd)
            raise
        self.direct = DirectTwin(fd, writable)
        self._advice = ReadAdvice(fd, path)
        # A file open read-only changes under nobody here: its extents may be cached.
        self._extents = None if writable or self.block_device else ExtentMap(fd, self.size, path)

    # -- the Source protocol ---------------------------------------------------------------------

    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino): one file under any name, hard links included."""
        return self._identity

    def read_into(self, view: memoryview, offset: int, read_for: ReadFor = ReadFor.GUEST) -> int:
        return pread_into(self.fd, view, offset, self.direct.fd if read_for is ReadFor.GENTLE else -1)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) == length or not data or offset + len(data) >= self.size:  # done, or at the end
            return data
        return data + self.read(offset + len(data), length - len(data))

    def prefetch(self, offset: int, length: int, read_for: ReadFor = ReadFor.GUEST) -> None:
        self._advice.willneed(offset, length)  # the page cache, where every read but a gentle one looks

    def data_status(self, offset: int, length: int) -> tuple[bool, int]:
        """Data or a hole at `offset`, and how far it goes: from the file's extents (FIEMAP) when
        it is open read-only (sources/extents.py), otherwise (and where the extents cannot say)
        SEEK_DATA/SEEK_HOLE, as QEMU's file driver asks them."""
        end = min(offset + length, self.size)
        if self._extents is not None and offset < end:
            found = self._extents.data_status(offset, end)
            if found is not None:
                return found
        try:
            data_start = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole from here to the end of the file
            return False, length
        if data_start > offset:
            return False, min(data_start, end) - offset
        hole_start = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return True, min(hole_start, end) - offset

    def descriptor(self) -> int | None:
        return self.fd

    def describe(self) -> dict[str, object]:
        return {}

    def close(self) -> None:
        if self.fd >= 0:
            self.direct.close()
            os.close(self.fd)
            self.fd = -1

    # -- writes (a file opened writable) --------------------------------------------------------

    def write(self, offset: int, data: Buffers, direct: bool = False) -> None:
        """Write all of `data` (one buffer, or a list of buffers written back to back) at
        `offset`. `direct`: through the O_DIRECT descriptor where every buffer allows it (see
        DirectTwin), else through the page cache."""
        buffers = data if isinstance(data, list) else [data]
        aligned = direct and all(direct_io_allowed(memoryview(b), offset) for b in buffers)
        _pwrite_all(self.direct.fd if aligned and self.direct.fd >= 0 else self.fd, data, offset)

    def sync(self) -> None:
        """fdatasync: everything written so far, and the file's size, are durable."""
        os.fdatasync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def punch_hole(self, offset: int, length: int) -> None:
        punch_hole(self.fd, offset, length)

    def current_size(self) -> int:
        return os.fstat(self.fd).st_size

    def allocated_bytes(self) -> int:
        """Disk space the file really uses (st_blocks)."""
        return os.fstat(self.fd).st_blocks * 512


def file_identity(path: str) -> tuple[int, int] | None:
    """LocalFile.identity of the file at `path` without opening it (links followed); None where
    there is no file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _open_regular_file(path: str, flags: int, allow_block_device: bool) -> int:
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


def _pwrite_all(fd: int, data: Buffers, offset: int) -> None:
    """Write all of `data` (one buffer, or a list of buffers written back to back with pwritev,
    so that nothing is copied into one piece first) at `offset`, however many calls it takes."""
    buffers = [memoryview(b).cast("B") for b in data] if isinstance(data, list) else [memoryview(data).cast("B")]
    while buffers:
        batch = buffers[:IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        offset += written
        while buffers and written >= len(buffers[0]):
            written -= len(buffers.pop(0))
        if written:
            buffers[0] = buffers[0][written:]


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
        self._opening = threading.Lock()  # gentle reads of compressed clusters run in a pool

    @property
    def fd(self) -> int:
        if self._direct is None:  # the lock only for the first use, not on every direct I/O
            with self._opening:
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
    if direct_fd < 0:  # the common case first: one call
        filled = os.preadv(fd, [view], offset)
        if filled in (0, len(view)):
            return filled
    else:
        filled = 0
    while filled < len(view):
        part = view[filled:]
        aligned = direct_fd >= 0 and direct_io_allowed(part, offset + filled)
        n = os.preadv(direct_fd if aligned else fd, [part], offset + filled)
        if n == 0:
            break
        filled += n
    return filled
