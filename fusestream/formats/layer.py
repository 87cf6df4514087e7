"""The one small interface every layer of a backing chain implements.

A layer may be a local raw file, a QED image, and later qcow2 or a remote source; the chain
and the stream job only ever use what is here, so a slow or failing source fits in too.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from typing import Protocol


class BlockStatus(enum.Enum):
    """QEMU's lookup results for a range of one layer."""

    FOUND = "found"  # the layer holds data for the range
    ZERO = "zero"  # the layer says the range reads as zeros (hides anything below)
    UNALLOCATED = "unallocated"  # the layer has nothing: look further down the chain


class Layer(Protocol):
    path: str
    format_name: str
    size: int

    def read(self, offset: int, length: int) -> bytes:
        """Return exactly `length` bytes of a range that lies within `size`."""

    def read_into(self, view: memoryview, offset: int) -> int:
        """Fill `view` (zero-filled by the caller) from a range within `size`; returns how many
        bytes were filled, fewer only on a short read. For bulk reads: no copies under the GIL."""

    def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        """Status of the run starting at `offset` and how many bytes (<= length) share it."""

    def close(self) -> None: ...


def read_into_from(layer: Layer | None, view: memoryview, offset: int) -> int:
    """read_into through an optional backing layer; past its end (or with none) the zero-filled
    view is already right. Returns how many bytes are right, len(view) unless a read was short."""
    if layer is None or offset >= layer.size:
        return len(view)
    inside = min(len(view), layer.size - offset)
    filled = layer.read_into(view[:inside], offset)
    return filled if filled < inside else len(view)


def read_from(layer: Layer | None, offset: int, length: int) -> bytes:
    """Read through an optional backing layer: no layer, or past its end, reads as zeros."""
    if layer is None or offset >= layer.size:
        return bytes(length)
    inside = min(length, layer.size - offset)
    data = layer.read(offset, inside)
    return data if inside == length else data + bytes(length - inside)


def open_regular_file(path: str, flags: int, allow_block_device: bool = False) -> int:
    """Open an image file, refusing anything but a regular file (or, when the user asked for
    it, a block device): a directory, device, FIFO or socket named by a possibly hostile image is
    an error, and O_NONBLOCK keeps a FIFO from hanging the open."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or (allow_block_device and stat.S_ISBLK(mode))):
        os.close(fd)
        if stat.S_ISDIR(mode):
            problem = "is a directory, not a regular file"
        elif stat.S_ISBLK(mode):
            problem = "is a block device (allowed only with -o allow_devices)"
        else:
            problem = "is a device, FIFO or socket, not a regular file"
        raise OSError(errno.EINVAL, problem)
    return fd
