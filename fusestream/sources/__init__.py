"""Where an image's bytes come from: a local file, an HTTP(S) URL. A source knows nothing about
image formats; formats parse and read through it, so any format can live on any source.

Sources are synchronous and thread-safe: bulk and remote reads run in worker threads, and a
read that may wait on a network (`remote`) never runs on the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from typing import Protocol, runtime_checkable
from urllib.parse import urljoin

from ..errors import SourceError
from .http import HttpOptions, HttpSource, redact_url, url_identity
from .local import Buffers, LocalFile, file_identity
from .read_for import ReadFor


class Source(Protocol):
    """The bytes of one image file, read-only from the formats' side (the top image's source
    adds writes: WritableSource)."""

    name: str
    """The path or URL, credentials removed: what messages, status and events name."""
    size: int
    """Its length in bytes, fixed at open (a source that changes under us is an error)."""
    remote: bool
    """Reads may wait on a network: callers keep them off the event loop."""
    bulk_size: int
    """The read size that keeps all of the source's transfers busy (HttpSource: connections x
    request_size), for the stream's steps; 0 where any size does (a local file)."""

    def identity(self) -> Hashable:
        """The same value for the same object under any name (hard links, symbolic links, an
        equivalent URL), so that a backing chain can refuse loops."""

    def read_into(self, view: memoryview, offset: int, read_for: ReadFor = ReadFor.GUEST) -> int:
        """Fill `view` from `offset` until it is full or the source ends; returns the bytes
        filled. `read_for` decides which of the source's caches the read goes through (see
        ReadFor). Errors: OSError, or errors.SourceError for a remote source that keeps
        failing or changed."""

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset`, fewer only where the source ends (headers, tables)."""

    def prefetch(self, offset: int, length: int, read_for: ReadFor = ReadFor.GUEST) -> None:
        """A hint that the range will be read soon, by a read for `read_for`: start fetching it
        without waiting, where that read will look for it. Never fails."""

    def data_status(self, offset: int, length: int) -> tuple[bool, int]:
        """(True, n): the source holds data for n bytes (<= length) from `offset`; (False, n): a
        hole that reads zeros (SEEK_HOLE). A source with no notion of holes says (True, length)."""

    def describe(self) -> dict[str, object]:
        """What `info --chain` and status show of the source beyond its name (for a remote
        one: what the server said, bytes fetched, connections, retries, the last error). Never
        credentials."""

    def descriptor(self) -> int | None:
        """The file descriptor whose bytes are the source's, for readers that pread it
        themselves (the mount's native read threads); None for a remote source. Valid until
        close."""

    def close(self) -> None: ...


@runtime_checkable
class WritableSource(Source, Protocol):
    """A source that takes the top image's writes: a local file (sources.local.LocalFile)."""

    writable: bool
    """Opened for writing: the write methods below are for such a source only."""

    def write(self, offset: int, data: Buffers, direct: bool = False) -> None:
        """Write all of `data` (one buffer, or a list of buffers back to back) at `offset`.
        `direct`: bypass the page cache where every buffer's alignment allows it."""

    def sync(self) -> None:
        """Make everything written so far, and the size, durable (fdatasync)."""

    def truncate(self, size: int) -> None: ...

    def punch_hole(self, offset: int, length: int) -> None:
        """Give the space of a range back; it reads zeros. Where the storage cannot, the range
        keeps its space (a warning says so once)."""

    def current_size(self) -> int:
        """The length now (`size` is the length at open)."""

    def allocated_bytes(self) -> int:
        """The space it really uses on disk."""


def open_source(location: str, *, writable: bool = False, lock: bool = True, allow_device: bool = False,
                http: HttpOptions | None = None) -> Source:
    """The source at `location`: an http:// or https:// URL (read-only, with the `http` options),
    else a local path (sources.local.LocalFile: `writable`, `lock` and `allow_device` apply)."""
    if is_url(location):
        return HttpSource(location, http or HttpOptions())
    return LocalFile(location, writable=writable, lock=lock, allow_device=allow_device)


# -- locations: a path or a URL. What the chain, the commands and the control files know of
# where a source is lives here, dispatched on is_url: a new kind of source adds its branch.


def is_url(location: str) -> bool:
    """Whether a location (a backing name) names a remote source rather than a path."""
    scheme, colon, _ = location.partition(":")  # not urlsplit: it raises for a bad host
    return bool(colon) and scheme.lower() in ("http", "https")


def resolve_backing(image: str, name: str) -> str:
    """A backing name as QEMU reads it: a URL or an absolute path as it is, else relative to the
    image's directory, or to the image's URL for a remote image."""
    if is_url(name) or os.path.isabs(name):
        return name
    if is_url(image):
        try:
            return urljoin(image, name)
        except ValueError:  # a bracket that does not close, say: a hostile image may name anything
            raise SourceError(f"{redact_url(name)}: not a name that resolves against {redact_url(image)}") from None
    return os.path.join(os.path.dirname(os.path.abspath(image)), name)


def backing_name(image: str, backing: str) -> str:
    """The name to store in `image` for its backing file at `backing`: a URL as it is; a path
    relative when it lies beside the image, else absolute."""
    if is_url(backing):
        return backing
    if os.path.dirname(os.path.abspath(backing)) == os.path.dirname(os.path.abspath(image)):
        return os.path.basename(backing)
    return os.path.abspath(backing)


def absolute_location(location: str) -> str:
    """A location that no longer depends on the current directory: a URL as it is, a path made
    absolute."""
    return location if is_url(location) else os.path.abspath(location)


def location_exists(location: str) -> bool:
    """Whether there is something at `location` to open; a URL is only known once contacted."""
    return is_url(location) or os.path.exists(location)


def display_name(location: str) -> str:
    """A location as messages, status and events may show it: a URL without its credentials."""
    return redact_url(location) if is_url(location) else location


def location_identity(location: str) -> Hashable | None:
    """Source.identity of the source at `location` without opening it: None for a local path
    where there is no file."""
    return url_identity(location) if is_url(location) else file_identity(location)


def same_location(a: str, b: str) -> bool:
    """Whether two locations name one object: the same identity (links followed, hard links
    and equivalent URLs counted), or two paths that are one once links are resolved, where no
    file is there yet."""
    if is_url(a) != is_url(b):
        return False
    identity = location_identity(a)
    if identity is not None and identity == location_identity(b):
        return True
    return not is_url(a) and os.path.realpath(a) == os.path.realpath(b)


def disk_usage(source: Source) -> int | None:
    """The disk space a source's file takes (qemu-img info's "disk size"); None where it has
    none to tell (a remote object)."""
    return source.allocated_bytes() if isinstance(source, LocalFile) else None


def create_file(path: str, overwrite: bool = False) -> WritableSource:
    """A new local image file, open for writing and locked as a writer (sources.local.LocalFile.create)."""
    return LocalFile.create(path, overwrite)
