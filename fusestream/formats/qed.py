"""QED images: open and validate, look up clusters, read through, allocate and write.

The image is thread-safe so that bulk I/O can run off the trio event loop. Two locks:

* ``_table_lock`` guards the in-memory L1 table and the L2 cache; it is held for lookups,
  including the read of an L2 table that is not cached.
* ``_alloc_lock`` serialises allocating writes (QEMU does the same) and is held across their I/O,
  so a cluster is never allocated twice and the crash-safe order below is kept.

Crash-safe order of an allocating write (QEMU's): the data cluster is written whole (the rest
filled from the backing chain or zeros) and, when there is a backing file, made durable before
the L2 entry that points to it; a new L2 table is written whole and made durable before the L1
entry that points to it. Without a backing file, QEMU skips the data flush and marks the image
``QED_F_NEED_CHECK`` instead; we do the same and clear the flag on a clean close.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import errno
import heapq
import logging
import mmap
import os
import stat
import sys
import threading
import types
from collections.abc import Iterator

from construct import ConstructError

from ..errors import (
    CorruptionError,
    FusestreamError,
    InvalidImageError,
    ReadOnlyImageError,
    UnsupportedImageError,
    describe_os_error,
)
from .image_lock import lock_image
from .layer import (
    ZEROS,
    BlockStatus,
    DirectTwin,
    Layer,
    ReadAdvice,
    direct_io_allowed,
    fill_zeros,
    open_regular_file,
    pread_into,
    prefetch_from,
    punch_hole,
    read_from,
    read_into_from,
)
from .qed_structs import (
    QED_AUTOCLEAR_FEATURE_MASK,
    QED_DEFAULT_CLUSTER_SIZE,
    QED_DEFAULT_TABLE_SIZE,
    QED_F_BACKING_FILE,
    QED_F_BACKING_FORMAT_NO_PROBE,
    QED_F_NEED_CHECK,
    QED_FEATURE_MASK,
    QED_HEADER,
    QED_HEADER_SIZE,
    QED_MAGIC,
    QED_MAX_CLUSTER_SIZE,
    QED_MAX_TABLE_SIZE,
    QED_MIN_CLUSTER_SIZE,
    QED_MIN_TABLE_SIZE,
    QED_UNALLOCATED,
    QED_ZERO_CLUSTER,
    TABLE_ENTRY_SIZE,
    is_power_of_two,
    max_image_size,
    table_nelems,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "qed"
MAX_BACKING_NAME = 4095  # PATH_MAX less the NUL QEMU keeps
# The largest virtual size: QEMU's BDRV_MAX_LENGTH (INT64_MAX aligned down to 1 GiB), which its
# block layer enforces on every image it opens ("File too large"); it also keeps every offset
# in the kernel's signed 64-bit off_t, which FUSE's st_size and requests use.
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)
DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024
# Pieces one block_status answer merges at most (~1 ms of lookups): see QedImage.block_status.
BLOCK_STATUS_MAX_PIECES = 1024
# Guest data kept in memory until an fdatasync has made it durable, at most; past this, a failed
# fdatasync can no longer be repaired by writing again (see Unsynced).
UNSYNCED_DATA_MAX = 64 * 1024 * 1024

if sys.byteorder != "little":  # tables are little-endian and read with array("Q")
    raise ImportError("fusestream's QED tables assume a little-endian host")


@dataclasses.dataclass(frozen=True)
class Extent:
    """A run of guest bytes with one lookup result; file_offset is set only when FOUND."""

    status: BlockStatus
    offset: int
    length: int
    file_offset: int | None = None


@dataclasses.dataclass
class Unsynced:
    """What was written to the top image since its last successful fdatasync, so that all of it
    can be written again after a failed one. Linux may drop the dirty pages an fdatasync could not
    write, mark them clean and report success at the next fdatasync ("fsyncgate"): a cluster or
    a table entry written before a failed flush is on disk only once written again."""

    writes: list[tuple[int, bytes | memoryview | None, int]] = dataclasses.field(default_factory=list)
    """(file offset, data, guest offset) of each data write, in order: guest data (immutable
    bytes, kept by reference), or None for a new cluster copied from the backing chain, read
    again when needed (the stream's buffers are reused)."""
    data_bytes: int = 0
    spans: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # L2 entries written
    l1: set[int] = dataclasses.field(default_factory=set)  # L1 entries written
    header: bool = False


def _fail(path: str, problem: str) -> InvalidImageError:
    return InvalidImageError(f"{path}: {problem}")


def validate_header(path: str, h, file_size: int) -> None:
    """Refuse a header that breaks any rule of QEMU's QED spec; every message names the field."""
    cs, ts = h.cluster_size, h.table_size
    if not (is_power_of_two(cs) and QED_MIN_CLUSTER_SIZE <= cs <= QED_MAX_CLUSTER_SIZE):
        raise _fail(path, f"invalid cluster_size {cs} (a power of two from 4 KiB to 64 MiB)")
    if not (is_power_of_two(ts) and QED_MIN_TABLE_SIZE <= ts <= QED_MAX_TABLE_SIZE):
        raise _fail(path, f"invalid table_size {ts} (a power of two from 1 to 16)")
    unknown = h.features & ~QED_FEATURE_MASK
    if unknown:
        raise UnsupportedImageError(f"{path}: unknown QED feature bits {unknown:#x}")
    header_bytes = h.header_size * cs
    if h.header_size < 1 or header_bytes > file_size:
        raise _fail(path, f"invalid header_size {h.header_size} clusters for a {file_size}-byte file")
    if h.image_size % 512:
        raise _fail(path, f"invalid image_size {h.image_size} (not a multiple of 512)")
    if h.image_size > max_image_size(cs, ts):
        raise _fail(path, f"invalid image_size {h.image_size} (more than the tables can address: "
                          f"{max_image_size(cs, ts)} bytes)")
    if h.image_size > BDRV_MAX_LENGTH:
        raise _fail(path, f"invalid image_size {h.image_size} (more than QEMU's limit, {BDRV_MAX_LENGTH} bytes)")
    table_bytes = cs * ts
    l1 = h.l1_table_offset
    if l1 % cs or l1 < header_bytes or l1 + table_bytes > file_size:
        raise _fail(path, f"invalid l1_table_offset {l1} (not cluster-aligned, in the header or past the end)")
    if h.features & QED_F_BACKING_FILE:
        start, size = h.backing_filename_offset, h.backing_filename_size
        if size == 0 or size > MAX_BACKING_NAME or start < QED_HEADER_SIZE or start + size > header_bytes:
            raise _fail(path, f"invalid backing file name at offset {start}, size {size} (not in the header clusters)")


def is_zero(data: bytes | memoryview) -> bool:
    """True if every byte is zero; a memcmp against zeros, not a Python loop over bytes (nor
    memoryview's comparison, which goes item by item), a megabyte at a time and copying nothing,
    so that a 64 MiB cluster costs no extra memory."""
    view = memoryview(data).cast("B")
    return all(ZEROS.startswith(view[at : at + len(ZEROS)]) for at in range(0, len(view), len(ZEROS)))


def _pread_exact(fd: int, offset: int, length: int) -> bytes:
    """pread that treats a short read (the file shrank under us) as an error, not as data."""
    chunks = []
    while length:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise EOFError(f"unexpected end of file at offset {offset}")
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


IOV_MAX = 1024  # buffers per pwritev call (Linux's UIO_MAXIOV)
DISCARD_BATCH = 65536  # clusters a discard changes under one hold of the allocation lock


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


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of `data` (one buffer, or a list of buffers written back to back with pwritev,
    so that nothing is copied into one piece first) at `offset`, however many calls it takes."""
    buffers = [memoryview(b).cast("B") for b in data] if isinstance(data, list) else [memoryview(data).cast("B")]
    while buffers:
        batch = buffers[:IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        offset += written
        while buffers and written >= len(buffers[0]):
            written -= len(buffers.pop(0))
        if written:
            buffers[0] = buffers[0][written:]


class QedImage:
    """One open QED file. ``backing`` is set by the chain once it has opened the backing layer."""

    format_name = FORMAT_NAME

    def __init__(
        self,
        path: str,
        writable: bool = False,
        lock: bool = True,
        l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
        check_tables: bool = True,
    ):
        """Open and validate a QED file. With check_tables=False the L1 entries are not checked:
        only for the consistency check, which examines them itself."""
        self.path = path
        self.writable = writable
        self.backing: Layer | None = None
        self._unsynced = Unsynced()
        # Set after a write past UNSYNCED_DATA_MAX: data written that is not kept, so a failed
        # fdatasync before the next good one loses it for good.
        self._unkept = False
        # Held by a data write and the recording of it, and while the writes are written again,
        # so that none of them interleave (the kernel serialises buffered writes to a file anyway).
        self._unsynced_lock = threading.Lock()
        self._flush_failed: OSError | None = None  # the last fdatasync failed: write _unsynced again
        self._lost: OSError | None = None  # a failed fdatasync lost data that was not kept
        self._tail_unused = False  # a failed append left bytes past file_size
        try:
            self.fd = open_regular_file(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as err:
            raise InvalidImageError(describe_os_error(path, err)) from None
        try:
            if lock:
                lock_image(self.fd, path, writable)
            self._load(l2_cache_bytes, check_tables)
        except OSError as err:
            os.close(self.fd)
            raise InvalidImageError(describe_os_error(path, err)) from None
        except BaseException:
            os.close(self.fd)
            raise
        self.direct = DirectTwin(self.fd, writable)  # for the stream's bulk I/O
        self.advice = ReadAdvice(self.fd, path)
        self._table_lock = threading.RLock()
        self._alloc_lock = threading.Lock()
        self._we_set_need_check = False
        self.need_check_allocations = 0  # allocations that set or kept NEED_CHECK (services.NeedCheckTimer)
        # Data clusters nothing references, lowest first: allocations take them before the file
        # grows. Found by one scan of the tables at the first allocation (the leaks a crash or an
        # earlier mount's discards left), then fed by discards. A cluster a discard frees waits
        # in _freed until the entries that dropped it are durable (see _release_freed).
        self._free: list[int] = []
        self._freed: list[int] = []
        self._free_scanned = False

    # -- opening -------------------------------------------------------------------------------

    def _load(self, l2_cache_bytes: int, check_tables: bool) -> None:
        file_size = os.fstat(self.fd).st_size
        raw = os.pread(self.fd, QED_HEADER_SIZE, 0)
        if len(raw) < QED_HEADER_SIZE or not raw.startswith(QED_MAGIC):
            if file_size == 0:
                raise _fail(self.path, "empty file")
            raise _fail(self.path, "truncated QED header" if raw.startswith(QED_MAGIC) else "not a QED image")
        try:
            self.header = QED_HEADER.parse(raw)
        except ConstructError as err:
            raise _fail(self.path, f"unreadable QED header ({err})") from None
        validate_header(self.path, self.header, file_size)
        h = self.header
        self.cluster_size = h.cluster_size
        self.table_bytes = h.cluster_size * h.table_size
        self.nelems = table_nelems(h.cluster_size, h.table_size)
        self.size = h.image_size
        self.first_cluster = h.header_size * h.cluster_size
        self.file_size = file_size - file_size % h.cluster_size
        self.backing_filename = self._read_backing_filename()
        # Only the entries that address the virtual size are read: with 64 MiB clusters and
        # table_size 16 a table is 1 GiB, while a 10 GiB image needs one L1 entry and 160 L2 ones.
        self.l1_entries = -(-self.size // (self.cluster_size * self.nelems))
        self.l2_entries = min(self.nelems, -(-self.size // self.cluster_size))
        self.l1 = self.read_table(h.l1_table_offset, self.l1_entries)
        self._l2_offsets = {o for o in self.l1 if o != QED_UNALLOCATED}
        if check_tables:
            self._check_l1()
        self._l2_cache: collections.OrderedDict[int, array.array] = collections.OrderedDict()
        self._l2_cache_max = max(1, l2_cache_bytes // max(1, self.l2_entries * TABLE_ENTRY_SIZE))
        # L2 table offset -> [lo, hi): entries changed in the cached table and not yet written.
        # Such a table stays cached until write_back() has written them (see _write_back).
        self._unwritten: dict[int, tuple[int, int]] = {}
        if self.writable:
            self._clear_unknown_autoclear_bits()
        if h.features & QED_F_NEED_CHECK and self.writable and check_tables:
            log.warning("%s: QED_F_NEED_CHECK is set (not closed cleanly); it stays set until checked", self.path)

    def _read_backing_filename(self) -> str | None:
        h = self.header
        if not h.features & QED_F_BACKING_FILE:
            return None
        raw = os.pread(self.fd, h.backing_filename_size, h.backing_filename_offset)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(self.path, "backing file name is not valid UTF-8") from None
        if "\0" in name:
            raise _fail(self.path, "backing file name contains a NUL byte")
        return name

    @property
    def need_check_set_by_us(self) -> bool:
        return self._we_set_need_check

    @property
    def backing_format_is_raw(self) -> bool:
        """QED_F_BACKING_FORMAT_NO_PROBE: the backing file is raw and must not be probed."""
        return bool(self.header.features & QED_F_BACKING_FORMAT_NO_PROBE)

    def read_table(self, offset: int, entries: int | None = None) -> array.array:
        """The first `entries` entries of the table at `offset` (all of them by default). The
        image reads l1_entries of its L1 table and l2_entries of each L2 table: the rest address
        nothing inside the virtual size."""
        table = array.array("Q")
        count = self.nelems if entries is None else entries
        table.frombytes(_pread_exact(self.fd, offset, count * TABLE_ENTRY_SIZE))
        return table

    def _check_l1(self) -> None:
        """Every L1 entry must name a whole L2 table inside the file, clear of the L1 and of
        every other L2 table."""
        l1_start = self.header.l1_table_offset
        for index, offset in enumerate(self.l1):
            if offset == QED_UNALLOCATED:
                continue
            problem = self.table_offset_problem(offset)
            if problem is None and abs(offset - l1_start) < self.table_bytes:
                problem = "overlaps the L1 table"
            if problem:
                raise _fail(self.path, f"L1 entry {index}: L2 table offset {offset} {problem}")
        tables = sorted(o for o in self.l1 if o != QED_UNALLOCATED)
        for lower, upper in zip(tables, tables[1:], strict=False):
            if upper - lower < self.table_bytes:
                raise _fail(self.path, f"L2 tables at offsets {lower} and {upper} overlap")

    def table_offset_problem(self, offset: int) -> str | None:
        if offset % self.cluster_size:
            return "is not cluster-aligned"
        if offset < self.first_cluster:
            return "lies in the header"
        if offset + self.table_bytes > self.file_size:
            return "lies beyond the end of the file"
        return None

    def _clear_unknown_autoclear_bits(self) -> None:
        if self.header.autoclear_features & ~QED_AUTOCLEAR_FEATURE_MASK:
            self.header.autoclear_features &= QED_AUTOCLEAR_FEATURE_MASK
            self._write_header()
            self._sync()

    def _write_header(self) -> None:
        """Rewrite the known header fields in place; the backing name after them is untouched."""
        self._unsynced.header = True
        _pwrite_all(self.fd, QED_HEADER.build(self.header), 0)

    def _write_l1_entry(self, index: int, value: int) -> None:
        self._unsynced.l1.add(index)
        at = self.header.l1_table_offset + index * TABLE_ENTRY_SIZE
        _pwrite_all(self.fd, array.array("Q", [value]).tobytes(), at)

    def _sync(self) -> None:
        """fdatasync of the top image. After a failure everything written since the last good one
        is written again before the next write-back (_write_unsynced_again); if some of it was not
        kept, every later flush fails (see flush). Needs _alloc_lock; writes in place may run
        meanwhile: only those recorded before the fdatasync began are known to be covered."""
        covered = len(self._unsynced.writes)
        unkept, self._unkept = self._unkept, False  # cleared first: a write racing us sets it again
        try:
            os.fdatasync(self.fd)
        except OSError as err:
            self._flush_failed = err
            if unkept or self._unkept:
                self._lost = self._lost or err
            self._unkept = self._unkept or unkept
            raise
        with self._unsynced_lock:
            later = self._unsynced.writes[covered:]
            size = sum(len(data) for _, data, _ in later if data is not None)
            self._unsynced = Unsynced(writes=later, data_bytes=size)

    # -- lookups -------------------------------------------------------------------------------

    def _l2_table(self, offset: int) -> array.array:
        table = self._l2_cache.get(offset)
        if table is None:
            table = self.read_table(offset, self.l2_entries)
            self._cache_table(offset, table)
        else:
            self._l2_cache.move_to_end(offset)
        return table

    def _cache_table(self, offset: int, table: array.array) -> None:
        """Add a table to the L2 cache, evicting the least recently used one that has nothing
        unwritten (the cache may stay over its bound until a write-back: see _set_l2_entries)."""
        self._l2_cache[offset] = table
        if len(self._l2_cache) > self._l2_cache_max:
            victim = next((o for o in self._l2_cache if o not in self._unwritten and o not in self._unsynced.spans),
                          None)
            if victim is not None:
                del self._l2_cache[victim]

    def _cluster_entry(self, cluster: int) -> int:
        """The L2 entry of a cluster (0 unallocated, 1 zero, else its file offset), validated."""
        l1_index, l2_index = divmod(cluster, self.nelems)
        l2_offset = self.l1[l1_index]
        if l2_offset == QED_UNALLOCATED:
            return QED_UNALLOCATED
        try:
            entry = self._l2_table(l2_offset)[l2_index]
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
        cs = self.cluster_size
        if offset % cs:
            return "is not cluster-aligned"
        if offset < self.first_cluster or offset + cs > self.file_size:
            return "lies outside the data area of the file"
        if 0 <= offset - self.header.l1_table_offset < self.table_bytes:
            return "lies in the L1 table"
        if any(offset - k * cs in self._l2_offsets for k in range(self.header.table_size)):
            return "lies in an L2 table"
        return None

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[BlockStatus, int, int, int | None]]:
        """(status, offset, length, file offset) of [offset, offset+length), a cluster at a time,
        or a whole L2 table's span at once where the L1 entry is unallocated. Plain tuples: this
        is the innermost loop of every walk. The table lock is taken per lookup, so a long walk
        (the stream job's) never holds up a guest read for long."""
        cs = self.cluster_size
        span = cs * self.nelems  # guest bytes behind one L2 table
        end = offset + length
        pos = offset
        while pos < end:
            if self.l1[pos // span] == QED_UNALLOCATED:
                run = min(end, (pos // span + 1) * span) - pos
                yield BlockStatus.UNALLOCATED, pos, run, None
                pos += run
                continue
            cluster, within = divmod(pos, cs)
            run = min(cs - within, end - pos)
            with self._table_lock:
                entry = self._cluster_entry(cluster)
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
        for status, pos, run, file_offset in self._pieces(offset, length):
            if current and current[0] is status and (file_offset is None or current[3] + current[2] == file_offset):
                current[2] += run
                continue
            if current:
                yield Extent(*current)
            current = [status, pos, run, file_offset]
        if current:
            yield Extent(*current)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The runs of iter_extents as a list."""
        return list(self.iter_extents(offset, length))

    def block_status(self, offset: int, length: int,
                     max_pieces: int = BLOCK_STATUS_MAX_PIECES) -> tuple[BlockStatus, int]:
        """The status of the run at `offset` and how far (<= length) it goes, wherever its data
        lies in the file. It merges at most `max_pieces` pieces of _pieces (L2 entries, or spans
        of an unallocated L1 entry): a shorter answer is still true, and a caller that walks on
        asks again where it ends. So one answer costs a bounded walk, however long the run, and
        a caller that needs only the start of a long run (a stream step that has planned
        enough) does not pay for the rest of it."""
        pieces = self._pieces(offset, length)
        status, _, run, _ = next(pieces)
        for merged, (next_status, _, next_run, _) in enumerate(pieces, 1):
            if next_status is not status or merged >= max_pieces:
                break
            run += next_run
        return status, run

    # -- reads ---------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray:
        cluster, within = divmod(offset, self.cluster_size)
        if within + length <= self.cluster_size:  # the common small read: one lookup, no extents
            with self._table_lock:
                entry = self._cluster_entry(cluster)
            if entry == QED_UNALLOCATED:
                return read_from(self.backing, offset, length)
            if entry == QED_ZERO_CLUSTER:
                return bytes(length)
            return self._read_data(entry + within, length)
        # Returned as it is, not as bytes: pyfuse3 replies from any buffer, and copying a
        # megabyte once more cost ~15% of warm sequential reads.
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)  # a short backing read leaves zeros, as read_from pads
        return buf

    def read_into(self, view: memoryview, offset: int, direct: bool = False) -> int:
        """Fill `view` with the guest data at `offset`, with preadv straight into it; returns
        len(view) unless a backing layer's read was short."""
        for extent in self.iter_extents(offset, len(view)):
            part = view[extent.offset - offset : extent.offset - offset + extent.length]
            if extent.status is BlockStatus.FOUND:
                self._read_data_into(part, extent.file_offset, direct)
            elif extent.status is BlockStatus.ZERO:
                fill_zeros(part)
            else:
                filled = read_into_from(self.backing, part, extent.offset, direct)
                if filled < len(part):
                    return extent.offset - offset + filled
        return len(view)

    def prefetch(self, offset: int, length: int) -> None:
        for extent in self.iter_extents(offset, length):
            if extent.status is BlockStatus.FOUND:
                self.advice.willneed(extent.file_offset, extent.length)
            elif extent.status is BlockStatus.UNALLOCATED:
                prefetch_from(self.backing, extent.offset, extent.length)

    def _read_data_into(self, view: memoryview, file_offset: int, direct: bool) -> None:
        filled = pread_into(self.fd, view, file_offset, self.direct.fd if direct else -1)
        if filled < len(view):
            raise CorruptionError(f"{self.path}: data cluster: unexpected end of file at {file_offset + filled}")

    def _read_data(self, file_offset: int, length: int) -> bytes:
        try:
            return _pread_exact(self.fd, file_offset, length)
        except EOFError as err:
            raise CorruptionError(f"{self.path}: data cluster: {err}") from None

    # -- writes --------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes, wait: bool = True) -> None:
        """Write guest data; clusters not yet allocated are allocated in QEMU's crash-safe order.
        With wait=False, an allocation that would have to wait for another one (or for a
        write-back's flush) raises BlockingIOError instead, having written nothing."""
        if not self.writable:
            raise ReadOnlyImageError(f"{self.path}: image is open read-only")
        extents = self.extents(offset, len(data))
        if all(e.status is BlockStatus.FOUND for e in extents):
            self._write_found(extents, offset, data)
            return
        if not self._alloc_lock.acquire(blocking=wait):
            raise BlockingIOError(errno.EAGAIN, "an allocation is in progress")
        try:
            # Look again: another writer may have allocated these clusters while we waited.
            for extent in self.extents(offset, len(data)):
                piece = memoryview(data)[extent.offset - offset : extent.offset - offset + extent.length]
                if extent.status is BlockStatus.FOUND:
                    self._write_in_place(piece, extent.file_offset)
                else:
                    self._allocating_write(extent, piece)
        finally:
            self._alloc_lock.release()

    def _write_found(self, extents: list[Extent], offset: int, data: bytes) -> None:
        view = memoryview(data)
        for extent in extents:
            start = extent.offset - offset
            self._write_in_place(view[start : start + extent.length], extent.file_offset)

    def _write_in_place(self, data: memoryview, file_offset: int) -> None:
        with self._unsynced_lock:
            _pwrite_all(self.fd, data, file_offset)
            self._keep_unsynced(file_offset, data, -1)

    def _allocating_write(self, extent: Extent, piece: memoryview) -> None:
        """Give each cluster of a ZERO/UNALLOCATED run its data: a new cluster, or a zero cluster
        when the guest wrote a whole cluster of zeros."""
        cs = self.cluster_size
        first = extent.offset // cs
        last = (extent.offset + extent.length - 1) // cs
        contents = {cluster: self._cluster_content(cluster, extent, piece) for cluster in range(first, last + 1)}
        self._install_clusters(contents, from_backing=False)

    def _install_clusters(self, contents: dict[int, bytes | memoryview | None], from_backing: bool) -> None:
        """Point each cluster at its new content (None: a zero cluster), appending the data
        clusters in one write, durable before the tables point to them. Needs _alloc_lock.
        `from_backing`: the contents are copies of the backing chain, in buffers the caller
        reuses; they are not kept (_keep_unsynced)."""
        entries = {cluster: QED_ZERO_CLUSTER for cluster, data in contents.items() if data is None}
        data_clusters = [(cluster, data) for cluster, data in contents.items() if data is not None]
        reused = self._reuse_free_clusters(data_clusters, from_backing)
        entries.update(reused)
        appended = [(cluster, data) for cluster, data in data_clusters if cluster not in reused]
        if appended:
            start = self._append_clusters([data for _, data in appended])
            for i, (cluster, data) in enumerate(appended):
                entries[cluster] = start + i * self.cluster_size
                with self._unsynced_lock:
                    self._keep_unsynced(entries[cluster], None if from_backing else data, cluster * self.cluster_size)
        if entries:
            self._set_l2_entries(entries)

    def _reuse_free_clusters(self, data_clusters: list[tuple[int, bytes | memoryview]],
                             from_backing: bool) -> dict[int, int]:
        """Write as many of the new clusters as there are free ones into free clusters (their
        entries, as for appended ones, wait for a write-back after a flush, and the data is kept
        until then as in _install_clusters); returns cluster -> file offset for those. Needs
        _alloc_lock."""
        if not self._free_scanned:
            self._scan_free_clusters()
        placed: dict[int, int] = {}
        for cluster, data in data_clusters:
            if not self._free:
                break
            offset = heapq.heappop(self._free)
            try:
                with self._unsynced_lock:
                    _pwrite_all(self._append_fd([data], offset), data, offset)
                    self._keep_unsynced(offset, None if from_backing else data, cluster * self.cluster_size)
            except BaseException:
                heapq.heappush(self._free, offset)  # nothing points there yet
                raise
            placed[cluster] = offset
        if placed and self.backing is None:
            self._set_need_check()
        return placed

    def _scan_free_clusters(self) -> None:
        """Find the data clusters of the file that no table references (one read of every L2
        table, once a mount): leaks left by a crash, or by discards before the last unmount."""
        cs = self.cluster_size
        used = bytearray(self.file_size // cs)
        used[: self.first_cluster // cs] = b"\1" * (self.first_cluster // cs)
        for l2_offset in [self.header.l1_table_offset, *self._l2_offsets]:
            start = l2_offset // cs
            used[start : start + self.header.table_size] = b"\1" * self.header.table_size
        for l2_offset in sorted(self._l2_offsets):
            with self._table_lock:
                table = self._l2_table(l2_offset)
                for entry in table:
                    if entry not in (QED_UNALLOCATED, QED_ZERO_CLUSTER) and entry // cs < len(used):
                        used[entry // cs] = 1
        for offset in self._freed:  # old entries may still be on disk
            used[offset // cs] = 1
        self._free = [c * cs for c in range(len(used)) if not used[c]]  # ascending: already a heap
        self._free_scanned = True

    def populate(self, pieces: list[tuple[int, bytes | memoryview]], zero_clusters: bool) -> int:
        """Copy data that the caller read from the backing chain, as (offset, data) pieces, into
        the clusters they cover that are still unallocated; returns the bytes allocated. All
        pieces go in with one append; the L2 entries wait for the next write-back.

        Clusters the guest has written meanwhile are left alone: guest writes win. Each offset must
        be cluster-aligned and each piece cover whole clusters (or run to the end of the image):
        anything else is refused with ValueError, since the rest of a cluster cut short is not
        known and must never become zeros. An all-zero cluster becomes a zero cluster when
        `zero_clusters`, else stays unallocated.
        """
        if not self.writable:
            raise ReadOnlyImageError(f"{self.path}: image is open read-only")
        cs = self.cluster_size
        for offset, data in pieces:
            end = offset + len(data)
            if offset % cs or (end % cs and end != self.size) or end > self.size:
                raise ValueError(f"{self.path}: populate of [{offset}, {end}) does not cover whole clusters")
        with self._alloc_lock:
            contents: dict[int, bytes | memoryview | None] = {}
            for offset, data in pieces:
                view = memoryview(data)
                for extent in self.iter_extents(offset, len(view)):
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
            self._install_clusters(contents, from_backing=True)
        return sum(cs for data in contents.values() if data is not None)

    def _cluster_content(self, cluster: int, extent: Extent, piece: memoryview) -> bytes | None:
        """The whole new content of one cluster, or None for a guest write of a full zero cluster."""
        cs = self.cluster_size
        cluster_start = cluster * cs
        lo = max(cluster_start, extent.offset)
        hi = min(cluster_start + cs, extent.offset + extent.length)
        guest = piece[lo - extent.offset : hi - extent.offset]
        if lo == cluster_start and hi == cluster_start + cs and is_zero(guest):
            return None
        buf = bytearray(cs)
        if lo > cluster_start:
            buf[: lo - cluster_start] = self._fill(extent.status, cluster_start, lo - cluster_start)
        buf[lo - cluster_start : hi - cluster_start] = guest
        if hi < cluster_start + cs:
            buf[hi - cluster_start :] = self._fill(extent.status, hi, cluster_start + cs - hi)
        return bytes(buf)

    def _fill(self, status: BlockStatus, offset: int, length: int) -> bytes:
        """What the rest of a newly allocated cluster holds: the backing data, or zeros."""
        if status is BlockStatus.ZERO or offset >= self.size:
            return bytes(length)
        inside = min(length, self.size - offset)
        return read_from(self.backing, offset, inside) + bytes(length - inside)

    def _append_clusters(self, clusters: list[bytes | memoryview]) -> int:
        """Write whole clusters at the end of the file. No table on disk points there before
        they are durable: the entries are written by _write_back, after an fdatasync."""
        start = self.file_size
        self.file_size += len(clusters) * self.cluster_size
        try:
            _pwrite_all(self._append_fd(clusters, start), clusters, start)
            if self.backing is None:
                self._set_need_check()
        except BaseException:
            self.file_size = start  # nothing points there: the next allocation reuses the space
            self._tail_unused = True
            raise
        return start

    def _keep_unsynced(self, file_offset: int, data: bytes | memoryview | None, guest_offset: int) -> None:
        """Remember a data write until an fdatasync has made it durable (see Unsynced); after
        the write (see _sync). Needs _unsynced_lock."""
        size = 0 if data is None else len(data)
        if self._unsynced.data_bytes + size > UNSYNCED_DATA_MAX:
            self._unkept = True
            return
        self._unsynced.writes.append((file_offset, data, guest_offset))
        self._unsynced.data_bytes += size

    def _write_unsynced_again(self) -> bool:
        """After a failed fdatasync: write again, from memory, every cluster, L2 entry, L1 entry and
        header written since the last good one, so that the next fdatasync covers them. Until this
        has succeeded, no L2 entry is written: it could point at a cluster that is not on disk.
        Returns whether there was anything to do."""
        if self._flush_failed is None:
            return False
        with self._unsynced_lock:
            unsynced = self._unsynced
            for file_offset, data, guest_offset in unsynced.writes:
                if data is None:
                    data = self._fill(BlockStatus.UNALLOCATED, guest_offset, self.cluster_size)
                _pwrite_all(self.fd, data, file_offset)
        with self._table_lock:  # lookups may be evicting from the cache, which reads _unwritten
            for l2_offset, (lo, hi) in unsynced.spans.items():
                self._mark_unwritten(l2_offset, lo, hi)
        for index in sorted(unsynced.l1):
            self._write_l1_entry(index, self.l1[index])
        if unsynced.header:
            self._write_header()
        self._flush_failed = None
        return True

    def _append_fd(self, clusters: list[bytes | memoryview], start: int) -> int:
        """The O_DIRECT descriptor for clusters that all allow it (the stream's aligned buffers),
        else the ordinary one (guest writes: they may be read again soon)."""
        if all(direct_io_allowed(memoryview(data), start) for data in clusters) and self.direct.fd >= 0:
            return self.direct.fd
        return self.fd

    def _set_need_check(self) -> None:
        self.need_check_allocations += 1
        if not self.header.features & QED_F_NEED_CHECK:
            self.header.features |= QED_F_NEED_CHECK
            try:
                self._write_header()
                self._sync()
            except BaseException:
                self.header.features &= ~QED_F_NEED_CHECK  # as on disk, or as it will be again
                raise
            self._we_set_need_check = True

    def clear_need_check(self) -> None:
        """Make everything durable, then clear the QED_F_NEED_CHECK flag we set (QEMU does this
        a few seconds after the last allocating write, and on close)."""
        with self._alloc_lock:
            if not self._we_set_need_check:
                return
            self._write_back()
            self._sync()
            self.header.features &= ~QED_F_NEED_CHECK
            try:
                self._write_header()
                self._sync()
            except BaseException:
                self.header.features |= QED_F_NEED_CHECK
                raise
            self._we_set_need_check = False

    def _set_l2_entries(self, entries: dict[int, int]) -> None:
        by_table: dict[int, dict[int, int]] = collections.defaultdict(dict)
        for cluster, entry in entries.items():
            l1_index, l2_index = divmod(cluster, self.nelems)
            by_table[l1_index][l2_index] = entry
        for l1_index, updates in sorted(by_table.items()):
            if self.l1[l1_index] == QED_UNALLOCATED:
                self._new_l2_table(l1_index, updates)
            else:
                self._update_l2_table(self.l1[l1_index], updates)
        if len(self._unwritten) > self._l2_cache_max // 2:
            self._write_back()  # keeps the tables that must stay cached well within the cache

    def _update_l2_table(self, l2_offset: int, updates: dict[int, int]) -> None:
        """Change entries in the cached table, where lookups see them at once; they reach the
        disk at the next write-back. Under the table lock, so that no reader sees the table
        half-updated."""
        with self._table_lock:
            table = self._l2_table(l2_offset)
            for index, entry in updates.items():
                table[index] = entry
            self._mark_unwritten(l2_offset, min(updates), max(updates) + 1)

    def _mark_unwritten(self, l2_offset: int, lo: int, hi: int) -> None:
        """Entries [lo, hi) of a cached table are to be written at the next write-back. Needs
        _table_lock."""
        old_lo, old_hi = self._unwritten.get(l2_offset, (hi, lo))
        self._unwritten[l2_offset] = (min(lo, old_lo), max(hi, old_hi))

    def write_back(self) -> None:
        """Write the L2 entries that allocations changed since the last write-back."""
        with self._alloc_lock:
            self._write_back()

    @property
    def has_unwritten_tables(self) -> bool:
        return bool(self._unwritten)

    @property
    def needs_write_back(self) -> bool:
        """Entries to write, a failed fdatasync whose writes must be written again, or clusters
        that discards freed to release."""
        return bool(self._unwritten or self._freed) or self._flush_failed is not None

    def _write_back(self) -> None:
        """QEMU's order, batched: one fdatasync makes every cluster appended so far durable, and
        only then are the L2 entries that point to them written (they become durable at the
        next fdatasync). So an entry on disk never points at data that may not be there, and an
        allocating write costs no flush of its own. Needs _alloc_lock.

        On a failure the entries not yet written stay in _unwritten and the next write-back
        writes them; the tables stay cached until then."""
        if self._write_unsynced_again() or self._unwritten:
            self._sync()
            with self._table_lock:
                for l2_offset, (lo, hi) in sorted(self._unwritten.items()):
                    table = self._l2_cache[l2_offset]
                    _pwrite_all(self.fd, table[lo:hi].tobytes(), l2_offset + lo * TABLE_ENTRY_SIZE)
                    del self._unwritten[l2_offset]
                    written_lo, written_hi = self._unsynced.spans.get(l2_offset, (hi, lo))
                    self._unsynced.spans[l2_offset] = (min(lo, written_lo), max(hi, written_hi))
        self._release_freed()

    def _release_freed(self) -> None:
        """Make the clusters that discards freed reusable, once the entries that dropped them are
        durable: until then a power cut could bring an old entry back, and a reused cluster
        would then be referenced twice. Needs _alloc_lock, and nothing of theirs unwritten."""
        if self._freed:
            self._sync()
            for offset in self._freed:
                heapq.heappush(self._free, offset)
            self._freed.clear()

    def _new_l2_table(self, l1_index: int, updates: dict[int, int]) -> None:
        """Append a new L2 table, whole on disk: its l2_entries are written, the rest of it is
        the zeros of a file extended past them (a table can be 1 GiB; see _load)."""
        table = array.array("Q", bytes(self.l2_entries * TABLE_ENTRY_SIZE))
        for index, entry in updates.items():
            table[index] = entry
        l2_offset = self.file_size
        self.file_size += self.table_bytes
        try:
            os.ftruncate(self.fd, l2_offset)  # what lay past the last cluster (nothing points there)
            _pwrite_all(self.fd, table.tobytes(), l2_offset)
            os.ftruncate(self.fd, self.file_size)
            self._sync()  # the table, and the data its entries point to, before the L1 entry
            with self._table_lock:
                self._write_l1_entry(l1_index, l2_offset)
        except BaseException:
            self.file_size = l2_offset  # nothing points at the table: the space is used again
            self._tail_unused = True
            raise
        with self._table_lock:
            self.l1[l1_index] = l2_offset
            self._l2_offsets.add(l2_offset)
            self._cache_table(l2_offset, table)

    # -- discard -------------------------------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        """Make a guest range read zeros at once, as a disk's discard (or write-zeroes) does, and
        give the space of its whole clusters back. Whole clusters become zero clusters (or
        unallocated, where no backing file could show through); their data clusters are punched
        out of the file and reused by later allocations. Partial clusters are written with zeros.
        A discard is a guest write: the stream never brings backing data back under it."""
        if not self.writable:
            raise ReadOnlyImageError(f"{self.path}: image is open read-only")
        cs = self.cluster_size
        end = min(offset + length, self.size)
        whole_start = -(-offset // cs) * cs
        whole_end = end if end == self.size else end - end % cs  # the image's last cluster may be partial
        if whole_start >= whole_end:
            self._zero_partial(offset, end)
            return
        self._zero_partial(offset, whole_start)
        for start in range(whole_start, whole_end, DISCARD_BATCH * cs):
            self._discard_clusters(start, min(whole_end, start + DISCARD_BATCH * cs))
        self._zero_partial(whole_end, end)

    def _zero_partial(self, start: int, end: int) -> None:
        """Zeros over part of a cluster, written only where the range does not read zeros already."""
        if start >= end:
            return
        if all(e.status is BlockStatus.ZERO or (e.status is BlockStatus.UNALLOCATED and self.backing is None)
               for e in self.iter_extents(start, end - start)):
            return
        self.write(start, bytes(end - start))

    def _discard_clusters(self, start: int, end: int) -> None:
        """Discard whole clusters [start, end): new entries in the cached tables (reads see them at
        once), the old data clusters punched and kept in _freed. Under _alloc_lock, so that no
        allocation (the stream's included) interleaves."""
        cs = self.cluster_size
        dropped = QED_UNALLOCATED if self.backing is None else QED_ZERO_CLUSTER
        with self._alloc_lock:
            entries: dict[int, int] = {}
            freed: list[int] = []
            for extent in self.iter_extents(start, end - start):
                first = extent.offset // cs
                clusters = range(first, -(-(extent.offset + extent.length) // cs))
                if extent.status is BlockStatus.FOUND:
                    freed += [extent.file_offset + (c - first) * cs for c in clusters]
                elif extent.status is BlockStatus.ZERO or self.backing is None:
                    continue
                entries.update(dict.fromkeys(clusters, dropped))
            if entries:
                self._set_l2_entries(entries)
            for run_start, run_length in _runs(freed, cs):
                punch_hole(self.fd, run_start, run_length)
            self._freed += freed

    # -- repairs (for the consistency check) ------------------------------------------------------

    def write_l1_entry(self, index: int, value: int) -> None:
        with self._alloc_lock, self._table_lock:
            _pwrite_all(self.fd, array.array("Q", [value]).tobytes(),
                        self.header.l1_table_offset + index * TABLE_ENTRY_SIZE)
            os.fdatasync(self.fd)
            self._l2_offsets.discard(self.l1[index])
            self._l2_cache.pop(self.l1[index], None)
            self.l1[index] = value

    def write_l2_entries(self, l2_offset: int, entries: dict[int, int]) -> None:
        with self._alloc_lock:
            self._update_l2_table(l2_offset, entries)
            self._write_back()
            os.fdatasync(self.fd)

    def copy_cluster(self, file_offset: int) -> int:
        """Append a copy of the data cluster at `file_offset`, durable before anything points to
        it; returns where the copy is (for a cluster referenced twice)."""
        with self._alloc_lock:
            data = _pread_exact(self.fd, file_offset, self.cluster_size)
            copy = self.file_size
            _pwrite_all(self.fd, data, copy)
            os.fdatasync(self.fd)
            self.file_size += self.cluster_size
            return copy

    def truncate_file(self, size: int) -> None:
        """Cut clusters nothing references off the end of the file."""
        with self._alloc_lock:
            os.ftruncate(self.fd, size)
            os.fdatasync(self.fd)
            self.file_size = size

    def mark_clean(self) -> None:
        """Clear QED_F_NEED_CHECK after a check found the image consistent."""
        with self._alloc_lock:
            self._write_back()
            if self.header.features & QED_F_NEED_CHECK:
                os.fdatasync(self.fd)
                self.header.features &= ~QED_F_NEED_CHECK
                self._write_header()
                os.fdatasync(self.fd)
            self._we_set_need_check = False

    # -- the backing file ------------------------------------------------------------------------

    def change_backing_file(self, name: str | None, raw: bool = False) -> None:
        """Point the header at a new backing file (None: no backing file), crash-safely.

        Everything written before is made durable first. The new name goes where the current
        one is not, and is durable before the header fields switch to it, so a crash leaves
        either the old backing file or the new one, never a torn name.
        """
        if not self.writable:
            raise ReadOnlyImageError(f"{self.path}: image is open read-only")
        with self._alloc_lock:
            saved = self.header.copy()
            try:
                self._change_backing_file(name, raw)
            except BaseException:
                self.header = saved  # what the disk holds, or will once written again
                raise
            self.backing_filename = name

    def _change_backing_file(self, name: str | None, raw: bool) -> None:
        """change_backing_file's steps. They change the header in memory as they go; on a
        failure the caller puts back the header the disk holds."""
        h = self.header
        self._write_back()
        self._sync()
        if name is None:
            h.features &= ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE)
            h.backing_filename_offset = h.backing_filename_size = 0
        else:
            encoded = name.encode("utf-8")
            start = self._free_name_offset(len(encoded))
            _pwrite_all(self.fd, encoded, start)
            self._sync()
            h.features |= QED_F_BACKING_FILE
            if raw:
                h.features |= QED_F_BACKING_FORMAT_NO_PROBE
            else:
                h.features &= ~QED_F_BACKING_FORMAT_NO_PROBE
            h.backing_filename_offset, h.backing_filename_size = start, len(encoded)
        self._write_header()
        self._sync()

    def _free_name_offset(self, size: int) -> int:
        """Where a new backing name of `size` bytes fits in the header clusters without
        overwriting the current one."""
        used_start = self.header.backing_filename_offset if self.backing_filename is not None else 0
        used_end = used_start + self.header.backing_filename_size if self.backing_filename is not None else 0
        for start in (QED_HEADER_SIZE, max(QED_HEADER_SIZE, used_end)):
            if (start + size <= used_start or start >= used_end) and start + size <= self.first_cluster:
                return start
        raise InvalidImageError(f"{self.path}: backing file name of {size} bytes does not fit in the header")

    # -- durability and closing ----------------------------------------------------------------

    def flush(self) -> None:
        """Make everything written so far durable (what fsync on the raw file asks for). Once a
        failed fdatasync has lost data that was not kept (see _sync), every flush fails with EIO:
        a later success would claim what is not on disk."""
        if self.writable:
            with self._alloc_lock:
                self._write_back()
                self._sync()
                if self._lost is not None:
                    raise OSError(errno.EIO, f"an earlier flush failed ({self._lost.strerror}): "
                                  "data written before it may be lost")

    def _cut_unused_tail(self) -> None:
        """Give back what failed appends left past the end that nothing points to."""
        if self._tail_unused and os.fstat(self.fd).st_size > self.file_size:
            os.ftruncate(self.fd, self.file_size)
            os.fdatasync(self.fd)

    def allocated_bytes(self) -> int:
        """Disk space the image file really uses (for st_blocks)."""
        return os.fstat(self.fd).st_blocks * 512

    def _trim_free_tail(self) -> None:
        """Cut the free clusters at the end of the file off, so that discards there leave no
        leaks behind (free clusters elsewhere stay leaks, punched, until the next mount reuses
        them)."""
        with self._alloc_lock:
            free = set(self._free)
            end = self.file_size
            while end - self.cluster_size in free:
                end -= self.cluster_size
            if end < self.file_size:
                os.ftruncate(self.fd, end)
                os.fdatasync(self.fd)
                self.file_size = end
                self._free = [offset for offset in self._free if offset < end]
                heapq.heapify(self._free)

    def close(self) -> None:
        """Flush, clear the NEED_CHECK flag we set, and release the file."""
        if self.fd < 0:
            return
        try:
            if self.writable:
                self.flush()
                self.clear_need_check()
                self._cut_unused_tail()
                self._trim_free_tail()
        except OSError as err:
            raise FusestreamError(f"{self.path}: not everything could be written at close: "
                                  f"{err.strerror or err}") from None
        finally:
            self.direct.close()
            os.close(self.fd)
            self.fd = -1


def create(
    path: str,
    size: int,
    backing_filename: str | None = None,
    backing_raw: bool = False,
    cluster_size: int = QED_DEFAULT_CLUSTER_SIZE,
    table_size: int = QED_DEFAULT_TABLE_SIZE,
    overwrite: bool = False,
) -> int:
    """Create an empty QED image laid out as qemu-img lays it out: header cluster, then L1.
    Returns the virtual size, rounded up to whole 512-byte sectors as qemu-img does."""
    size = -(-size // 512) * 512  # qemu-img rounds the virtual size up to whole sectors
    if table_size == 1:
        # Valid by the spec, but QEMU (7.2 at least) cannot open such images: its overflow check
        # on the table's last cluster rejects them. Images we create must open in QEMU.
        raise InvalidImageError(f"{path}: table_size 1 makes images that QEMU cannot open; use 2 or more")
    header = dict(
        cluster_size=cluster_size,
        table_size=table_size,
        header_size=1,
        features=0,
        compat_features=0,
        autoclear_features=0,
        l1_table_offset=cluster_size,
        image_size=size,
        backing_filename_offset=0,
        backing_filename_size=0,
    )
    name = backing_filename.encode("utf-8") if backing_filename else b""
    if backing_filename:
        header.update(
            features=QED_F_BACKING_FILE | (QED_F_BACKING_FORMAT_NO_PROBE if backing_raw else 0),
            backing_filename_offset=QED_HEADER_SIZE,
            backing_filename_size=len(name),
        )
    file_size = cluster_size * (1 + table_size)
    validate_header(path, types.SimpleNamespace(**header), file_size)  # before build: any int
    first_cluster = QED_HEADER.build(header) + name
    fd = _create_file(path, overwrite)
    try:
        lock_image(fd, path, writable=True)  # never truncate an image that is in use
        os.ftruncate(fd, 0)
        _pwrite_all(fd, first_cluster, 0)
        os.ftruncate(fd, file_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _create_file(path: str, overwrite: bool) -> int:
    """Open a new image file for writing; with `overwrite`, an existing one, if it is a regular
    file: O_NONBLOCK keeps a FIFO from hanging the open, and a device is refused."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | (0 if overwrite else os.O_EXCL)  # RDWR: read locks
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise InvalidImageError(f"{path}: already exists (use --force to overwrite it)") from None
    except OSError as err:
        if err.errno == errno.ENXIO:  # a FIFO that nobody reads, or a socket
            raise InvalidImageError(f"{path}: is a FIFO or socket, not a regular file") from None
        raise InvalidImageError(describe_os_error(path, err)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidImageError(f"{path}: is a device, FIFO or socket, not a regular file")
    return fd
