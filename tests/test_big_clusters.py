"""Every cluster size the format allows (4 KiB to 64 MiB): the stream and copy-on-read copy every
byte, and metadata reads are sized by the virtual size, not by the largest table the format allows.

QEMU cannot open a QED image whose largest possible size (table_nelems**2 * cluster_size) does
not fit in 64 bits: its qed_max_image_size wraps to 0 (8 MiB clusters at table_size 2, 1 MiB at
16, ...). For those geometries the oracle is `read_qed_file` below, a reader that shares no code
with fusestream; qemu-img is the oracle wherever it can open the image.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import FUSESTREAM, qemu_check, qemu_convert, read_alone, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusestream.chain import open_chain
from fusestream.cli import describe_layer
from fusestream.copy import Copier
from fusestream.faults import WriteErrors
from fusestream.formats import qed
from fusestream.formats.qed_check import check_file
from fusestream.formats.qed_structs import table_nelems
from fusestream.stream import COMPLETED, COPY_ON_READ_COPIERS, FAILED, CopyOnRead, Streamer

MiB = 1 << 20


# -- an independent reader, and how to build the chains --------------------------------------------


def read_qed_file(path: Path, first_cluster: int = 0) -> bytes:
    """The guest view of a QED image with no backing file, read straight from the spec (from
    `first_cluster` on)."""
    with open(path, "rb") as f:
        raw = f.read(64)
        assert raw[:4] == b"QED\0"
        cs, ts, _, features, _, _, l1_offset, size = struct.unpack_from("<IIIQQQQQ", raw, 4)
        assert not features & 1, "the image still has a backing file"
        nelems = cs * ts // 8
        out = bytearray()
        for cluster in range(first_cluster, -(-size // cs)):
            l1_index, l2_index = divmod(cluster, nelems)
            f.seek(l1_offset + 8 * l1_index)
            (l2_offset,) = struct.unpack("<Q", f.read(8))
            entry = 0
            if l2_offset:
                f.seek(l2_offset + 8 * l2_index)
                (entry,) = struct.unpack("<Q", f.read(8))
            if entry in (0, 1):
                out += bytes(cs)
            else:
                f.seek(entry)
                data = f.read(cs)
                assert len(data) == cs, f"data cluster at {entry} is cut short"
                out += data
        return bytes(out[: size - first_cluster * cs])


def qemu_opens(cluster_size: int, table_size: int) -> bool:
    return table_nelems(cluster_size, table_size) ** 2 * cluster_size < 1 << 64


def raw_base(path: Path, size: int, writes: list[tuple[int, int]], seed: int = 1) -> bytes:
    """A sparse raw file of `size` bytes with random data at each (offset, length); its bytes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in writes:
            f.seek(offset)
            f.write(rng.randbytes(min(length, size - offset)))
    return path.read_bytes()


def top_over(tmp: Path, base: Path, size: int, cluster_size: int, table_size: int = 2) -> Path:
    top = tmp / "top.qed"
    qed.create(str(top), size, backing_filename=base.name, backing_raw=True,
               cluster_size=cluster_size, table_size=table_size, overwrite=True)
    return top


def random_base_under_top(tmp: Path, size: int, cluster_size: int) -> tuple[bytes, Path]:
    """A raw base of random data and a QED image over it; the base's bytes and the image."""
    base = tmp / "base.raw"
    expected = raw_base(base, size, [(0, size)])
    return expected, top_over(tmp, base, size, cluster_size)


async def inline(fn, *args):
    """Run a blocking step inline; a copy step must move forward (one that did not looped for ever)."""
    result = fn(*args)
    if fn.__name__ == "copy_step":
        assert result[0] > args[0], f"the copy step at {args[0]} made no progress"
    return result


def stream_to_end(chain, emit=lambda *_: None) -> str:
    """Run a whole stream job on a MockClock, the copy steps inline; returns its final state."""

    async def main():
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                streamer = Streamer(chain, emit, run_sync=inline)
                await nursery.start(streamer.run)
                job = streamer.start()
                await job.wait_finished()
                streamer.stop()
                return job.state

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def assert_image_reads(top: Path, expected: bytes, tmp: Path) -> None:
    """The image alone reads `expected` (no backing file left), clean by our check and, where
    QEMU can open it, by qemu-img check and convert."""
    assert read_qed_file(top) == expected
    assert check_file(str(top)).exit_status == 0
    image = qed.open_image(str(top), lock=False)
    cs, ts = image.cluster_size, image.header.table_size
    image.close()
    if qemu_opens(cs, ts):
        assert qemu_check(top).returncode == 0, qemu_check(top).stdout
        assert qemu_convert(top, tmp / "qemu.raw") == expected


# -- finding 1: clusters larger than the copy buffers --------------------------------------------


def test_a_stream_copies_whole_16m_clusters(tmp_path, open_chains):
    expected, top = random_base_under_top(tmp_path, 48 * MiB, 16 * MiB)
    c = open_chains(top)
    assert stream_to_end(c) == COMPLETED
    assert c.read(0, len(expected)) == expected
    c.close()
    assert_image_reads(top, expected, tmp_path)


