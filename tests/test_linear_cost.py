"""The cost of a stream, of guest reads and of copy-on-read is linear in the chain (issue 12).

Counted, not timed: the L2 entry lookups (QedTables.cluster_entry), the layers' block-status
calls and the raw layers' lseek and FIEMAP calls stay under a small constant times the clusters
plus the extents of every layer, on chains of the shapes real images have. The extents are counted by
QEMU (`qemu-img map` of each layer alone), the clusters from the layers' sizes.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
from pathlib import Path

import pytest
import trio
from conftest import inline, qemu_convert, qemu_img, qemu_io, sample_stream

from fusestream import stream
from fusestream.chain import open_chain
from fusestream.control import EventLog
from fusestream.copy import Copier
from fusestream.faults import WriteErrors
from fusestream.formats import qed, qed_table, raw
from fusestream.sources import extents, local
from fusestream.stream import CopyOnRead, GuestActivity, Streamer, StreamJob

CLUSTER = 65536
SIZE = 64 << 20
COST_PER_UNIT = 4  # counted calls per cluster or extent, at most
SEEK_COST_PER_LAYER = 4  # counted calls per lseek answer and layer, at most, beyond that


def write_raw(path: Path, size: int, pieces: list[tuple[int, int]], rng: random.Random) -> None:
    """A sparse raw file with random data in the (offset, length) pieces, holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in sorted(pieces):
            f.seek(offset)
            f.write(rng.randbytes(length))


def qed_over(path: Path, backing: Path, commands: list[str]) -> None:
    fmt = "raw" if backing.suffix == ".raw" else "qed"
    qemu_img("create", "-f", "qed", "-b", backing.name, "-F", fmt, str(path), str(SIZE))
    for i in range(0, len(commands), 200):
        qemu_io(path, *commands[i : i + 200], fmt="qed")


