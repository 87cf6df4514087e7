"""Raw backing layers: the file is the disk. Holes report ZERO so that sparseness survives."""

from __future__ import annotations

import os

from ..errors import BackingFileError, describe_os_error
from .image_lock import lock_image
from .layer import BlockStatus, DirectTwin, ReadAdvice, open_regular_file, pread_into

FORMAT_NAME = "raw"


class RawLayer:
    """A read-only raw file used as a backing layer."""

    format_name = FORMAT_NAME

    def __init__(self, path: str, lock: bool = True, allow_device: bool = False):
        self.path = path
        try:
            self.fd = open_regular_file(path, os.O_RDONLY, allow_block_device=allow_device)
        except OSError as err:
            raise BackingFileError(describe_os_error(path, err)) from None
        try:
            if lock:
                lock_image(self.fd, path, writable=False)
            self.size = os.lseek(self.fd, 0, os.SEEK_END)  # st_size is 0 for a block device
        except OSError as err:  # a "regular file" that cannot be locked or sized, such as /proc/self/mem
            os.close(self.fd)
            raise BackingFileError(f"{path}: cannot lock it or tell its size: {err.strerror or err}") from None
        except BaseException:
            os.close(self.fd)
            raise
        self.direct = DirectTwin(self.fd, writable=False)
        self.advice = ReadAdvice(self.fd, path)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # the file may be shorter than its size said: zeros, as QEMU reads
            data += bytes(length - len(data))
        return data

    def read_into(self, view: memoryview, offset: int, direct: bool = False) -> int:
        # Fewer bytes than asked: the file is shorter than it was, for the caller to judge.
        return pread_into(self.fd, view, offset, self.direct.fd if direct else -1)

    def prefetch(self, offset: int, length: int) -> None:
        self.advice.willneed(offset, length)

    def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        """FOUND for data, ZERO for a hole (SEEK_DATA/SEEK_HOLE, as QEMU's file driver does)."""
        end = min(offset + length, self.size)
        try:
            data_start = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole from here to the end of the file
            return BlockStatus.ZERO, length
        if data_start > offset:
            return BlockStatus.ZERO, min(data_start, end) - offset
        hole_start = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return BlockStatus.FOUND, min(hole_start, end) - offset

    def close(self) -> None:
        self.direct.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
