"""Cluster allocation in the QED top image: allocating writes, `populate` (the stream's copy),
new L2 tables, free clusters, discard (QEMU's allocating write path of qed.c), and the
write-back that makes what they changed durable.

Everything here needs the image's ``_alloc_lock`` (the methods that take it themselves say so):
allocations are serialised and held across their I/O, so that a cluster is never allocated
twice and the crash-safe order is kept. QEMU's order: the data cluster is written whole (the
rest filled from what lies below, or zeros) and, when there is a backing file, made durable
before the L2 entry that points to it; a new L2 table is written whole and made durable before
the L1 entry that points to it. Without a backing file, QEMU skips the data flush and marks the
image QED_F_NEED_CHECK instead; so do we (`SyncLog.set_need_check`).
"""

from __future__ import annotations

import collections
import heapq
import mmap
import threading
from collections.abc import Iterator

from ..sources import WritableSource
from .layer import ZEROS, BlockStatus, ReadBelow
from .qed_structs import QED_UNALLOCATED, QED_ZERO_CLUSTER
from .qed_sync import SyncLog, read_below
from .qed_table import ClusterSpace, Extent, Geometry, QedTables, read_exact

DISCARD_BATCH = 65536  # clusters a discard changes under one hold of the allocation lock
Contents = dict[int, "bytes | None"]
"""cluster -> the whole new content of a cluster an allocating write gives it (None: a zero cluster)."""


