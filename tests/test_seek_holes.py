"""lseek SEEK_DATA / SEEK_HOLE on the raw file follow the chain's allocation, so cp --sparse and
qemu-img map skip its holes (needs the patched pyfuse3 that scripts/setup builds)."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from conftest import build_chain, fallocate, qemu_img, qemu_io, write_random

from fusestream.formats import qed
from fusestream.formats.layer import BlockStatus

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def data_ranges(map_json: str) -> list[tuple[int, int]]:
    """The runs that `qemu-img map --output=json` reports as data, adjacent ones merged."""
    ranges: list[tuple[int, int]] = []
    for entry in json.loads(map_json):
        if not entry["data"]:
            continue
        start, end = entry["start"], entry["start"] + entry["length"]
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def seek_ranges(seek, size: int) -> list[tuple[int, int]]:
    """The data runs that alternating SEEK_DATA / SEEK_HOLE calls find."""
    ranges, pos = [], 0
    while pos < size:
        start = seek(pos, True)
        if start is None:
            break
        pos = seek(start, False)
        ranges.append((start, pos))
    return ranges


def test_seek_finds_the_data_qemu_img_map_reports(tmp_path, open_chains):
    c = build_chain(tmp_path, size=8 * 1024 * 1024 + 512, cluster_size=4096, table_size=2)
    expected = data_ranges(qemu_img("map", "--output=json", str(c.top)))
    chain = open_chains(c.top, writable=False)
    assert seek_ranges(chain.seek, chain.size) == expected
    assert chain.seek(chain.size, True) is None and chain.seek(chain.size, False) == chain.size


def test_seek_on_a_sparse_terabyte_crosses_runs_not_clusters(tmp_path, monkeypatch, open_chains):
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(1 << 40)
        f.seek(700 << 30)
        f.write(os.urandom(1 << 20))
    top = tmp_path / "top.qed"
    qed.create(str(top), 1 << 40, backing_filename=base.name, backing_raw=True)
    chain = open_chains(top, writable=False)
    calls = []
    for layer in chain.layers:
        original = layer.block_status
        monkeypatch.setattr(layer, "block_status", lambda o, n, f=original: calls.append(o) or f(o, n))
    assert chain.seek(0, True) == 700 << 30
    assert chain.seek(700 << 30, False) == (700 << 30) + (1 << 20)
    assert chain.seek((700 << 30) + (1 << 20), True) is None
    assert len(calls) <= 12, calls


def test_the_chain_status_is_decided_top_down(tmp_path, open_chains):
    c = build_chain(tmp_path, size=1 << 20, cluster_size=4096, table_size=2)
    write_random(c.mid, tmp_path, random.Random(2), 0, 65536, "qed")
    overlay = tmp_path / "overlay.qed"
    qed.create(str(overlay), c.size, backing_filename=c.top.name, cluster_size=4096, table_size=2)
    qemu_io(overlay, "write -z 0 64k", fmt="qed")
    chain = open_chains(overlay, writable=False)
    assert chain.status_above(0, chain.size, len(chain.layers))[0] is BlockStatus.FOUND
    assert chain.block_status(0, chain.size) == (BlockStatus.ZERO, 65536)  # the top's zeros hide it


@pytest.mark.mount
def test_cp_sparse_and_qemu_img_map_see_the_holes_of_the_raw_file(tmp_path, mount):
    c = build_chain(tmp_path, size=16 * 1024 * 1024, cluster_size=65536, table_size=2)
    expected = data_ranges(qemu_img("map", "--output=json", str(c.top)))
    m = mount(c.top, "nostream", "ro")
    try:
        assert data_ranges(qemu_img("map", "-f", "raw", "--output=json", str(m.raw))) == expected
        copy = tmp_path / "copy.raw"
        subprocess.run(["cp", "--sparse=always", str(m.raw), str(copy)], check=True)
        assert copy.read_bytes() == m.raw.read_bytes()
        data_bytes = sum(end - start for start, end in expected)
        assert copy.stat().st_blocks * 512 <= data_bytes + 65536
        with open(m.raw, "rb") as f:
            assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == next(
                (start for start, _ in _holes(expected, c.size)), c.size)
    finally:
        m.umount()


def _holes(data: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    holes, pos = [], 0
    for start, end in data:
        if start > pos:
            holes.append((pos, start))
        pos = end
    if pos < size:
        holes.append((pos, size))
    return holes


@pytest.mark.mount
def test_control_files_are_all_data(tmp_path, mount):
    top = tmp_path / "top.qed"
    qed.create(str(top), 1 << 20)
    m = mount(top)
    try:
        status = Path(m.mountpoint / "status")
        with open(status, "rb") as f:
            size = len(f.read())
            assert os.lseek(f.fileno(), 0, os.SEEK_DATA) == 0
            assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == size
    finally:
        m.umount()


def raw_base_in_pieces(tmp: Path, size: int) -> Path:
    """A QED top over a raw base whose data lies in whole MiB pieces and in 4 KiB blocks, so that
    some 64 KiB clusters hold both data and holes; the top holds a few writes of its own."""
    rng = random.Random(23)
    base = tmp / "base.raw"
    with open(base, "wb") as f:
        f.truncate(size)
        for piece in rng.sample(range(size >> 20), (size >> 20) // 2):
            f.seek(piece << 20)
            f.write(rng.randbytes(1 << 20))
        for block in rng.sample(range(size // 4096), 40):
            f.seek(block * 4096)
            f.write(rng.randbytes(4096))
    top = tmp / "top.qed"
    qemu_img("create", "-f", "qed", "-b", base.name, "-F", "raw", str(top), str(size))
    for _ in range(6):
        write_random(top, tmp, rng, rng.randrange(size - 70_000), rng.randrange(1, 70_000), "qed")
    return top


def file_seek(fd: int):
    def seek(offset: int, data: bool) -> int | None:
        try:
            return os.lseek(fd, offset, os.SEEK_DATA if data else os.SEEK_HOLE)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            return None
    return seek


def native_seeks(m) -> int:
    return json.loads((m.mountpoint / "status.json").read_text())["images"][0]["native_reads"]["seeks"]


@pytest.mark.mount
def test_native_threads_answer_seeks_exactly_and_see_every_write(tmp_path, mount):
    """Once reads have mapped the disk, the native threads answer SEEK_DATA / SEEK_HOLE from the
    map: the same runs as qemu-img map of the image, to the byte where a cluster holds both
    data and holes; and a write or a discard changes the answer at once."""
    size = 16 * MiB
    top = raw_base_in_pieces(tmp_path, size)
    expected = data_ranges(qemu_img("map", "--output=json", str(top)))
    m = mount(top, "nostream")
    fd = os.open(m.raw, os.O_RDWR)
    try:
        for offset in range(0, size, 1 * MiB):  # the reads map the disk for the native threads
            os.pread(fd, 1 * MiB, offset)
        assert seek_ranges(file_seek(fd), size) == expected
        before = native_seeks(m)
        assert seek_ranges(file_seek(fd), size) == expected
        assert native_seeks(m) > before  # those that cross only whole units of one kind
        hole = next(start for start, end in _holes(expected, size) if end - start >= 3 * 65536)
        cluster = -(-hole // 65536) * 65536 + 65536  # a whole cluster inside the hole
        os.pwrite(fd, b"\x5a" * 4096, cluster + 8192)
        assert os.lseek(fd, hole, os.SEEK_DATA) == cluster  # the write allocated its cluster
        assert fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, cluster, 65536) == 0
        assert os.lseek(fd, hole, os.SEEK_DATA) > cluster
        assert seek_ranges(file_seek(fd), size) == expected
    finally:
        os.close(fd)
    m.umount()
    assert data_ranges(qemu_img("map", "--output=json", str(top))) == expected
