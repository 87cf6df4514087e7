"""Raw backing layers: the source is the disk. Holes report ZERO so that sparseness survives."""

from __future__ import annotations

from ..sources import Source
from .layer import BlockStatus, Location, Ranges, ShortRead, fill_zeros

FORMAT_NAME = "raw"


class RawLayer:
    """A read-only raw source used as a backing layer: it holds every byte of its size, so it
    leaves nothing UNALLOCATED and names no backing file."""

    format_name = FORMAT_NAME
    backing_filename = None
    backing_format = None

    def __init__(self, source: Source):
        self.source = source
        self.path = source.name
        self.size = source.size

    def read_into(self, view: memoryview, offset: int, direct: bool = False) -> Ranges:
        filled = self.source.read_into(view, offset, direct)
        if filled < len(view):  # shorter than it was at open: zeros, as QEMU reads
            fill_zeros(view[filled:])
            raise ShortRead(offset + filled)
        return []

    def prefetch(self, offset: int, length: int) -> Ranges:
        self.source.prefetch(offset, length)
        return []

    def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        """FOUND for data, ZERO for a hole (the source's data_status: SEEK_DATA/SEEK_HOLE for a
        local file, as QEMU's file driver does)."""
        is_data, run = self.source.data_status(offset, length)
        return BlockStatus.FOUND if is_data else BlockStatus.ZERO, run

    def locate(self, offset: int, length: int) -> list[Location]:
        """All of it is the source's, byte for byte (holes read as zeros)."""
        return [Location(offset, length, BlockStatus.FOUND, self.source.descriptor(), offset)]

    def close(self) -> None:
        self.source.close()


# -- what the chain and `fusestream info` use of a format module (see chain.FORMAT_MODULES) -------


def probe(head: bytes) -> bool:
    """Raw has no magic: a file is raw when no other format claims it (chain.probe_format)."""
    return False


def from_source(source: Source) -> RawLayer:
    """A raw layer over `source`, which it then owns."""
    return RawLayer(source)


def info(layer: RawLayer) -> dict[str, object]:
    """Raw shows nothing beyond what every layer shows."""
    return {}