class Allocator:
    """The allocations of one writable QED image."""

    def __init__(self, source: WritableSource, geometry: Geometry, tables: QedTables, space: ClusterSpace, log: SyncLog,
                 alloc_lock: threading.Lock):
        self.source, self.geometry, self.tables, self.space, self.log = source, geometry, tables, space, log
        self._alloc_lock = alloc_lock

    # -- allocating writes ---------------------------------------------------------------------

    def allocating_write(self, extent: Extent, data: memoryview, below: ReadBelow | None,
                         contents: Contents | None = None) -> None:
        """Give each cluster of a ZERO/UNALLOCATED run its guest `data`: a new cluster (the rest
        of it filled from `below`, or zeros), or a zero cluster when the guest wrote a whole
        cluster of zeros. `contents`: what cluster_contents gave for this very extent."""
        if contents is None:
            contents = self.cluster_contents(extent, data, below)
        self._populate_clusters(contents, below, copied=False)

    def cluster_contents(self, extent: Extent, data: memoryview, below: ReadBelow | None) -> Contents:
        """The new content of each cluster of a ZERO/UNALLOCATED run given guest `data` (None:
        a zero cluster). Needs no lock: it only reads below, which does not change, so that
        allocating writes read what lies below side by side and hold _alloc_lock only while
        they allocate."""
        cs = self.geometry.cluster_size
        first = extent.offset // cs
        last = (extent.offset + extent.length - 1) // cs
        return {cluster: self._cluster_content(cluster, extent, data, below) for cluster in range(first, last + 1)}

    def _cluster_content(self, cluster: int, extent: Extent, data: memoryview, below: ReadBelow | None
                         ) -> bytes | None:
        """The whole new content of one cluster, or None for a guest write of a full zero cluster."""
        cs = self.geometry.cluster_size
        cluster_start = cluster * cs
        lo = max(cluster_start, extent.offset)
        hi = min(cluster_start + cs, extent.offset + extent.length)
        guest = data[lo - extent.offset : hi - extent.offset]
        if lo == cluster_start and hi == cluster_start + cs and is_zero(guest):
            return None
        buf = bytearray(cs)
        if lo > cluster_start:
            buf[: lo - cluster_start] = self._fill(extent.status, cluster_start, lo - cluster_start, below)
        buf[lo - cluster_start : hi - cluster_start] = guest
        if hi < cluster_start + cs:
            buf[hi - cluster_start :] = self._fill(extent.status, hi, cluster_start + cs - hi, below)
        return bytes(buf)

    def _fill(self, status: BlockStatus, offset: int, length: int, below: ReadBelow | None) -> bytes | bytearray:
        """What the rest of a newly allocated cluster holds: what lies below, or zeros."""
        if status is BlockStatus.ZERO:
            return bytes(length)
        return read_below(below, offset, length, self.geometry.size)

    def populate(self, copies: list[tuple[int, bytes | memoryview]], zero_clusters: bool,
                 below: ReadBelow | None) -> int:
        """See QedImage.populate. Takes _alloc_lock."""
        cs = self.geometry.cluster_size
        for offset, data in copies:
            end = offset + len(data)
            if offset % cs or (end % cs and end != self.geometry.size) or end > self.geometry.size:
                raise ValueError(f"{self.source.name}: populate of [{offset}, {end}) does not cover whole clusters")
        with self._alloc_lock:
            contents: dict[int, bytes | memoryview | None] = {}
            for offset, data in copies:
                view = memoryview(data)
                for extent in self.tables.iter_extents(offset, len(view)):
                    if extent.status is not BlockStatus.UNALLOCATED:
                        continue
                    for at in range(extent.offset - offset, extent.offset - offset + extent.length, cs):
                        cluster = view[at : at + cs]
                        if is_zero(cluster):
                            if zero_clusters:
                                contents[(offset + at) // cs] = None
                        elif len(cluster) == cs:
                            contents[(offset + at) // cs] = cluster
                        else:  # the image's last cluster, past the image's end: padded, page-aligned
                            padded = memoryview(mmap.mmap(-1, cs))
                            padded[: len(cluster)] = cluster
                            contents[(offset + at) // cs] = padded
            self._populate_clusters(contents, below, copied=True)
        return sum(cs for data in contents.values() if data is not None)

    def _populate_clusters(self, contents: dict[int, bytes | memoryview | None], below: ReadBelow | None,
                           copied: bool) -> None:
        """Point each cluster at its new content (None: a zero cluster), writing the data
        clusters into free ones, the rest appended in one write, durable before the tables point
        to them. `copied`: the contents are copies of what lies below, in buffers the caller
        reuses; they are not kept, but read again through `below` if need be (see qed_sync)."""
        cs = self.geometry.cluster_size
        entries = {cluster: QED_ZERO_CLUSTER for cluster, data in contents.items() if data is None}
        data_clusters = [(cluster, data) for cluster, data in contents.items() if data is not None]
        reused = self._reuse_free_clusters(data_clusters, below, copied)
        entries.update(reused)
        appended = [(cluster, data) for cluster, data in data_clusters if cluster not in reused]
        if appended:
            start = self._append_clusters([data for _, data in appended], below)
            for i, (cluster, data) in enumerate(appended):
                entries[cluster] = start + i * cs
                self.log.keep(entries[cluster], None if copied else data, cluster * cs, below)
        if entries:
            self._set_entries(entries)

    def _reuse_free_clusters(self, data_clusters: list[tuple[int, bytes | memoryview]], below: ReadBelow | None,
                             copied: bool) -> dict[int, int]:
        """Write as many of the new clusters as there are free ones into free clusters (their
        entries, as for appended ones, wait for a write-back after a flush, and the data is kept
        until then); returns cluster -> file offset for those."""
        if not self.space.scanned:
            self._scan_free_clusters()
        placed: dict[int, int] = {}
        for cluster, data in data_clusters:
            if not self.space.free:
                break
            offset = heapq.heappop(self.space.free)
            try:
                self.log.write(offset, data, None if copied else data, cluster * self.geometry.cluster_size, below,
                               direct=True)
            except BaseException:
                heapq.heappush(self.space.free, offset)  # nothing points there yet
                raise
            placed[cluster] = offset
        if placed and below is None:
            self.log.set_need_check()
        return placed

    def _scan_free_clusters(self) -> None:
        """Find the data clusters of the file that no table references (one read of every L2
        table, once a mount): leaks left by a crash, or by discards before the last unmount."""
        g, tables = self.geometry, self.tables
        cs = g.cluster_size
        used = bytearray(self.space.file_size // cs)
        used[: g.first_cluster // cs] = b"\1" * (g.first_cluster // cs)
        for l2_offset in [g.l1_table_offset, *tables.l2_offsets]:
            start = l2_offset // cs
            used[start : start + g.table_size] = b"\1" * g.table_size
        for l2_offset in sorted(tables.l2_offsets):
            with tables.lock:
                table = tables.l2_table(l2_offset)
                for entry in table:
                    if entry not in (QED_UNALLOCATED, QED_ZERO_CLUSTER) and entry // cs < len(used):
                        used[entry // cs] = 1
        for offset in self.space.freed:  # old entries may still be on disk
            used[offset // cs] = 1
        self.space.free = [c * cs for c in range(len(used)) if not used[c]]  # ascending: already a heap
        self.space.scanned = True

    def _append_clusters(self, clusters: list[bytes | memoryview], below: ReadBelow | None) -> int:
        """Write whole clusters at the end of the file. No table on disk points there before
        they are durable: the entries are written by the write-back, after an fdatasync. The
        stream's page-aligned buffers bypass the page cache (the source's direct write); guest
        data, which may be read again soon, goes through it."""
        start = self.space.append(len(clusters) * self.geometry.cluster_size)
        try:
            self.source.write(start, clusters, direct=True)
            if below is None:
                self.log.set_need_check()
        except BaseException:
            self.space.give_back(start)
            raise
        return start

    # -- tables ----------------------------------------------------------------------------------

    def _set_entries(self, entries: dict[int, int]) -> None:
        """New L2 entries for clusters, in the cached tables (a new table where the L1 entry is
        unallocated)."""
        by_table: dict[int, dict[int, int]] = collections.defaultdict(dict)
        for cluster, entry in entries.items():
            l1_index, l2_index = divmod(cluster, self.geometry.nelems)
            by_table[l1_index][l2_index] = entry
        for l1_index, updates in sorted(by_table.items()):
            if self.tables.l1[l1_index] == QED_UNALLOCATED:
                self._new_l2_table(l1_index, updates)
            else:
                self.tables.update_table(self.tables.l1[l1_index], updates)
        if self.tables.write_back_due:
            self.write_back()  # keeps the tables that must stay cached well within the cache

    def _new_l2_table(self, l1_index: int, updates: dict[int, int]) -> None:
        """Append a new L2 table, whole on disk: its l2_entries are written, the rest of it is
        the zeros of a file extended past them (a table can be 1 GiB; see Geometry). Its L1
        entry is written back like the L2 entries, after one fdatasync for every table and
        cluster appended meanwhile (QedTables.add_table): a stream over a disk of scattered
        data makes a table every few steps, and one fdatasync each cost 537 of them on the
        1 TiB bench shape."""
        table = self.tables.new_table(updates)
        l2_offset = self.space.append(self.geometry.table_bytes)
        try:
            self.source.truncate(l2_offset)  # what lay past the last cluster (nothing points there)
            self.source.write(l2_offset, table.tobytes())
            self.source.truncate(self.space.file_size)
        except BaseException:
            self.space.give_back(l2_offset)  # nothing points at the table: the space is used again
            raise
        self.tables.add_table(l1_index, l2_offset, table)

    # -- write-back --------------------------------------------------------------------------------

    def write_back(self) -> None:
        """QEMU's order, batched: one fdatasync makes every cluster appended so far durable, and
        only then are the L2 entries that point to them written (they become durable at the
        next fdatasync). So an entry on disk never points at data that may not be there, and an
        allocating write costs no flush of its own. Then the clusters that discards freed are
        released. Needs _alloc_lock.

        On a failure the entries not yet written stay unwritten and the next write-back writes
        them; the tables stay cached until then."""
        if self._write_again() or self.tables.has_unwritten:
            self.log.sync()
            self.tables.write_unwritten()
        self.release_freed()

    def _write_again(self) -> bool:
        """After a failed fdatasync: write again every cluster, L2 entry, L1 entry and header
        written since the last good one, so that the next fdatasync covers them. Until this has
        succeeded, no L2 entry is written: it could point at a cluster that is not on disk.
        Returns whether there was anything to do."""
        if self.log.flush_failed is None:
            return False
        unsynced = self.log.write_data_again()
        self.tables.write_again(unsynced.spans, unsynced.l1)
        if unsynced.header:
            self.log.write_header()
        self.log.flush_failed = None
        return True

    # -- discard ---------------------------------------------------------------------------------

    def discard_clusters(self, start: int, end: int, below: ReadBelow | None) -> None:
        """Discard whole clusters [start, end): new entries in the cached tables (reads see them
        at once): zero clusters, or unallocated where nothing lies below to show through; the old
        data clusters punched and kept in `freed`. Takes _alloc_lock, so that no allocation (the
        stream's included) interleaves."""
        cs = self.geometry.cluster_size
        dropped = QED_UNALLOCATED if below is None else QED_ZERO_CLUSTER
        with self._alloc_lock:
            entries: dict[int, int] = {}
            freed: list[int] = []
            for extent in self.tables.iter_extents(start, end - start):
                first = extent.offset // cs
                clusters = range(first, -(-(extent.offset + extent.length) // cs))
                if extent.status is BlockStatus.FOUND:
                    freed += [extent.file_offset + (c - first) * cs for c in clusters]
                elif extent.status is BlockStatus.ZERO or below is None:
                    continue
                entries.update(dict.fromkeys(clusters, dropped))
            if entries:
                self._set_entries(entries)
            for run_start, run_length in _runs(freed, cs):
                self.source.punch_hole(run_start, run_length)
            self.space.freed += freed

    def release_freed(self) -> None:
        """Make the clusters that discards freed reusable, once the entries that dropped them are
        durable: until then a power cut could bring an old entry back, and a reused cluster
        would then be referenced twice. Needs nothing of theirs unwritten."""
        if self.space.freed:
            self.log.sync()
            for offset in self.space.freed:
                heapq.heappush(self.space.free, offset)
            self.space.freed.clear()

    # -- the end of the file -----------------------------------------------------------------------

    def cut_unused_tail(self) -> None:
        """Give back what failed appends left past the end that nothing points to."""
        if self.space.tail_unused and self.source.current_size() > self.space.file_size:
            self.source.truncate(self.space.file_size)
            self.source.sync()

    def trim_free_tail(self) -> None:
        """Cut the free clusters at the end of the file off, so that discards there leave no
        leaks behind (free clusters elsewhere stay leaks, punched, until the next mount reuses
        them). Takes _alloc_lock."""
        with self._alloc_lock:
            cs = self.geometry.cluster_size
            free = set(self.space.free)
            end = self.space.file_size
            while end - cs in free:
                end -= cs
            if end < self.space.file_size:
                self.source.truncate(end)
                self.source.sync()
                self.space.file_size = end
                self.space.free = [offset for offset in self.space.free if offset < end]
                heapq.heapify(self.space.free)

    # -- repairs (for the consistency check; they take _alloc_lock) -------------------------------

    def copy_cluster(self, file_offset: int) -> int:
        """Append a copy of the data cluster at `file_offset`, durable before anything points to
        it; returns where the copy is (for a cluster referenced twice)."""
        with self._alloc_lock:
            cs = self.geometry.cluster_size
            data = read_exact(self.source, file_offset, cs)
            copy = self.space.file_size
            self.source.write(copy, data)
            self.source.sync()
            self.space.file_size += cs
            return copy

    def truncate_file(self, size: int) -> None:
        """Cut clusters nothing references off the end of the file."""
        with self._alloc_lock:
            self.source.truncate(size)
            self.source.sync()
            self.space.file_size = size


def is_zero(data: bytes | memoryview) -> bool:
    """True if every byte is zero; a memcmp against zeros, not a Python loop over bytes (nor
    memoryview's comparison, which goes item by item), a megabyte at a time and copying nothing,
    so that a 64 MiB cluster costs no extra memory."""
    view = memoryview(data).cast("B")
    return all(ZEROS.startswith(view[at : at + len(ZEROS)]) for at in range(0, len(view), len(ZEROS)))


def _runs(offsets: list[int], step: int) -> Iterator[tuple[int, int]]:
    """(start, length) of the runs of consecutive `step`-spaced offsets, in the order given."""
    run_start = run_end = None
    for offset in offsets:
        if offset != run_end:
            if run_start is not None:
                yield run_start, run_end - run_start
            run_start = offset
        run_end = offset + step
    if run_start is not None:
        yield run_start, run_end - run_start
