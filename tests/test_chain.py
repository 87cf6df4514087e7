"""The backing chain: probing, name resolution, and every way a chain can be wrong."""

from __future__ import annotations

import errno
import gc
import logging
import os
import socket
import subprocess
import types

import pytest
from conftest import qemu_convert, qemu_img, qemu_io

from fusestream.chain import PREFETCH_READ_MIN, Confinement, open_chain
from fusestream.copy import Copier
from fusestream.errors import BackingFileError, ImageBusyError
from fusestream.formats import qed
from fusestream.formats.layer import prefetch_layers, read_layers_into
from fusestream.formats.qed_structs import QED_MAGIC
from fusestream.sources import ReadFor


def test_no_probe_reads_a_raw_backing_file_that_starts_with_qed_magic(tmp_path, open_chains):
    """QED_F_BACKING_FORMAT_NO_PROBE: a raw disk whose first bytes look like QED stays raw."""
    base = tmp_path / "base.raw"
    base.write_bytes(QED_MAGIC + bytes((1 << 20) - 4))
    qemu_img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(tmp_path / "top.qed"))
    chain = open_chains(tmp_path / "top.qed", writable=False)
    assert [layer.format_name for layer in chain.layers] == ["qed", "raw"]
    assert chain.read(0, 8) == QED_MAGIC + bytes(4)


def test_backing_names_resolve_relative_to_the_image_not_the_cwd(tmp_path, monkeypatch, open_chains):
    (tmp_path / "images").mkdir()
    base = tmp_path / "images" / "base.raw"
    base.write_bytes(b"\xab" * 65536)
    qemu_img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(tmp_path / "images" / "top.qed"))
    monkeypatch.chdir("/")
    chain = open_chains(tmp_path / "images" / "top.qed", writable=False)
    assert chain.layers[1].path == str(base)


def test_a_relative_base_names_a_layer_beside_the_image_or_as_its_parent_names_it(tmp_path, open_chains):
    """As QEMU's block-stream finds its base: top in t/, its backing file in m/ with the base
    beside it there. "base.raw", the name mid.qed stores, names the base although t/ has none."""
    for directory in ("t", "m"):
        (tmp_path / directory).mkdir()
    (tmp_path / "m" / "base.raw").write_bytes(b"\xab" * 65536)
    qemu_img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(tmp_path / "m" / "mid.qed"))
    qemu_img("create", "-f", "qed", "-b", "../m/mid.qed", "-F", "qed", str(tmp_path / "t" / "top.qed"))
    chain = open_chains(tmp_path / "t" / "top.qed", writable=False)
    mid, base = chain.layers[1:]
    assert chain.base_layer_named("base.raw") is base
    assert chain.base_layer_named("../m/base.raw") is base  # beside the image, as before
    assert chain.base_layer_named("../m/mid.qed") is mid
    assert chain.base_layer_named(str(tmp_path / "m" / "base.raw")) is base
    for name in ("mid.qed", "top.qed", str(tmp_path / "base.raw")):  # t/mid.qed: mid's name is ../m/mid.qed
        with pytest.raises(BackingFileError, match="is not in the backing chain of"):
            chain.base_layer_named(name)


def test_reads_past_the_end_of_a_shorter_backing_file_are_zeros(tmp_path, open_chains):
    (tmp_path / "base.raw").write_bytes(b"\x11" * 6000)
    top = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw", str(top), "64K")
    expected = qemu_convert(top, tmp_path / "expected.raw")
    assert expected == b"\x11" * 6000 + bytes(65536 - 6000)
    chain = open_chains(top)
    assert chain.read(0, 65536) == expected
    chain.write(4000, b"\x22" * 10)  # the allocated cluster's fill also stops at the backing end
    expected = expected[:4000] + b"\x22" * 10 + expected[4010:]
    assert chain.read(0, 65536) == expected
    chain.close()
    assert qemu_convert(top, tmp_path / "after.raw") == expected


def test_a_backing_file_larger_than_the_image_is_cut_at_the_image_size(tmp_path, open_chains):
    (tmp_path / "base.raw").write_bytes(b"\x33" * 3 * 65536)
    top = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(top), "65536")
    chain = open_chains(top)
    assert chain.size == 65536
    assert chain.read(60000, 10000) == b"\x33" * 5536


def test_missing_backing_file_names_it(tmp_path):
    top = tmp_path / "top.qed"
    qed.create(str(top), 1 << 20, backing_filename="gone.raw", backing_raw=True)
    with pytest.raises(BackingFileError, match=r"gone\.raw does not exist"):
        open_chain(str(top))


