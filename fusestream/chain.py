"""The backing chain: open an image and every layer below it, hold them (top first, the one
place that does), and read, write and stream through them.

Opening a layer: open its source (sources.open_source), probe the format through it, hand the
source to the format. Backing names are resolved as QEMU resolves them: an http:// or https://
URL as it is (QEMU's curl driver), a relative name against the directory, or the URL, of the
image that names it; formats are probed by magic unless the image names the backing format
(QED_F_BACKING_FORMAT_NO_PROBE: raw; qcow2's backing format header extension). Every failure
names the image and the file or URL (without credentials) that caused it.

A layer reads only what it holds and hands back what it leaves UNALLOCATED; the chain asks each
layer, top down, once about the ranges the layers above left, and what no layer holds reads as
zeros. The top image's writes get a reader of the layers below it (`below`:
formats.layer.read_layers_into bound to them), which never comes back to the chain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import threading
from collections.abc import Iterator
from typing import Protocol

from .errors import BackingFileError, FusestreamError, SourceError, describe_os_error
from .formats import qcow2, qed, raw
from .formats.layer import BlockStatus, Layer, Placed, ReadBelow, locate_layers, prefetch_layers, read_layers_into
from .formats.qcow2_structs import QCOW_MAGIC
from .sources import (
    HttpOptions,
    ReadFor,
    Source,
    absolute_location,
    backing_name,
    display_name,
    is_url,
    location_exists,
    location_identity,
    open_source,
    resolve_backing,
)
from .sources.http import url_origin
from .sources.local import LocalFile

MAX_CHAIN_DEPTH = 64
# A guest read of at least this much (the kernel's readahead: 1 MiB requests) first prefetches
# all of its clusters, so that the ones scattered over the layers' files come from the device
# together rather than one synchronous read after another. Cold sequential reads of the bench
# chain went from ~700 to ~880 MiB/s (bench/read_bench.py); smaller reads gain nothing.
PREFETCH_READ_MIN = 128 * 1024


# The formats a layer may have. Each module (formats/) names its FORMAT_NAME, recognises its
# images by their first PROBE_BYTES (`probe`), makes a layer of a source that the layer then owns
# (`from_source`) and says what `fusestream info` shows of one (`info`). Raw claims nothing: a
# file is raw when no format claims it and it carries none of IMAGE_MAGICS. A new format is a new
# module and its name here (and in cli's -F choices, which a test holds equal to FORMATS).
FORMAT_MODULES = (raw, qed, qcow2)
FORMATS = {module.FORMAT_NAME: module for module in FORMAT_MODULES}
# Magic numbers of the image formats QEMU probes that we do not read. A backing file that carries
# one of these must never be read as raw: that would serve the format's own metadata as disk data.
IMAGE_MAGICS = {
    QCOW_MAGIC: "qcow",  # the qcow2 module claims every version but 1
    b"KDMV": "vmdk",
    b"# Disk Descriptor": "vmdk",
    b"conectix": "vpc",
    b"vhdxfile": "vhdx",
    b"LUKS\xba\xbe": "luks",
    b"WithoutFreeSpace": "parallels",
    b"WithouFreSpacExt": "parallels",
    b"#!/bin/sh\n#V2.0 Format\n": "cloop",
    b"Bochs Virtual HD Image": "bochs",
}
VDI_SIGNATURE = (64, b"\x7f\x10\xda\xbe")  # VDI keeps its magic after a 64-byte text banner
PROBE_BYTES = 512


def probe_format(path: str, allow_device: bool = False, http: HttpOptions | None = None) -> str:
    """The format of the image at `path` (or URL) by its magic: the name of a format in FORMATS
    (raw where none claims it), or of another image format, which open_layer refuses."""
    source = open_source(path, lock=False, allow_device=allow_device, http=http)
    try:
        return _probe(source)
    finally:
        source.close()


def _probe(source: Source) -> str:
    """probe_format, through an open source: its first PROBE_BYTES."""
    try:
        head = source.read(0, PROBE_BYTES)
    except OSError as err:
        raise BackingFileError(describe_os_error(source.name, err)) from None
    claimed = next((module.FORMAT_NAME for module in FORMAT_MODULES if module.probe(head)), None)
    if claimed is not None:
        return claimed
    at, signature = VDI_SIGNATURE
    if head[at : at + len(signature)] == signature:
        return "vdi"
    return next((fmt for magic, fmt in IMAGE_MAGICS.items() if head.startswith(magic)), raw.FORMAT_NAME)


def open_layer(path: str, fmt: str | None = None, lock: bool = True, allow_device: bool = False,
               http: HttpOptions | None = None) -> Layer:
    """Open one read-only layer (without its own backing chain) in format `fmt`, or the one its
    magic says, from a path or an http(s) URL (read with the `http` options). With `lock`, a
    local one holds a shared lock so that no fusestream mount writes it while it is in use;
    `allow_device` lets a block device be a raw layer."""
    source = open_source(path, lock=lock, allow_device=allow_device, http=http)
    try:
        fmt = fmt or _probe(source)
        if fmt not in FORMATS:
            raise BackingFileError(f"{source.name}: unsupported image format '{fmt}' "
                                   f"({supported_formats()} layers are supported)")
        if fmt != raw.FORMAT_NAME and isinstance(source, LocalFile) and source.block_device:
            raise BackingFileError(f"{path}: is a block device holding a {fmt} image "
                                   "(a block device may only be a raw layer)")
    except BaseException:
        source.close()
        raise
    return FORMATS[fmt].from_source(source)


def supported_formats() -> str:
    """The formats of FORMATS, as messages list them: 'raw, qed and qcow2'."""
    *others, last = FORMATS
    return f"{', '.join(others)} and {last}"


class LayersInUse:
    """Lets many threads read through the backing layers while none may close them.

    Streaming to completion retires layers; a read that started before then may still be
    reading one of them, so retiring waits for the reads in flight to finish. `with in_use:`
    marks a read (a plain class, not a generator: it is on every guest read's path).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0

    def __enter__(self) -> None:
        with self._cond:
            self._readers += 1

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._readers == 0)
            yield


