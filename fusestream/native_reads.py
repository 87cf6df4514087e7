"""Reads of the raw file answered by native threads, off the event loop and without the GIL.

The patched pyfuse3 (patches/pyfuse3/0002) can let native threads receive the requests from
/dev/fuse: each READ of the raw file whose every byte its map places (a descriptor and an offset,
or zeros) is answered by the thread that received it, with pread(2); every other request goes
to the event loop as before. So a guest with many reads in flight gets as many preads at the
device at once, and the event loop's per-request cost (trio, pyfuse3, our lookups) is paid only
by what the map cannot answer.

The map is a cache of Chain.locate, in units of the top image's cluster. It starts empty; the
event loop fills the window around each read it serves (FILL_WINDOW), so the next reads nearby
go native. The chain tells NativeReads whatever may change a location (Chain.map_listener):
every write, discard and populate drops its range once made, before the request returns, and a
fill computed before a drop is refused (the map's epoch), so a stale location is never
installed; before the layers are closed, the map is cleared and the threads that still read
them are waited for. Copy-on-read mounts keep every read on the event loop (it must see them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyfuse3

from .chain import Chain
from .errors import FusestreamError

log = logging.getLogger(__name__)

DEFAULT_THREADS = 16
MAX_THREADS = 64  # the patched pyfuse3's limit
FILL_WINDOW = 4 << 20  # what the event loop maps around a read it served, aligned
FILL_AHEAD = 3  # windows mapped after it for a sequential reader: past the kernel's readahead
MAX_SLOTS = 1 << 20  # units the map holds at most: 32 MiB, 64 GiB of a disk at 64 KiB clusters


class NativeReads:
    """The native threads' map of the raw file (inode `inode`) of `chain`, and the chain's
    MapListener that keeps it true."""

    def __init__(self, chain: Chain, inode: int, threads: int):
        self.chain = chain
        self.threads = threads  # what pyfuse3.main is to start
        units = -(-chain.size // chain.cluster_size)
        slots = min(MAX_SLOTS, 1 << max(0, units - 1).bit_length())
        pyfuse3.native_reads_setup(inode, chain.cluster_size, chain.size, slots)
        chain.map_listener = self
        # The windows filled, by their place in the map (a window evicts another one that uses
        # the same slots): (window, epoch it was filled at). So reads of what cannot be mapped (a
        # compressed cluster) do not locate their window again and again while nothing changes.
        self._map_span = slots * chain.cluster_size
        self._filled: dict[int, tuple[int, int]] = {}

    def fill_around(self, offset: int, sequential: bool) -> None:
        """Map the FILL_WINDOW (or the cluster, if larger) around `offset`, which the event loop
        has just read or sought, and for a `sequential` reader the FILL_AHEAD windows after it:
        the kernel's readahead runs megabytes ahead of such a reader, in several requests at
        once, which all reach the loop if their window is not mapped before they come. What
        only a read through the layers gives (compressed, remote) stays unmapped. A fill that
        a change overtook is dropped whole: the next read fills again."""
        window = max(FILL_WINDOW, self.chain.cluster_size)
        start = offset - offset % window
        for ahead in range(1 + FILL_AHEAD if sequential else 1):
            if start + ahead * window < self.chain.size:
                self._fill(start + ahead * window, window)

    def _fill(self, start: int, window: int) -> None:
        epoch = pyfuse3.native_reads_epoch()
        place = start % self._map_span
        if self._filled.get(place) == (start, epoch):  # nothing changed since: what is unmapped stays so
            return
        self._filled[place] = (start, epoch)
        try:
            placed = self.chain.locate(start, window)
        except (FusestreamError, OSError) as err:  # the read reported it; the map stays empty there
            log.debug("native reads: not mapping %d+%d: %s", start, window, err)
            return
        for run_offset, length, fd, file_offset, holes in placed:
            if fd is not None and pyfuse3.native_reads_fill(run_offset, length, fd, file_offset, epoch, holes) < 0:
                return

    def call_reads(self, read: Callable[[int, int], bytes | bytearray | int]) -> None:
        """Let the native threads answer what the map cannot place (compressed, remote, not yet
        mapped) by calling `read(offset, length)` themselves, with the GIL, rather than handing
        the request to the event loop, which hands it to a worker thread and back: for a remote
        4 KiB read those hand-offs took 120 of its 300 us. At most half the threads call it at
        once, so that the others keep serving the map while a slow server holds the callers.
        The callers are done when pyfuse3.close() has stopped the threads."""
        pyfuse3.native_reads_set_callback(read, max(1, self.threads // 2))

    def remapped(self, offset: int, length: int) -> None:
        pyfuse3.native_reads_drop(offset, length)

    def retiring(self) -> None:
        pyfuse3.native_reads_clear()

    def describe(self) -> dict[str, int]:
        """status.json's "native_reads": the threads, the READs they answered from the map,
        the READs they answered by reading through the chain themselves ("called"), the bytes
        of both, the lseeks they answered, and the requests they handed to the event loop."""
        served, served_bytes, forwarded, seeks, called = pyfuse3.native_reads_stats()
        return {"threads": self.threads, "served": served, "called": called, "bytes": served_bytes,
                "seeks": seeks, "forwarded": forwarded}

    @staticmethod
    def waiting() -> int:
        """Requests the threads have queued for the event loop that it has not taken yet."""
        return pyfuse3.native_reads_queued()

    @staticmethod
    def served() -> int:
        """READs the native threads answered from the map so far (the guest's activity the
        stream sees; the reads they answer through the chain note it themselves)."""
        return pyfuse3.native_reads_stats()[0]
