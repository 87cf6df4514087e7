"""The floor of pyfuse3 and trio: the smallest filesystem that serves one raw file.

``pyfuse3_floor.py FILE MOUNTPOINT`` mounts MOUNTPOINT/floor.raw, a read-only view of FILE, and
serves it until unmounted. Each read is one ``os.pread`` on the event loop and nothing else: no
chain, no lookups, no locks. What it costs per request is what any pyfuse3 filesystem pays
before doing its own work, so read_bench.py runs it as a third peer to show how much of the gap
to qemu-storage-daemon is fusestream's and how much is pyfuse3's.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_NAME = b"floor.raw"
FILE_INODE = pyfuse3.ROOT_INODE + 1


class FloorOperations(pyfuse3.Operations):
    def __init__(self, path: str):
        super().__init__()
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        is_root = inode == pyfuse3.ROOT_INODE
        attr.st_mode = (stat.S_IFDIR | 0o755) if is_root else (stat.S_IFREG | 0o444)
        attr.st_size = 0 if is_root else self.size
        attr.attr_timeout = attr.entry_timeout = 300
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)  # as fusestream's raw file

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)


async def serve() -> None:
    """pyfuse3.main until unmounted, or until SIGTERM/SIGINT (then unmount cleanly)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main() -> None:
    path, mountpoint = sys.argv[1:3]
    options = set(pyfuse3.default_options) | {"fsname=pyfuse3-floor", "ro"}
    pyfuse3.init(FloorOperations(path), mountpoint, options)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