def test_backing_loop_is_refused(tmp_path):
    a, b = tmp_path / "a.qed", tmp_path / "b.qed"
    qed.create(str(a), 1 << 20, backing_filename="b.qed")
    qed.create(str(b), 1 << 20, backing_filename="a.qed")
    with pytest.raises(BackingFileError, match="loop"):
        open_chain(str(a))


def test_self_loop_through_a_symlink_is_refused(tmp_path):
    os.symlink("a.qed", tmp_path / "alias.qed")
    qed.create(str(tmp_path / "a.qed"), 1 << 20, backing_filename="alias.qed")
    with pytest.raises(BackingFileError, match="loop"):
        open_chain(str(tmp_path / "a.qed"))


def test_too_deep_a_chain_is_refused(tmp_path):
    (tmp_path / "l0.raw").write_bytes(bytes(4096))
    qed.create(str(tmp_path / "l1.qed"), 4096, backing_filename="l0.raw", backing_raw=True)
    for i in range(2, 8):
        qed.create(str(tmp_path / f"l{i}.qed"), 4096, backing_filename=f"l{i - 1}.qed")
    open_chain(str(tmp_path / "l7.qed"), confinement=Confinement(max_depth=7)).close()
    with pytest.raises(BackingFileError, match="deeper than 6"):
        open_chain(str(tmp_path / "l7.qed"), confinement=Confinement(max_depth=6))


def test_unreadable_backing_file_names_it(tmp_path):
    qed.create(str(tmp_path / "top.qed"), 1 << 20, backing_filename="dir.raw")
    (tmp_path / "dir.raw").mkdir()
    with pytest.raises(BackingFileError, match="dir.raw"):
        open_chain(str(tmp_path / "top.qed"))


def test_a_backing_qed_that_is_malformed_names_both_files(tmp_path):
    (tmp_path / "mid.qed").write_bytes(QED_MAGIC + bytes(60))
    qed.create(str(tmp_path / "top.qed"), 1 << 20, backing_filename="mid.qed")
    with pytest.raises(BackingFileError, match=r"top\.qed: backing file .*mid\.qed: invalid cluster_size"):
        open_chain(str(tmp_path / "top.qed"))


def test_one_writer_per_image_and_no_writer_on_a_backing_file(tmp_path, open_chains):
    qemu_img("create", "-f", "qed", str(tmp_path / "mid.qed"), "1M")
    qemu_io(tmp_path / "mid.qed", "write -P 5 0 4k")
    qed.create(str(tmp_path / "top.qed"), 1 << 20, backing_filename="mid.qed")
    open_chains(tmp_path / "top.qed")
    with pytest.raises(ImageBusyError):
        open_chain(str(tmp_path / "top.qed"))
    with pytest.raises(ImageBusyError):
        open_chain(str(tmp_path / "mid.qed"))
    open_chain(str(tmp_path / "top.qed"), writable=False, lock=False).close()


@pytest.mark.parametrize("fmt", ["qcow", "vdi", "vmdk", "vpc", "vhdx", "parallels"])
def test_a_backing_file_in_another_image_format_is_refused_not_read_as_raw(tmp_path, fmt):
    """Reading such a file as raw would serve its metadata as disk data."""
    qemu_img("create", "-f", fmt, str(tmp_path / "b.img"), "16M")
    qed.create(str(tmp_path / "top.qed"), 16 << 20, backing_filename="b.img")
    with pytest.raises(BackingFileError, match=f"unsupported image format '{fmt}'"):
        open_chain(str(tmp_path / "top.qed"))


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket"])
def test_a_backing_name_naming_a_special_file_is_refused_without_hanging(tmp_path, kind):
    special = tmp_path / "special"
    if kind == "fifo":
        os.mkfifo(special)  # opening it for reading would block forever without O_NONBLOCK
    elif kind == "directory":
        special.mkdir()
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(special))
    qed.create(str(tmp_path / "top.qed"), 1 << 20, backing_filename="special", backing_raw=kind != "directory")
    with pytest.raises(BackingFileError, match="not a regular file|No such device"):
        open_chain(str(tmp_path / "top.qed"))


def test_backing_dir_confines_the_chain(tmp_path):
    confined = Confinement(backing_dir=str(tmp_path / "images"))
    (tmp_path / "images").mkdir()
    (tmp_path / "secret.raw").write_bytes(b"not yours" * 1000)
    os.symlink("../secret.raw", tmp_path / "images" / "link.raw")
    for name in ("../secret.raw", str(tmp_path / "secret.raw"), "link.raw"):
        qed.create(str(tmp_path / "images" / "top.qed"), 1 << 20, backing_filename=name, backing_raw=True,
                   overwrite=True)
        with pytest.raises(BackingFileError, match="outside backing_dir"):
            open_chain(str(tmp_path / "images" / "top.qed"), confinement=confined)
    (tmp_path / "images" / "base.raw").write_bytes(bytes(4096))
    qed.create(str(tmp_path / "images" / "top.qed"), 1 << 20, backing_filename="base.raw", backing_raw=True,
               overwrite=True)
    open_chain(str(tmp_path / "images" / "top.qed"), confinement=confined).close()


