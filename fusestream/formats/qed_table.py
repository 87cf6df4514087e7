"""QED's L1 and L2 tables: reading and checking them, the L2 cache, cluster lookups, and the
write-back of the entries that allocations change (QEMU's qed-table.c, qed-l2-cache.c and the
lookup of qed-cluster.c); and the file's cluster space (ClusterSpace), which the table checks
measure against and the allocator (qed_alloc.py) takes clusters from.

``QedTables.lock`` guards the in-memory L1 table and the L2 cache; it is held for a lookup,
including the read of an L2 table that is not cached, and while an update changes a cached
table, so that no reader sees one half-updated.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import re
import threading
from collections.abc import Iterator

from ..errors import CorruptionError, InvalidImageError
from ..sources import Source, WritableSource
from .layer import BlockStatus
from .qed_structs import QED_UNALLOCATED, QED_ZERO_CLUSTER, TABLE_ENTRY_SIZE, table_nelems
from .qed_sync import SyncLog

# A run of L2 entries that all say "unallocated" (or all "zero"), matched in the table's bytes by
# the regular expression engine: a lookup over a long run costs C's time, not Python's per entry.
# The tables hold the on-disk (little-endian) bytes as read.
_SAME_ENTRIES = {
    entry: re.compile(b"(?:" + re.escape(entry.to_bytes(TABLE_ENTRY_SIZE, "little")) + b")*")
    for entry in (QED_UNALLOCATED, QED_ZERO_CLUSTER)
}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The sizes a QED header gives, in the words of QEMU's spec."""

    cluster_size: int
    table_size: int  # clusters per table
    nelems: int  # entries per table
    table_bytes: int
    first_cluster: int  # header_size in bytes: where the clusters after the header start
    l1_table_offset: int
    size: int  # image_size: the virtual size
    # Only the entries that address the virtual size are read: with 64 MiB clusters and
    # table_size 16 a table is 1 GiB, while a 10 GiB image needs one L1 entry and 160 L2 ones.
    l1_entries: int
    l2_entries: int

    @classmethod
    def of(cls, header) -> Geometry:
        cs, ts = header.cluster_size, header.table_size
        nelems = table_nelems(cs, ts)
        return cls(cs, ts, nelems, cs * ts, header.header_size * cs, header.l1_table_offset, header.image_size,
                   -(-header.image_size // (cs * nelems)), min(nelems, -(-header.image_size // cs)))


@dataclasses.dataclass(frozen=True)
class Extent:
    """A run of guest bytes with one lookup result; file_offset is set only when FOUND."""

    status: BlockStatus
    offset: int
    length: int
    file_offset: int | None = None


class ClusterSpace:
    """Where new clusters go: the end of the file, tracked in memory from the file size rounded
    down to a cluster, or a free cluster. Data clusters nothing references (`free`, lowest
    first) are found by one scan of the tables at the first allocation (the leaks a crash or an
    earlier mount's discards left), then fed by discards. A cluster a discard frees waits in
    `freed` until the entries that dropped it are durable (see Allocator.release_freed)."""

    def __init__(self, file_size: int, cluster_size: int):
        self.file_size = file_size - file_size % cluster_size
        self.free: list[int] = []
        self.freed: list[int] = []
        self.scanned = False
        self.tail_unused = False  # a failed append left bytes past file_size

    def append(self, length: int) -> int:
        """Take `length` bytes at the end of the file; returns where they start."""
        start = self.file_size
        self.file_size += length
        return start

    def give_back(self, start: int) -> None:
        """An append from `start` failed: nothing points there, so the next one takes it again,
        and what it left past the end is cut at close (Allocator.cut_unused_tail)."""
        self.file_size = start
        self.tail_unused = True


class QedTables:
    """The tables of one open QED image, read through its source (and written through it when
    the image is writable). For a writable image, updates go to the cached tables first (lookups
    see them at once) and reach the disk at the next write-back, after an fdatasync has made the
    data they point to durable."""

    def __init__(self, source: WritableSource, geometry: Geometry, space: ClusterSpace, log: SyncLog,
                 alloc_lock: threading.Lock, l2_cache_bytes: int):
        self.source, self.geometry, self.space, self.log = source, geometry, space, log
        self._alloc_lock = alloc_lock  # the image's: held by the repairs
        self.path = source.name
        self.lock = threading.RLock()
        self.l1 = self.read_table(geometry.l1_table_offset, geometry.l1_entries)
        self.l2_offsets = {o for o in self.l1 if o != QED_UNALLOCATED}
        self._l2_cache: collections.OrderedDict[int, array.array] = collections.OrderedDict()
        self._l2_cache_max = max(1, l2_cache_bytes // max(1, geometry.l2_entries * TABLE_ENTRY_SIZE))
        # L2 table offset -> [lo, hi): entries changed in the cached table and not yet written.
        # Such a table stays cached until write_unwritten() has written them.
        self.unwritten: dict[int, tuple[int, int]] = {}
        # L1 entries of new tables, in `l1` already and not yet on disk: written by
        # write_unwritten() too, once an fdatasync has made their tables durable.
        self.unwritten_l1: set[int] = set()

    # -- reading and checking ------------------------------------------------------------------

    def read_table(self, offset: int, entries: int | None = None) -> array.array:
        """The first `entries` entries of the table at `offset` (all of them by default). The
        image reads l1_entries of its L1 table and l2_entries of each L2 table: the rest address
        nothing inside the virtual size."""
        table = array.array("Q")
        table.frombytes(read_exact(self.source, offset, (self.geometry.nelems if entries is None else entries)
                                   * TABLE_ENTRY_SIZE))
        return table

    def check_l1(self) -> None:
        """Every L1 entry must name a whole L2 table inside the file, clear of the L1 and of
        every other L2 table."""
        g = self.geometry
        for index, offset in enumerate(self.l1):
            if offset == QED_UNALLOCATED:
                continue
            problem = self.table_offset_problem(offset)
            if problem is None and abs(offset - g.l1_table_offset) < g.table_bytes:
                problem = "overlaps the L1 table"
            if problem:
                raise InvalidImageError(f"{self.path}: L1 entry {index}: L2 table offset {offset} {problem}")
        tables = sorted(o for o in self.l1 if o != QED_UNALLOCATED)
        for lower, upper in zip(tables, tables[1:], strict=False):
            if upper - lower < g.table_bytes:
                raise InvalidImageError(f"{self.path}: L2 tables at offsets {lower} and {upper} overlap")

    def table_offset_problem(self, offset: int) -> str | None:
        if offset % self.geometry.cluster_size:
            return "is not cluster-aligned"
        if offset < self.geometry.first_cluster:
            return "lies in the header"
        if offset + self.geometry.table_bytes > self.space.file_size:
            return "lies beyond the end of the file"
        return None

    # -- the L2 cache ----------------------------------------------------------------------------

    def l2_table(self, offset: int) -> array.array:
        """An L2 table by its file offset, cached; needs lock."""
        table = self._l2_cache.get(offset)
        if table is None:
            table = self.read_table(offset, self.geometry.l2_entries)
            self.cache_table(offset, table)
        else:
            self._l2_cache.move_to_end(offset)
        return table

    def cache_table(self, offset: int, table: array.array) -> None:
        """Add a table to the L2 cache, evicting the least recently used other one that has
        nothing unwritten or unsynced (the cache may stay over its bound until a write-back: see
        write_back_due). Never the table just added: its caller is about to use it, and an
        update of a table that is not cached would be lost to the write-back."""
        self._l2_cache[offset] = table
        if len(self._l2_cache) > self._l2_cache_max:
            spans = self.log.unsynced.spans
            victim = next((o for o in self._l2_cache if o != offset and o not in self.unwritten and o not in spans),
                          None)
            if victim is not None:
                del self._l2_cache[victim]

    # -- lookups ---------------------------------------------------------------------------------

    def cluster_entry(self, cluster: int) -> int:
        """The L2 entry of a cluster (0 unallocated, 1 zero, else its file offset), validated.
        Needs lock."""
        l1_index, l2_index = divmod(cluster, self.geometry.nelems)
        l2_offset = self.l1[l1_index]
        if l2_offset == QED_UNALLOCATED:
            return QED_UNALLOCATED
        try:
            entry = self.l2_table(l2_offset)[l2_index]
        except EOFError as err:
            raise CorruptionError(f"{self.path}: L2 table at {l2_offset}: {err}") from None
        if entry in (QED_UNALLOCATED, QED_ZERO_CLUSTER):
            return entry
        problem = self._data_offset_problem(entry)
        if problem:
            raise CorruptionError(
                f"{self.path}: L2 table at {l2_offset}, entry {l2_index}: data cluster offset {entry} {problem}"
            )
        return entry

    def _data_offset_problem(self, offset: int) -> str | None:
        """Why a data cluster offset is impossible, so that no guest I/O ever touches metadata or
        goes outside the file."""
        g = self.geometry
        if offset % g.cluster_size:
            return "is not cluster-aligned"
        if offset < g.first_cluster or offset + g.cluster_size > self.space.file_size:
            return "lies outside the data area of the file"
        if 0 <= offset - g.l1_table_offset < g.table_bytes:
            return "lies in the L1 table"
        if any(offset - k * g.cluster_size in self.l2_offsets for k in range(g.table_size)):
            return "lies in an L2 table"
        return None

    def _same_entries(self, cluster: int, limit: int) -> int:
        """How many clusters from `cluster` on (at most `limit`, and within its L2 table, which is
        cached and allocated) have its entry, an unallocated or a zero one. Needs lock."""
        l1_index, first = divmod(cluster, self.geometry.nelems)
        table = self.l2_table(self.l1[l1_index])
        stop = min(first + limit, len(table))
        with memoryview(table) as entries, entries.cast("B") as table_bytes:
            same = _SAME_ENTRIES[table[first]].match(table_bytes, first * TABLE_ENTRY_SIZE, stop * TABLE_ENTRY_SIZE)
            return (same.end() - same.start()) // TABLE_ENTRY_SIZE

    def lookups(self, offset: int, length: int) -> Iterator[tuple[BlockStatus, int, int, int | None]]:
        """(status, offset, length, file offset) of [offset, offset+length), one L2 entry (a
        cluster) at a time, a run of unallocated or of zero entries at once, or a whole L2
        table's span at once where the L1 entry is unallocated.
        Plain tuples: this is the innermost loop of every walk. The lock is taken per lookup, so
        a long walk (the stream job's) never holds up a guest read for long."""
        cs = self.geometry.cluster_size
        span = cs * self.geometry.nelems  # guest bytes behind one L2 table
        end = offset + length
        pos = offset
        while pos < end:
            if self.l1[pos // span] == QED_UNALLOCATED:
                run = min(end, (pos // span + 1) * span) - pos
                yield BlockStatus.UNALLOCATED, pos, run, None
                pos += run
                continue
            cluster, within = divmod(pos, cs)
            left = -(-end // cs) - cluster  # clusters the range still touches
            with self.lock:
                entry = self.cluster_entry(cluster)
                clusters = self._same_entries(cluster, left) if left > 1 and entry in _SAME_ENTRIES else 1
            run = min((cluster + clusters) * cs, end) - pos
            if entry == QED_UNALLOCATED:
                yield BlockStatus.UNALLOCATED, pos, run, None
            elif entry == QED_ZERO_CLUSTER:
                yield BlockStatus.ZERO, pos, run, None
            else:
                yield BlockStatus.FOUND, pos, run, entry + within
            pos += run

    def iter_extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Runs of FOUND (contiguous in the file), ZERO and UNALLOCATED over a guest range,
        looked up only as far as the caller reads."""
        current = None  # [status, offset, length, file offset] of the run being merged
        for status, pos, run, file_offset in self.lookups(offset, length):
            if current and current[0] is status and (file_offset is None or current[3] + current[2] == file_offset):
                current[2] += run
                continue
            if current:
                yield Extent(*current)
            current = [status, pos, run, file_offset]
        if current:
            yield Extent(*current)

    # -- updates and their write-back ------------------------------------------------------------

    def update_table(self, l2_offset: int, updates: dict[int, int]) -> None:
        """Change entries in the cached table, where lookups see them at once; they reach the
        disk at the next write-back."""
        with self.lock:
            table = self.l2_table(l2_offset)
            for index, entry in updates.items():
                table[index] = entry
            self.mark_unwritten(l2_offset, min(updates), max(updates) + 1)

    def mark_unwritten(self, l2_offset: int, lo: int, hi: int) -> None:
        """Entries [lo, hi) of a cached table are to be written at the next write-back. Needs
        lock."""
        old_lo, old_hi = self.unwritten.get(l2_offset, (hi, lo))
        self.unwritten[l2_offset] = (min(lo, old_lo), max(hi, old_hi))

    @property
    def has_unwritten(self) -> bool:
        """L2 entries or new tables' L1 entries that the next write-back is to write."""
        return bool(self.unwritten or self.unwritten_l1)

    @property
    def write_back_due(self) -> bool:
        """More than half the cache holds tables with unwritten entries (which it cannot evict)."""
        return len(self.unwritten) > self._l2_cache_max // 2

    def new_table(self, updates: dict[int, int]) -> array.array:
        """A new L2 table in memory: its l2_entries, zeros but for `updates`."""
        table = array.array("Q", bytes(self.geometry.l2_entries * TABLE_ENTRY_SIZE))
        for index, entry in updates.items():
            table[index] = entry
        return table

    def add_table(self, l1_index: int, l2_offset: int, table: array.array) -> None:
        """A new L2 table, written to the file, is in use: lookups see it, and it is cached. Its
        L1 entry reaches the disk at the next write-back (write_unwritten), after the fdatasync
        that makes the table durable: until then the table and the clusters it points to are
        only space that nothing on disk refers to."""
        with self.lock:
            self.l1[l1_index] = l2_offset
            self.l2_offsets.add(l2_offset)
            self.cache_table(l2_offset, table)
            self.unwritten_l1.add(l1_index)

    def write_l1_entry(self, index: int, value: int) -> None:
        """Write an L1 entry (durable at the next fdatasync); `l1` in memory is the caller's to
        change."""
        self.log.unsynced.l1.add(index)
        at = self.geometry.l1_table_offset + index * TABLE_ENTRY_SIZE
        self.source.write(at, array.array("Q", [value]).tobytes())

    def write_unwritten(self) -> None:
        """Write the entries of every cached table that updates changed, and the L1 entries of
        new tables. Only after an fdatasync has made what they point to durable
        (Allocator.write_back). On a failure the entries not yet written stay in `unwritten`
        and `unwritten_l1`; the tables stay cached until written."""
        with self.lock:
            for l2_offset, (lo, hi) in sorted(self.unwritten.items()):
                table = self._l2_cache[l2_offset]
                self.source.write(l2_offset + lo * TABLE_ENTRY_SIZE, table[lo:hi].tobytes())
                del self.unwritten[l2_offset]
                written_lo, written_hi = self.log.unsynced.spans.get(l2_offset, (hi, lo))
                self.log.unsynced.spans[l2_offset] = (min(lo, written_lo), max(hi, written_hi))
            for index in sorted(self.unwritten_l1):
                self.write_l1_entry(index, self.l1[index])
                self.unwritten_l1.discard(index)

    def write_again(self, spans: dict[int, tuple[int, int]], l1: set[int]) -> None:
        """After a failed fdatasync: the L2 entries written since the last good one are
        unwritten again, and the L1 entries are written again."""
        with self.lock:  # lookups may be evicting from the cache, which reads `unwritten`
            for l2_offset, (lo, hi) in spans.items():
                self.mark_unwritten(l2_offset, lo, hi)
        for index in sorted(l1):
            self.write_l1_entry(index, self.l1[index])

    # -- repairs (for the consistency check) -----------------------------------------------------

    def repair_l1_entry(self, index: int, value: int) -> None:
        with self._alloc_lock, self.lock:
            self.source.write(self.geometry.l1_table_offset + index * TABLE_ENTRY_SIZE,
                              array.array("Q", [value]).tobytes())
            self.source.sync()
            self.l2_offsets.discard(self.l1[index])
            self._l2_cache.pop(self.l1[index], None)
            self.l1[index] = value

    def repair_l2_entries(self, l2_offset: int, entries: dict[int, int]) -> None:
        with self._alloc_lock:
            self.update_table(l2_offset, entries)
            self.log.sync()
            self.write_unwritten()
            self.log.sync()


def read_exact(source: Source, offset: int, length: int) -> bytes:
    """source.read that treats a short read (the file shrank under us) as an error, not as data."""
    data = source.read(offset, length)
    if len(data) < length:
        raise EOFError(f"unexpected end of file at offset {offset + len(data)}")
    return data
