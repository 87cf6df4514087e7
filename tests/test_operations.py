"""The Operations layer called directly (no kernel): errors reach the guest as the right errno,
for the failing range only."""

from __future__ import annotations

import errno
import os
import threading
import time

import pyfuse3
import pytest
import trio
from conftest import FaultyLayer, qemu_img, qemu_io

from fusestream import fs
from fusestream.chain import open_chain
from fusestream.errors import CorruptionError, ReadOnlyImageError
from fusestream.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, INLINE_READ_MAX, INLINE_WRITE_MAX, RAW_INODE
from fusestream.mount import MountOptions, build_mount


@pytest.mark.parametrize("size", [4096, INLINE_READ_MAX * 4], ids=["inline", "threaded"])
def test_a_failing_backing_range_is_eio_for_that_range_only(chain, size):
    c = open_chain(str(chain.top), writable=False)
    fail_start = 4 << 20
    faulty = FaultyLayer(c.layers[2], fail_start, fail_start + 65536)
    c.layers[2] = faulty
    ops = build_mount(c, MountOptions(ro=True)).ops
    unallocated = next(e for e in c.top.extents(fail_start, 65536) if e.status.value == "unallocated")

    async def main():
        with pytest.raises(pyfuse3.FUSEError) as err:
            await ops.read(RAW_INODE, unallocated.offset, size)
        assert err.value.errno == errno.EIO
        assert len(await ops.read(RAW_INODE, 0, size)) == size
        faulty.failing = False
        assert len(await ops.read(RAW_INODE, unallocated.offset, size)) == size

    try:
        trio.run(main)
    finally:
        c.close()


def test_an_allocating_write_that_would_wait_goes_to_a_thread(chain):
    """Small writes run on the event loop, but never wait there: while another allocation (or a
    write-back's flush) holds the allocation lock, the write waits in a worker thread, and the
    event loop keeps serving reads."""
    c = open_chain(str(chain.top))
    ops = build_mount(c, MountOptions()).ops
    unallocated = next(e for e in c.top.extents(0, chain.size) if e.status.value == "unallocated")
    held, release = threading.Event(), threading.Event()

    def another_allocation():
        with c.top._alloc_lock:
            held.set()
            release.wait(5)

    other = threading.Thread(target=another_allocation)
    other.start()
    held.wait()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.write, RAW_INODE, unallocated.offset, b"guest data")
            await trio.sleep(0.1)
            started = time.monotonic()
            assert len(await ops.read(RAW_INODE, 0, 4096)) == 4096
            # Waiting for the lock, the read would take the 5 s until the other thread lets go.
            assert time.monotonic() - started < 3, "the event loop waited for the allocation lock"
            assert c.read(unallocated.offset, 10) != b"guest data"  # the write is still waiting
            release.set()
        assert c.read(unallocated.offset, 10) == b"guest data"

    try:
        trio.run(main)
    finally:
        release.set()
        other.join()
        c.close()


def test_write_without_waiting_writes_nothing_when_it_would_wait(chain):
    c = open_chain(str(chain.top))
    try:
        extents = c.top.extents(0, chain.size)
        unallocated = next(e for e in extents if e.status.value == "unallocated")
        found = next(e for e in extents if e.status.value == "found")
        before = c.read(unallocated.offset, 10)
        with c.top._alloc_lock:
            with pytest.raises(BlockingIOError):
                c.write(unallocated.offset, b"guest data", wait=False)
            c.write(found.offset, b"in place", wait=False)  # no allocation: never waits
        assert c.read(unallocated.offset, 10) == before
        assert c.read(found.offset, 8) == b"in place"
    finally:
        c.close()


@pytest.mark.parametrize("error, expected", [
    (PermissionError(errno.EACCES, "Permission denied"), errno.EACCES),  # the OS's own: stays EACCES
    (ReadOnlyImageError("top.qed: image is open read-only"), errno.EROFS),
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (CorruptionError("top.qed: L2 table offset out of range"), errno.EIO),
], ids=["eacces", "read-only-image", "enospc", "corruption"])
@pytest.mark.parametrize("size", [4096, INLINE_WRITE_MAX * 2], ids=["inline", "threaded"])
def test_an_error_of_the_top_image_reaches_the_guest_as_its_errno(chain, monkeypatch, error, expected, size):
    c = open_chain(str(chain.top))
    ops = build_mount(c, MountOptions()).ops

    def failing_write(offset, data, wait=True, below=None):
        raise error

    monkeypatch.setattr(c.top, "write", failing_write)

    async def main():
        with pytest.raises(pyfuse3.FUSEError) as err:
            await ops.write(RAW_INODE, 0, b"x" * size)
        assert err.value.errno == expected
        assert ops.control.events.events()[-1]["event"] == "BLOCK_IO_ERROR"
        assert ops.write_errors.error == f"guest write: {os.strerror(expected)}"

    try:
        trio.run(main)
    finally:
        c.close()


def test_a_read_only_mount_refuses_writes_and_discards_with_erofs(chain):
    c = open_chain(str(chain.top), writable=False)
    ops = build_mount(c, MountOptions(ro=True)).ops

    async def main():
        for request in (ops.open(RAW_INODE, os.O_RDWR, None), ops.write(RAW_INODE, 0, b"x"),
                        ops.fallocate(RAW_INODE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)):
            with pytest.raises(pyfuse3.FUSEError) as err:
                await request
            assert err.value.errno == errno.EROFS

    try:
        trio.run(main)
    finally:
        c.close()


def test_a_long_seek_goes_on_in_a_worker_thread(tmp_path, monkeypatch):
    """An lseek starts on the event loop, but one that crosses more than SEEK_INLINE_RUNS runs
    (here SEEK_HOLE across clusters written in turn into the top and the middle layer) goes on
    in a worker thread, and finds the same answer."""
    base, mid, top = tmp_path / "base.raw", tmp_path / "mid.qed", tmp_path / "top.qed"
    base.write_bytes(b"")
    os.truncate(base, 4 << 20)
    qemu_img("create", "-f", "qed", "-b", base.name, "-F", "raw", str(mid), str(4 << 20))
    qemu_img("create", "-f", "qed", "-b", mid.name, "-F", "qed", str(top), str(4 << 20))
    for cluster in range(0, 40):
        qemu_io(top if cluster % 2 else mid, f"write -P {cluster + 1} {cluster * 65536} 65536", fmt="qed")
    chain = open_chain(str(top), writable=False)
    ops = build_mount(chain, MountOptions(ro=True)).ops
    threaded = []
    run_io = fs.run_io
    monkeypatch.setattr(fs, "run_io", lambda fn, *args: threaded.append(args) or run_io(fn, *args))
    try:
        assert chain.seek_some(0, False, fs.SEEK_INLINE_RUNS) == (False, fs.SEEK_INLINE_RUNS * 65536)
        expected = chain.seek(0, False)
        assert expected == 40 * 65536

        async def main():
            assert await ops.lseek(RAW_INODE, 0, os.SEEK_HOLE) == expected
            assert await ops.lseek(RAW_INODE, 39 * 65536, os.SEEK_HOLE) == expected  # one run: on the loop

        trio.run(main)
        assert threaded == [(0, fs.SEEK_INLINE_RUNS * 65536, False, 0)]
    finally:
        chain.close()