def test_a_block_device_is_a_raw_layer_only_when_allowed(tmp_path, open_chains):
    (tmp_path / "disk.img").write_bytes(b"\x5a" * (1 << 20))
    device = subprocess.run(["losetup", "--find", "--show", "--read-only", str(tmp_path / "disk.img")],
                            capture_output=True, text=True, check=True).stdout.strip()
    try:
        qed.create(str(tmp_path / "top.qed"), 1 << 20, backing_filename=device, backing_raw=True)
        with pytest.raises(BackingFileError, match="block device .allowed only with -o allow_devices."):
            open_chain(str(tmp_path / "top.qed"))
        chain = open_chains(tmp_path / "top.qed", confinement=Confinement(allow_devices=True))
        assert chain.layers[1].size == 1 << 20
        assert chain.read(4096, 16) == b"\x5a" * 16
        chain.close()
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


# -- prefetching -----------------------------------------------------------------------------------


def merged(ranges) -> list[tuple[int, int]]:
    """The union of (start, end) ranges, as sorted disjoint ranges."""
    union: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if union and start <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        else:
            union.append((start, end))
    return union


def by_fd(calls) -> dict[int, list[tuple[int, int]]]:
    ranges: dict[int, list[tuple[int, int]]] = {}
    for fd, offset, length in calls:
        ranges.setdefault(fd, []).append((offset, offset + length))
    return {fd: merged(r) for fd, r in ranges.items()}


