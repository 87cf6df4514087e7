"""The backing chain: open an image and every layer below it, and read through them.

Backing names are resolved relative to the directory of the image that names them; formats are
probed by magic unless the image says the backing file is raw (QED_F_BACKING_FORMAT_NO_PROBE) or,
for qcow2, names its format (the backing format header extension).
Every failure names the file that caused it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator

from .errors import BackingFileError, FusestreamError, describe_os_error
from .formats import qcow2, qed
from .formats.layer import BlockStatus, Layer, open_regular_file, prefetch_from, read_into_from
from .formats.qed_structs import QED_MAGIC
from .formats.raw import RawLayer

MAX_CHAIN_DEPTH = 64
# A guest read of at least this much (the kernel's readahead: 1 MiB requests) first prefetches
# all of its clusters, so that the ones scattered over the layers' files come from the device
# together rather than one synchronous read after another. Cold sequential reads of the bench
# chain went from ~700 to ~880 MiB/s (bench/read_bench.py); smaller reads gain nothing.
PREFETCH_READ_MIN = 128 * 1024


# Magic numbers of the image formats QEMU probes. A backing file that carries one of these must
# never be read as raw: that would serve the format's own metadata as disk data.
IMAGE_MAGICS = {
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
QCOW_MAGIC = b"QFI\xfb"
VDI_SIGNATURE = (64, b"\x7f\x10\xda\xbe")  # VDI keeps its magic after a 64-byte text banner
PROBE_BYTES = 512


def probe_format(path: str, allow_device: bool = False) -> str:
    """The format of a file by its magic: 'qed', another image format's name, or 'raw'."""
    try:
        fd = open_regular_file(path, os.O_RDONLY, allow_block_device=allow_device)
        try:
            head = os.pread(fd, PROBE_BYTES, 0)
        finally:
            os.close(fd)
    except OSError as err:
        raise BackingFileError(describe_os_error(path, err)) from None
    if head.startswith(QED_MAGIC):
        return qed.FORMAT_NAME
    if head.startswith(QCOW_MAGIC):  # qcow and qcow2 share it; the version follows
        return "qcow" if int.from_bytes(head[4:8], "big") == 1 else "qcow2"
    at, signature = VDI_SIGNATURE
    if head[at : at + len(signature)] == signature:
        return "vdi"
    return next((fmt for magic, fmt in IMAGE_MAGICS.items() if head.startswith(magic)), "raw")


def resolve_backing(image_path: str, backing_name: str) -> str:
    """A backing name as QEMU reads it: absolute, or relative to the image's directory."""
    if os.path.isabs(backing_name):
        return backing_name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), backing_name)


