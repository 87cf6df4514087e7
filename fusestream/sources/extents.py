"""Where a read-only file's data lies, from FIEMAP: hundreds of extents per system call.

SEEK_DATA and SEEK_HOLE cost two system calls per extent, and each one lets go of the GIL and
takes it back. On a raw base whose data lies in 4 KiB pieces (65 000 extents a GiB), the stream's
plan and its count spent most of their time waiting to take it back while the other threads ran
(py-spy of bench/shapes_bench.py's sparse4k shape). One FS_IOC_FIEMAP call returns up to
EXTENTS_PER_CALL extents; a few batches stay cached, one for each walk going on at once (the
stream's copy, its count, a guest's lseeks).

FIEMAP and SEEK_DATA disagree in one case: an unwritten (preallocated) extent reads as zeros,
unless the page cache holds data written into it, which only SEEK_DATA looks at. So there, and
on a filesystem that has no FIEMAP (tmpfs, some network filesystems) or whose FIEMAP returns
overlapping extents (refused once, never asked again), the caller asks SEEK_DATA. Extents of
data not yet allocated (delayed allocation) are reported, as data. Only for files nobody writes
through this process: a batch is not told of changes.
"""

from __future__ import annotations

import bisect
import collections
import errno
import fcntl
import logging
import struct
import threading

log = logging.getLogger(__name__)

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
EXTENTS_PER_CALL = 512
CACHED_BATCHES = 8
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical, fe_physical, fe_length, reserved, fe_flags, reserved
_REFUSALS = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EBADR)


class Batch:
    """What one FIEMAP call said: the data runs (adjacent or overlapping extents merged) of
    [start, end), which it describes completely."""

    def __init__(self, start: int, end: int, runs: list[tuple[int, int, bool]]):
        self.start, self.end = start, end
        self.runs = runs  # (start, end, unwritten), in order
        self.starts = [run[0] for run in runs]

    def covers(self, offset: int) -> bool:
        return self.start <= offset < self.end

    def status(self, offset: int, end: int) -> tuple[bool, int] | None:
        """(data, run) at `offset` up to `end`, or None inside an unwritten extent."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i >= 0 and offset < self.runs[i][1]:
            if self.runs[i][2]:
                return None
            return True, min(self.runs[i][1], self.end, end) - offset
        following = self.runs[i + 1][0] if i + 1 < len(self.runs) else self.end
        return False, min(following, end) - offset


class ExtentMap:
    """The data extents of the file open as `fd` (`size` bytes), a FIEMAP batch at a time."""

    def __init__(self, fd: int, size: int, name: str):
        self._fd, self._size, self._name = fd, size, name
        self._batches: collections.OrderedDict[int, Batch] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._last = threading.local()
        self._synced = False  # the first call asks FIEMAP_FLAG_SYNC
        self.refused = False

    def data_status(self, offset: int, end: int) -> tuple[bool, int] | None:
        """(whether `offset` holds data, how far that goes, up to `end`) for an offset inside the
        file, or None where SEEK_DATA must answer (see the module's docstring)."""
        batch = self._batch_at(offset)
        return None if batch is None else batch.status(offset, end)

    def _batch_at(self, offset: int) -> Batch | None:
        last = getattr(self._last, "batch", None)  # this thread's: each walk goes its own way
        if last is not None and last.covers(offset):
            return last
        self._last.batch = batch = self._cached_or_fetched(offset)
        return batch

    def _cached_or_fetched(self, offset: int) -> Batch | None:
        with self._lock:
            for key, batch in self._batches.items():
                if batch.covers(offset):
                    self._batches.move_to_end(key)
                    return batch
        if self.refused:
            return None
        batch = self._fetch(offset)
        if batch is None or not batch.covers(offset):
            return None
        with self._lock:
            self._batches[batch.start] = batch
            while len(self._batches) > CACHED_BATCHES:
                self._batches.popitem(last=False)
        return batch

    def _fetch(self, offset: int) -> Batch | None:
        buffer = bytearray(_HEADER.size + _EXTENT.size * EXTENTS_PER_CALL)
        # The first call has the file's dirty pages written first, so that no filesystem can
        # leave out data that has no blocks yet (delayed allocation): cheap for a file that
        # nobody writes. Later calls need not.
        flags = 0 if self._synced else FIEMAP_FLAG_SYNC
        _HEADER.pack_into(buffer, 0, offset, self._size - offset, flags, 0, EXTENTS_PER_CALL, 0)
        try:
            fcntl.ioctl(self._fd, FS_IOC_FIEMAP, buffer)
        except OSError as err:
            if err.errno not in _REFUSALS:
                raise
            log.debug("%s: no FIEMAP (%s); holes by SEEK_DATA", self._name, err.strerror)
            self.refused = True
            return None
        self._synced = True
        mapped = _HEADER.unpack_from(buffer)[3]
        extents = list(_EXTENT.iter_unpack(memoryview(buffer)[_HEADER.size : _HEADER.size + mapped * _EXTENT.size]))
        runs = self._runs(extents)
        if runs is None:  # extents that contradict each other: never asked again, not each time
            log.debug("%s: FIEMAP returned overlapping extents; holes by SEEK_DATA", self._name)
            self.refused = True
            return None
        complete = mapped < EXTENTS_PER_CALL or not extents or extents[-1][3] & FIEMAP_EXTENT_LAST
        return Batch(offset, self._size if complete or not runs else runs[-1][1], runs)

    def _runs(self, extents: list[tuple[int, int, int, int]]) -> list[tuple[int, int, bool]] | None:
        """The extents as data runs within the file, adjacent ones merged, overlapping ones (a
        filesystem's bug) too; None where an unwritten and a written one overlap, which only
        SEEK_DATA can sort out."""
        runs: list[tuple[int, int, bool]] = []
        for logical, _, length, flags in extents:
            start, stop, unwritten = logical, min(logical + length, self._size), bool(flags & FIEMAP_EXTENT_UNWRITTEN)
            if stop <= start:
                continue
            if runs and start <= runs[-1][1]:
                if runs[-1][2] == unwritten:
                    runs[-1] = (runs[-1][0], max(stop, runs[-1][1]), unwritten)
                    continue
                if start < runs[-1][1]:
                    return None
            runs.append((start, stop, unwritten))
        return runs
