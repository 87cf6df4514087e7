"""The top image's fdatasync, and what it covers: everything written to the file since the last
good one, kept so that all of it can be written again after a failed one.

Linux may drop the dirty pages an fdatasync could not write, mark them clean and report success
at the next fdatasync ("fsyncgate"): a cluster or a table entry written before a failed flush is
on disk only once written again. Guest data is kept (by reference, up to UNSYNCED_DATA_MAX); a
cluster copied from the backing chain is read again from there; tables and the header are
written again from memory (see Allocator.write_back in qed_alloc.py).
"""

from __future__ import annotations

import dataclasses
import threading

from construct import Container

from ..sources import Buffers, WritableSource
from .layer import ReadBelow
from .qed_structs import QED_F_NEED_CHECK, QED_HEADER

# Guest data kept in memory until an fdatasync has made it durable, at most; past this, a failed
# fdatasync can no longer be repaired by writing again.
UNSYNCED_DATA_MAX = 64 * 1024 * 1024


@dataclasses.dataclass
class Unsynced:
    """What was written to the top image since its last successful fdatasync."""

    writes: list[tuple[int, bytes | memoryview | None, int, ReadBelow | None]] = dataclasses.field(
        default_factory=list)
    """(file offset, data, guest offset, below) of each data write, in order: guest data
    (immutable bytes, kept by reference), or None for a new cluster copied from what lies below
    the top, in a buffer its writer reuses (the stream's), read again through `below` when
    needed (None: nothing lies below, zeros)."""
    data_bytes: int = 0
    spans: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # L2 entries written
    l1: set[int] = dataclasses.field(default_factory=set)  # L1 entries written
    header: bool = False


def read_below(below: ReadBelow | None, offset: int, length: int, size: int) -> bytearray:
    """`length` bytes of what lies below the top image at guest `offset`: zeros past the virtual
    `size`, where nothing lies below (`below` is None), and where a layer's read was short."""
    data = bytearray(length)
    inside = max(0, min(length, size - offset))
    if below is not None and inside:
        below(memoryview(data)[:inside], offset)
    return data


class SyncLog:
    """The top image's file with the account of its writes since the last good fdatasync, and
    its header as the disk is to hold it (written again from here after a failed one). A
    read-only image has one too, never written through."""

    def __init__(self, source: WritableSource, cluster_size: int, size: int, header: Container):
        self.source = source
        self.header = header  # QED_HEADER's fields, changed in memory first, then written
        self._cluster_size, self._size = cluster_size, size
        self.unsynced = Unsynced()
        # Set after a write past UNSYNCED_DATA_MAX: data written that is not kept, so a failed
        # fdatasync before the next good one loses it for good.
        self._unkept = False
        # Held by a data write and the recording of it, and while the writes are written again,
        # so that none of them interleave (the kernel serialises buffered writes to a file anyway).
        self._lock = threading.Lock()
        self.flush_failed: OSError | None = None  # the last fdatasync failed: write `unsynced` again
        self.lost: OSError | None = None  # a failed fdatasync lost data that was not kept
        self.need_check_allocations = 0  # allocations that set or kept NEED_CHECK (services.NeedCheckTimer)
        self.need_check_set_by_us = False

    def write(self, file_offset: int, data: Buffers, kept: bytes | memoryview | None, guest_offset: int,
              below: ReadBelow | None = None, direct: bool = False) -> None:
        """Write a data cluster, or part of one, and keep it until durable: `kept` is `data`,
        or None for a copy of what lies below (read again through `below`)."""
        with self._lock:
            self.source.write(file_offset, data, direct)
            self._keep(file_offset, kept, guest_offset, below)

    def keep(self, file_offset: int, kept: bytes | memoryview | None, guest_offset: int,
             below: ReadBelow | None) -> None:
        """As write(), for data already written (the clusters of one append)."""
        with self._lock:
            self._keep(file_offset, kept, guest_offset, below)

    def _keep(self, file_offset: int, kept: bytes | memoryview | None, guest_offset: int,
              below: ReadBelow | None) -> None:
        """Remember a data write until an fdatasync has made it durable; after the write (see
        sync). Needs _lock."""
        size = 0 if kept is None else len(kept)
        if self.unsynced.data_bytes + size > UNSYNCED_DATA_MAX:
            self._unkept = True
            return
        self.unsynced.writes.append((file_offset, kept, guest_offset, below))
        self.unsynced.data_bytes += size

    def sync(self) -> None:
        """fdatasync of the top image. After a failure everything written since the last good one
        is to be written again before the next write-back (Allocator.write_back); if some of it
        was not kept, every later flush fails (see QedImage.flush). Needs the image's
        _alloc_lock; writes in place may run meanwhile: only those recorded before the fdatasync
        began are known to be covered."""
        covered = len(self.unsynced.writes)
        unkept, self._unkept = self._unkept, False  # cleared first: a write racing us sets it again
        try:
            self.source.sync()
        except OSError as err:
            self.flush_failed = err
            if unkept or self._unkept:
                self.lost = self.lost or err
            self._unkept = self._unkept or unkept
            raise
        with self._lock:
            later = self.unsynced.writes[covered:]
            size = sum(len(data) for _, data, _, _ in later if data is not None)
            self.unsynced = Unsynced(writes=later, data_bytes=size)

    def write_header(self) -> None:
        """Rewrite the known header fields in place; the backing name after them is untouched."""
        self.unsynced.header = True
        self.source.write(0, QED_HEADER.build(self.header))

    def set_need_check(self) -> None:
        """An allocation in an image without a backing file: QED_F_NEED_CHECK durable on disk
        before the allocation's entries are (QEMU's alternative to flushing the data first)."""
        self.need_check_allocations += 1
        if not self.header.features & QED_F_NEED_CHECK:
            self.header.features |= QED_F_NEED_CHECK
            try:
                self.write_header()
                self.sync()
            except BaseException:
                self.header.features &= ~QED_F_NEED_CHECK  # as on disk, or as it will be again
                raise
            self.need_check_set_by_us = True

    def write_data_again(self) -> Unsynced:
        """After a failed fdatasync: write every data write since the last good one again, from
        memory or from below; returns the account, whose tables and header the caller writes
        again too."""
        with self._lock:
            unsynced = self.unsynced
            for file_offset, data, guest_offset, below in unsynced.writes:
                if data is None:
                    data = read_below(below, guest_offset, self._cluster_size, self._size)
                self.source.write(file_offset, data)
        return unsynced
