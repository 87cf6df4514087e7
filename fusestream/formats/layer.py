"""What every layer of a backing chain is: an image format read through a byte source.

A layer (raw.py, qed.py, qcow2.py) parses its source and answers for what it holds itself,
nothing more: it holds no reference to the layer below. Where it holds nothing (UNALLOCATED),
its reads hand the ranges back, and the chain (chain.py), the one holder of the layers, reads
them from the layers below. A new format is a new module with this interface.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

from ..errors import InvalidImageError, describe_os_error
from ..sources import ReadFor, Source


class BlockStatus(enum.Enum):
    """QEMU's lookup results for a range of one layer."""

    FOUND = "found"  # the layer holds data for the range
    ZERO = "zero"  # the layer says the range reads as zeros (hides anything below)
    UNALLOCATED = "unallocated"  # the layer has nothing: look further down the chain


Ranges = list[tuple[int, int]]
"""(offset, length) ranges of the virtual disk, in order: what a layer leaves UNALLOCATED."""

ReadBelow = Callable[[memoryview, int], int]
"""Fills a buffer with what lies below the top image at an offset; returns how many bytes are
right (len(view) unless a layer's read was short). The chain passes the top image's writes,
which need what lies below, read_layers_into bound to the layers below the top (None: nothing
lies below, zeros), so that they read down those layers without coming back to the chain."""


class Location(NamedTuple):
    """Where a run of one layer lies (Layer.locate)."""

    offset: int
    length: int
    status: BlockStatus
    fd: int | None = None  # FOUND: the descriptor holding the bytes as they are read; None:
    file_offset: int = 0  # only the layer's read_into can produce them (compressed, remote)
    holes: bool = False  # FOUND: its bytes in fd may hold holes that an lseek must report


PLACED_ZEROS = -1
Placed = tuple[int, int, int | None, int, bool]
"""(offset, length, fd, file_offset, holes) of a run of the guest view: its bytes are fd's from
file_offset on, or zeros (fd PLACED_ZEROS), or only a read through the layers gives them (None);
`holes`: fd's bytes there may hold holes (Location.holes), so only a read may use the run."""


class ShortRead(Exception):
    """A layer's file ended before `offset`, inside the layer's size (the file shrank under
    us): the rest of the range was filled with zeros, as QEMU reads it, and the chain says how
    much of a read is right, so that the stream never writes those zeros."""

    def __init__(self, offset: int):
        super().__init__(f"unexpected end of file at offset {offset}")
        self.offset = offset


class Layer(Protocol):
    source: Source
    path: str  # source.name: what messages, info and status show
    format_name: str
    size: int
    backing_filename: str | None  # the backing file the image names, as stored
    backing_format: str | None  # the format it gives for it; None: probe

    def read_into(self, view: memoryview, offset: int, read_for: ReadFor = ReadFor.GUEST) -> Ranges:
        """Fill `view` from `offset` (a range within `size`) where the layer decides: its data
        (FOUND), read by the source straight into `view` (Source.read_into, `read_for` handed
        to it), and zeros (ZERO); returns the UNALLOCATED ranges it left for the layers below.
        ShortRead where the source ended early."""

    def prefetch(self, offset: int, length: int, read_for: ReadFor = ReadFor.GUEST) -> Ranges:
        """Hint the source (Source.prefetch) at where the layer's data of a range within `size`
        lies, so that it starts fetching it without waiting and the reads that follow find it
        there: for reads of many scattered clusters, fetched all at once rather than one
        cluster at a time. A hint: it never fails. Returns the UNALLOCATED ranges, for the
        chain to prefetch below."""

    def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        """Status of the run starting at `offset` and how many bytes (<= length) share it."""

    def locate(self, offset: int, length: int, unit: int) -> list[Location]:
        """Where the runs of a range within `size` lie, in order: FOUND data with the
        descriptor and offset that hold it as read_into would read it (fd None where no plain
        read of a file gives it), ZERO, and UNALLOCATED for the layers below. The caller maps
        in aligned `unit`s: a raw layer reports as ZERO only the whole units of its holes, and
        the units that hold both data and holes as FOUND with `holes`."""

    def close(self) -> None:
        """Close the source too."""


