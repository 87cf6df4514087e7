"""Hostile qcow2 backing layers, fuzzed with hypothesis from valid images that qemu-img made.

Whatever the header, its extensions, the L1 and L2 tables, the compressed descriptors or the
compressed data hold: opening the chain works or fails with one of our errors (one line naming
the file), reads return exactly what was asked or fail with CorruptionError (EIO for that
range), no read goes outside the file, nothing is written, and nothing hangs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import shutil
import struct
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from conftest import qemu_img, qemu_io, read_alone
from hypothesis import event, given
from hypothesis import strategies as st

from fusestream.chain import open_chain
from fusestream.errors import CorruptionError, FusestreamError
from fusestream.formats import qed
from fusestream.formats.qcow2_structs import (
    L1E_OFFSET_MASK,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_DATA_FILE,
    QCOW2_EXT_MAGIC_END,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_HEADER_V2,
    QCOW2_HEADER_V3,
    QCOW2_V2_HEADER_LENGTH,
    QCOW2_V3_HEADER_LENGTH,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    csize_shift,
)

BASE_SIZE = 256 * 1024
TOP_SIZE = 1024 * 1024
READ = 8192

U64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from(
    [0, 1, 2**63, 2**64 - 1, 2**62, 2**63 + 2**62, 2**32, 4095, 4096, 65536, 2**56 - 512, 2**55]))
U32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 3, 4, 8, 9, 16, 21, 22, 72, 104, 112, 2**31]))
V2_FIELDS = {
    "version": st.one_of(U32, st.sampled_from([2, 3])), "backing_file_offset": U64, "backing_file_size": U32,
    "cluster_bits": st.one_of(U32, st.integers(8, 22)), "size": U64, "crypt_method": U32, "l1_size": U32,
    "l1_table_offset": U64, "refcount_table_offset": U64, "refcount_table_clusters": U32,
    "nb_snapshots": U32, "snapshots_offset": U64,
}
V3_FIELDS = {
    "incompatible_features": st.one_of(U64, st.integers(0, 63)), "compatible_features": U64,
    "autoclear_features": U64, "refcount_order": U32, "header_length": U32,
}


@dataclasses.dataclass(frozen=True)
class Seed:
    name: str
    content: bytes

    def __repr__(self) -> str:  # a failing example's report stays readable
        return f"Seed({self.name!r})"

    def _repr_pretty_(self, printer, cycle) -> None:  # what hypothesis prints
        printer.text(repr(self))

    @property
    def header(self):
        return QCOW2_HEADER_V2.parse(self.content)

    def l2_tables(self) -> list[int]:
        h = self.header
        entries = struct.unpack_from(f">{h.l1_size}Q", self.content, h.l1_table_offset)
        return [e & L1E_OFFSET_MASK for e in entries if e & L1E_OFFSET_MASK]


def make_seeds(directory: Path) -> dict[str, Seed]:
    """Small images (4 KiB and 16 KiB clusters, so that the fuzzer's bytes land on metadata)
    over a raw base: zlib and zstd compressed, version 2, extended L2 with subclusters."""
    rng = random.Random(3)
    source = directory / "source.raw"
    source.write_bytes(b"".join(rng.randbytes(61) * 60 if rng.random() < 0.6 else bytes(3660) for _ in range(60)))
    variants = {
        "zlib": ["-c", "-o", "cluster_size=4K"],
        "zstd": ["-c", "-o", "cluster_size=4K,compression_type=zstd"],
        "v2": ["-o", "compat=0.10,cluster_size=4K"],
    }
    seeds = {}
    for name, options in variants.items():
        image = directory / f"{name}.qcow2"
        qemu_img("convert", *options, "-O", "qcow2", "-B", "base.raw", "-F", "raw", str(source), str(image))
        seeds[name] = Seed(name, image.read_bytes())
    image = directory / "extl2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=16K", "-b", "base.raw", "-F", "raw",
             str(image), str(BASE_SIZE))
    qemu_io(image, "write -P 1 1k 3k", "write -z 20k 2k", "write -P 2 64k 16k", "write -z 128k 16k", fmt="qcow2")
    seeds["extl2"] = Seed("extl2", image.read_bytes())
    return seeds


@pytest.fixture(scope="module")
def seeds():
    directory = Path(tempfile.mkdtemp(prefix="fusestream-qcow2-fuzz-"))
    (directory / "base.raw").write_bytes(bytes(BASE_SIZE))
    try:
        yield make_seeds(directory)
    finally:
        shutil.rmtree(directory)


SEED_NAMES = st.sampled_from(["zlib", "zstd", "v2", "extl2"])


class ReadLog:
    """Every pread/preadv this process makes, so that reads outside the qcow2 file show up."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.outside: list[tuple[int, int]] = []
        self._pread, self._preadv = os.pread, os.preadv

    def _check(self, fd: int, offset: int, length: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == self.path:
            size = os.fstat(fd).st_size
            if offset < 0 or (offset > 0 and offset + length > size):  # at 0: the probe and header reads
                self.outside.append((offset, length))

    def pread(self, fd, length, offset):
        self._check(fd, offset, length)
        return self._pread(fd, length, offset)

    def preadv(self, fd, buffers, offset, *args):
        self._check(fd, offset, sum(len(memoryview(b)) for b in buffers))
        return self._preadv(fd, buffers, offset, *args)

    @contextlib.contextmanager
    def active(self):
        with mock.patch.object(os, "pread", self.pread), mock.patch.object(os, "preadv", self.preadv):
            yield


def exercise(content: bytes, tmp: Path, offsets: tuple[int, ...] = ()) -> None:
    """Open a QED top over the image as a mount would, and read the image through it and on its
    own (also at `offsets`); only our errors may come out, no read may leave the file, the file must
    not change."""
    (tmp / "base.raw").write_bytes(bytes(BASE_SIZE))
    path = tmp / "layer.qcow2"
    path.write_bytes(content)
    top = tmp / "top.qed"
    qed.create(str(top), TOP_SIZE, backing_filename=path.name, overwrite=True)
    reads = ReadLog(path)
    with reads.active():
        read_chain(top, tmp, offsets)
    assert not reads.outside, reads.outside
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(content).digest()


def read_chain(top: Path, tmp: Path, offsets: tuple[int, ...]) -> None:
    try:
        chain = open_chain(str(top), writable=False)
    except FusestreamError as err:
        assert str(err).startswith(str(tmp)) and "\n" not in str(err), err
        event(f"refused at open: {type(err).__name__}")  # --hypothesis-show-statistics
        return
    event("opened")
    try:
        layer = chain.layers[1]
        for offset in (0, 4096 * 5, 65536, TOP_SIZE - READ):
            try:
                assert len(chain.read(offset, READ)) == READ
            except CorruptionError:  # EIO for this range: what a hostile table deserves
                event("EIO for a range")
        ends = {0, layer.size // 2, max(0, layer.size - READ), max(0, layer.size - 1)}
        for offset in ends | {o for o in offsets if o < layer.size}:
            length = min(READ, layer.size - offset)
            with contextlib.suppress(CorruptionError):
                assert len(read_alone(layer, offset, length)) == length
                status, run = layer.block_status(offset, max(1, length))
                assert 0 < run <= max(1, length)
    finally:
        chain.close()


@given(name=SEED_NAMES, v2=st.fixed_dictionaries({}, optional=V2_FIELDS),
       v3=st.fixed_dictionaries({}, optional=V3_FIELDS), compression_type=st.none() | st.integers(0, 255))
def test_fuzzed_header_fields(seeds, tmp_path_factory, name, v2, v3, compression_type):
    content = bytearray(seeds[name].content)
    header = QCOW2_HEADER_V2.parse(content)
    header.update(v2)
    content[:QCOW2_V2_HEADER_LENGTH] = QCOW2_HEADER_V2.build(header)
    if name != "v2":
        fields = QCOW2_HEADER_V3.parse(content[QCOW2_V2_HEADER_LENGTH:])
        fields.update(v3)
        content[QCOW2_V2_HEADER_LENGTH:QCOW2_V3_HEADER_LENGTH] = QCOW2_HEADER_V3.build(fields)
        if compression_type is not None:
            content[QCOW2_V3_HEADER_LENGTH] = compression_type
    exercise(bytes(content), tmp_path_factory.mktemp("h"))


@given(name=SEED_NAMES, flips=st.lists(st.tuples(st.integers(0, 7 * 4096 - 1), st.integers(1, 255)),
                                        min_size=1, max_size=40))
def test_flipped_bytes_in_header_and_tables(seeds, tmp_path_factory, name, flips):
    content = bytearray(seeds[name].content)
    for offset, mask in flips:
        content[offset % len(content)] ^= mask
    exercise(bytes(content), tmp_path_factory.mktemp("f"))


def descriptors(seed: Seed) -> st.SearchStrategy[int]:
    """Compressed cluster descriptors: offsets at the header, the tables, the end of the file
    and beyond, with every sector count."""
    h, size = seed.header, len(seed.content)
    shift = csize_shift(h.cluster_bits)
    offsets = st.one_of(st.integers(0, (1 << shift) - 1), st.sampled_from(
        [0, 100, h.l1_table_offset, h.refcount_table_offset, size - 1, size, size + 512, *seed.l2_tables()]))
    sectors = st.integers(0, (1 << (h.cluster_bits - 8)) - 1)
    return st.builds(lambda o, n: QCOW_OFLAG_COMPRESSED | n << shift | o, offsets, sectors)


@given(name=SEED_NAMES, data=st.data())
def test_hostile_table_entries(seeds, tmp_path_factory, name, data):
    seed = seeds[name]
    h, content = seed.header, bytearray(seed.content)
    aimed = st.sampled_from([0, 512, h.l1_table_offset, h.refcount_table_offset, len(content),
                             *seed.l2_tables()]).map(lambda o: o | QCOW_OFLAG_COPIED)
    entry = st.one_of(U64, aimed, descriptors(seed))
    l1 = data.draw(st.dictionaries(st.integers(0, max(0, h.l1_size - 1)), st.one_of(U64, aimed), max_size=3))
    l2 = data.draw(st.dictionaries(st.integers(0, (1 << h.cluster_bits) // 8 - 1), entry, max_size=8))
    for table, entries in ((h.l1_table_offset, l1), (seed.l2_tables()[0], l2)):
        for index, value in entries.items():
            struct.pack_into(">Q", content, table + 8 * index, value)
    cs = 1 << h.cluster_bits
    offsets = tuple(i * cs * (cs // 8) for i in l1) + tuple(i * cs for i in l2)
    exercise(bytes(content), tmp_path_factory.mktemp("t"), offsets)


EXTENSION_MAGICS = st.one_of(U32, st.sampled_from([
    QCOW2_EXT_MAGIC_END, QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_FEATURE_TABLE, QCOW2_EXT_MAGIC_DATA_FILE]))


@given(name=st.sampled_from(["zlib", "zstd", "extl2"]),
       extensions=st.lists(st.tuples(EXTENSION_MAGICS, st.one_of(U32, st.integers(0, 600)), st.binary(max_size=300)),
                           max_size=5))
def test_hostile_header_extensions(seeds, tmp_path_factory, name, extensions):
    """Extensions of any type, length (past the cluster, near 2^32) and content, in place of
    qemu-img's own."""
    content = bytearray(seeds[name].content)
    header_length = QCOW2_HEADER_V3.parse(content[QCOW2_V2_HEADER_LENGTH:]).header_length
    area = b"".join(struct.pack(">II", magic, length) + data + bytes(-len(data) % 8)
                    for magic, length, data in extensions)
    content[header_length : header_length + len(area)] = area
    exercise(bytes(content[: len(seeds[name].content)]), tmp_path_factory.mktemp("x"))


@given(name=st.sampled_from(["zlib", "zstd"]),
       flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=20))
def test_damaged_compressed_data(seeds, tmp_path_factory, name, flips):
    """Bytes flipped in the data area, where the compressed clusters are: inflating fails (EIO)
    or gives one cluster, never more, never a crash."""
    seed = seeds[name]
    content = bytearray(seed.content)
    data_start = max(seed.l2_tables()) + (1 << seed.header.cluster_bits)
    for offset, mask in flips:
        content[data_start + offset % (len(content) - data_start)] ^= mask
    exercise(bytes(content), tmp_path_factory.mktemp("c"))


@given(name=st.one_of(st.binary(min_size=1, max_size=1100), st.sampled_from(
    [b"base.raw", b"./base.raw", b"layer.qcow2", b"top.qed", b"/dev/zero", b"/proc/self/mem", b"..", b"/"])))
def test_hostile_backing_names(seeds, tmp_path_factory, name):
    content = bytearray(seeds["zlib"].content)
    header = QCOW2_HEADER_V2.parse(content)
    header.update({"backing_file_offset": 2048, "backing_file_size": len(name)})
    content[:QCOW2_V2_HEADER_LENGTH] = QCOW2_HEADER_V2.build(header)
    content[2048 : 2048 + len(name)] = name
    exercise(bytes(content[: len(seeds["zlib"].content)]), tmp_path_factory.mktemp("n"))
