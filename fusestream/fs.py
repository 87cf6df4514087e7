"""pyfuse3 Operations: the mount's directory, its raw file and the control files. Translation
only, no format logic; fuse_errors is the one place that turns errors into errnos.

With native read threads (native_reads.py), most reads of the raw file never get here: the
threads answer them from their map, and hand everything else to the event loop. Small reads
and writes of the raw file (INLINE_READ_MAX, INLINE_WRITE_MAX) that do get here run on the event
loop itself, measured to cost less than a hand-over to a thread, while no other request waits
behind them; a small write that would wait (for another allocation, or a write-back's flush)
goes to a thread instead. lseek's SEEK_DATA / SEEK_HOLE do the same. Larger requests, discards,
fsync and every read with copy-on-read run in worker threads (``trio.to_thread``), so
that a slow disk or a long allocating write never stalls the event loop, which also serves the
other requests and the stream job. The image is thread-safe for this reason (formats/qed.py).

While a backing layer is remote (Chain.remote), nothing of the raw file runs inline: any read,
and any write that allocates (it reads what lies below for the rest of its clusters), may wait
on the network, for up to the retries' bounded time, so every read goes to a worker thread: a
4 KiB read of remote data is mostly hand-off and network. Once a stream has retired the remote
layers, small requests run inline again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pyfuse3
import trio

from .chain import Chain
from .control import Control, rejection
from .errors import CommandError, CorruptionError, FusestreamError, ReadOnlyImageError
from .faults import WriteErrors
from .native_reads import NativeReads
from .stream import CopyOnRead, GuestActivity

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
RAW_INODE, STATUS_INODE, STATUS_JSON_INODE, CTL_INODE, EVENTS_INODE = range(ROOT_INODE + 1, ROOT_INODE + 6)
CONTROL_FILES = {  # name -> (inode, mode)
    b"status": (STATUS_INODE, 0o444),
    b"status.json": (STATUS_JSON_INODE, 0o444),
    b"ctl": (CTL_INODE, 0o200),
    b"events": (EVENTS_INODE, 0o444),
}
CONTROL_MODES = {inode: mode for inode, mode in CONTROL_FILES.values()}
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10  # fallocate(2)'s modes
DISCARD_MODES = {FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                 FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE}
FIRST_SNAPSHOT_FH = 1000  # file handles of open status files; inode numbers serve as the others
T = TypeVar("T")


def raw_name(image_path: str) -> str:
    """The name of the raw file in the mount: the image's stem plus .raw (top.qed -> top.raw)."""
    stem, _ = os.path.splitext(os.path.basename(image_path))
    return stem + ".raw"


# Reads up to this size are served on the event loop itself: a page-cache hit or one small disk
# read costs less than handing the request to a worker thread (~78 us on a 2-vCPU VM, measured
# with bench/read_bench.py). Larger reads (the kernel's readahead, several at a time) go to
# threads so that they overlap. See docs/performance.md, "What each lever gave".
INLINE_READ_MAX = 64 * 1024
# Writes up to this size are served on the event loop too, unless they would wait for another
# allocation or a write-back's flush: then a worker thread waits. An allocating 4 KiB write
# went from 5.2k to 9.9k IOPS (bench/write_bench.py).
INLINE_WRITE_MAX = 64 * 1024
# Runs an lseek crosses on the event loop at most (Chain.seek_some) before it goes on in a
# worker thread: cp --sparse's seeks cross one to three.
SEEK_INLINE_RUNS = 8
# A read at least this long is the kernel's readahead of a sequential reader (its requests are
# 128 KiB and more): the native threads' map is filled ahead of it (NativeReads.fill_around).
SEQUENTIAL_READ_MIN = 128 * 1024


@contextlib.contextmanager
def fuse_errors() -> Iterator[None]:
    """The one place that turns our errors into FUSE errnos."""
    try:
        yield
    except CorruptionError as err:
        log.error("%s", err)
        raise pyfuse3.FUSEError(errno.EIO) from None
    except ReadOnlyImageError:
        raise pyfuse3.FUSEError(errno.EROFS) from None
    except CommandError:  # the reason is in `events` (see Operations._command)
        raise pyfuse3.FUSEError(errno.EINVAL) from None
    except OSError as err:
        log.error("I/O error: %s", err)
        raise pyfuse3.FUSEError(err.errno or errno.EIO) from None
    except FusestreamError as err:
        log.error("%s", err)
        raise pyfuse3.FUSEError(errno.EIO) from None


