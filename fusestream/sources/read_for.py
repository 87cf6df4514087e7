"""Who a read is for, which decides the caches it goes through (Source.read_into)."""

from __future__ import annotations

import enum


class ReadFor(enum.Enum):
    GUEST = "guest"
    """Data that may be read again: cached (a remote source's block cache) and read ahead."""
    STREAM = "stream"
    """Read once, to be stored in the top image: past a remote source's block cache, on its
    bulk connections; a local file reads through the page cache, the fast way for a copy."""
    GENTLE = "gentle"
    """As STREAM, while giving way to the guest or held to a speed limit: past every cache and
    readahead (a local file's O_DIRECT), exactly what is asked for."""
