"""Raw backing layers: the source is the disk. Holes report ZERO so that sparseness survives."""

from __future__ import annotations

from collections.abc import Iterator

from ..sources import ReadFor, Source
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

    def read_into(self, view: memoryview, offset: int, read_for: ReadFor = ReadFor.GUEST) -> Ranges:
        filled = self.source.read_into(view, offset, read_for)
        if filled < len(view):  # shorter than it was at open: zeros, as QEMU reads
            fill_zeros(view[filled:])
            raise ShortRead(offset + filled)
        return []

    def prefetch(self, offset: int, length: int, read_for: ReadFor = ReadFor.GUEST) -> Ranges:
        self.source.prefetch(offset, length, read_for)
        return []

    def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        """FOUND for data, ZERO for a hole (the source's data_status: for a local file, its
        extents or SEEK_DATA/SEEK_HOLE, what QEMU's file driver asks)."""
        is_data, run = self.source.data_status(offset, length)
        return BlockStatus.FOUND if is_data else BlockStatus.ZERO, run

    def locate(self, offset: int, length: int, unit: int) -> list[Location]:
        """The source's bytes at their place, by aligned `unit`s: the whole units of its holes
        as ZERO, so that a reader of the map neither reads them nor fills the page cache with
        them (the kernel's readahead runs on past the data into the holes); the units that
        hold both data and holes as FOUND with `holes`. A remote source has no descriptor: all
        of it is data that only read_into gives."""
        fd = self.source.descriptor()
        if fd is None:
            return [Location(offset, length, BlockStatus.FOUND)]
        located: list[Location] = []
        for start, end, holes_only, mixed in self._unit_pieces(offset, offset + length, unit):
            status = BlockStatus.ZERO if holes_only else BlockStatus.FOUND
            if located and (located[-1].status, located[-1].holes) == (status, mixed):
                located[-1] = located[-1]._replace(length=end - located[-1].offset)
            else:
                located.append(Location(start, end - start, status, None if holes_only else fd, start, mixed))
        return located

    def _unit_pieces(self, offset: int, end: int, unit: int) -> Iterator[tuple[int, int, bool, bool]]:
        """(start, end, a hole, mixed) of each data or hole run of [offset, end) cut where it
        leaves whole units: its whole units, and the parts before and after them, which share a
        unit with another run (mixed: data that may hold holes)."""
        pos = offset
        while pos < end:
            is_data, run = self.source.data_status(pos, end - pos)
            first, last = -(-pos // unit) * unit, (pos + run) // unit * unit
            if last <= first:
                yield pos, pos + run, False, True
            else:
                if first > pos:
                    yield pos, first, False, True
                yield first, last, not is_data, False
                if pos + run > last:
                    yield last, pos + run, False, True
            pos += run

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
