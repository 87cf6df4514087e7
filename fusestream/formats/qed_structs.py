"""QED on-disk structures (docs/interop/qed_spec.txt in QEMU), with no file I/O.

Field names are QEMU's (block/qed.h) so that a QEMU engineer reads this without a glossary.
"""

from construct import Const, Int32ul, Int64ul, Struct

QED_MAGIC = b"QED\0"

QED_F_BACKING_FILE = 0x01
QED_F_NEED_CHECK = 0x02
QED_F_BACKING_FORMAT_NO_PROBE = 0x04
QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE
QED_AUTOCLEAR_FEATURE_MASK = 0

QED_MIN_CLUSTER_SIZE = 4 * 1024
QED_MAX_CLUSTER_SIZE = 64 * 1024 * 1024
QED_DEFAULT_CLUSTER_SIZE = 64 * 1024
QED_MIN_TABLE_SIZE = 1
QED_MAX_TABLE_SIZE = 16
QED_DEFAULT_TABLE_SIZE = 4

# A data cluster offset of 1 in an L2 table: the cluster reads as zeros, hiding the backing file.
QED_ZERO_CLUSTER = 1
QED_UNALLOCATED = 0

QED_HEADER = Struct(
    "magic" / Const(QED_MAGIC),
    "cluster_size" / Int32ul,
    "table_size" / Int32ul,
    "header_size" / Int32ul,
    "features" / Int64ul,
    "compat_features" / Int64ul,
    "autoclear_features" / Int64ul,
    "l1_table_offset" / Int64ul,
    "image_size" / Int64ul,
    "backing_filename_offset" / Int32ul,
    "backing_filename_size" / Int32ul,
)
QED_HEADER_SIZE = QED_HEADER.sizeof()  # 64 bytes

TABLE_ENTRY_SIZE = 8


def table_nelems(cluster_size: int, table_size: int) -> int:
    """Entries in one L1 or L2 table (TABLE_NOFFSETS in the spec)."""
    return cluster_size * table_size // TABLE_ENTRY_SIZE


def max_image_size(cluster_size: int, table_size: int) -> int:
    """The largest image_size an L1 table of this geometry can address."""
    n = table_nelems(cluster_size, table_size)
    return n * n * cluster_size


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