def record_file_io(monkeypatch) -> list[tuple]:
    """Record ("advise", fd, offset, length) for every posix_fadvise WILLNEED and ("read", fd,
    offset, length) for every preadv, in order; both still happen."""
    calls: list[tuple] = []
    real_fadvise, real_preadv = os.posix_fadvise, os.preadv

    def fadvise(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        calls.append(("advise", fd, offset, length))
        real_fadvise(fd, offset, length, advice)

    def preadv(fd, buffers, offset):
        calls.append(("read", fd, offset, sum(len(b) for b in buffers)))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    monkeypatch.setattr(os, "preadv", preadv)
    return calls


def test_a_prefetch_asks_for_exactly_the_file_ranges_that_the_read_reads(chain, monkeypatch, open_chains):
    """Through every layer: each layer's data clusters where it decides, nothing for zero
    clusters or past a backing file's end."""
    c = open_chains(chain.top)
    calls = record_file_io(monkeypatch)
    prefetch_layers(c.layers, 0, chain.size)
    advised = by_fd(call[1:] for call in calls)
    calls.clear()
    read_layers_into(c.layers, memoryview(bytearray(chain.size)), 0)
    read = by_fd(call[1:] for call in calls)
    c.close()
    assert len(read) == 3  # all three layers hold data somewhere
    assert advised == read


def test_a_large_guest_read_prefetches_its_clusters_before_reading_and_a_small_one_does_not(
    tmp_path, chain, monkeypatch, open_chains
):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    calls = record_file_io(monkeypatch)
    for offset in range(0, chain.size, PREFETCH_READ_MIN):
        calls.clear()
        assert c.read(offset, PREFETCH_READ_MIN) == expected[offset : offset + PREFETCH_READ_MIN]
        kinds = [kind for kind, *_ in calls]
        first_read = kinds.index("read") if "read" in kinds else len(kinds)
        assert "advise" not in kinds[first_read:]
        assert by_fd(call[1:] for call in calls[:first_read]) == by_fd(call[1:] for call in calls[first_read:])
    calls.clear()
    assert c.read(4096, 8192) == expected[4096 : 4096 + 8192]
    c.close()
    assert calls and {kind for kind, *_ in calls} == {"read"}


def test_a_kernel_that_refuses_read_ahead_advice_costs_one_warning_per_file_and_no_read(
    tmp_path, chain, monkeypatch, caplog, open_chains
):
    """Prefetching is a hint: where posix_fadvise fails (a sandbox's system call filter, say),
    reads and streams go on without it, and each file says so once."""
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    refused: list[int] = []

    def refuse(fd, offset, length, advice):
        refused.append(fd)
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    with caplog.at_level(logging.WARNING):
        for offset in range(0, chain.size, PREFETCH_READ_MIN):
            assert c.read(offset, PREFETCH_READ_MIN) == expected[offset : offset + PREFETCH_READ_MIN]
        copier = Copier(c, None, pipelined=True)
        copier.copy_range(0, chain.size)
        copier.close()
        c.rebase(copier.base_index)
        assert c.read(0, chain.size) == expected
    c.close()
    assert len(refused) == len(set(refused)) == 3  # one try per file of the chain
    warnings = [r.getMessage() for r in caplog.records if "read-ahead advice" in r.getMessage()]
    assert len(warnings) == 3 and all("Operation not permitted" in w for w in warnings)


# -- one chain, stored once -------------------------------------------------------------------------


class RecordedLayer:
    """Wraps a layer; records the (offset, length) of every read_into and prefetch it is asked,
    and the ranges it hands back, by kind."""

    def __init__(self, layer):
        self.layer = layer
        self.path, self.format_name, self.size, self.source = layer.path, layer.format_name, layer.size, layer.source
        self.asked: dict[str, list[tuple[int, int]]] = {"read": [], "prefetch": []}
        self.left: dict[str, list[tuple[int, int]]] = {"read": [], "prefetch": []}

    def read_into(self, view, offset, read_for=ReadFor.GUEST):
        self.asked["read"].append((offset, len(view)))
        left = self.layer.read_into(view, offset, read_for)
        self.left["read"] += left
        return left

    def prefetch(self, offset, length, read_for=ReadFor.GUEST):
        self.asked["prefetch"].append((offset, length))
        left = self.layer.prefetch(offset, length, read_for)
        self.left["prefetch"] += left
        return left

    def block_status(self, offset, length):
        return self.layer.block_status(offset, length)

    def close(self):
        self.layer.close()


def test_a_read_asks_each_layer_once_about_what_the_layers_above_left(tmp_path, chain):
    """Down the layers once: the top about the whole range, each layer below exactly about the
    ranges the one above handed back (inside its size), none twice, and nothing comes back up."""
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chain(str(chain.top))
    recorded = [RecordedLayer(layer) for layer in c.layers]
    c.layers[:] = recorded
    try:
        assert chain.size >= PREFETCH_READ_MIN
        assert c.read(0, chain.size) == expected  # prefetches, then reads
        for kind in ("prefetch", "read"):
            assert recorded[0].asked[kind] == [(0, chain.size)]
            for above, below in zip(recorded, recorded[1:], strict=False):
                inside = [(start, min(length, below.size - start)) for start, length in above.left[kind]
                          if start < below.size]
                assert below.asked[kind] == inside, kind
                assert len(set(below.asked[kind])) == len(below.asked[kind])
            assert all(layer.left[kind] for layer in recorded[:-1])  # every layer had ranges to hand down
    finally:
        c.close()


def reachable(root) -> list[object]:
    """Every object `root` refers to, directly or not, short of classes, modules and functions."""
    seen, todo, found = {id(root)}, [root], []
    while todo:
        for referent in gc.get_referents(todo.pop()):
            if isinstance(referent, type | types.ModuleType | types.FunctionType | types.BuiltinFunctionType):
                continue
            if id(referent) not in seen:
                seen.add(id(referent))
                todo.append(referent)
                found.append(referent)
    return found


def test_a_layer_holds_no_reference_to_the_layers_below_it_nor_to_the_chain(tmp_path, chain):
    c = open_chain(str(chain.top))
    try:
        c.write(12345, b"guest data")  # an allocating write: filled from below
        c.discard(3 * chain.cluster_size, 2 * chain.cluster_size)
        copier = Copier(c, c.layers[2])
        copier.copy_range(0, chain.size)  # a stream's populates, of the mid layer
        c.flush()
        for layer in c.layers:
            held = {id(o) for o in reachable(layer)}
            assert id(c) not in held and not any(id(other) in held for other in c.layers if other is not layer)
        expected = c.read(0, chain.size)
        c.rebase(copier.base_index)  # one list to change: the mid layer merged, the base below the top
        assert [layer.path for layer in c.layers] == [str(chain.top), str(chain.base)]
        assert c.read(0, chain.size) == expected
    finally:
        c.close()


def test_rebase_makes_the_top_durable_before_it_closes_the_merged_layers(chain, open_chains, monkeypatch):
    """A copy-on-read may have copied from a merged layer after the backing file changed; until
    that copy is durable, writing it again after a failed fdatasync reads that layer again. So
    the top is flushed after the swap and before the merged layers close."""
    c = open_chains(chain.top)
    order: list[str] = []
    flush = c.top.flush
    monkeypatch.setattr(c.top, "flush", lambda: order.append("flush") or flush())
    merged = c.layers[1]
    close = merged.close
    monkeypatch.setattr(merged, "close", lambda: order.append("close merged") or close())
    Copier(c, c.layers[2]).copy_range(0, chain.size)
    order.clear()
    c.rebase(2)
    assert "close merged" in order and order.index("flush") < order.index("close merged")
    assert [layer.path for layer in c.layers] == [str(chain.top), str(chain.base)]