async def run_io(fn: Callable[..., T], *args) -> T:
    """Run image I/O in a worker thread."""
    with fuse_errors():
        return await trio.to_thread.run_sync(fn, *args)


def run_inline(fn: Callable[..., T], *args) -> T:
    """Run short image I/O on the event loop (see INLINE_READ_MAX)."""
    with fuse_errors():
        return fn(*args)


class Operations(pyfuse3.Operations):
    """A root directory holding the raw file, the flat view of the chain, and the control files."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    # Asynchronous requests (readahead, O_DIRECT reads and writes from aio) the kernel keeps in
    # flight at once; its default of 12 would hold back a guest's queue of 16 and more, now
    # that the native threads serve reads side by side (native_reads.py).
    max_background = 64
    congestion_threshold = 48
    # Every change of the raw file goes through us (keep_cache), so the kernel need not drop its
    # pages when the mtime moves, nor ask for the attributes before each read after a write.
    auto_inval_data = False

    def __init__(self, chain: Chain, control: Control, write_errors: WriteErrors, guest: GuestActivity,
                 copy_on_read: CopyOnRead | None = None, read_only: bool = False,
                 native_reads: NativeReads | None = None):
        super().__init__()
        self.chain = chain
        self.control = control
        self.write_errors = write_errors  # where failed writes and fsyncs are also reported
        self.guest = guest  # noted at every request of the raw file, for the stream to give way
        self.read_only = read_only or not chain.top.writable
        self.raw_name = raw_name(chain.top.path).encode()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.raw_mode = 0o444 if self.read_only else 0o644  # chmod/chown change these (libvirt does)
        self.raw_uid, self.raw_gid = self.uid, self.gid
        now = time.time_ns()
        self.mtime_ns = self.ctime_ns = self.atime_ns = now
        self.read_raw: Callable[[int, int], bytes | bytearray] = copy_on_read.read if copy_on_read else chain.read
        self.inline_small_reads = copy_on_read is None  # a read with copy-on-read may write
        self.native_reads = native_reads  # answers the reads it can place, before they get here
        self._snapshots: dict[int, bytes] = {}  # open status files: what that open() saw
        self._next_fh = FIRST_SNAPSHOT_FH
        self.after_init: Callable[[], None] | None = None  # see init()

    def init(self) -> None:
        """The kernel's FUSE_INIT request, answered as soon as this returns. The kernel applies
        its answer then (the readahead window, for one), so after_init runs on the event loop's
        next turn, once the answer is in."""
        if self.after_init is not None:
            trio.lowlevel.current_trio_token().run_sync_soon(self.after_init)

    # -- attributes ----------------------------------------------------------------------------

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns = self.atime_ns, self.mtime_ns, self.ctime_ns
        attr.st_blksize = 4096
        if inode == ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        elif inode == RAW_INODE:
            attr.st_mode = stat.S_IFREG | self.raw_mode
            attr.st_uid, attr.st_gid = self.raw_uid, self.raw_gid
            attr.st_nlink = 1
            attr.st_size = self.chain.size
            attr.st_blocks = self.chain.top.allocated_bytes() // 512
        elif inode in CONTROL_MODES:
            attr.st_mode = stat.S_IFREG | CONTROL_MODES[inode]
            attr.st_nlink = 1
            # The events file's size, not its content: that may hold gaps of any length (EventLog).
            attr.st_size = len(self.control.events) if inode == EVENTS_INODE else len(self._control_content(inode))
            attr.st_mtime_ns = attr.st_ctime_ns = time.time_ns()
            attr.attr_timeout = attr.entry_timeout = 0  # they change all the time: never cache
            return attr
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # The kernel may cache these briefly; the size never changes and st_blocks is advisory.
        attr.attr_timeout = attr.entry_timeout = 1.0
        return attr

    def _control_content(self, inode: int) -> bytes:
        if inode == STATUS_INODE:
            return self.control.status()
        if inode == STATUS_JSON_INODE:
            return self.control.status_json()
        return b""

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT_INODE and name == self.raw_name:
            return self._attr(RAW_INODE)
        if parent_inode == ROOT_INODE and name in CONTROL_FILES:
            return self._attr(CONTROL_FILES[name][0])
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        truncating_ctl = inode == CTL_INODE and attr.st_size == 0  # `echo cmd > ctl` opens with O_TRUNC
        if fields.update_size and not truncating_ctl and (inode != RAW_INODE or attr.st_size != self.chain.size):
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk's size does not change through the mount
        if (fields.update_mode or fields.update_uid or fields.update_gid) and inode != RAW_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        # The kernel has checked the caller's right to chmod/chown (default_permissions). The
        # change lasts as long as the mount, as with qemu-storage-daemon's export.
        if fields.update_mode:
            self.raw_mode = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            self.raw_uid = attr.st_uid
        if fields.update_gid:
            self.raw_gid = attr.st_gid
        if fields.update_atime:
            self.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            self.mtime_ns = attr.st_mtime_ns
        return self._attr(inode)

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 512
        st.f_blocks = self.chain.size // 512
        st.f_bfree = st.f_bavail = 0
        st.f_files, st.f_ffree, st.f_favail = 2, 0, 0
        st.f_namemax = 255
        return st

    # -- the directory -------------------------------------------------------------------------

    async def opendir(self, inode, ctx):
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        entries = [(self.raw_name, RAW_INODE)] + [(name, inode) for name, (inode, _) in CONTROL_FILES.items()]
        for index, (name, inode) in enumerate(entries[start_id:], start=start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), index):
                break

    async def releasedir(self, fh):
        pass

    # -- the raw file --------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        if inode in CONTROL_MODES:
            return self._open_control(inode, flags)
        if inode != RAW_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT_INODE else errno.ENOENT)
        if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        # Every change goes through this process, so the kernel's page cache stays valid.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    def _open_control(self, inode: int, flags: int) -> pyfuse3.FileInfo:
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing != (inode == CTL_INODE):
            raise pyfuse3.FUSEError(errno.EACCES)
        fh = inode
        if inode in (STATUS_INODE, STATUS_JSON_INODE):  # one consistent rendering per open()
            fh = self._next_fh = self._next_fh + 1
            self._snapshots[fh] = self._control_content(inode)
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def read(self, fh, off, size):
        if fh in self._snapshots:
            return self._snapshots[fh][off : off + size]
        if fh == EVENTS_INODE:
            return self.control.events.read(off, size)
        self.guest.note()
        if size <= INLINE_READ_MAX and self.inline_small_reads and self._inline():
            return run_inline(self._read_and_map, off, size)
        return await run_io(self._read_and_map, off, size)

    def _inline(self) -> bool:
        """Whether a small request of the raw file may run on the event loop: never while a
        backing layer is remote; with native threads, only while no other request waits for
        the loop (NativeReads.waiting), so that several guest requests go to the disk side by
        side in worker threads rather than one after another on the loop."""
        if self.chain.remote:
            return False
        return self.native_reads is None or not self.native_reads.waiting()

    def read_unmapped(self, off: int, size: int) -> bytes | bytearray | int:
        """A READ of the raw file that the native threads could not place, read by the native
        thread that received it (NativeReads.call_reads): the data, or a negative errno. It
        runs outside the event loop, in any of those threads."""
        self.guest.note_in_thread()
        try:
            return run_inline(self._read_and_map, off, size)
        except pyfuse3.FUSEError as err:
            return -err.errno
        except Exception:  # a bug: on the loop it would stop the mount; here the guest gets EIO, and the log says why
            log.exception("read of the raw file at %d+%d failed", off, size)
            return -errno.EIO

    def _read_and_map(self, off: int, size: int) -> bytes | bytearray:
        """A read of the raw file that the native threads could not answer; then what lies
        around it is mapped for them (in the same thread: locating may read tables)."""
        data = self.read_raw(off, size)
        if self.native_reads is not None:
            self.native_reads.fill_around(off, sequential=size >= SEQUENTIAL_READ_MIN)
        return data

    async def write(self, fh, off, buf):
        if fh == CTL_INODE:
            return self._command(buf)
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off >= self.chain.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # a disk does not grow when written past its end
        self.guest.note()
        with self._reporting_write_errors("guest write"):
            inline = len(buf) <= INLINE_WRITE_MAX and self._inline()
            written = run_inline(self._write_unless_blocked, off, buf) if inline else None
            if written is None:
                written = await run_io(self.chain.write, off, buf)
        self.mtime_ns = self.ctime_ns = time.time_ns()
        return written

    def _write_unless_blocked(self, off: int, buf: bytes) -> int | None:
        try:
            return self.chain.write(off, buf, wait=False)
        except BlockingIOError:  # another allocation, or a write-back's flush: wait in a thread
            return None

    def _command(self, buf: bytes) -> int:
        with fuse_errors():
            try:
                self.control.command(buf)
            except CommandError as err:
                # At debug level only: the reason is in `events`, and every write to ctl would
                # otherwise be a log line, however many come.
                shown = rejection(bytes(buf), err)  # credentials redacted
                log.debug("ctl: rejected %r (%d bytes): %s", shown["command"], len(buf), shown["reason"])
                raise
        return len(buf)

    async def lseek(self, fh, off, whence):
        """SEEK_DATA / SEEK_HOLE (the kernel answers the other kinds itself): from the chain's
        allocation for the raw file, so that cp --sparse and qemu-img map skip its holes. A
        control file is all data."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if fh == RAW_INODE:
            found = await self._seek(off, whence == os.SEEK_DATA) if off < self.chain.size else None
        else:
            size = len(self._snapshots[fh]) if fh in self._snapshots else len(self._control_content(fh))
            found = None if off >= size else off if whence == os.SEEK_DATA else size
        if found is None:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return found

    async def _seek(self, offset: int, data: bool) -> int | None:
        """Chain.seek: first on the loop when it may run there (_inline), for at most
        SEEK_INLINE_RUNS runs (each a few microseconds, less than the hand-off to a worker
        thread); a seek that goes further (across the allocated clusters of a whole disk, say)
        goes on in a worker thread."""
        reached = offset
        if self._inline():
            done, reached = run_inline(self._seek_and_map, offset, reached, data, SEEK_INLINE_RUNS)
            if done:
                return reached
        return (await run_io(self._seek_and_map, offset, reached, data, 0))[1]

    def _seek_and_map(self, origin: int, offset: int, data: bool, max_runs: int) -> tuple[bool, int | None]:
        """Chain.seek_some from `offset`, for an lseek from `origin` that the native threads could
        not answer: once answered, what the reader is about to read (the data found, or the
        data it seeks the end of) is mapped for them, as a read maps."""
        done, found = self.chain.seek_some(offset, data, max_runs)
        if done and self.native_reads is not None and found is not None:
            self.native_reads.fill_around(found if data else origin, sequential=True)
        return done, found

    async def fallocate(self, fh, mode, offset, length):
        """Discard: PUNCH_HOLE (with KEEP_SIZE, as Linux requires) and ZERO_RANGE, what a guest's
        TRIM and write-zeroes become through a loop device. The range reads zeros at once and
        its whole clusters' space goes back. A disk's size never changes: a ZERO_RANGE that would
        grow the file fails with ENOSPC, as a write past the end does; other modes (plain
        preallocation, collapse, insert) are not supported."""
        if fh != RAW_INODE or mode not in DISCARD_MODES:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not mode & FALLOC_FL_KEEP_SIZE and offset + length > self.chain.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.guest.note()
        with self._reporting_write_errors("guest discard"):
            await run_io(self.chain.discard, offset, length)
        self.mtime_ns = self.ctime_ns = time.time_ns()

    async def fsync(self, fh, datasync):
        if fh == RAW_INODE:
            with self._reporting_write_errors("guest fsync"):
                await run_io(self.chain.flush)
            self.write_errors.cleared()

    @contextlib.contextmanager
    def _reporting_write_errors(self, origin: str) -> Iterator[None]:
        """A failed write or fsync of the raw file is also a BLOCK_IO_ERROR (see faults.py)."""
        try:
            yield
        except pyfuse3.FUSEError as err:
            self.write_errors.report(origin, err.errno)
            raise

    async def flush(self, fh):
        pass

    async def release(self, fh):
        self._snapshots.pop(fh, None)
