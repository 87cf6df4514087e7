"""A read-only file's data and holes from FIEMAP (sources/extents.py): the same runs as SEEK_DATA /
SEEK_HOLE find, across batch boundaries, in unwritten extents, from several threads at once, and
where the filesystem has no FIEMAP."""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

import pytest
from conftest import fallocate

from fusestream.sources import extents
from fusestream.sources.local import LocalFile

K = 1024


def sparse_file(path: Path, size: int, rng: random.Random, pieces: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(pieces):
            at = rng.randrange(size // 4096) * 4096
            f.seek(at)
            f.write(rng.randbytes(rng.choice([4 * K, 12 * K, 64 * K, 200 * K])))
    return path


def seek_runs(path: Path) -> list[tuple[int, int]]:
    """The data runs that SEEK_DATA / SEEK_HOLE find: the oracle."""
    runs, pos = [], 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, pos))
    finally:
        os.close(fd)
    return runs


def status_runs(source: LocalFile, start: int = 0) -> list[tuple[int, int]]:
    """The data runs that data_status answers, walking from `start`, adjacent answers merged."""
    runs: list[tuple[int, int]] = []
    pos = start
    while pos < source.size:
        data, run = source.data_status(pos, source.size - pos)
        assert run > 0
        if data:
            runs[-1:] = [(runs[-1][0], pos + run)] if runs and runs[-1][1] == pos else [*runs[-1:], (pos, pos + run)]
        pos += run
    return runs


def clip(runs: list[tuple[int, int]], start: int) -> list[tuple[int, int]]:
    return [(max(lo, start), hi) for lo, hi in runs if hi > start]


@pytest.mark.parametrize("per_call", [3, extents.EXTENTS_PER_CALL])
def test_the_extents_are_the_runs_seek_finds(tmp_path, monkeypatch, per_call):
    monkeypatch.setattr(extents, "EXTENTS_PER_CALL", per_call)  # batch boundaries everywhere
    path = sparse_file(tmp_path / "base.raw", 8 << 20, random.Random(5), 300)
    expected = seek_runs(path)
    source = LocalFile(str(path), lock=False)
    try:
        assert source._extents is not None and not source._extents.refused
        assert status_runs(source) == expected
        for start in random.Random(6).sample(range(source.size), 40):
            assert status_runs(source, start) == clip(expected, start), start
        assert not source._extents.refused  # FIEMAP answered all of it
    finally:
        source.close()


def test_walks_from_several_threads_at_once_each_see_the_truth(tmp_path, monkeypatch):
    monkeypatch.setattr(extents, "EXTENTS_PER_CALL", 5)
    path = sparse_file(tmp_path / "base.raw", 8 << 20, random.Random(7), 400)
    expected = seek_runs(path)
    source = LocalFile(str(path), lock=False)
    results, errors = [], []

    def walk(start):
        try:
            results.append((start, status_runs(source, start)))
        except Exception as err:  # reported below, with the others
            errors.append(err)

    try:
        threads = [threading.Thread(target=walk, args=(start,)) for start in range(0, 8 << 20, 1 << 20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        source.close()
    assert not errors
    assert all(runs == clip(expected, start) for start, runs in results) and len(results) == 8


def test_an_unwritten_extent_is_asked_of_seek_data(tmp_path):
    """A preallocated range reads as zeros (a hole to SEEK_DATA), unless written since: FIEMAP
    says "unwritten" for both, so SEEK_DATA decides."""
    path = tmp_path / "prealloc.raw"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        assert fallocate(f.fileno(), 0, 1 << 20, 2 << 20) == 0  # unwritten blocks
        f.seek(0)
        f.write(b"\x11" * 65536)
        f.seek((2 << 20) + 8192)
        f.write(b"\x22" * 4096)  # into the unwritten extent, not yet on disk
    source = LocalFile(str(path), lock=False)
    try:
        assert status_runs(source) == seek_runs(path)
        assert source.data_status((2 << 20) + 8192, 4096) == (True, 4096)
    finally:
        source.close()


def test_a_filesystem_without_fiemap_is_asked_seek_data(tmp_path, monkeypatch):
    path = sparse_file(tmp_path / "base.raw", 4 << 20, random.Random(8), 50)

    def no_fiemap(fd, request, buffer):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(extents.fcntl, "ioctl", no_fiemap)
    source = LocalFile(str(path), lock=False)
    try:
        assert status_runs(source) == seek_runs(path)
        assert source._extents.refused
    finally:
        source.close()


def test_a_file_open_for_writing_is_asked_seek_data(tmp_path):
    path = sparse_file(tmp_path / "top.raw", 1 << 20, random.Random(9), 5)
    source = LocalFile(str(path), writable=True, lock=False)
    try:
        assert source._extents is None  # its extents change as it is written
        assert status_runs(source) == seek_runs(path)
    finally:
        source.close()


def test_overlapping_extents_merge_and_an_unwritten_overlap_is_left_to_seek_data(tmp_path):
    """What a filesystem's FIEMAP bug could report: overlapping or contained extents merge
    into one run; an unwritten one overlapping a written one makes the batch unusable."""
    path = sparse_file(tmp_path / "base.raw", 1 << 20, random.Random(10), 0)
    source = LocalFile(str(path), lock=False)
    try:
        runs = source._extents._runs
        assert runs([(0, 0, 100, 0), (50, 0, 10, 0), (90, 0, 30, 0), (120, 0, 5, 0)]) == [(0, 125, False)]
        assert runs([(0, 0, 100, 0), (100, 0, 50, extents.FIEMAP_EXTENT_UNWRITTEN)]) == [
            (0, 100, False), (100, 150, True)]
        assert runs([(0, 0, 100, 0), (60, 0, 50, extents.FIEMAP_EXTENT_UNWRITTEN)]) is None
        assert runs([(0, 0, 2 << 20, 0)]) == [(0, 1 << 20, False)]  # nothing past the end of the file
    finally:
        source.close()


def test_only_the_first_call_asks_for_dirty_pages_to_be_written(tmp_path, monkeypatch):
    monkeypatch.setattr(extents, "EXTENTS_PER_CALL", 2)
    path = sparse_file(tmp_path / "base.raw", 4 << 20, random.Random(11), 30)
    flags = []
    ioctl = extents.fcntl.ioctl

    def recorded(fd, request, buffer):
        flags.append(extents._HEADER.unpack_from(buffer)[2])
        return ioctl(fd, request, buffer)

    monkeypatch.setattr(extents.fcntl, "ioctl", recorded)
    source = LocalFile(str(path), lock=False)
    try:
        assert status_runs(source) == seek_runs(path)
    finally:
        source.close()
    assert len(flags) > 3 and flags[0] == extents.FIEMAP_FLAG_SYNC and not any(flags[1:])