class MapListener(Protocol):
    """Told whenever where the guest view lies may change (Chain.locate's answers), for a
    reader that keeps its own map of them: the mount's native reads (native_reads.py)."""

    def remapped(self, offset: int, length: int) -> None:
        """The range was written, discarded or populated: what was located there may be stale.
        Called once the change is made, before the request that made it returns."""

    def retiring(self) -> None:
        """Backing layers are about to close: forget their descriptors, and return only once
        nothing still reads them."""


_NO_RUN = (BlockStatus.UNALLOCATED, 0, 0)


class StatusWalk:
    """Block status along one forward walk over layers that do not change while it lasts (the
    backing layers, during a stream), up to `horizon`.

    It remembers the run each layer answered last, and asks a layer again only past the end of
    that run, then about everything up to the horizon (a layer bounds its own answer: see
    QedImage.block_status). So under a long unallocated run of one layer, stepping through the
    many short runs of the layer below costs the upper layer nothing more, and a whole walk
    asks each layer about as often as it has runs: without it, each short step asked the upper
    layer about the whole rest of its run again (issue 12: quadratic in the size of the disk).
    """

    def __init__(self, horizon: int):
        self.horizon = horizon
        self._runs: dict[Layer, tuple[BlockStatus, int, int]] = {}

    def block_status(self, layer: Layer, offset: int, length: int) -> tuple[BlockStatus, int]:
        """Layer.block_status of the run at `offset`, at most `length` (which stays within
        the layer), from the run remembered when it covers `offset`."""
        status, start, end = self._runs.get(layer, _NO_RUN)
        if not start <= offset < end:
            status, run = layer.block_status(offset, max(length, min(self.horizon, layer.size) - offset))
            start, end = offset, offset + run
            self._runs[layer] = (status, start, end)
        return status, min(end, offset + length) - offset