def invalid_image(path: str, problem: str) -> InvalidImageError:
    """The error for an image that breaks its format's rules: one line, naming the file."""
    return InvalidImageError(f"{path}: {problem}")


@contextlib.contextmanager
def closed_on_failure(source: Source) -> Iterator[None]:
    """Around a layer's open of `source`, which the layer owns: a failure closes the source, and
    an OSError becomes an InvalidImageError naming it."""
    try:
        yield
    except OSError as err:
        source.close()
        raise InvalidImageError(describe_os_error(source.name, err)) from None
    except BaseException:
        source.close()
        raise


ZEROS = bytes(1 << 20)
_ZEROS_VIEW = memoryview(ZEROS)


def fill_zeros(view: memoryview) -> None:
    """Zero `view` in place (buffers are reused, so nothing can count on them being zeroed)."""
    for start in range(0, len(view), len(ZEROS)):
        chunk = view[start : start + len(ZEROS)]
        chunk[:] = _ZEROS_VIEW[: len(chunk)]


def prefetch_layers(layers: Sequence[Layer], offset: int, length: int, read_for: ReadFor = ReadFor.GUEST) -> None:
    """Layer.prefetch down `layers` (top first), as read_layers_into reads them: each layer
    hints at the ranges that every layer above it left UNALLOCATED."""
    pending = [(offset, length)]
    for layer in layers:
        pending = [left for start, run in pending if start < layer.size
                   for left in layer.prefetch(start, min(run, layer.size - start), read_for)]
        if not pending:
            return


def read_layers_into(layers: Sequence[Layer], view: memoryview, offset: int,
                     read_for: ReadFor = ReadFor.GUEST) -> int:
    """Fill `view` with what `layers` (top first) hold at `offset`, going down them once: each
    layer is asked about the ranges that every layer above it left UNALLOCATED. What no layer
    holds reads as zeros, and so does what lies past the end of a layer that is shorter than the
    image above it (as QEMU reads it). Returns how many bytes are right (len(view) unless a
    layer's read was short: zeros from there). On every guest read's path, so a plain loop: a
    small read costs under a microsecond more than its layers' own lookups and reads."""
    right = size = len(view)
    pending = [(offset, size)]
    for layer in layers:
        left: Ranges = []
        for start, length in pending:
            if start + length > layer.size:  # past the end of a shorter layer: zeros
                inside = max(0, layer.size - start)
                fill_zeros(view[start - offset + inside : start - offset + length])
                if not inside:
                    continue
                length = inside
            part = view if length == size else view[start - offset : start - offset + length]
            try:
                left += layer.read_into(part, start, read_for)
            except ShortRead as short:
                right = min(right, short.offset - offset)
        if not left:
            return right
        pending = left
    for start, length in pending:
        fill_zeros(view[start - offset : start - offset + length])
    return right


def locate_layers(layers: Sequence[Layer], offset: int, length: int, unit: int) -> list[Placed]:
    """Where the guest view of [offset, offset+length) lies, as read_layers_into would read it
    from `layers` (top first): each layer is asked about what every layer above it left
    UNALLOCATED; past the end of a shorter layer, and where no layer holds anything, zeros.
    In order of offset. `unit`: see Layer.locate."""
    placed: list[Placed] = []
    pending = [(offset, length)]
    for layer in layers:
        left: Ranges = []
        for start, run in pending:
            if start + run > layer.size:
                inside = max(0, layer.size - start)
                placed.append((start + inside, run - inside, PLACED_ZEROS, 0, False))
                if not inside:
                    continue
                run = inside
            for where in layer.locate(start, run, unit):
                if where.status is BlockStatus.UNALLOCATED:
                    left.append((where.offset, where.length))
                elif where.status is BlockStatus.ZERO:
                    placed.append((where.offset, where.length, PLACED_ZEROS, 0, False))
                else:
                    placed.append((where.offset, where.length, where.fd, where.file_offset, where.holes))
        pending = left
        if not pending:
            break
    placed += [(start, run, PLACED_ZEROS, 0, False) for start, run in pending]
    return sorted(placed, key=lambda run: run[0])
