"""lseek SEEK_DATA / SEEK_HOLE on the raw file follow the chain's allocation, so cp --sparse and
qemu-img map skip its holes (needs the patched pyfuse3 that scripts/setup builds)."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from conftest import build_chain, qemu_img, qemu_io, write_random

from fusestream.formats import qed
from fusestream.formats.layer import BlockStatus


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