@dataclasses.dataclass
class Chain:
    """The layers of a backing chain, top first: the QED top image and the layers below it.
    Only the chain holds them; no layer knows the one below."""

    layers: list[Layer]
    in_use: LayersInUse = dataclasses.field(default_factory=LayersInUse)
    # Where each layer was opened from, as resolved (a URL with its credentials, if it had
    # any): what a rebase stores. A layer missing here was opened from its `path`.
    locations: dict[Layer, str] = dataclasses.field(default_factory=dict)
    # Whether a backing layer's reads may wait on a network (Source.remote): then no guest I/O
    # may run on the event loop (fs.py). Set at open, and again when a stream retires layers.
    remote: bool = False
    map_listener: MapListener | None = None

    @property
    def top(self) -> qed.QedImage:
        return self.layers[0]

    @property
    def size(self) -> int:
        return self.top.size

    @property
    def path(self) -> str:
        """The top image's path."""
        return self.top.path

    @property
    def writable(self) -> bool:
        return self.top.writable

    @property
    def cluster_size(self) -> int:
        """The top image's: what a copy into it is counted in."""
        return self.top.cluster_size

    @property
    def backing_filename(self) -> str | None:
        """The top image's backing file, as stored."""
        return self.top.backing_filename

    @property
    def backing_layers(self) -> list[Layer]:
        return self.layers[1:]

    def base_index(self, base: Layer | None) -> int:
        """Where `base` is in `layers`; len(layers) without a base, or for one no longer in the
        chain. The layers above base are layers[1:base_index]."""
        return self.layers.index(base) if base in self.layers else len(self.layers)

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Read the guest view of [offset, offset+length), clamped to the virtual size. Returned
        as it is, not as bytes: pyfuse3 replies from any buffer, and copying a megabyte once
        more cost ~15% of warm sequential reads."""
        length = max(0, min(length, self.size - offset))
        if not length:
            return b""
        data = bytearray(length)
        with self.in_use:
            if length >= PREFETCH_READ_MIN:
                prefetch_layers(self.layers, offset, length)
            read_layers_into(self.layers, memoryview(data), offset)  # a short read leaves zeros, as QEMU reads
        return data

    def locate(self, offset: int, length: int) -> list[Placed]:
        """Where the guest view of [offset, offset+length) lies (formats.layer.locate_layers),
        clamped to the virtual size. Stays true until map_listener hears otherwise."""
        length = max(0, min(length, self.size - offset))
        with self.in_use:
            return locate_layers(self.layers, offset, length, self.cluster_size) if length else []

    def read_backing_into(self, view: memoryview, offset: int, read_for: ReadFor = ReadFor.GUEST) -> int:
        """Fill `view` with what the chain below the top image holds at `offset`; returns how
        many bytes are right (len(view) unless a layer's read was short). `read_for`: see
        Source.read_into."""
        with self.in_use:
            return read_layers_into(self.layers[1:], view, offset, read_for)

    def prefetch_backing(self, offset: int, length: int, read_for: ReadFor = ReadFor.GUEST) -> None:
        """Layer.prefetch of what the chain below the top image holds for the range, for a read
        for `read_for` that follows."""
        with self.in_use:
            prefetch_layers(self.layers[1:], offset, length, read_for)

    def write(self, offset: int, data: bytes, wait: bool = True) -> int:
        """Write guest data into the top image; returns how many bytes fit in the virtual size.
        `wait`: see QedImage.write."""
        length = max(0, min(len(data), self.size - offset))
        if length:
            try:
                with self.in_use:
                    self.top.write(offset, data[:length], wait, below=self._below())
            finally:  # also half-way: the tables may have changed before the error
                self._remapped(offset, length)
        return length

    def discard(self, offset: int, length: int) -> None:
        """Discard (or write zeros over) a guest range, clamped to the virtual size; see
        QedImage.discard."""
        length = max(0, min(length, self.size - offset))
        # In pieces of one batch of the image's (qed.DISCARD_BATCH clusters), each told to the
        # listener as it is done: the clusters a batch frees may be reused by the next write-back
        # while later batches run, and no reader may still find them where the discard was.
        step = qed.DISCARD_BATCH * self.cluster_size
        end = offset + length
        while offset < end:
            piece = min(end, (offset // step + 1) * step) - offset
            try:
                with self.in_use:
                    self.top.discard(offset, piece, below=self._below())
            finally:
                self._remapped(offset, piece)
            offset += piece

    def populate(self, copies: list[tuple[int, bytes | memoryview]], zero_clusters: bool) -> int:
        """QedImage.populate of copies read with read_backing_into (the stream's and
        copy-on-read's); returns the bytes allocated."""
        if not copies:
            return 0
        start = min(offset for offset, _ in copies)
        try:
            with self.in_use:
                return self.top.populate(copies, zero_clusters, below=self._below())
        finally:
            self._remapped(start, max(offset + len(data) for offset, data in copies) - start)

    def _remapped(self, offset: int, length: int) -> None:
        """After a change of the top image's range, made or failed half-way (a plain call in a
        finally, not a context manager: it is on every guest write's path)."""
        if self.map_listener is not None:
            self.map_listener.remapped(offset, length)

    def _below(self) -> ReadBelow | None:
        """What the top image's writes read below it: the backing layers as they are now, read
        down without coming back here, or nothing. Called under in_use: the layers it binds stay
        open while the write that uses it runs."""
        if len(self.layers) == 1:
            return None
        return functools.partial(read_layers_into, self.layers[1:])

    def flush(self) -> None:
        self.top.flush()

    def find_layer(self, location: str) -> Layer | None:
        """The backing layer at `location` (a path or URL, compared by identity: links followed,
        hard links and equivalent URLs counted), if it is in the chain."""
        identity = location_identity(location)
        if identity is None:
            return None
        return next((layer for layer in self.layers[1:] if layer.source.identity() == identity), None)

    def base_layer(self, location: str) -> Layer:
        """The backing layer a stream's base (or the mount's base=) names; BackingFileError,
        saying why, where `location` is no layer of the chain or names nothing at all (a URL
        with a bad port, say)."""
        try:
            layer = self.find_layer(location)
        except SourceError as err:
            raise BackingFileError(f"base {err}") from None
        if layer is None:
            raise BackingFileError(f"base {display_name(location)} is not in the backing chain of {self.path}")
        return layer

    def base_layer_named(self, name: str) -> Layer:
        """The backing layer a ctl command's base names: as base_layer, a relative name taken
        beside the image; failing that, as QEMU's block-stream finds its base, a relative name
        taken beside each layer's parent in turn, so that the name an image stores for its
        backing file names it wherever that image lives."""
        try:
            return self.base_layer(resolve_backing(self.path, name))
        except BackingFileError:
            if is_url(name) or os.path.isabs(name):
                raise
            for parent, layer in itertools.pairwise(self.layers):
                if names_layer(self.location(parent), name, layer):
                    return layer
            raise

    def location(self, layer: Layer) -> str:
        """Where `layer` was opened from (see `locations`)."""
        return self.locations.get(layer, layer.path)

    def status_above(self, offset: int, length: int, base_index: int,
                     walk: StatusWalk | None = None) -> tuple[BlockStatus, int]:
        """What layers[1:base_index] (the layers above the base, which a stream merges) say about
        the run at `offset`: the first layer that is not UNALLOCATED decides; past a layer's end
        it reads ZERO. A caller that walks forward passes its StatusWalk, so that each layer is
        asked once per run of its own rather than once per call."""
        for layer in self.layers[1:base_index]:
            if offset >= layer.size:
                return BlockStatus.ZERO, length
            inside = min(length, layer.size - offset)
            status, length = walk.block_status(layer, offset, inside) if walk else layer.block_status(offset, inside)
            if status is not BlockStatus.UNALLOCATED:
                return status, length
        return BlockStatus.UNALLOCATED, length

    def top_status(self, offset: int, length: int, max_lookups: int) -> tuple[BlockStatus, int]:
        """The top image's own block status of the run at `offset`, from at most `max_lookups`
        lookups (QedImage.block_status): what a copy into it must leave alone."""
        return self.top.block_status(offset, length, max_lookups)

    def block_status(self, offset: int, length: int, walk: StatusWalk | None = None) -> tuple[BlockStatus, int]:
        """What the guest view holds for the run at `offset`: the first layer, top down, that is
        not UNALLOCATED decides; UNALLOCATED everywhere reads as zeros. `walk`: see status_above;
        it remembers the top's runs too, so it must not outlive a guest write (seek's lasts one
        call)."""
        with self.in_use:
            if walk is None:
                status, length = self.top.block_status(offset, length)
            else:
                status, length = walk.block_status(self.top, offset, length)
            if status is BlockStatus.UNALLOCATED:
                status, length = self.status_above(offset, length, len(self.layers), walk)
        return status, length

    def seek(self, offset: int, data: bool) -> int | None:
        """lseek's SEEK_DATA (`data`) or SEEK_HOLE from `offset`: the first offset at or after it
        that holds data (FOUND in the layer that decides) or a hole (ZERO, or unallocated in
        every layer). The end of the disk counts as a hole; None where no data follows. Costs
        one block-status answer per run crossed (the walk remembers each layer's run), each
        bounded (QedImage.block_status)."""
        return self.seek_some(offset, data, 0)[1]

    def seek_some(self, offset: int, data: bool, max_runs: int) -> tuple[bool, int | None]:
        """seek, crossing at most `max_runs` runs (0: all of them): (True, its answer), or (False,
        where it stopped), from where a seek goes on."""
        pos, walk, runs = offset, StatusWalk(self.size), 0
        while pos < self.size:
            if runs == max_runs > 0:
                return False, pos
            status, run = self.block_status(pos, self.size - pos, walk)
            if (status is BlockStatus.FOUND) == data:
                return True, pos
            pos, runs = pos + run, runs + 1
        return True, None if data else self.size

    def rebase(self, base_index: int) -> Layer | None:
        """After a stream has copied layers[1:base_index] into the top image: make
        layers[base_index] (or nothing, when base_index is len(layers)) the top's backing file,
        on disk, then in the chain once no read is in flight, and close the merged layers.
        Returns the new backing layer."""
        backing = self.layers[base_index] if base_index < len(self.layers) else None
        self.top.change_backing_file(
            None if backing is None else backing_name(self.top.path, self.location(backing)),
            raw=backing is not None and backing.format_name == raw.FORMAT_NAME,
        )
        with self.in_use.exclusive():
            retired, self.layers = self.layers[1:base_index], [self.top, *self.layers[base_index:]]
            self.remote = has_remote_layer(self.layers[1:])
        if self.map_listener is not None:
            self.map_listener.retiring()
        # A copy-on-read may have copied from the merged layers since the backing file changed;
        # until that is durable, writing it again after a failed fdatasync reads them again. If
        # this flush fails, they stay open (the copy's record still reads them) and we raise.
        self.top.flush()
        for layer in retired:
            self.locations.pop(layer, None)
            layer.close()
        return backing

    def close(self) -> None:
        """Close every layer, the top last so that its clean-close header update happens after
        nothing else can fail."""
        if self.map_listener is not None:
            self.map_listener.retiring()
        errors = []
        for layer in reversed(self.layers):
            try:
                layer.close()
            except OSError as err:
                errors.append(describe_os_error(layer.path, err))
        if errors:
            raise FusestreamError("; ".join(errors))


def names_layer(parent: str, name: str, layer: Layer) -> bool:
    """Whether `name`, taken against the location of `parent`, is where `layer` is (compared
    by identity, as find_layer does)."""
    try:
        return location_identity(resolve_backing(parent, name)) == layer.source.identity()
    except SourceError:  # a name that names nothing names no layer
        return False


def has_remote_layer(layers: list[Layer]) -> bool:
    return any(layer.source.remote for layer in layers)


@dataclasses.dataclass(frozen=True)
class Confinement:
    """What a possibly hostile image may make us open as its backing chain, and how remote
    layers are read (`http`: its allowed_origins confine them)."""

    backing_dir: str | None = None  # backing files only inside this directory (links resolved)
    allow_devices: bool = False  # a block device may be a raw layer
    max_depth: int = MAX_CHAIN_DEPTH
    http: HttpOptions = HttpOptions()

    def check(self, image: str, backing_path: str) -> None:
        """Refuse a backing file outside backing_dir, or a URL whose origin is not allowed
        (with backing_dir, only listed origins are), before anything is contacted."""
        if is_url(backing_path):
            self._check_url(image, backing_path)
            return
        if self.backing_dir is None:
            return
        inside = os.path.realpath(self.backing_dir)
        real = os.path.realpath(backing_path)
        if os.path.commonpath([inside, real]) != inside:
            raise BackingFileError(f"{image}: backing file {backing_path} is outside backing_dir {self.backing_dir}")

    def _check_url(self, image: str, url: str) -> None:
        allowed = self.http.allowed_origins
        if allowed is None and self.backing_dir is None:
            return
        origin = url_origin(url)
        if allowed is None:
            raise BackingFileError(f"{image}: backing file {display_name(url)} is remote, and with backing_dir "
                                   "only the origins that allowed_origins lists may be contacted")
        if origin not in allowed:
            raise BackingFileError(f"{image}: backing file {display_name(url)}: {origin} is not an allowed "
                                   f"origin (allowed_origins: {', '.join(allowed) or 'none'})")


def open_chain(path: str, writable: bool = True, lock: bool = True, confinement: Confinement = Confinement()) -> Chain:
    """Open a QED image (a local path, or read-only a URL) and its whole backing chain; on any
    error nothing stays open."""
    path = absolute_location(path)
    chain = Chain([qed.open_image(path, writable=writable, lock=lock)])
    try:
        _open_backing(chain, path, confinement, lock)
    except BaseException:
        for layer in chain.layers:
            layer.close()
        raise
    chain.remote = has_remote_layer(chain.backing_layers)
    return chain


def _open_backing(chain: Chain, location: str, confinement: Confinement, lock: bool) -> None:
    """Follow backing names down from the top image, opened from `location`, appending each
    opened layer."""
    current = chain.layers[0]
    seen = {current.source.identity()}
    while current.backing_filename is not None:
        try:
            location = resolve_backing(location, current.backing_filename)
            identity = location_identity(location)  # before opening: a loop must not meet our own lock
        except SourceError as err:  # a URL that cannot name anything (a bad port)
            raise BackingFileError(f"{current.path}: backing file {err}") from None
        shown = display_name(location)
        if identity is not None and identity in seen:
            raise BackingFileError(f"{current.path}: backing file loop: {shown} is already in the chain")
        if len(chain.layers) > confinement.max_depth:
            raise BackingFileError(f"{current.path}: backing chain deeper than {confinement.max_depth} layers")
        confinement.check(current.path, location)
        if not location_exists(location):
            raise BackingFileError(f"{current.path}: backing file {location} does not exist")
        try:
            layer = open_layer(location, current.backing_format, lock, confinement.allow_devices, confinement.http)
        except FusestreamError as err:  # say which image names the file at fault
            raise BackingFileError(f"{current.path}: backing file {err}") from None
        seen.add(layer.source.identity())
        chain.layers.append(layer)
        chain.locations[layer] = location
        current = layer