def open_layer(path: str, fmt: str | None = None, lock: bool = True, allow_device: bool = False) -> Layer:
    """Open one read-only layer (without its own backing chain). With `lock`, it holds a shared
    lock so that no fusestream mount writes it while it is in use; `allow_device` lets a block
    device be a raw layer."""
    fmt = fmt or probe_format(path, allow_device)
    if fmt == "raw":
        return RawLayer(path, lock=lock, allow_device=allow_device)
    if fmt == qed.FORMAT_NAME:
        return qed.QedImage(path, writable=False, lock=lock)
    if fmt == qcow2.FORMAT_NAME:
        return qcow2.Qcow2Image(path, lock=lock)
    raise BackingFileError(f"{path}: unsupported image format '{fmt}' (raw, qed and qcow2 layers are supported)")


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
    """The top image and the layers below it, top first."""

    top: qed.QedImage
    layers: list[Layer]
    in_use: LayersInUse = dataclasses.field(default_factory=LayersInUse)

    @property
    def size(self) -> int:
        return self.top.size

    @property
    def backing_layers(self) -> list[Layer]:
        return self.layers[1:]

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Read the guest view of [offset, offset+length), clamped to the virtual size."""
        length = max(0, min(length, self.size - offset))
        if not length:
            return b""
        with self.in_use:
            if length >= PREFETCH_READ_MIN:
                self.top.prefetch(offset, length)
            return self.top.read(offset, length)

    def read_backing_into(self, view: memoryview, offset: int, direct: bool = False) -> int:
        """Fill `view` with what the chain below the top image holds at `offset`; returns how
        many bytes are right (len(view) unless a layer's read was short). `direct`: see
        Layer.read_into."""
        with self.in_use:
            return read_into_from(self.top.backing, view, offset, direct)

    def prefetch_backing(self, offset: int, length: int) -> None:
        """Layer.prefetch of what the chain below the top image holds for the range."""
        with self.in_use:
            prefetch_from(self.top.backing, offset, length)

    def write(self, offset: int, data: bytes, wait: bool = True) -> int:
        """Write guest data into the top image; returns how many bytes fit in the virtual size.
        `wait`: see QedImage.write."""
        length = max(0, min(len(data), self.size - offset))
        if length:
            with self.in_use:
                self.top.write(offset, data[:length], wait)
        return length

    def discard(self, offset: int, length: int) -> None:
        """Discard (or write zeros over) a guest range, clamped to the virtual size; see
        QedImage.discard."""
        length = max(0, min(length, self.size - offset))
        if length:
            with self.in_use:
                self.top.discard(offset, length)

    def flush(self) -> None:
        self.top.flush()

    def find_layer(self, path: str) -> Layer | None:
        """The backing layer at `path` (compared after resolving links), if it is in the chain."""
        real = os.path.realpath(path)
        return next((layer for layer in self.layers[1:] if os.path.realpath(layer.path) == real), None)

    def status_above(self, offset: int, length: int, stop: int,
                     walk: StatusWalk | None = None) -> tuple[BlockStatus, int]:
        """What layers[1:stop] (the layers a stream merges) say about the run at `offset`: the
        first layer that is not UNALLOCATED decides; past a layer's end it reads ZERO. A caller
        that walks forward passes its StatusWalk, so that each layer is asked once per run of
        its own rather than once per call."""
        for layer in self.layers[1:stop]:
            if offset >= layer.size:
                return BlockStatus.ZERO, length
            inside = min(length, layer.size - offset)
            status, length = walk.block_status(layer, offset, inside) if walk else layer.block_status(offset, inside)
            if status is not BlockStatus.UNALLOCATED:
                return status, length
        return BlockStatus.UNALLOCATED, length

    def block_status(self, offset: int, length: int, walk: StatusWalk | None = None) -> tuple[BlockStatus, int]:
        """What the guest view holds for the run at `offset`: the first layer, top down, that is
        not UNALLOCATED decides; UNALLOCATED everywhere reads as zeros. `walk`: see status_above."""
        with self.in_use:
            status, length = self.top.block_status(offset, length)
            if status is BlockStatus.UNALLOCATED:
                status, length = self.status_above(offset, length, len(self.layers), walk)
        return status, length

    def seek(self, offset: int, data: bool) -> int | None:
        """lseek's SEEK_DATA (`data`) or SEEK_HOLE from `offset`: the first offset at or after it
        that holds data (FOUND in the layer that decides) or a hole (ZERO, or unallocated in
        every layer). The end of the disk counts as a hole; None where no data follows. Costs
        one block-status answer per run crossed."""
        pos, walk = offset, StatusWalk(self.size)
        while pos < self.size:
            status, run = self.block_status(pos, self.size - pos, walk)
            if (status is BlockStatus.FOUND) == data:
                return pos
            pos += run
        return None if data else self.size

    def rebase(self, stop: int) -> Layer | None:
        """After a stream has copied layers[1:stop] into the top image: make layers[stop] (or
        nothing) the top's backing file, on disk and in memory, and close the merged layers."""
        base = self.layers[stop] if stop < len(self.layers) else None
        self.top.change_backing_file(
            None if base is None else backing_name(self.top.path, base.path),
            raw=base is not None and base.format_name == "raw",
        )
        with self.in_use.exclusive():
            self.top.backing = base
            retired, self.layers = self.layers[1:stop], [self.top, *self.layers[stop:]]
        for layer in retired:
            layer.close()
        return base

    def close(self) -> None:
        """Close every layer, the top last so that its clean-close header update happens after
        nothing else can fail."""
        errors = []
        for layer in reversed(self.layers):
            try:
                layer.close()
            except OSError as err:
                errors.append(describe_os_error(layer.path, err))
        if errors:
            raise FusestreamError("; ".join(errors))


def backing_name(image_path: str, backing_path: str) -> str:
    """The name to store for a backing file: relative when it lies beside the image."""
    if os.path.dirname(os.path.abspath(backing_path)) == os.path.dirname(os.path.abspath(image_path)):
        return os.path.basename(backing_path)
    return os.path.abspath(backing_path)


@dataclasses.dataclass(frozen=True)
class Confinement:
    """What a possibly hostile image may make us open as its backing chain."""

    backing_dir: str | None = None  # backing files only inside this directory (links resolved)
    allow_devices: bool = False  # a block device may be a raw layer
    max_depth: int = MAX_CHAIN_DEPTH

    def check(self, image: str, backing_path: str) -> None:
        if self.backing_dir is None:
            return
        inside = os.path.realpath(self.backing_dir)
        real = os.path.realpath(backing_path)
        if os.path.commonpath([inside, real]) != inside:
            raise BackingFileError(f"{image}: backing file {backing_path} is outside backing_dir {self.backing_dir}")


def open_chain(path: str, writable: bool = True, lock: bool = True, confinement: Confinement = Confinement()) -> Chain:
    """Open a QED image and its whole backing chain; on any error nothing stays open."""
    path = os.path.abspath(path)
    top = qed.QedImage(path, writable=writable, lock=lock)
    layers: list[Layer] = [top]
    try:
        _open_backing(layers, confinement, lock)
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return Chain(top, layers)


def _open_backing(layers: list[Layer], confinement: Confinement, lock: bool) -> None:
    """Follow backing names down from layers[-1], appending each opened layer."""
    seen = {_file_identity(layers[0].path)}
    current = layers[0]
    while isinstance(current, qed.QedImage | qcow2.Qcow2Image) and current.backing_filename is not None:
        backing_path = resolve_backing(current.path, current.backing_filename)
        identity = _file_identity(backing_path)
        if identity is not None and identity in seen:
            raise BackingFileError(f"{current.path}: backing file loop: {backing_path} is already in the chain")
        if len(layers) > confinement.max_depth:
            raise BackingFileError(f"{current.path}: backing chain deeper than {confinement.max_depth} layers")
        confinement.check(current.path, backing_path)
        if not os.path.exists(backing_path):
            raise BackingFileError(f"{current.path}: backing file {backing_path} does not exist")
        fmt = "raw" if current.backing_format_is_raw else getattr(current, "backing_format", None)
        try:
            layer = open_layer(backing_path, fmt, lock, confinement.allow_devices)
        except FusestreamError as err:  # say which image names the file at fault
            raise BackingFileError(f"{current.path}: backing file {err}") from None
        seen.add(identity)
        layers.append(layer)
        current.backing = layer
        current = layer


def _file_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at `path`, links followed: one file under any name, hard
    links included; None where there is no file to open (the checks after say why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
