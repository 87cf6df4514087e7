"""QED images: the header and its rules, opening, and the image that composes the parts (QEMU's
qed.c): reads, guest writes, populate, discard, flush, the backing file's name, close.

The parts: qed_table.py (L1/L2 tables, the L2 cache, lookups, the file's cluster space),
qed_alloc.py (cluster allocation: allocating writes, populate, new tables, free clusters,
discard, and the write-back that makes them durable in QEMU's order), qed_sync.py (the
fdatasync, what it must write again after a failed one, and the header as the disk is to hold
it), qed_check.py (the consistency check). An image reads only what it holds: the chain
(chain.py) reads what it leaves UNALLOCATED from the layers below, and hands a top image's
writes what they need of those (`below`).

The image is thread-safe so that bulk I/O can run off the trio event loop. Two locks:

* ``tables.lock`` (QedTables.lock) guards the in-memory L1 table and the L2 cache; it is held
  for lookups, including the read of an L2 table that is not cached.
* ``_alloc_lock`` serialises allocating writes (QEMU does the same) and is held across their I/O,
  so a cluster is never allocated twice and the crash-safe order (see qed_alloc.py) is kept.
  Everything else that rewrites metadata (write-back, flush, header changes, repairs) holds it
  too.
"""

from __future__ import annotations

import errno
import logging
import threading
import types
from collections.abc import Iterator

from construct import ConstructError, Container

from ..errors import (
    CorruptionError,
    FusestreamError,
    ReadOnlyImageError,
    UnsupportedImageError,
)
from ..sources import ReadFor, Source, WritableSource, create_file, open_source
from .layer import BlockStatus, Location, Ranges, ReadBelow, closed_on_failure, fill_zeros, invalid_image
from .qed_alloc import DISCARD_BATCH, Allocator
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
    is_power_of_two,
    max_image_size,
)
from .qed_sync import SyncLog
from .qed_table import ClusterSpace, Extent, Geometry, QedTables

log = logging.getLogger(__name__)

FORMAT_NAME = "qed"
MAX_BACKING_NAME = 4095  # PATH_MAX less the NUL QEMU keeps
# The largest virtual size: QEMU's BDRV_MAX_LENGTH (INT64_MAX aligned down to 1 GiB), which its
# block layer enforces on every image it opens ("File too large"); it also keeps every offset
# in the kernel's signed 64-bit off_t, which FUSE's st_size and requests use.
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)
DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024
# Lookups one block_status answer merges at most (~1 ms of them): see QedImage.block_status.
BLOCK_STATUS_MAX_LOOKUPS = 1024


def validate_header(path: str, h, file_size: int) -> None:
    """Refuse a header that breaks any rule of QEMU's QED spec; every message names the field."""
    cs, ts = h.cluster_size, h.table_size
    if not (is_power_of_two(cs) and QED_MIN_CLUSTER_SIZE <= cs <= QED_MAX_CLUSTER_SIZE):
        raise invalid_image(path, f"invalid cluster_size {cs} (a power of two from 4 KiB to 64 MiB)")
    if not (is_power_of_two(ts) and QED_MIN_TABLE_SIZE <= ts <= QED_MAX_TABLE_SIZE):
        raise invalid_image(path, f"invalid table_size {ts} (a power of two from 1 to 16)")
    unknown = h.features & ~QED_FEATURE_MASK
    if unknown:
        raise UnsupportedImageError(f"{path}: unknown QED feature bits {unknown:#x}")
    header_bytes = h.header_size * cs
    if h.header_size < 1 or header_bytes > file_size:
        raise invalid_image(path, f"invalid header_size {h.header_size} clusters for a {file_size}-byte file")
    if h.image_size % 512:
        raise invalid_image(path, f"invalid image_size {h.image_size} (not a multiple of 512)")
    if h.image_size > max_image_size(cs, ts):
        raise invalid_image(path, f"invalid image_size {h.image_size} (more than the tables can address: "
                                  f"{max_image_size(cs, ts)} bytes)")
    if h.image_size > BDRV_MAX_LENGTH:
        raise invalid_image(path, f"invalid image_size {h.image_size} (more than QEMU's limit, "
                                  f"{BDRV_MAX_LENGTH} bytes)")
    table_bytes = cs * ts
    l1 = h.l1_table_offset
    if l1 % cs or l1 < header_bytes or l1 + table_bytes > file_size:
        raise invalid_image(path, f"invalid l1_table_offset {l1} (not cluster-aligned, in the header or past the end)")
    if h.features & QED_F_BACKING_FILE:
        start, size = h.backing_filename_offset, h.backing_filename_size
        if size == 0 or size > MAX_BACKING_NAME or start < QED_HEADER_SIZE or start + size > header_bytes:
            raise invalid_image(path, f"invalid backing file name at offset {start}, size {size} "
                                      "(not in the header clusters)")


class QedImage:
    """One open QED image, read through its source (which it owns, and closes on a failed open
    too). Writable when the source is a WritableSource opened writable: the top image."""

    format_name = FORMAT_NAME

    def __init__(self, source: Source, l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES, check_tables: bool = True):
        """Validate a QED image. With check_tables=False the L1 entries are not checked: only
        for the consistency check, which examines them itself."""
        self.source = source
        self.path = source.name
        self.writable = isinstance(source, WritableSource) and source.writable
        self._alloc_lock = threading.Lock()
        self._closed = False
        with closed_on_failure(source):
            self._load(l2_cache_bytes, check_tables)

    # -- opening -------------------------------------------------------------------------------

    def _load(self, l2_cache_bytes: int, check_tables: bool) -> None:
        file_size = self.source.size
        raw = self.source.read(0, QED_HEADER_SIZE)
        if len(raw) < QED_HEADER_SIZE or not raw.startswith(QED_MAGIC):
            if file_size == 0:
                raise invalid_image(self.path, "empty file")
            raise invalid_image(self.path, "truncated QED header" if raw.startswith(QED_MAGIC) else "not a QED image")
        try:
            header = QED_HEADER.parse(raw)
        except ConstructError as err:
            raise invalid_image(self.path, f"unreadable QED header ({err})") from None
        validate_header(self.path, header, file_size)
        self.geometry = g = Geometry.of(header)
        self.cluster_size, self.size = g.cluster_size, g.size
        self.log = SyncLog(self.source, g.cluster_size, g.size, header)
        self.backing_filename = self._read_backing_filename()
        self.space = ClusterSpace(file_size, g.cluster_size)
        self.tables = QedTables(self.source, g, self.space, self.log, self._alloc_lock, l2_cache_bytes)
        if check_tables:
            self.tables.check_l1()
        self.alloc = Allocator(self.source, g, self.tables, self.space, self.log, self._alloc_lock)
        if self.writable:
            self._clear_unknown_autoclear_bits()
        if self.header.features & QED_F_NEED_CHECK and self.writable and check_tables:
            log.warning("%s: QED_F_NEED_CHECK is set (not closed cleanly); it stays set until checked", self.path)

    def _read_backing_filename(self) -> str | None:
        h = self.header
        if not h.features & QED_F_BACKING_FILE:
            return None
        raw = self.source.read(h.backing_filename_offset, h.backing_filename_size)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid_image(self.path, "backing file name is not valid UTF-8") from None
        if "\0" in name:
            raise invalid_image(self.path, "backing file name contains a NUL byte")
        return name

    def _clear_unknown_autoclear_bits(self) -> None:
        if self.header.autoclear_features & ~QED_AUTOCLEAR_FEATURE_MASK:
            self.header.autoclear_features &= QED_AUTOCLEAR_FEATURE_MASK
            self._write_header()
            self.log.sync()

    @property
    def header(self) -> Container:
        """The QED header as the disk holds it, or is to hold it once written again (held by
        the SyncLog, which writes it)."""
        return self.log.header

    @property
    def backing_format_is_raw(self) -> bool:
        """QED_F_BACKING_FORMAT_NO_PROBE: the backing file is raw and must not be probed."""
        return bool(self.header.features & QED_F_BACKING_FORMAT_NO_PROBE)

    @property
    def backing_format(self) -> str | None:
        return "raw" if self.backing_format_is_raw else None

    @property
    def need_check_set_by_us(self) -> bool:
        return self.log.need_check_set_by_us

    @property
    def need_check_allocations(self) -> int:
        """Allocations that set or kept QED_F_NEED_CHECK so far (services.NeedCheckTimer)."""
        return self.log.need_check_allocations

    # -- lookups ---------------------------------------------------------------------------------

    def iter_extents(self, offset: int, length: int) -> Iterator[Extent]:
        """QedTables.iter_extents: runs of FOUND, ZERO and UNALLOCATED, looked up lazily."""
        return self.tables.iter_extents(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The runs of iter_extents as a list."""
        return list(self.tables.iter_extents(offset, length))

    def block_status(self, offset: int, length: int,
                     max_lookups: int = BLOCK_STATUS_MAX_LOOKUPS) -> tuple[BlockStatus, int]:
        """The status of the run at `offset` and how far (<= length) it goes, wherever its data
        lies in the file. It merges at most `max_lookups` lookups (L2 entries, or spans of an
        unallocated L1 entry): a shorter answer is still true, and a caller that walks on asks
        again where it ends. So one answer costs a bounded walk, however long the run, and a
        caller that needs only the start of a long run (a stream step that has planned enough)
        does not pay for the rest of it."""
        lookups = self.tables.lookups(offset, length)
        status, _, run, _ = next(lookups)
        for merged, (next_status, _, next_run, _) in enumerate(lookups, 1):
            if next_status is not status or merged >= max_lookups:
                break
            run += next_run
        return status, run

    def locate(self, offset: int, length: int, unit: int) -> list[Location]:
        """The extents of the range, FOUND ones at their place in the image file (`unit`: its
        holes are clusters already)."""
        fd = self.source.descriptor()
        return [Location(extent.offset, extent.length, extent.status, fd, extent.file_offset or 0)
                for extent in self.tables.iter_extents(offset, length)]

    # -- reads -----------------------------------------------------------------------------------

    def read_into(self, view: memoryview, offset: int, read_for: ReadFor = ReadFor.GUEST) -> Ranges:
        """Fill `view` where the image decides (Layer.read_into): data clusters read by the
        source straight into it, zero clusters as zeros; returns the UNALLOCATED ranges."""
        cluster, within = divmod(offset, self.cluster_size)
        if within + len(view) <= self.cluster_size:  # the common small read: one lookup, no extents
            with self.tables.lock:
                entry = self.tables.cluster_entry(cluster)
            if entry == QED_UNALLOCATED:
                return [(offset, len(view))]
            if entry == QED_ZERO_CLUSTER:
                fill_zeros(view)
            else:
                self._read_data_into(view, entry + within, read_for)
            return []
        unallocated = []
        for extent in self.tables.iter_extents(offset, len(view)):
            part = view[extent.offset - offset : extent.offset - offset + extent.length]
            if extent.status is BlockStatus.FOUND:
                self._read_data_into(part, extent.file_offset, read_for)
            elif extent.status is BlockStatus.ZERO:
                fill_zeros(part)
            else:
                unallocated.append((extent.offset, extent.length))
        return unallocated

    def prefetch(self, offset: int, length: int, read_for: ReadFor = ReadFor.GUEST) -> Ranges:
        unallocated = []
        for extent in self.tables.iter_extents(offset, length):
            if extent.status is BlockStatus.FOUND:
                self.source.prefetch(extent.file_offset, extent.length, read_for)
            elif extent.status is BlockStatus.UNALLOCATED:
                unallocated.append((extent.offset, extent.length))
        return unallocated

    def _read_data_into(self, view: memoryview, file_offset: int, read_for: ReadFor) -> None:
        filled = self.source.read_into(view, file_offset, read_for)
        if filled < len(view):
            raise CorruptionError(f"{self.path}: data cluster: unexpected end of file at {file_offset + filled}")

    # -- writes ----------------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyImageError(f"{self.path}: image is open read-only")

    def write(self, offset: int, data: bytes, wait: bool = True, *, below: ReadBelow | None) -> None:
        """Write guest data; clusters not yet allocated are allocated in QEMU's crash-safe order,
        filled from `below` (what lies below the top; None: nothing, zeros). With wait=False, an
        allocation that would have to wait for another one (or for a write-back's flush) raises
        BlockingIOError instead, having written nothing."""
        self._require_writable()
        extents = self.extents(offset, len(data))
        if all(e.status is BlockStatus.FOUND for e in extents):
            self._write_found(extents, offset, data)
            return
        if not wait and self._alloc_lock.locked():
            raise BlockingIOError(errno.EAGAIN, "an allocation is in progress")
        view = memoryview(data)
        # The new clusters' contents first, without the lock: reading what lies below is what
        # takes long, and several writers may do it at once.
        prepared = {(e.offset, e.length, e.status): self.alloc.cluster_contents(e, view[e.offset - offset :], below)
                    for e in extents if e.status is not BlockStatus.FOUND}
        if not self._alloc_lock.acquire(blocking=wait):
            raise BlockingIOError(errno.EAGAIN, "an allocation is in progress")
        try:
            # Look again: another writer (or the stream, or a discard) may have changed these
            # clusters meanwhile; what was prepared for an extent that is no longer the same is
            # prepared again.
            for extent in self.extents(offset, len(data)):
                part = view[extent.offset - offset : extent.offset - offset + extent.length]
                if extent.status is BlockStatus.FOUND:
                    self._write_in_place(part, extent.file_offset)
                else:
                    contents = prepared.get((extent.offset, extent.length, extent.status))
                    self.alloc.allocating_write(extent, part, below, contents)
        finally:
            self._alloc_lock.release()

    def _write_found(self, extents: list[Extent], offset: int, data: bytes) -> None:
        view = memoryview(data)
        for extent in extents:
            start = extent.offset - offset
            self._write_in_place(view[start : start + extent.length], extent.file_offset)

    def _write_in_place(self, data: memoryview, file_offset: int) -> None:
        self.log.write(file_offset, data, data, -1)

    def populate(self, copies: list[tuple[int, bytes | memoryview]], zero_clusters: bool, *,
                 below: ReadBelow | None) -> int:
        """Copy data that the caller read from what lies below the top (`below` reads it), as
        (offset, data) copies, into the clusters they cover that are still unallocated; returns
        the bytes allocated. All copies go in with one append; the L2 entries wait for the next
        write-back.

        Clusters the guest has written meanwhile are left alone: guest writes win. Each offset must
        be cluster-aligned and each copy cover whole clusters (or run to the end of the image):
        anything else is refused with ValueError, since the rest of a cluster cut short is not
        known and must never become zeros. An all-zero cluster becomes a zero cluster when
        `zero_clusters`, else stays unallocated.
        """
        self._require_writable()
        return self.alloc.populate(copies, zero_clusters, below)

    def discard(self, offset: int, length: int, *, below: ReadBelow | None) -> None:
        """Make a guest range read zeros at once, as a disk's discard (or write-zeroes) does, and
        give the space of its whole clusters back. Whole clusters become zero clusters (or
        unallocated, where nothing lies below to show through: `below` is None); their data
        clusters are punched out of the file and reused by later allocations. Partial clusters
        are written with zeros. A discard is a guest write: the stream never brings backing data
        back under it."""
        self._require_writable()
        cs = self.cluster_size
        end = min(offset + length, self.size)
        whole_start = -(-offset // cs) * cs
        whole_end = end if end == self.size else end - end % cs  # the image's last cluster may be partial
        if whole_start >= whole_end:
            self._zero_partial(offset, end, below)
            return
        self._zero_partial(offset, whole_start, below)
        for start in range(whole_start, whole_end, DISCARD_BATCH * cs):
            self.alloc.discard_clusters(start, min(whole_end, start + DISCARD_BATCH * cs), below)
        self._zero_partial(whole_end, end, below)

    def _zero_partial(self, start: int, end: int, below: ReadBelow | None) -> None:
        """Zeros over part of a cluster, written only where the range does not read zeros already."""
        if start >= end:
            return
        if all(e.status is BlockStatus.ZERO or (e.status is BlockStatus.UNALLOCATED and below is None)
               for e in self.tables.iter_extents(start, end - start)):
            return
        self.write(start, bytes(end - start), below=below)

    # -- the header --------------------------------------------------------------------------------

    def _write_header(self) -> None:
        """The header fields as they are in memory, rewritten in place (SyncLog.write_header)."""
        self.log.write_header()

    def clear_need_check(self) -> None:
        """Make everything durable, then clear the QED_F_NEED_CHECK flag we set (QEMU does this
        a few seconds after the last allocating write, and on close)."""
        with self._alloc_lock:
            if not self.log.need_check_set_by_us:
                return
            self.alloc.write_back()
            self.log.sync()
            self.header.features &= ~QED_F_NEED_CHECK
            try:
                self._write_header()
                self.log.sync()
            except BaseException:
                self.header.features |= QED_F_NEED_CHECK
                raise
            self.log.need_check_set_by_us = False

    def mark_clean(self) -> None:
        """Clear QED_F_NEED_CHECK after a check found the image consistent."""
        with self._alloc_lock:
            self.alloc.write_back()
            if self.header.features & QED_F_NEED_CHECK:
                self.source.sync()
                self.header.features &= ~QED_F_NEED_CHECK
                self._write_header()
                self.source.sync()
            self.log.need_check_set_by_us = False

    def change_backing_file(self, name: str | None, raw: bool = False) -> None:
        """Point the header at a new backing file (None: no backing file), crash-safely.

        Everything written before is made durable first. The new name goes where the current
        one is not, and is durable before the header fields switch to it, so a crash leaves
        either the old backing file or the new one, never a torn name.
        """
        self._require_writable()
        with self._alloc_lock:
            saved = self.header.copy()
            try:
                self._change_backing_file(name, raw)
            except BaseException:
                self.log.header = saved  # what the disk holds, or will once written again
                raise
            self.backing_filename = name

    def _change_backing_file(self, name: str | None, raw: bool) -> None:
        """change_backing_file's steps. They change the header in memory as they go; on a
        failure the caller puts back the header the disk holds."""
        h = self.header
        self.alloc.write_back()
        self.log.sync()
        if name is None:
            h.features &= ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE)
            h.backing_filename_offset = h.backing_filename_size = 0
        else:
            encoded = name.encode("utf-8")
            start = self._free_name_offset(len(encoded))
            self.source.write(start, encoded)
            self.log.sync()
            h.features |= QED_F_BACKING_FILE
            if raw:
                h.features |= QED_F_BACKING_FORMAT_NO_PROBE
            else:
                h.features &= ~QED_F_BACKING_FORMAT_NO_PROBE
            h.backing_filename_offset, h.backing_filename_size = start, len(encoded)
        self._write_header()
        self.log.sync()

    def _free_name_offset(self, size: int) -> int:
        """Where a new backing name of `size` bytes fits in the header clusters without
        overwriting the current one."""
        used_start = self.header.backing_filename_offset if self.backing_filename is not None else 0
        used_end = used_start + self.header.backing_filename_size if self.backing_filename is not None else 0
        for start in (QED_HEADER_SIZE, max(QED_HEADER_SIZE, used_end)):
            if (start + size <= used_start or start >= used_end) and start + size <= self.geometry.first_cluster:
                return start
        raise invalid_image(self.path, f"backing file name of {size} bytes does not fit in the header")

    # -- write-back, durability and closing ----------------------------------------------------------

    def write_back(self) -> None:
        """Write the L2 entries that allocations changed since the last write-back."""
        with self._alloc_lock:
            self.alloc.write_back()

    @property
    def has_unwritten_tables(self) -> bool:
        return self.tables.has_unwritten

    @property
    def needs_write_back(self) -> bool:
        """Entries to write, a failed fdatasync whose writes must be written again, or clusters
        that discards freed to release."""
        return self.tables.has_unwritten or bool(self.space.freed) or self.log.flush_failed is not None

    def flush(self) -> None:
        """Make everything written so far durable (what fsync on the raw file asks for). Once a
        failed fdatasync has lost data that was not kept (see qed_sync), every flush fails with
        EIO: a later success would claim what is not on disk."""
        if self.writable:
            with self._alloc_lock:
                self.alloc.write_back()
                self.log.sync()
                if self.log.lost is not None:
                    raise OSError(errno.EIO, f"an earlier flush failed ({self.log.lost.strerror}): "
                                  "data written before it may be lost")

    def allocated_bytes(self) -> int:
        """Disk space the image file really uses (for st_blocks)."""
        return self.source.allocated_bytes()

    def close(self) -> None:
        """Flush, clear the NEED_CHECK flag we set, and release the file."""
        if self._closed:
            return
        try:
            if self.writable:
                self.flush()
                self.clear_need_check()
                self.alloc.cut_unused_tail()
                self.alloc.trim_free_tail()
        except OSError as err:
            raise FusestreamError(f"{self.path}: not everything could be written at close: "
                                  f"{err.strerror or err}") from None
        finally:
            self._closed = True
            self.source.close()


def open_image(path: str, writable: bool = False, lock: bool = True, **options) -> QedImage:
    """Open the QED image at `path` (read-only: a local path or a URL; writable: a local file),
    with QedImage's `options`."""
    return QedImage(open_source(path, writable=writable, lock=lock), **options)


# -- what the chain and `fusestream info` use of a format module (see chain.FORMAT_MODULES) -------


def probe(head: bytes) -> bool:
    """Whether an image's first bytes are a QED image's."""
    return head.startswith(QED_MAGIC)


def from_source(source: Source) -> QedImage:
    """A QED layer read through `source`, which it then owns."""
    return QedImage(source)


def info(image: QedImage) -> dict[str, object]:
    """What `fusestream info` shows of a QED image beyond what every layer shows (qemu-img info's
    JSON keys where it has them)."""
    return {"cluster-size": image.cluster_size, "table-size": image.header.table_size,
            "need-check": bool(image.header.features & QED_F_NEED_CHECK)}


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
        raise invalid_image(path, "table_size 1 makes images that QEMU cannot open; use 2 or more")
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
    file = create_file(path, overwrite)  # locked: never truncate an image that is in use
    try:
        file.truncate(0)
        file.write(0, first_cluster)
        file.truncate(file_size)
        file.sync()
    finally:
        file.close()
    return size
