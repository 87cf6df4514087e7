"""The Operations layer called directly (no kernel): errors reach the guest as the right errno,
for the failing range only."""

from __future__ import annotations

import errno

import pyfuse3
import pytest
import trio
from test_stream import FaultyLayer

from fusestream.chain import open_chain
from fusestream.fs import INLINE_READ_MAX, RAW_INODE, Operations


@pytest.mark.parametrize("size", [4096, INLINE_READ_MAX * 4], ids=["inline", "threaded"])
def test_a_failing_backing_range_is_eio_for_that_range_only(chain, size):
    c = open_chain(str(chain.top), writable=False)
    fail_start = 4 << 20
    faulty = FaultyLayer(c.layers[2], fail_start, fail_start + 65536)
    c.layers[2] = c.layers[1].backing = faulty
    ops = Operations(c, read_only=True)
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
