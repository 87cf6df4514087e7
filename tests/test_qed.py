"""The QED format on its own: structs, lookups, reads and writes, checked against qemu-img."""

from __future__ import annotations

import array
import concurrent.futures
import contextlib
import os
import random

import pytest
from conftest import build_chain, qemu_check, qemu_convert, qemu_img, qemu_io, random_writes, read_alone, sha256

from fusestream.errors import CorruptionError
from fusestream.formats import qed
from fusestream.formats.layer import BlockStatus
from fusestream.formats.qed_structs import QED_F_NEED_CHECK, QED_HEADER, QED_HEADER_SIZE
from fusestream.sources import local


@pytest.mark.parametrize("opts", ["cluster_size=4K,table_size=2", "cluster_size=64K", "cluster_size=1M,table_size=16"])
def test_header_parse_build_is_byte_exact_on_qemu_images(tmp_path, opts):
    qemu_img("create", "-f", "raw", str(tmp_path / "b.raw"), "1M")
    image = tmp_path / "t.qed"
    qemu_img("create", "-f", "qed", "-o", opts, "-b", "b.raw", "-F", "raw", str(image), "1G")
    raw = image.read_bytes()[:QED_HEADER_SIZE]
    header = QED_HEADER.parse(raw)
    assert QED_HEADER.build(header) == raw
    assert header.image_size == 1 << 30


def test_reads_match_qemu_for_every_cluster_size(tmp_path, open_chains):
    for cluster_size in (4096, 65536, 1 << 20):
        d = tmp_path / str(cluster_size)
        d.mkdir()
        c = build_chain(d, size=6 * cluster_size * 3 + 1536, cluster_size=cluster_size)
        expected = qemu_convert(c.top, d / "expected.raw")
        chain = open_chains(c.top, writable=False)
        assert chain.read(0, c.size) == expected
        rng = random.Random(cluster_size)
        for _ in range(300):
            off = rng.randrange(c.size)
            length = rng.randrange(1, 3 * cluster_size)
            assert chain.read(off, length) == expected[off : off + length], (off, length)
        chain.close()


def test_extents_report_qemu_lookup_results(tmp_path):
    qemu_img("create", "-f", "qed", "-o", "cluster_size=4096", str(tmp_path / "t.qed"), "1M")
    qemu_io(tmp_path / "t.qed", "write -P 1 4096 8192", "write -z 65536 4096")
    image = qed.open_image(str(tmp_path / "t.qed"))
    try:
        assert image.block_status(0, 1 << 20) == (BlockStatus.UNALLOCATED, 4096)
        assert image.block_status(4096, 1 << 20)[0] is BlockStatus.FOUND
        assert image.block_status(65536, 4096) == (BlockStatus.ZERO, 4096)
    finally:
        image.close()


def test_random_writes_read_back_and_qemu_agrees(chain, tmp_path, open_chains):
    before = {p: sha256(p) for p in chain.backing_files}
    model = bytearray(qemu_convert(chain.top, tmp_path / "before.raw"))
    c = open_chains(chain.top)
    for offset, data in random_writes(random.Random(7), chain.size, 300):
        c.write(offset, data)
        model[offset : offset + len(data)] = data
    assert c.read(0, chain.size) == model
    c.close()
    check = qemu_check(chain.top)
    assert check.returncode == 0, check.stdout + check.stderr
    assert qemu_convert(chain.top, tmp_path / "after.raw") == model
    assert {p: sha256(p) for p in chain.backing_files} == before


def test_concurrent_writers_to_the_same_clusters(chain, tmp_path, open_chains):
    """Allocating writes from many threads: each byte ends with one writer's data, none lost."""
    c = open_chains(chain.top)
    rng = random.Random(3)
    jobs = [(rng.randrange(0, 1 << 20, 512), bytes([i % 250 + 1]) * 512) for i in range(400)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda job: c.write(*job), jobs))
    final = {}
    for offset, data in jobs:  # any order is valid; every write must be there whole
        final[offset] = final.get(offset, set()) | {data}
    for offset, candidates in final.items():
        assert bytes(c.read(offset, 512)) in candidates
    c.close()
    assert qemu_check(chain.top).returncode == 0


def test_full_zero_cluster_write_becomes_a_zero_cluster(chain, open_chains):
    c = open_chains(chain.top)
    file_size = chain.top.stat().st_size
    c.write(5 * chain.cluster_size, bytes(4 * chain.cluster_size))
    assert chain.top.stat().st_size == file_size  # no data cluster was appended
    assert c.top.block_status(5 * chain.cluster_size, chain.cluster_size)[0] is BlockStatus.ZERO
    assert c.read(5 * chain.cluster_size, 4 * chain.cluster_size) == bytes(4 * chain.cluster_size)


def test_need_check_set_while_writing_without_backing_and_cleared_on_close(tmp_path):
    path = tmp_path / "t.qed"
    qed.create(str(path), 1 << 20)
    image = qed.open_image(str(path), writable=True)
    image.write(1000, b"x" * 5000, below=None)
    assert QED_HEADER.parse(path.read_bytes()[:QED_HEADER_SIZE]).features & QED_F_NEED_CHECK
    image.close()
    assert not QED_HEADER.parse(path.read_bytes()[:QED_HEADER_SIZE]).features & QED_F_NEED_CHECK
    assert qemu_check(path).returncode == 0


def test_with_a_backing_file_need_check_is_never_set(chain, open_chains):
    c = open_chains(chain.top)
    c.write(0, b"y" * 70000)
    assert not QED_HEADER.parse(chain.top.read_bytes()[:QED_HEADER_SIZE]).features & QED_F_NEED_CHECK


def _corrupt_first_l2_entry(path, bad_entry: str) -> int:
    """Point the first allocated data cluster's L2 entry somewhere impossible; returns the
    guest offset of that cluster."""
    image = qed.open_image(str(path))
    l2_offset = next(o for o in image.tables.l1 if o)
    table = image.tables.read_table(l2_offset)
    targets = {
        "beyond-file": 1 << 50,
        "misaligned": table[0] + 17 if table[0] > 1 else 4096 * 100 + 17,
        "in-l1-table": image.header.l1_table_offset,
        "in-l2-table": l2_offset,
    }
    image.close()
    index = next(i for i, e in enumerate(table) if e > 1)
    with open(path, "r+b") as f:
        f.seek(l2_offset + 8 * index)
        f.write(array.array("Q", [targets[bad_entry]]).tobytes())
    return index * 4096


@pytest.mark.parametrize("bad_entry", ["beyond-file", "misaligned", "in-l1-table", "in-l2-table"])
def test_impossible_l2_entry_fails_only_that_range(tmp_path, bad_entry):
    """EIO (CorruptionError) for that cluster only: never a read outside the data area, never a
    guest write over metadata."""
    path = tmp_path / "t.qed"
    qemu_img("create", "-f", "qed", "-o", "cluster_size=4096", str(path), "1M")
    qemu_io(path, "write -P 7 0 64k")
    guest = _corrupt_first_l2_entry(path, bad_entry)
    before = sha256(path)
    image = qed.open_image(str(path), writable=True)
    try:
        with pytest.raises(CorruptionError, match="data cluster offset"):
            read_alone(image, guest, 1)
        with pytest.raises(CorruptionError):
            image.write(guest, b"z", below=None)
        assert read_alone(image, guest + 4096, 4096) == b"\x07" * 4096
    finally:
        image.close()
    assert sha256(path) == before


def test_l2_cache_stays_within_its_bound(tmp_path):
    path = tmp_path / "t.qed"
    qed.create(str(path), 1 << 30, cluster_size=4096, table_size=2)
    image = qed.open_image(str(path), writable=True, l2_cache_bytes=4 * 8192)
    try:
        for i in range(40):  # each write lands in its own L2 table (4 MiB of guest space each)
            image.write(i * (4 << 20), b"d", below=None)
        assert len(image.tables._l2_cache) <= 4
        assert all(read_alone(image, i * (4 << 20), 1) == b"d" for i in range(40))
    finally:
        image.close()
    assert qemu_check(path).returncode == 0


def _l2_entry_on_disk(image_path, cluster: int) -> int:
    """What the file itself says about a cluster, bypassing any cache of an open image."""
    on_disk = qed.open_image(str(image_path), lock=False)
    try:
        return on_disk.tables.cluster_entry(cluster)
    finally:
        on_disk.close()


def test_allocating_writes_batch_their_table_updates_behind_one_flush(tmp_path, monkeypatch, open_chains):
    """QEMU's order (data durable before the L2 entry that points to it) at the price of one
    fdatasync per write-back, not one per allocating write."""
    c = build_chain(tmp_path, size=4 << 20, cluster_size=4096)
    calls: list[str | int] = []  # "fdatasync", or the offset of a write
    real_fdatasync, real_pwrite = os.fdatasync, local._pwrite_all
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append("fdatasync"), real_fdatasync(fd))[1])
    monkeypatch.setattr(local, "_pwrite_all", lambda fd, data, offset: (calls.append(offset),
                                                                       real_pwrite(fd, data, offset))[1])
    chain = open_chains(c.top)
    clusters = [cluster for cluster in range(0, 1024, 37) if chain.top.tables.cluster_entry(cluster) == 0][:5]
    assert len(clusters) == 5 and chain.top.tables.l1[0] != 0  # unallocated clusters, in an existing table
    calls.clear()
    for cluster in clusters:
        chain.write(cluster * 4096 + 100, b"new data")
    assert "fdatasync" not in calls  # five allocating writes, no flush
    assert all(_l2_entry_on_disk(c.top, cluster) == 0 for cluster in clusters)  # nothing points there yet
    assert all(chain.read(cluster * 4096 + 100, 8) == b"new data" for cluster in clusters)
    assert chain.top.has_unwritten_tables
    calls.clear()
    chain.flush()
    table = range(chain.top.tables.l1[0], chain.top.tables.l1[0] + chain.top.geometry.table_bytes)
    l2_writes = [i for i, call in enumerate(calls) if call != "fdatasync" and call in table]
    assert calls[0] == "fdatasync" and l2_writes and l2_writes[0] > 0 and calls[-1] == "fdatasync"
    assert all(_l2_entry_on_disk(c.top, cluster) > 1 for cluster in clusters)
    assert not chain.top.has_unwritten_tables
    chain.close()
    check = qemu_check(c.top)
    assert check.returncode == 0, check.stdout + check.stderr


def _l1_entry_on_disk(path, index: int) -> int:
    with contextlib.closing(qed.open_image(str(path), writable=False, lock=False)) as image:
        return image.tables.read_table(image.geometry.l1_table_offset, image.geometry.l1_entries)[index]


def test_new_tables_reach_the_l1_table_behind_one_flush(tmp_path, monkeypatch, open_chains):
    """A write into a span with no L2 table appends one; its L1 entry is written back like the
    L2 entries (after the fdatasync that makes the table and its data durable), not with an
    fdatasync of its own."""
    base, top = tmp_path / "base.raw", tmp_path / "top.qed"
    with open(base, "wb") as f:
        f.truncate(64 << 20)
    # a backing file: no QED_F_NEED_CHECK to make durable first; a table maps 4 MiB
    qed.create(str(top), 64 << 20, backing_filename=base.name, backing_raw=True, cluster_size=4096, table_size=2)
    syncs = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real_fdatasync(fd))[1])
    chain = open_chains(top)
    spans = [3, 7, 10, 15]
    syncs.clear()
    for span in spans:
        chain.write(span * (4 << 20) + 4096, b"in a new table")
    assert not syncs  # four new tables, no flush
    assert chain.top.has_unwritten_tables
    assert all(chain.read(span * (4 << 20) + 4096, 14) == b"in a new table" for span in spans)
    assert all(_l1_entry_on_disk(top, span) == 0 for span in spans)  # nothing on disk points there yet
    chain.flush()
    assert all(_l1_entry_on_disk(top, span) == chain.top.tables.l1[span] != 0 for span in spans)
    assert not chain.top.has_unwritten_tables and len(syncs) == 2  # the write-back's, and the flush's
    chain.close()
    check = qemu_check(top)
    assert check.returncode == 0, check.stdout + check.stderr
    data = qemu_convert(top, tmp_path / "after.raw")
    assert all(data[span * (4 << 20) + 4096 :][:14] == b"in a new table" for span in spans)


def test_a_table_with_unwritten_entries_is_never_evicted(tmp_path, open_chains):
    # 4 KiB clusters and two-cluster tables: one table is 8 KiB and maps 4 MiB. A cache of four
    # tables; two tables with unwritten entries stay below the write-back threshold, and
    # reading ten other tables must not evict them.
    image = tmp_path / "top.qed"
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(48 << 20))
    qed.create(str(image), 48 << 20, backing_filename="base.raw", backing_raw=True, cluster_size=4096, table_size=2)
    chain = open_chains(image)
    small = qed.open_image(str(image), writable=True, lock=False, l2_cache_bytes=4 * 8192)
    chain.top.close()
    chain.layers[0] = small
    for region in range(12):  # a table for every 4 MiB, so the reads below have tables to load
        chain.write(region * (4 << 20), b"x")
    chain.flush()
    chain.write(1 << 20, b"first")
    chain.write((5 << 20) + 7, b"second")
    assert len(small.tables.unwritten) == 2
    for region in range(2, 12):
        chain.read(region * (4 << 20), 4096)
    assert len(small.tables._l2_cache) >= 2 and set(small.tables.unwritten) <= set(small.tables._l2_cache)
    assert chain.read(1 << 20, 5) == b"first" and chain.read((5 << 20) + 7, 6) == b"second"
    chain.close()
    assert qemu_convert(image, tmp_path / "out.raw")[1 << 20 : (1 << 20) + 5] == b"first"
    check = qemu_check(image)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_table_updated_while_every_other_cached_table_is_pinned_stays_cached(tmp_path, open_chains):
    """A cache of four tables, all of them with entries written but not yet synced (which keep
    them cached): a write into a fifth table loads it, and must not evict it at once, or its new
    entry would be on a table nobody writes back."""
    image = tmp_path / "top.qed"
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(48 << 20)
    qed.create(str(image), 48 << 20, backing_filename="base.raw", backing_raw=True, cluster_size=4096, table_size=2)
    chain = open_chains(image)
    small = qed.open_image(str(image), writable=True, lock=False, l2_cache_bytes=4 * 8192)
    chain.top.close()
    chain.layers[0] = small
    for region in range(6):  # a table for every 4 MiB
        chain.write(region * (4 << 20), b"x")
    chain.flush()
    small.tables._l2_cache.clear()
    for region in range(2):
        chain.write(region * (4 << 20) + 8192, b"pinned")
    small.alloc.write_back()  # written after the fdatasync: unsynced, so they stay cached
    for region in range(2, 4):
        chain.write(region * (4 << 20) + 8192, b"pinned")  # unwritten: cached too
    assert len(small.tables.log.unsynced.spans) == 2 and len(small.tables.unwritten) == 2
    assert len(small.tables._l2_cache) == 4
    chain.write(5 * (4 << 20) + 8192, b"fifth")
    assert set(small.tables.unwritten) <= set(small.tables._l2_cache)
    chain.close()
    data = qemu_convert(image, tmp_path / "out.raw")
    assert data[5 * (4 << 20) + 8192 :][:5] == b"fifth"
    assert all(data[region * (4 << 20) + 8192 :][:6] == b"pinned" for region in range(4))
    check = qemu_check(image)
    assert check.returncode == 0, check.stdout + check.stderr