def test_copy_on_read_copies_the_whole_16m_cluster(tmp_path, open_chains):
    expected, top = random_base_under_top(tmp_path, 32 * MiB, 16 * MiB)
    c = open_chains(top)
    copy_on_read = CopyOnRead(Streamer(c, lambda *_: None), WriteErrors("top.raw", lambda *_: None))
    assert copy_on_read.read(16 * MiB + 4096, 4096) == expected[16 * MiB + 4096 : 16 * MiB + 8192]
    assert c.read(0, len(expected)) == expected
    c.close()
    alone = qed.open_image(str(top), lock=False)  # without the chain: reads only what it holds
    try:
        assert alone.extents(0, len(expected))[0].status.name == "UNALLOCATED"
        assert read_alone(alone, 16 * MiB, 16 * MiB) == expected[16 * MiB :]
    finally:
        alone.close()


def test_copy_on_read_reuses_a_few_copiers(tmp_path, monkeypatch, open_chains):
    """Each copier holds a buffer of a whole step (64 MiB with 64 MiB clusters): guest reads
    copying at once share a bounded few, built once, not one per read."""
    expected, top = random_base_under_top(tmp_path, 8 * 65536, 65536)
    built, in_flight, most = [], [0], [0]
    copy_range, init = Copier.copy_range, Copier.__init__
    lock = threading.Lock()

    def counting_init(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    def slow_copy_range(self, offset, length):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.05)
        try:
            return copy_range(self, offset, length)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(Copier, "__init__", counting_init)
    monkeypatch.setattr(Copier, "copy_range", slow_copy_range)
    c = open_chains(top)
    copy_on_read = CopyOnRead(Streamer(c, lambda *_: None), WriteErrors("top.raw", lambda *_: None))
    readers = [threading.Thread(target=copy_on_read.read, args=(i * 65536, 4096)) for i in range(8)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert c.top.extents(0, len(expected))[0].status.name == "FOUND"
    assert c.read(0, len(expected)) == expected
    assert 1 <= len(built) <= COPY_ON_READ_COPIERS and most[0] <= COPY_ON_READ_COPIERS


def test_populate_refuses_part_of_a_cluster(tmp_path):
    """Padding a piece short of its cluster with zeros would lose the rest of the cluster."""
    base = tmp_path / "base.raw"
    raw_base(base, 2 * 65536, [(0, 2 * 65536)])
    top = top_over(tmp_path, base, 2 * 65536 + 4096, 65536)
    image = qed.open_image(str(top), writable=True)
    try:
        for offset, length in ((0, 4096), (4096, 65536), (0, 65536 + 4096)):
            with pytest.raises(ValueError, match="whole clusters"):
                image.populate([(offset, bytes(b"x" * length))], zero_clusters=False, below=None)
        assert image.populate([(2 * 65536, b"y" * 4096)], zero_clusters=False, below=None) == 65536  # the image's end
        assert [e.status.name for e in image.extents(0, 2 * 65536 + 4096)] == ["UNALLOCATED", "FOUND"]
    finally:
        image.close()


def test_a_step_short_of_its_cluster_fails_the_stream(tmp_path, monkeypatch, open_chains):
    """Were a step ever planned short of a cluster again, the job fails; no zeros are written."""
    expected, top = random_base_under_top(tmp_path, 32 * MiB, 16 * MiB)
    monkeypatch.setattr(Copier, "_whole_clusters", lambda self, max_read: 8 * MiB)
    c = open_chains(top)
    events = []
    assert stream_to_end(c, lambda name, data: events.append((name, data))) == FAILED
    assert "does not cover whole clusters" in events[-1][1]["error"]
    assert c.top.extents(0, len(expected))[0].status.name == "UNALLOCATED"
    assert c.read(0, len(expected)) == expected


@pytest.mark.mount
def test_a_mounted_stream_with_16m_clusters_keeps_every_byte(tmp_path, mount):
    base = tmp_path / "base.raw"
    expected = raw_base(base, 48 * MiB, [(0, 48 * MiB)])
    top = tmp_path / "top.qed"
    run(FUSESTREAM, "create", "--cluster-size", "16M", "--table-size", "2", "-b", "base.raw", "-F", "raw", str(top))
    m = mount(top)
    run(FUSESTREAM, "wait", str(m.mountpoint), timeout=120)
    assert m.raw.read_bytes() == expected
    m.umount()
    assert_image_reads(top, expected, tmp_path)


CLUSTER_SIZES = [1 << bits for bits in range(12, 27)]  # 4 KiB .. 64 MiB
# Where data lies, as a fraction of the base: spread over whole clusters, where plain integers
# up to the base's size would mostly stay near its start.
FRACTION_ONE = 1 << 32
FRACTION = st.integers(0, FRACTION_ONE - 1)


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(data=st.data(), table_size=st.sampled_from([2, 4, 16]))
def test_a_stream_reproduces_the_base_for_any_cluster_size(tmp_path_factory, cluster_size, data, table_size):
    """A few clusters, the last one partial; a sparse base, perhaps shorter than the image, with
    data at random places and in the last sector of each of its clusters."""
    tmp = tmp_path_factory.mktemp("prop")
    clusters = data.draw(st.integers(1, 3), label="clusters")
    size = clusters * cluster_size - data.draw(st.integers(0, min(cluster_size, 65536) // 512 - 1)) * 512
    base_size = max(512, size * data.draw(FRACTION, label="base size") // FRACTION_ONE // 512 * 512)
    writes = data.draw(st.lists(st.tuples(FRACTION, st.integers(1, 2 * MiB)), min_size=1, max_size=4), label="writes")
    writes = [(base_size * fraction // FRACTION_ONE, length) for fraction, length in writes]
    writes += [(min(start + cluster_size, base_size) - 512, 512) for start in range(0, base_size, cluster_size)]
    base = tmp / "base.raw"
    expected = raw_base(base, base_size, writes, seed=len(writes)) + bytes(size - base_size)
    top = top_over(tmp, base, size, cluster_size, table_size)
    with contextlib.closing(open_chain(str(top))) as c:
        assert stream_to_end(c) == COMPLETED
    assert_image_reads(top, expected, tmp)


# -- finding 8: metadata reads sized by the virtual size ------------------------------------------


class ReadCounter:
    """Counts the bytes fusestream reads from files (os.pread and os.preadv)."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        pread, preadv = os.pread, os.preadv

        def counting_pread(fd, length, offset):
            data = pread(fd, length, offset)
            self.bytes += len(data)
            return data

        def counting_preadv(fd, buffers, offset):
            n = preadv(fd, buffers, offset)
            self.bytes += n
            return n

        monkeypatch.setattr(os, "pread", counting_pread)
        monkeypatch.setattr(os, "preadv", counting_preadv)


def test_info_on_a_64m_table_size_16_image_reads_a_few_bytes(tmp_path, monkeypatch):
    """Its L1 table is 1 GiB; the 10 GiB it addresses need 160 of its entries."""
    image_path = tmp_path / "big.qed"
    run(FUSESTREAM, "create", "--cluster-size", "64M", "--table-size", "16", "-s", "10G", str(image_path))
    counter = ReadCounter(monkeypatch)
    layer = qed.open_image(str(image_path), lock=False)
    try:
        assert describe_layer(layer)["cluster-size"] == 64 * MiB
    finally:
        layer.close()
    assert counter.bytes <= 64 + 8  # the header and the one L1 entry that addresses 10 GiB


def test_guest_io_on_a_64m_table_size_16_image_reads_and_writes_what_it_addresses(tmp_path, monkeypatch, open_chains):
    image_path = tmp_path / "big.qed"
    size = 10 * 1024 * MiB
    qed.create(str(image_path), size, cluster_size=64 * MiB, table_size=16)
    written = []
    pwritev = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, off: written.append(n := pwritev(fd, bufs, off)) or n)
    counter = ReadCounter(monkeypatch)
    c = open_chains(image_path)
    c.write(size - 64 * MiB + 512, b"z" * 4096)  # the last cluster: allocates the first L2 table
    c.flush()
    c.top.tables._l2_cache.clear()  # the next lookup reads the table from disk
    assert c.read(size - 64 * MiB, 8192) == bytes(512) + b"z" * 4096 + bytes(8192 - 4608)
    c.close()
    entries = size // (64 * MiB)
    assert counter.bytes <= 512 + 64 + 8 + 8 * entries + 8192  # probe, header, L1 entry, L2 entries, the read
    assert sum(written) <= 64 * MiB + 2 * 8 * entries + 64 + 8
    assert check_file(str(image_path)).exit_status == 0
    assert read_qed_file(image_path, entries - 1)[:8192] == bytes(512) + b"z" * 4096 + bytes(3584)


@pytest.mark.parametrize("cluster_size, table_size, size", [(4096, 2, 9 * MiB + 512), (MiB, 16, 40 * MiB)])
def test_tables_written_in_part_are_whole_for_qemu(tmp_path, cluster_size, table_size, size, open_chains):
    """Several L2 tables, the last one addressed only in part (4 KiB clusters), and a 16 MiB
    table of which 40 entries are addressed: QEMU reads what fusestream wrote."""
    image_path = tmp_path / "top.qed"
    qed.create(str(image_path), size, cluster_size=cluster_size, table_size=table_size)
    rng = random.Random(7)
    expected = bytearray(size)
    c = open_chains(image_path)
    for offset in (0, size // 2 + 1000, size - 5000):
        data = rng.randbytes(4096)
        c.write(offset, data)
        expected[offset : offset + len(data)] = data
    assert c.read(0, size) == expected
    c.close()
    assert qemu_check(image_path).returncode == 0
    assert qemu_convert(image_path, tmp_path / "out.raw") == expected
