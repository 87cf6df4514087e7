"""Discard: fallocate PUNCH_HOLE / ZERO_RANGE on the raw file (a guest's TRIM and write-zeroes)
reads zeros at once, gives the space of whole clusters back, and freed clusters are reused
before the file grows; QEMU reads the result and finds no corruption."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from conftest import build_chain, fallocate, qemu_check, qemu_convert, qemu_img, run

from fusestream.copy import Copier
from fusestream.formats import qed
from fusestream.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE

CS = 65536


def expected_after(reference: bytes, discards: list[tuple[int, int]]) -> bytes:
    data = bytearray(reference)
    for offset, length in discards:
        data[offset : offset + length] = bytes(min(length, len(data) - offset))
    return bytes(data)


@pytest.fixture
def thin_chain(tmp_path):
    """A 4 MiB raw base full of data under an empty QED top (64 KiB clusters)."""
    base, top = tmp_path / "base.raw", tmp_path / "top.qed"
    base.write_bytes(random.Random(1).randbytes(4 << 20))
    qed.create(str(top), 4 << 20, backing_filename=base.name, backing_raw=True)
    return base, top


def test_discarded_clusters_read_zeros_and_hide_the_backing_file(thin_chain, tmp_path, open_chains):
    base, top = thin_chain
    chain = open_chains(top)
    chain.write(0, os.urandom(1 << 20))  # the top holds 16 clusters of its own
    written = chain.read(0, chain.size)
    discards = [(CS // 2, 3 * CS), (2 << 20, 5 * CS + 123), (chain.size - 1000, 1000)]
    for offset, length in discards:
        chain.discard(offset, length)
    want = expected_after(bytes(written), discards)
    assert chain.read(0, chain.size) == want
    chain.close()
    assert qemu_convert(top, tmp_path / "out.raw") == want
    assert qemu_check(top).returncode in (0, 3), qemu_check(top).stdout  # leaks (punched) are allowed


def test_discard_gives_space_back_and_the_next_allocation_reuses_it(thin_chain, tmp_path, open_chains):
    _, top = thin_chain
    chain = open_chains(top)
    chain.write(0, os.urandom(2 << 20))
    chain.flush()
    size_before, usage_before = os.stat(top).st_size, os.stat(top).st_blocks
    chain.discard(0, 1 << 20)
    chain.flush()  # the entries are durable: the freed clusters may be reused now
    assert os.stat(top).st_blocks * 512 <= usage_before * 512 - (1 << 20) + CS
    chain.write(3 << 20, os.urandom(1 << 20))
    chain.flush()
    assert os.stat(top).st_size == size_before  # reused, not appended
    want = chain.read(0, chain.size)
    chain.close()
    assert qemu_check(top).returncode == 0, qemu_check(top).stdout
    assert qemu_convert(top, tmp_path / "out.raw") == bytes(want)


def test_a_discard_before_the_stream_reaches_it_stays_zeros(thin_chain, tmp_path, open_chains):
    base, top = thin_chain
    chain = open_chains(top)
    copier = Copier(chain, base=None)
    copier.copy_range(0, 1 << 20)
    chain.discard(512 << 10, 2 << 20)  # half copied by the stream, half not yet
    copier.copy_range(0, chain.size)  # the whole disk again: guest writes win
    chain.rebase(len(chain.layers))
    want = expected_after(base.read_bytes(), [(512 << 10, 2 << 20)])
    assert chain.read(0, chain.size) == want
    chain.close()
    assert qemu_check(top).returncode in (0, 3)
    assert qemu_convert(top, tmp_path / "out.raw") == want
    assert "backing file" not in qemu_img("info", str(top))


def test_leaks_left_by_discards_are_reused_by_the_next_mount(tmp_path, open_chains):
    top = tmp_path / "top.qed"
    qed.create(str(top), 8 << 20)
    chain = open_chains(top)
    chain.write(0, os.urandom(4 << 20))
    chain.discard(CS, 8 * CS)  # inside the file: cannot be cut off at close
    chain.close()
    assert qemu_check(top).returncode == 3  # leaked, punched clusters: no harm to data
    size = os.stat(top).st_size
    chain = open_chains(top)
    chain.write(6 << 20, os.urandom(8 * CS))
    chain.close()
    assert os.stat(top).st_size == size
    assert qemu_check(top).returncode == 0, qemu_check(top).stdout


def test_a_discard_at_the_end_of_the_file_leaves_no_leak(tmp_path, open_chains):
    top = tmp_path / "top.qed"
    qed.create(str(top), 8 << 20)
    chain = open_chains(top)
    chain.write(0, os.urandom(2 << 20))
    chain.write(4 << 20, os.urandom(1 << 20))  # the last clusters of the file
    chain.discard(4 << 20, 1 << 20)
    chain.close()
    assert qemu_check(top).returncode == 0, qemu_check(top).stdout


def test_discard_on_the_chain_of_many_layers(tmp_path, open_chains):
    c = build_chain(tmp_path, size=4 * 1024 * 1024, cluster_size=4096, table_size=2)
    reference = qemu_convert(c.top, tmp_path / "ref.raw")
    rng = random.Random(5)
    discards = [(rng.randrange(c.size - 100_000), rng.randrange(1, 100_000)) for _ in range(20)]
    chain = open_chains(c.top)
    for offset, length in discards:
        chain.discard(offset, length)
    chain.close()
    assert qemu_convert(c.top, tmp_path / "out.raw") == expected_after(reference, discards)
    assert qemu_check(c.top).returncode in (0, 3)


def fallocate_path(path: Path, mode: int, offset: int, length: int) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        return fallocate(fd, mode, offset, length)
    finally:
        os.close(fd)


@pytest.mark.mount
def test_fallocate_on_the_raw_file(thin_chain, mount, tmp_path):
    base, top = thin_chain
    m = mount(top, "nostream")
    try:
        before = m.raw.read_bytes()  # in the kernel's page cache now
        assert fallocate_path(m.raw, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, CS, 2 * CS) == 0
        assert fallocate_path(m.raw, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 5 * CS + 7, 1000) == 0
        assert fallocate_path(m.raw, 0, 0, CS) == 95  # EOPNOTSUPP: a disk cannot preallocate
        assert fallocate_path(m.raw, FALLOC_FL_ZERO_RANGE, m.raw.stat().st_size - 10, 100) == 28  # ENOSPC
        want = expected_after(before, [(CS, 2 * CS), (5 * CS + 7, 1000)])
        assert m.raw.read_bytes() == want
        with open(m.raw, "rb") as f:
            assert os.lseek(f.fileno(), CS, os.SEEK_HOLE) == CS  # the zero clusters are a hole
    finally:
        m.umount()
    assert qemu_convert(top, tmp_path / "out.raw") == want
    assert qemu_check(top).returncode in (0, 3)


@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a path given later: yields attach(path) -> /dev/loopN; detached after."""
    devices: list[str] = []

    def attach(path: Path) -> str:
        device = run("losetup", "--find", "--show", str(path)).stdout.strip()
        devices.append(device)
        return device

    yield attach
    for device in devices:  # a test that failed half-way
        if Path(f"/sys/block/{Path(device).name}/loop/backing_file").exists():
            run("losetup", "-d", device, check=False)


@pytest.mark.mount
def test_fstrim_of_an_ext4_on_the_raw_file_gives_space_back(tmp_path, mount, loop_device):
    top = tmp_path / "disk.qed"
    qed.create(str(top), 256 << 20)
    m = mount(top)
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    device = loop_device(m.raw)
    try:
        run("mkfs.ext4", "-q", "-E", "nodiscard", device)
        run("mount", device, str(fsdir))
        try:
            for i in range(8):
                (fsdir / f"file{i}").write_bytes(os.urandom(8 << 20))
            os.sync()
            full = os.stat(top).st_blocks * 512
            for i in range(6):
                (fsdir / f"file{i}").unlink()
            os.sync()  # ext4 trims only blocks whose freeing is committed
            run("fstrim", str(fsdir))
        finally:
            run("umount", str(fsdir))
        trimmed = os.stat(top).st_blocks * 512
        assert trimmed <= full - (40 << 20), (full, trimmed)
        run("e2fsck", "-fn", device)
    finally:
        run("losetup", "-d", device, check=False)  # before the unmount: the loop device holds the raw file
    m.umount()
    result = qemu_check(top)
    assert result.returncode in (0, 3), result.stdout
