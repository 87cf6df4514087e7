"""pyfuse3 Operations: the mount's directory and its raw file. Translation only, no format logic.

Image I/O runs in worker threads (``trio.to_thread``) so that a slow disk or a long allocating
write never stalls the event loop, which also serves the other requests and later the stream
job. The image is thread-safe for exactly this reason (see formats/qed.py).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import TypeVar

import pyfuse3
import trio

from .chain import Chain
from .errors import CorruptionError, FusestreamError

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
RAW_INODE = ROOT_INODE + 1
T = TypeVar("T")


def raw_name(image_path: str) -> str:
    """The name of the raw file in the mount: the image's stem plus .raw (top.qed -> top.raw)."""
    stem, _ = os.path.splitext(os.path.basename(image_path))
    return stem + ".raw"


async def run_io(fn: Callable[..., T], *args) -> T:
    """Run image I/O in a thread; the one place that turns our errors into FUSE errnos."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except CorruptionError as err:
        log.error("%s", err)
        raise pyfuse3.FUSEError(errno.EIO) from None
    except PermissionError:
        raise pyfuse3.FUSEError(errno.EROFS) from None
    except OSError as err:
        log.error("I/O error: %s", err)
        raise pyfuse3.FUSEError(err.errno or errno.EIO) from None
    except FusestreamError as err:
        log.error("%s", err)
        raise pyfuse3.FUSEError(errno.EIO) from None


class Operations(pyfuse3.Operations):
    """A root directory holding one raw file, the flat view of the chain."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, chain: Chain, read_only: bool = False):
        super().__init__()
        self.chain = chain
        self.read_only = read_only or not chain.top.writable
        self.raw_name = raw_name(chain.top.path).encode()
        self.uid, self.gid = os.getuid(), os.getgid()
        now = time.time_ns()
        self.mtime_ns = self.ctime_ns = self.atime_ns = now

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
            attr.st_mode = stat.S_IFREG | (0o444 if self.read_only else 0o644)
            attr.st_nlink = 1
            attr.st_size = self.chain.size
            attr.st_blocks = self.chain.top.allocated_bytes() // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # The kernel may cache these briefly; the size never changes and st_blocks is advisory.
        attr.attr_timeout = attr.entry_timeout = 1.0
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT_INODE and name == self.raw_name:
            return self._attr(RAW_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size and (inode != RAW_INODE or attr.st_size != self.chain.size):
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk's size does not change through the mount
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
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
        if start_id < 1:
            pyfuse3.readdir_reply(token, self.raw_name, self._attr(RAW_INODE), 1)

    async def releasedir(self, fh):
        pass

    # -- the raw file --------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        if inode != RAW_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT_INODE else errno.ENOENT)
        if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        # Every change goes through this process, so the kernel's page cache stays valid.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return await run_io(self.chain.read, off, size)

    async def write(self, fh, off, buf):
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off >= self.chain.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # a disk does not grow when written past its end
        written = await run_io(self.chain.write, off, buf)
        self.mtime_ns = self.ctime_ns = time.time_ns()
        return written

    async def fsync(self, fh, datasync):
        await run_io(self.chain.flush)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass
