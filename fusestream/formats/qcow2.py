"""qcow2 images as read-only backing layers: open and validate, look up clusters, read what
they hold.

Only what reading needs: the active L1 table and its L2 tables (internal snapshots, bitmaps and
refcounts are never read, so the dirty bit and lazy refcounts do no harm). What cannot be read
safely is refused at open with one line naming the feature.

The image is read from worker threads (as QedImage is, see formats/qed.py). The L1 table never
changes after open; ``_table_lock`` guards the L2 cache (held for a lookup, including the read of
an L2 table that is not cached); ``_cluster_lock`` guards the cache of inflated compressed
clusters, and is not held while a cluster inflates, so that several inflate in parallel (isal
and zstandard release the GIL).
"""

from __future__ import annotations

import array
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import sys
import threading
from collections.abc import Iterator

import zstandard
from construct import ConstructError
from isal import isal_zlib  # ISA-L's inflate: twice zlib's speed on 64 KiB clusters

from .. import ioprio
from ..errors import CorruptionError, UnsupportedImageError
from ..sources import ReadFor, Source
from .layer import BlockStatus, Location, Ranges, closed_on_failure, fill_zeros, invalid_image
from .qcow2_structs import (
    COMPRESSION_TYPE_NAMES,
    CRYPT_METHOD_NAMES,
    L1E_OFFSET_MASK,
    L2_ENTRY_SIZE,
    L2_EXTENDED_ENTRY_SIZE,
    L2E_OFFSET_MASK,
    MAX_BACKING_FILE_SIZE,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    MIN_EXTENDED_L2_CLUSTER_BITS,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_COMPRESSION_TYPE,
    QCOW2_COMPRESSION_TYPE_ZLIB,
    QCOW2_COMPRESSION_TYPE_ZSTD,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_DATA_FILE,
    QCOW2_EXT_MAGIC_END,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_EXTENSION_ALIGN,
    QCOW2_EXTENSION_HEADER,
    QCOW2_FEAT_TYPE_INCOMPATIBLE,
    QCOW2_FEATURE_NAME,
    QCOW2_FEATURE_NAME_SIZE,
    QCOW2_HEADER_V2,
    QCOW2_HEADER_V3,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_DIRTY,
    QCOW2_INCOMPAT_EXTL2,
    QCOW2_INCOMPAT_MASK,
    QCOW2_V2_HEADER_LENGTH,
    QCOW2_V3_HEADER_LENGTH,
    QCOW2_VERSIONS,
    QCOW_CRYPT_NONE,
    QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER,
    QCOW_MAGIC,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE,
    QCOW_MAX_SNAPSHOTS,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_SUB_ZERO_SHIFT,
    QCOW_OFLAG_ZERO,
    compressed_descriptor,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "qcow2"
DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024
DEFAULT_CLUSTER_CACHE_BYTES = 8 * 1024 * 1024  # 128 inflated 64 KiB clusters: see docs/qcow2-format.md
# A read that needs at least this many clusters inflated inflates them on a thread pool.
PARALLEL_INFLATE_MIN = 2

if sys.byteorder != "little":  # tables are big-endian on disk, byteswapped once when read
    raise ImportError("fusestream's qcow2 tables assume a little-endian host")

# What one lookup finds: FOUND (a normal cluster's data at a file offset), ZERO, UNALLOCATED, or
# COMPRESSED (FOUND for block status: a compressed cluster is data).
COMPRESSED = "compressed"


@dataclasses.dataclass(frozen=True)
class Compressed:
    """Where a compressed cluster lies in the file: its descriptor's offset and byte count."""

    coffset: int
    csize: int


def _refuse(path: str, feature: str) -> UnsupportedImageError:
    return UnsupportedImageError(f"{path}: qcow2 {feature} is not supported")


class Qcow2Image:
    """One qcow2 image, read-only, read through its source (which it owns, and closes on a
    failed open too). It names its backing file (``backing_filename``, in ``backing_format``,
    or probed if None); the chain opens that one."""

    format_name = FORMAT_NAME

    def __init__(
        self,
        source: Source,
        l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
        cluster_cache_bytes: int = DEFAULT_CLUSTER_CACHE_BYTES,
    ):
        self.source = source
        self.path = source.name
        with closed_on_failure(source):
            self._load()
        self._table_lock = threading.Lock()
        self._l2_cache: collections.OrderedDict[int, array.array] = collections.OrderedDict()
        self._l2_cache_max = max(1, l2_cache_bytes // self.cluster_size)
        self._cluster_lock = threading.Lock()
        self._clusters: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._clusters_max = max(1, cluster_cache_bytes // self.cluster_size)
        self.inflations = 0  # compressed clusters inflated so far (the cache's misses)

    # -- opening -------------------------------------------------------------------------------

    def _load(self) -> None:
        self.file_size = self.source.size
        head = self.source.read(0, QCOW2_V3_HEADER_LENGTH + 8)
        if not head.startswith(QCOW_MAGIC):
            raise invalid_image(self.path, "empty file" if not head else "not a qcow2 image")
        if len(head) < QCOW2_V2_HEADER_LENGTH:
            raise invalid_image(self.path, "truncated qcow2 header")
        try:
            self.header = QCOW2_HEADER_V2.parse(head)
        except ConstructError as err:
            raise invalid_image(self.path, f"unreadable qcow2 header ({err})") from None
        h = self.header
        if h.version not in QCOW2_VERSIONS:
            raise _refuse(self.path, f"version {h.version}")
        if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
            raise invalid_image(self.path, f"invalid cluster_bits {h.cluster_bits} (from 9 to 21: 512 B to 2 MiB)")
        self.cluster_bits = h.cluster_bits
        self.cluster_size = 1 << h.cluster_bits
        self._load_v3_fields(head)
        header_cluster = self.source.read(0, self.cluster_size)
        self._check_crypt_and_features()
        self.backing_format, data_file = self._read_extensions(header_cluster)
        if data_file is not None:
            raise _refuse(self.path, f"external data file ({data_file!r})")
        self.backing_filename = self._read_backing_filename(header_cluster)
        self._check_geometry()
        self._metadata_regions = (
            (0, self.cluster_size, "header"),
            (h.l1_table_offset, h.l1_table_offset + h.l1_size * 8, "L1 table"),
            (h.refcount_table_offset, h.refcount_table_offset + h.refcount_table_clusters * self.cluster_size,
             "refcount table"),
        )
        self.l1 = self._read_l1()
        self._l2_offsets = frozenset(o for o in self.l1 if o)
        self._check_l1()

    def _load_v3_fields(self, head: bytes) -> None:
        """The version 3 fields, with their version 2 meanings for a version 2 image."""
        h = self.header
        if h.version == 2:
            h.update(dict(incompatible_features=0, compatible_features=0, autoclear_features=0, refcount_order=4,
                          header_length=QCOW2_V2_HEADER_LENGTH, compression_type=QCOW2_COMPRESSION_TYPE_ZLIB))
            return
        if len(head) < QCOW2_V3_HEADER_LENGTH:
            raise invalid_image(self.path, "truncated qcow2 version 3 header")
        h.update(QCOW2_HEADER_V3.parse(head[QCOW2_V2_HEADER_LENGTH:]))
        if (h.header_length < QCOW2_V3_HEADER_LENGTH or h.header_length % 8
                or h.header_length > min(self.cluster_size, self.file_size)):
            raise invalid_image(self.path, f"invalid header_length {h.header_length} (a multiple of 8 from 104 to "
                                           "the cluster size, inside the file)")
        if h.refcount_order > 6:
            raise invalid_image(self.path, f"invalid refcount_order {h.refcount_order} (at most 6)")
        h.compression_type = QCOW2_COMPRESSION_TYPE_ZLIB
        if h.header_length > QCOW2_V3_HEADER_LENGTH:
            h.update(QCOW2_COMPRESSION_TYPE.parse(head[QCOW2_V3_HEADER_LENGTH:]))

    def _check_crypt_and_features(self) -> None:
        h = self.header
        if h.crypt_method != QCOW_CRYPT_NONE:
            name = CRYPT_METHOD_NAMES.get(h.crypt_method, f"method {h.crypt_method}")
            raise _refuse(self.path, f"encryption ({name})")
        if h.incompatible_features & QCOW2_INCOMPAT_CORRUPT:
            raise _refuse(self.path, "image with the corrupt bit set (QEMU found it corrupt; "
                                     "'qemu-img check -r all' repairs it)")
        if h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
            raise _refuse(self.path, "external data file")
        if h.compression_type not in COMPRESSION_TYPE_NAMES:
            raise _refuse(self.path, f"compression type {h.compression_type}")
        if bool(h.incompatible_features & QCOW2_INCOMPAT_COMPRESSION) != (
                h.compression_type != QCOW2_COMPRESSION_TYPE_ZLIB):
            raise invalid_image(self.path, "the compression type feature bit disagrees with compression_type "
                                           f"{h.compression_type}")
        self.extended_l2 = bool(h.incompatible_features & QCOW2_INCOMPAT_EXTL2)
        if self.extended_l2 and self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
            raise invalid_image(self.path, f"extended L2 entries with {self.cluster_size}-byte clusters "
                                           "(16 KiB at least)")

    def _read_extensions(self, header_cluster: bytes) -> tuple[str | None, str | None]:
        """(backing format, external data file name) from the header extensions; unknown ones
        are skipped. An image with unknown incompatible bits is refused here, the bits named
        from the feature name table when it names them."""
        backing_format = data_file = None
        names: dict[int, str] = {}
        at = self.header.header_length
        while at + QCOW2_EXTENSION_HEADER.sizeof() <= len(header_cluster):
            ext = QCOW2_EXTENSION_HEADER.parse(header_cluster[at:])
            if ext.magic == QCOW2_EXT_MAGIC_END:
                break
            data_start = at + QCOW2_EXTENSION_HEADER.sizeof()
            if data_start + ext.len > len(header_cluster):
                raise invalid_image(self.path, f"header extension {ext.magic:#x} of {ext.len} bytes "
                                               "runs past the header cluster")
            data = header_cluster[data_start : data_start + ext.len]
            if ext.magic == QCOW2_EXT_MAGIC_BACKING_FORMAT:
                backing_format = self._decode(data, "backing format")
            elif ext.magic == QCOW2_EXT_MAGIC_DATA_FILE:
                data_file = self._decode(data, "external data file name")
            elif ext.magic == QCOW2_EXT_MAGIC_FEATURE_TABLE:
                names = self._feature_names(data)
            at = data_start + -(-ext.len // QCOW2_EXTENSION_ALIGN) * QCOW2_EXTENSION_ALIGN
        unknown = self.header.incompatible_features & ~QCOW2_INCOMPAT_MASK
        if unknown:
            bits = [bit for bit in range(64) if unknown >> bit & 1]
            named = ", ".join(f"bit {bit}" + (f" ({names[bit]})" if bit in names else "") for bit in bits)
            raise _refuse(self.path, f"incompatible feature {named}")
        return backing_format, data_file

    @staticmethod
    def _feature_names(data: bytes) -> dict[int, str]:
        names = {}
        for at in range(0, len(data) - QCOW2_FEATURE_NAME_SIZE + 1, QCOW2_FEATURE_NAME_SIZE):
            try:
                entry = QCOW2_FEATURE_NAME.parse(data[at:])
            except (ConstructError, UnicodeDecodeError):
                continue  # an unreadable name only makes the message less helpful
            if entry.type == QCOW2_FEAT_TYPE_INCOMPATIBLE and entry.name.isprintable():
                names[entry.bit] = entry.name
        return names

    def _decode(self, raw: bytes, what: str) -> str:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid_image(self.path, f"{what} is not valid UTF-8") from None
        if not text.isprintable():  # a NUL, or a newline that would break the one-line messages naming it
            raise invalid_image(self.path, f"{what} contains control characters")
        return text

    def _read_backing_filename(self, header_cluster: bytes) -> str | None:
        h = self.header
        if h.backing_file_offset == 0 or h.backing_file_size == 0:
            return None
        start, size = h.backing_file_offset, h.backing_file_size
        if size > MAX_BACKING_FILE_SIZE or start + size > len(header_cluster) or start + size > self.cluster_size:
            raise invalid_image(self.path, f"invalid backing file name at offset {start}, size {size} "
                                           "(not in the header cluster)")
        return self._decode(header_cluster[start : start + size], "backing file name")

    def _check_geometry(self) -> None:
        """The rules for the virtual size and the tables the header places."""
        h, cs = self.header, self.cluster_size
        self.l2_entry_size = L2_EXTENDED_ENTRY_SIZE if self.extended_l2 else L2_ENTRY_SIZE
        self.l2_entries = cs // self.l2_entry_size
        self.subcluster_size = cs // QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else cs
        self.size = h.size
        span = cs * self.l2_entries  # guest bytes behind one L2 table
        if h.size >= 1 << 63:
            raise invalid_image(self.path, f"invalid size {h.size}")
        if h.l1_size * 8 > QCOW_MAX_L1_SIZE or h.l1_size < -(-h.size // span):
            raise invalid_image(self.path, f"invalid l1_size {h.l1_size} for a virtual size of {h.size} bytes")
        if h.l1_table_offset % cs or (h.l1_size and h.l1_table_offset < cs) or (
                h.l1_table_offset + h.l1_size * 8 > self.file_size):
            raise invalid_image(self.path, f"invalid l1_table_offset {h.l1_table_offset} "
                                           "(not cluster-aligned, in the header or past the end)")
        reftable_bytes = h.refcount_table_clusters * cs
        if h.refcount_table_offset % cs or reftable_bytes > QCOW_MAX_REFTABLE_SIZE:
            raise invalid_image(self.path, f"invalid refcount table at {h.refcount_table_offset}, "
                                           f"{h.refcount_table_clusters} clusters")
        if h.nb_snapshots > QCOW_MAX_SNAPSHOTS or (h.nb_snapshots and h.snapshots_offset % cs):
            raise invalid_image(self.path, f"invalid snapshot table: {h.nb_snapshots} snapshots at "
                                           f"{h.snapshots_offset}")

    def _read_l1(self) -> array.array:
        l1 = array.array("Q")
        l1.frombytes(self.source.read(self.header.l1_table_offset, self.header.l1_size * 8))
        l1.byteswap()
        for index, entry in enumerate(l1):
            l1[index] = entry & L1E_OFFSET_MASK
        return l1

    def _check_l1(self) -> None:
        """Every L1 entry must name a whole L2 table inside the file, clear of the header, the
        L1 table and the refcount table."""
        for index, offset in enumerate(self.l1):
            if not offset:
                continue
            problem = None
            if offset % self.cluster_size:
                problem = "is not cluster-aligned"
            elif offset + self.cluster_size > self.file_size:
                problem = "lies beyond the end of the file"
            else:
                problem = self._metadata_overlap(offset, self.cluster_size, l2_tables=False)
            if problem:
                raise invalid_image(self.path, f"L1 entry {index}: L2 table offset {offset} {problem}")

    def _metadata_overlap(self, start: int, length: int, l2_tables: bool = True) -> str | None:
        """Which metadata [start, start+length) of the file overlaps, if any. On every lookup's
        path: the regions are worked out once (_metadata_regions)."""
        end = start + length
        for region_start, region_end, name in self._metadata_regions:
            if start < region_end and region_start < end:
                return f"lies in the {name}"
        if l2_tables:
            cs = self.cluster_size
            if start % cs == 0 and length == cs:  # a data cluster: only a table at its very offset
                return "lies in an L2 table" if start in self._l2_offsets else None
            if any(c * cs in self._l2_offsets for c in range(start // cs, (end - 1) // cs + 1)):
                return "lies in an L2 table"
        return None

    @property
    def backing_format_is_raw(self) -> bool:
        return self.backing_format == "raw"

    @property
    def compression_type(self) -> str:
        return COMPRESSION_TYPE_NAMES[self.header.compression_type]

    @property
    def compat(self) -> str:
        """qemu-img's name for the version: 0.10 or 1.1."""
        return "0.10" if self.header.version == 2 else "1.1"

    @property
    def dirty(self) -> bool:
        return bool(self.header.incompatible_features & QCOW2_INCOMPAT_DIRTY)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.header.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS)

    # -- lookups -------------------------------------------------------------------------------

    def _l2_table(self, offset: int) -> array.array:
        """An L2 table by its file offset, cached; needs _table_lock."""
        table = self._l2_cache.get(offset)
        if table is not None:
            self._l2_cache.move_to_end(offset)
            return table
        table = array.array("Q")
        table.frombytes(self.source.read(offset, self.cluster_size))
        if len(table) * 8 < self.cluster_size:
            raise CorruptionError(f"{self.path}: L2 table at {offset}: unexpected end of file")
        table.byteswap()
        self._l2_cache[offset] = table
        if len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)
        return table

    def _l2_entry(self, cluster: int) -> tuple[int, int, int] | None:
        """(L2 table offset, entry, subcluster bitmap) of a guest cluster; None where the L1
        entry is unallocated."""
        l1_index, l2_index = divmod(cluster, self.l2_entries)
        l2_offset = self.l1[l1_index]
        if not l2_offset:
            return None
        with self._table_lock:
            table = self._l2_table(l2_offset)
        if self.extended_l2:
            return l2_offset, table[2 * l2_index], table[2 * l2_index + 1]
        return l2_offset, table[l2_index], 0

    def _lookups(self, offset: int, length: int) -> Iterator[tuple[object, int, int, int | Compressed | None]]:
        """(status or COMPRESSED, guest offset, length, where) of [offset, offset+length): a
        subcluster (or cluster) at a time, or an L2 table's whole span where the L1 entry is
        unallocated. `where`: the file offset of FOUND data, the Compressed cluster, else None."""
        cs = self.cluster_size
        span = cs * self.l2_entries
        end = offset + length
        pos = offset
        while pos < end:
            cluster, within = divmod(pos, cs)
            found = self._l2_entry(cluster)
            if found is None:
                run = min(end, (pos // span + 1) * span) - pos
                yield BlockStatus.UNALLOCATED, pos, run, None
                pos += run
                continue
            l2_offset, entry, bitmap = found
            if entry & QCOW_OFLAG_COMPRESSED:
                run = min(cs - within, end - pos)
                yield COMPRESSED, pos, run, self._compressed(l2_offset, cluster, entry)
            elif self.extended_l2:
                run = min(self.subcluster_size - within % self.subcluster_size, end - pos)
                status, host = self._subcluster(l2_offset, cluster, entry, bitmap, within)
                yield status, pos, run, host
            else:
                run = min(cs - within, end - pos)
                status, host = self._standard(l2_offset, cluster, entry)
                yield status, pos, run, None if host is None else host + within
            pos += run

    def _standard(self, l2_offset: int, cluster: int, entry: int) -> tuple[BlockStatus, int | None]:
        """A standard L2 entry's meaning, as QEMU reads it (the zero flag whatever the version)."""
        if entry & QCOW_OFLAG_ZERO:
            return BlockStatus.ZERO, None
        host = entry & L2E_OFFSET_MASK
        if not host:
            return BlockStatus.UNALLOCATED, None
        self._check_host_cluster(l2_offset, cluster, host)
        return BlockStatus.FOUND, host

    def _subcluster(self, l2_offset: int, cluster: int, entry: int, bitmap: int, within: int
                    ) -> tuple[BlockStatus, int | None]:
        """An extended L2 entry's meaning for the subcluster holding byte `within` of the cluster."""
        index = within // self.subcluster_size
        allocated = bitmap >> index & 1
        zero = bitmap >> (QCOW_OFLAG_SUB_ZERO_SHIFT + index) & 1
        host = entry & L2E_OFFSET_MASK
        if allocated and (zero or not host):
            raise self._corrupt(l2_offset, cluster, f"subcluster {index} has an impossible bitmap {bitmap:#x}")
        if zero:
            return BlockStatus.ZERO, None
        if not allocated:
            return BlockStatus.UNALLOCATED, None
        self._check_host_cluster(l2_offset, cluster, host)
        return BlockStatus.FOUND, host + within

    def _check_host_cluster(self, l2_offset: int, cluster: int, host: int) -> None:
        """No guest read may touch metadata or start outside the file (past its end, a cluster
        reads as zeros, as QEMU reads it)."""
        if host % self.cluster_size:
            raise self._corrupt(l2_offset, cluster, f"data cluster offset {host} is not cluster-aligned")
        if host >= self.file_size:
            raise self._corrupt(l2_offset, cluster, f"data cluster offset {host} lies beyond the end of the file")
        problem = self._metadata_overlap(host, self.cluster_size)
        if problem:
            raise self._corrupt(l2_offset, cluster, f"data cluster offset {host} {problem}")

    def _compressed(self, l2_offset: int, cluster: int, entry: int) -> Compressed:
        coffset, csize = compressed_descriptor(entry, self.cluster_bits)
        if coffset >= self.file_size:
            raise self._corrupt(l2_offset, cluster, f"compressed cluster at {coffset} lies beyond the end of the file")
        csize = min(csize, self.file_size - coffset)  # its last sector may run past the end
        problem = self._metadata_overlap(coffset, csize)
        if problem:
            raise self._corrupt(l2_offset, cluster, f"compressed cluster at {coffset} {problem}")
        return Compressed(coffset, csize)

    def _corrupt(self, l2_offset: int, cluster: int, problem: str) -> CorruptionError:
        return CorruptionError(f"{self.path}: L2 table at {l2_offset}, cluster {cluster}: {problem}")

    def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        """As `qemu-img map` reports this layer: compressed clusters are data."""
        status = None
        total = 0
        for kind, _, run, _where in self._lookups(offset, length):
            kind = BlockStatus.FOUND if kind == COMPRESSED else kind
            if status is not None and kind is not status:
                break
            status = kind
            total += run
        return status, total

    def locate(self, offset: int, length: int, unit: int) -> list[Location]:
        """Normal clusters at their place in the file; compressed ones only read_into inflates
        (`unit`: its holes are clusters already)."""
        fd = self.source.descriptor()
        return [Location(pos, run, BlockStatus.FOUND, None) if kind == COMPRESSED else
                Location(pos, run, kind, fd if kind is BlockStatus.FOUND else None, where or 0)
                for kind, pos, run, where in self._merged_lookups(offset, length)]

    # -- reads ---------------------------------------------------------------------------------

    def read_into(self, view: memoryview, offset: int, read_for: ReadFor = ReadFor.GUEST) -> Ranges:
        """Fill `view` where the image decides; returns the UNALLOCATED ranges. Compressed
        clusters come inflated from the cache, those not in it inflated in parallel first."""
        lookups = list(self._merged_lookups(offset, len(view)))
        clusters = self._inflate_all([where for kind, _, _, where in lookups if kind == COMPRESSED], read_for)
        unallocated = []
        for kind, pos, run, where in lookups:
            part = view[pos - offset : pos - offset + run]
            if kind is BlockStatus.FOUND:
                self._read_data_into(part, where, read_for)
            elif kind == COMPRESSED:
                within = pos % self.cluster_size
                part[:] = memoryview(clusters[where.coffset])[within : within + run]
            elif kind is BlockStatus.ZERO:
                fill_zeros(part)
            else:
                unallocated.append((pos, run))
        return unallocated

    def _merged_lookups(self, offset: int, length: int) -> Iterator[tuple[object, int, int, int | Compressed | None]]:
        """_lookups with neighbours merged where one read serves them: data contiguous in the
        file, zeros, unallocated runs (compressed clusters stay one lookup each)."""
        current = None
        for kind, pos, run, where in self._lookups(offset, length):
            if current and current[0] is kind and kind != COMPRESSED and (
                    where is None or current[3] + current[2] == where):
                current[2] += run
                continue
            if current:
                yield tuple(current)
            current = [kind, pos, run, where]
        if current:
            yield tuple(current)

    def _read_data_into(self, view: memoryview, file_offset: int, read_for: ReadFor) -> None:
        """Read a normal cluster's data; what lies past the end of the file (as it was at open)
        reads as zeros, and is never asked for."""
        inside = max(0, min(len(view), self.file_size - file_offset))
        filled = self.source.read_into(view[:inside], file_offset, read_for)
        fill_zeros(view[filled:])

    def prefetch(self, offset: int, length: int, read_for: ReadFor = ReadFor.GUEST) -> Ranges:
        unallocated = []
        for kind, pos, run, where in self._merged_lookups(offset, length):
            if kind is BlockStatus.FOUND:
                self.source.prefetch(where, run, read_for)
            elif kind == COMPRESSED:
                self.source.prefetch(where.coffset, where.csize, read_for)
            elif kind is BlockStatus.UNALLOCATED:
                unallocated.append((pos, run))
        return unallocated

    # -- compressed clusters -------------------------------------------------------------------

    def _inflate_all(self, wanted: list[Compressed], read_for: ReadFor) -> dict[int, bytes]:
        """The inflated content of each compressed cluster, by coffset: cached ones from the
        cache, the others read for `read_for` and inflated (on the pool when there are several),
        then cached: a cluster larger than the top's is read by several of the stream's steps."""
        clusters: dict[int, bytes] = {}
        missing = []
        if not wanted:
            return clusters
        with self._cluster_lock:
            for compressed in wanted:
                data = self._clusters.get(compressed.coffset)
                if data is None:
                    missing.append(compressed)
                else:
                    self._clusters.move_to_end(compressed.coffset)
                    clusters[compressed.coffset] = data
        unique = list({c.coffset: c for c in missing}.values())
        inflate = functools.partial(self._inflate, read_for=read_for)
        if len(unique) >= PARALLEL_INFLATE_MIN:
            inflated = list(_inflate_pool().map(inflate, unique))
        else:
            inflated = [inflate(c) for c in unique]
        with self._cluster_lock:
            for compressed, data in zip(unique, inflated, strict=True):
                clusters[compressed.coffset] = data
                self._clusters[compressed.coffset] = data
                if len(self._clusters) > self._clusters_max:
                    self._clusters.popitem(last=False)
        return clusters

    def _inflate(self, compressed: Compressed, read_for: ReadFor) -> bytes:
        """One compressed cluster, inflated to exactly one cluster or refused (EIO)."""
        raw = bytearray(compressed.csize)
        filled = self.source.read_into(memoryview(raw), compressed.coffset, read_for)
        if filled < len(raw):  # only where the file ends (csize may run past it); a copy, not a
            raw = raw[:filled]  # resize, as a remote read's workers may still hold the buffer
        try:
            if self.header.compression_type == QCOW2_COMPRESSION_TYPE_ZSTD:
                data = _zstd_decompress(raw, self.cluster_size)
            else:
                data = isal_zlib.decompressobj(-12).decompress(raw, self.cluster_size)  # QEMU's raw deflate
        except (isal_zlib.error, zstandard.ZstdError) as err:
            raise CorruptionError(f"{self.path}: compressed cluster at {compressed.coffset}: {err}") from None
        if len(data) != self.cluster_size:
            raise CorruptionError(f"{self.path}: compressed cluster at {compressed.coffset} inflates to "
                                  f"{len(data)} bytes, not one cluster of {self.cluster_size}")
        self.inflations += 1
        return data

    def close(self) -> None:
        self.source.close()


# -- what the chain and `fusestream info` use of a format module (see chain.FORMAT_MODULES) -------


def probe(head: bytes) -> bool:
    """Whether an image's first bytes are a qcow2 image's: qcow's magic, not version 1 (qcow)."""
    return head.startswith(QCOW_MAGIC) and int.from_bytes(head[4:8], "big") != 1


def from_source(source: Source) -> Qcow2Image:
    """A qcow2 layer read through `source`, which it then owns."""
    return Qcow2Image(source)


def info(image: Qcow2Image) -> dict[str, object]:
    """What `fusestream info` shows of a qcow2 image beyond what every layer shows, with qemu-img
    info's JSON keys and order."""
    data = {"compat": image.compat, "compression-type": image.compression_type}
    if image.header.version == 2:
        data["refcount-bits"] = 16
    else:
        data.update({"lazy-refcounts": image.lazy_refcounts, "refcount-bits": 1 << image.header.refcount_order,
                     "corrupt": False, "extended-l2": image.extended_l2})  # a corrupt image is refused at open
    return {"cluster-size": image.cluster_size, "format-specific": {"type": "qcow2", "data": data},
            "dirty-flag": image.dirty}


def _zstd_decompress(raw: bytes, limit: int) -> bytes:
    """At most `limit` bytes of the zstd frame at the start of `raw` (what follows the frame in
    its last sector is ignored, as QEMU ignores it)."""
    reader = zstandard.ZstdDecompressor().stream_reader(raw)
    chunks, got = [], 0
    while got < limit:
        chunk = reader.read(limit - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _inflate_pool() -> concurrent.futures.ThreadPoolExecutor:
    """One small pool for every image: inflating releases the GIL, so a large read of many
    compressed clusters inflates them on every core at once."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                                          thread_name_prefix="qcow2-inflate",
                                                          initializer=ioprio.inherit_started)
        return _POOL
