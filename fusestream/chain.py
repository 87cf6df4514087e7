"""The backing chain: open an image and every layer below it, and read through them.

Backing names are resolved relative to the directory of the image that names them; formats are
probed by magic unless the image says the backing file is raw (QED_F_BACKING_FORMAT_NO_PROBE).
Every failure names the file that caused it.
"""

from __future__ import annotations

import dataclasses
import os

from .errors import BackingFileError, FusestreamError, InvalidImageError, describe_os_error
from .formats import qed
from .formats.layer import Layer
from .formats.qed_structs import QED_MAGIC
from .formats.raw import RawLayer

MAX_CHAIN_DEPTH = 64


def probe_format(path: str) -> str:
    """The format of a file, by its magic: 'qed', or 'raw' for anything without a known magic."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(QED_MAGIC))
    except OSError as err:
        raise BackingFileError(describe_os_error(path, err)) from None
    return qed.FORMAT_NAME if magic == QED_MAGIC else "raw"


def resolve_backing(image_path: str, backing_name: str) -> str:
    """A backing name as QEMU reads it: absolute, or relative to the image's directory."""
    if os.path.isabs(backing_name):
        return backing_name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), backing_name)


def open_layer(path: str, fmt: str | None = None, lock: bool = True) -> Layer:
    """Open one read-only layer (without its own backing chain). With `lock`, it holds a shared
    lock so that no fusestream mount writes it while it is in use."""
    fmt = fmt or probe_format(path)
    if fmt == "raw":
        return RawLayer(path, lock=lock)
    if fmt == qed.FORMAT_NAME:
        return qed.QedImage(path, writable=False, lock=lock)
    raise BackingFileError(f"{path}: unsupported backing format '{fmt}'")


@dataclasses.dataclass
class Chain:
    """The top image and the layers below it, top first."""

    top: qed.QedImage
    layers: list[Layer]

    @property
    def size(self) -> int:
        return self.top.size

    @property
    def backing_layers(self) -> list[Layer]:
        return self.layers[1:]

    def read(self, offset: int, length: int) -> bytes:
        """Read the guest view of [offset, offset+length), clamped to the virtual size."""
        length = max(0, min(length, self.size - offset))
        return self.top.read(offset, length) if length else b""

    def write(self, offset: int, data: bytes) -> int:
        """Write guest data into the top image; returns how many bytes fit in the virtual size."""
        length = max(0, min(len(data), self.size - offset))
        if length:
            self.top.write(offset, data[:length])
        return length

    def flush(self) -> None:
        self.top.flush()

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


def open_chain(path: str, writable: bool = True, lock: bool = True, max_depth: int = MAX_CHAIN_DEPTH) -> Chain:
    """Open a QED image and its whole backing chain; on any error nothing stays open."""
    path = os.path.abspath(path)
    top = qed.QedImage(path, writable=writable, lock=lock)
    layers: list[Layer] = [top]
    try:
        _open_backing(layers, max_depth, lock)
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return Chain(top, layers)


def _open_backing(layers: list[Layer], max_depth: int, lock: bool) -> None:
    """Follow backing names down from layers[-1], appending each opened layer."""
    seen = {os.path.realpath(layers[0].path)}
    current = layers[0]
    while isinstance(current, qed.QedImage) and current.backing_filename is not None:
        backing_path = resolve_backing(current.path, current.backing_filename)
        real = os.path.realpath(backing_path)
        if real in seen:
            raise BackingFileError(f"{current.path}: backing file loop: {backing_path} is already in the chain")
        if len(layers) > max_depth:
            raise BackingFileError(f"{current.path}: backing chain deeper than {max_depth} layers")
        if not os.path.exists(backing_path):
            raise BackingFileError(f"{current.path}: backing file {backing_path} does not exist")
        fmt = "raw" if current.backing_format_is_raw else None
        try:
            layer = open_layer(backing_path, fmt, lock)
        except InvalidImageError as err:
            raise BackingFileError(f"{current.path}: backing file {err}") from None
        seen.add(real)
        layers.append(layer)
        current.backing = layer
        current = layer
