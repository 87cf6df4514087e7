"""qcow2 on-disk structures (docs/interop/qcow2.txt in QEMU), with no file I/O.

Field and flag names are QEMU's (block/qcow2.h). Everything on disk is big-endian.
"""

from construct import Const, Int8ub, Int32ub, Int64ub, PaddedString, Struct

QCOW_MAGIC = b"QFI\xfb"

# The fields every version has (72 bytes: all of a version 2 header).
QCOW2_HEADER_V2 = Struct(
    "magic" / Const(QCOW_MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)
QCOW2_V2_HEADER_LENGTH = QCOW2_HEADER_V2.sizeof()  # 72

# What version 3 adds after them (104 bytes in all), and the compression type byte that a
# header_length above 104 holds.
QCOW2_HEADER_V3 = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)
QCOW2_V3_HEADER_LENGTH = QCOW2_V2_HEADER_LENGTH + QCOW2_HEADER_V3.sizeof()  # 104
QCOW2_COMPRESSION_TYPE = Struct("compression_type" / Int8ub)

QCOW2_VERSIONS = (2, 3)
MIN_CLUSTER_BITS = 9  # 512 B
MAX_CLUSTER_BITS = 21  # 2 MiB
MIN_EXTENDED_L2_CLUSTER_BITS = 14  # subclusters of at least 512 B
MAX_BACKING_FILE_SIZE = 1023
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024  # bytes of the L1 table
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024  # bytes of the refcount table
QCOW_MAX_SNAPSHOTS = 65536

QCOW_CRYPT_NONE, QCOW_CRYPT_AES, QCOW_CRYPT_LUKS = 0, 1, 2
CRYPT_METHOD_NAMES = {QCOW_CRYPT_AES: "AES", QCOW_CRYPT_LUKS: "LUKS"}

QCOW2_COMPRESSION_TYPE_ZLIB, QCOW2_COMPRESSION_TYPE_ZSTD = 0, 1
COMPRESSION_TYPE_NAMES = {QCOW2_COMPRESSION_TYPE_ZLIB: "zlib", QCOW2_COMPRESSION_TYPE_ZSTD: "zstd"}

# incompatible_features
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_MASK = (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE
                       | QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2)
# compatible_features
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features (ignored when reading: bitmaps and the raw external data file)
QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Header extension types
QCOW2_EXT_MAGIC_END = 0
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441

QCOW2_EXTENSION_HEADER = Struct("magic" / Int32ub, "len" / Int32ub)
QCOW2_EXTENSION_ALIGN = 8

QCOW2_FEAT_TYPE_INCOMPATIBLE, QCOW2_FEAT_TYPE_COMPATIBLE, QCOW2_FEAT_TYPE_AUTOCLEAR = 0, 1, 2
QCOW2_FEATURE_NAME = Struct(
    "type" / Int8ub,
    "bit" / Int8ub,
    "name" / PaddedString(46, "utf8"),
)
QCOW2_FEATURE_NAME_SIZE = QCOW2_FEATURE_NAME.sizeof()  # 48

# L1 entries: the L2 table offset in bits 9-55; bit 63 is QCOW_OFLAG_COPIED.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
# Standard L2 entries: the host cluster offset in bits 9-55.
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0  # v3 standard entries without extended L2: the cluster reads as zeros

L2_ENTRY_SIZE = 8
L2_EXTENDED_ENTRY_SIZE = 16  # the standard entry, then the subcluster bitmap
QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER = 32
# The extended bitmap: bit x "allocated" (data in the host cluster), bit 32 + x "reads as zeros".
QCOW_OFLAG_SUB_ALLOC_MASK = 0xFFFFFFFF
QCOW_OFLAG_SUB_ZERO_SHIFT = 32

COMPRESSED_SECTOR_SIZE = 512


def csize_shift(cluster_bits: int) -> int:
    """Where the compressed descriptor's sector count starts: 62 - (cluster_bits - 8)."""
    return 62 - (cluster_bits - 8)


def compressed_descriptor(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, bytes to read) of a compressed cluster's L2 entry: the offset is a byte
    offset in the low csize_shift bits, then the count of 512-byte sectors after the first."""
    shift = csize_shift(cluster_bits)
    coffset = entry & ((1 << shift) - 1)
    nb_csectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return coffset, nb_csectors * COMPRESSED_SECTOR_SIZE - (coffset % COMPRESSED_SECTOR_SIZE)