def fragmented(tmp: Path, rng: random.Random) -> Path:
    """Issue 12's chain, scaled down: 75% of the base's 64 KiB pieces hold data, in random order;
    a middle layer with one long write; a top with one 1/100 of the disk and one 4 KiB write."""
    pieces = list(range(SIZE // CLUSTER))
    rng.shuffle(pieces)
    write_raw(tmp / "base.raw", SIZE, [(p * CLUSTER, CLUSTER) for p in pieces[: len(pieces) * 3 // 4]], rng)
    qed_over(tmp / "sn1.qed", tmp / "base.raw", [f"write -P 0x5a {SIZE // 4} {SIZE // 20}"])
    qed_over(tmp / "top.qed", tmp / "sn1.qed", [f"write -P 0x33 {SIZE // 2} {SIZE // 100 // 512 * 512}",
                                                f"write -P 0x44 {SIZE - CLUSTER} 4096"])
    return tmp / "top.qed"


def sparse_4k(tmp: Path, rng: random.Random) -> Path:
    """A base whose data lies in random 4 KiB blocks (a tenth of them), under a snapshot and a
    top that each hold one 4 KiB write."""
    blocks = rng.sample(range(SIZE // 4096), SIZE // 4096 // 10)
    write_raw(tmp / "base.raw", SIZE, [(b * 4096, 4096) for b in blocks], rng)
    qed_over(tmp / "sn1.qed", tmp / "base.raw", [f"write -P 0x5a {SIZE // 5} 4096"])
    qed_over(tmp / "top.qed", tmp / "sn1.qed", [f"write -P 0x44 {SIZE // 3} 4096"])
    return tmp / "top.qed"


def deep(tmp: Path, rng: random.Random) -> Path:
    """Twelve layers: a raw base with a few long runs, and eleven QED layers above it, each with
    3% of its clusters written at random."""
    write_raw(tmp / "base.raw", SIZE, [(rng.randrange(SIZE // CLUSTER - 64) * CLUSTER, 32 * CLUSTER)
                                       for _ in range(4)], rng)
    below = tmp / "base.raw"
    for level in range(11):
        layer = tmp / f"layer{level}.qed"
        clusters = rng.sample(range(SIZE // CLUSTER), SIZE // CLUSTER * 3 // 100)
        qed_over(layer, below, [f"write -P {level + 1} {c * CLUSTER} {CLUSTER}" for c in clusters])
        below = layer
    return below


def one_long_run(tmp: Path, rng: random.Random) -> Path:
    """One long run of data in the base, one long write in the middle, nothing in the top."""
    write_raw(tmp / "base.raw", SIZE, [(SIZE // 8, SIZE // 2)], rng)
    qed_over(tmp / "mid.qed", tmp / "base.raw", [f"write -P 0x11 {SIZE // 4} {SIZE // 2}"])
    qed_over(tmp / "top.qed", tmp / "mid.qed", [])
    return tmp / "top.qed"


SHAPES = [fragmented, sparse_4k, deep, one_long_run]


def layer_map(path: Path) -> list[dict]:
    """QEMU's map of one layer alone (its backing file left out)."""
    if path.suffix == ".raw":
        spec = {"driver": "raw", "file": {"driver": "file", "filename": str(path)}}
    else:
        spec = {"driver": "qed", "backing": None, "file": {"driver": "file", "filename": str(path)}}
    return json.loads(qemu_img("map", "--output=json", "json:" + json.dumps(spec)))


def work_units(top: Path) -> int:
    """Clusters plus extents of every layer of the chain."""
    with contextlib.closing(open_chain(str(top), writable=False)) as c:
        paths = [Path(layer.path) for layer in c.layers]
    return sum(SIZE // CLUSTER + len(layer_map(path)) for path in paths)


class Counts:
    """Counts the calls that walk the chain, by wrapping the methods that do them."""

    def __init__(self, monkeypatch):
        self.calls: collections.Counter[str] = collections.Counter()
        for cls, name in ((qed_table.QedTables, "cluster_entry"), (qed.QedImage, "block_status"),
                          (raw.RawLayer, "block_status")):
            self._wrap(monkeypatch, cls, name)
        lseek = os.lseek

        def counted_lseek(fd, position, how):
            self.calls["lseek"] += 1
            return lseek(fd, position, how)

        monkeypatch.setattr(local.os, "lseek", counted_lseek)
        ioctl = extents.fcntl.ioctl

        def counted_ioctl(fd, request, *args):
            self.calls["fiemap" if request == extents.FS_IOC_FIEMAP else "ioctl"] += 1
            return ioctl(fd, request, *args)

        monkeypatch.setattr(extents.fcntl, "ioctl", counted_ioctl)

    def _wrap(self, monkeypatch, cls, name) -> None:
        method = getattr(cls, name)
        key = f"{cls.__name__}.{name}"

        def counted(layer, *args, **kwargs):
            self.calls[key] += 1
            return method(layer, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.__name__)
def test_a_stream_costs_linear_work(tmp_path, shape, monkeypatch):
    top = shape(tmp_path, random.Random(12))
    expected = qemu_convert(top, tmp_path / "expected.raw")
    units = work_units(top)
    counts = Counts(monkeypatch)
    sample_stream(top, speed=0, times=[])  # a whole job, steps inline on a MockClock; it completes
    monkeypatch.undo()
    assert counts.total <= COST_PER_UNIT * units, (dict(counts.calls), units)
    assert qemu_convert(top, tmp_path / "after.raw") == expected


def read_whole_disk(top: Path, copy_on_read: bool) -> bytes:
    """The whole disk, read in the kernel's 128 KiB requests (with copy-on-read: every cluster
    is copied into the top image first)."""
    c = open_chain(str(top))
    try:
        events = EventLog("top.raw")
        read = c.read
        if copy_on_read:
            read = CopyOnRead(Streamer(c, events.emit), WriteErrors("top.raw", events.emit)).read
        return b"".join(read(offset, 128 * 1024) for offset in range(0, SIZE, 128 * 1024))
    finally:
        c.close()


@pytest.mark.parametrize("copy_on_read", [False, True], ids=["read", "copy_on_read"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.__name__)
def test_guest_reads_cost_linear_work(tmp_path, shape, copy_on_read, monkeypatch):
    top = shape(tmp_path, random.Random(12))
    expected = qemu_convert(top, tmp_path / "expected.raw")
    units = work_units(top)
    counts = Counts(monkeypatch)
    data = read_whole_disk(top, copy_on_read)
    monkeypatch.undo()
    assert data == expected
    assert counts.total <= COST_PER_UNIT * units, (dict(counts.calls), units)


def data_runs(top: Path) -> list[tuple[int, int]]:
    """The data runs of the chain as QEMU maps it, adjacent ones merged."""
    runs: list[tuple[int, int]] = []
    for entry in json.loads(qemu_img("map", "--output=json", str(top))):
        if entry["data"]:
            start, end = entry["start"], entry["start"] + entry["length"]
            runs[-1:] = [(runs[-1][0], end)] if runs and runs[-1][1] == start else [*runs[-1:], (start, end)]
    return runs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.__name__)
def test_seeking_every_extent_costs_linear_work(tmp_path, shape, monkeypatch):
    """cp --sparse's walk: SEEK_DATA, then SEEK_HOLE from the data found, to the end of the disk.
    Each answer asks each layer afresh (a few calls), but must not walk the top image's run
    again for every run of a layer below, nor a long run entry by entry."""
    top = shape(tmp_path, random.Random(12))
    expected = data_runs(top)
    units = work_units(top)
    with contextlib.closing(open_chain(str(top), writable=False)) as chain:
        counts = Counts(monkeypatch)
        runs, pos = [], 0
        while (start := chain.seek(pos, True)) is not None:
            pos = chain.seek(start, False)
            runs.append((start, pos))
        monkeypatch.undo()
        per_seek = SEEK_COST_PER_LAYER * len(chain.layers)
    assert runs == expected
    assert counts.total <= COST_PER_UNIT * units + per_seek * 2 * len(runs), (dict(counts.calls), units, len(runs))


def test_counting_a_sparse_disk_takes_few_calls(tmp_path, monkeypatch):
    """The job's count of what to copy walks a 256 GiB disk holding 2 MiB in about 70
    worker-thread calls (the window grows to 4 GiB while calls are quick:
    stream.next_count_window), not one per 64 MiB (4096). Over a whole stream the count runs
    beside the copy, which overtakes it; here it runs alone, as on a disk too big for the copy
    to catch up."""
    size, rng = 256 << 30, random.Random(15)
    pieces = sorted(rng.sample(range(size // CLUSTER), 32))
    write_raw(tmp_path / "base.raw", size, [(p * CLUSTER, CLUSTER) for p in pieces], rng)
    qemu_img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(tmp_path / "top.qed"), str(size))
    calls = collections.Counter()
    bytes_to_copy = Copier.bytes_to_copy

    def counted(copier, *args):
        calls["bytes_to_copy"] += 1
        return bytes_to_copy(copier, *args)

    monkeypatch.setattr(Copier, "bytes_to_copy", counted)
    # Each call's time decides the next window: on a loaded machine calls that were quick here
    # may take long. The growth is what this test counts, so every call counts as quick.
    monkeypatch.setattr(stream, "COUNT_CALL_SECONDS", 0.5)
    with contextlib.closing(open_chain(str(tmp_path / "top.qed"))) as c:
        job = StreamJob(c, None, 0, EventLog("top.raw").emit, GuestActivity(), run_sync=inline)
        trio.run(job._count_to_copy)
        job.copier.close()
    assert job.to_copy == len(pieces) * CLUSTER
    assert 0 < calls["bytes_to_copy"] <= 96, calls


def test_the_count_window_shrinks_when_calls_grow_long():
    """Calls of the count stay near COUNT_CALL_SECONDS: the window halves after a long one
    (not below where it starts), doubles after a short one (up to its cap)."""
    start, cap, target = stream.COUNT_WINDOW_CLUSTERS, stream.MAX_COUNT_WINDOW_CLUSTERS, stream.COUNT_CALL_SECONDS
    assert stream.next_count_window(8 * start, 3 * target) == 4 * start
    assert stream.next_count_window(start, 3 * target) == start
    assert stream.next_count_window(8 * start, 1.5 * target) == 8 * start
    assert stream.next_count_window(8 * start, target / 2) == 16 * start
    assert stream.next_count_window(cap, 0.0) == cap
