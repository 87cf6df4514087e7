"""The fault tier: the top image's filesystem fills up and empties again, its device returns EIO.

The daemon must keep serving; a write error reaches the guest on its write or fsync (ENOSPC where
the cause is no space, else EIO), is a BLOCK_IO_ERROR event and a log line; what could not be
written stays in memory and is written once the fault clears; every write acknowledged by a
successful fsync survives, and qemu-img check finds the image clean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import time
from pathlib import Path

import pytest
from conftest import FUSESTREAM, qemu_check, qemu_convert, qemu_img, run

CLUSTER = 65536


@dataclasses.dataclass
class SmallFs:
    """A tmpfs of a few MiB with a filler file that takes up its free space on demand."""

    path: Path

    @property
    def filler(self) -> Path:
        return self.path / "filler"

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Grow the filler until the filesystem is full, then give back `leave` bytes."""
        with open(self.filler, "ab") as f:
            chunk = bytes(CLUSTER)
            with contextlib.suppress(OSError):
                while True:
                    f.write(chunk)
                    f.flush()
        size = self.filler.stat().st_size
        os.truncate(self.filler, size - size % 4096)
        if leave:
            os.truncate(self.filler, max(0, self.filler.stat().st_size - leave))

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs in tmp_path, always unmounted (lazily if something still holds it)."""
    where = tmp_path / "smallfs"
    where.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=16M,mode=0755", "tmpfs", str(where))
    try:
        yield SmallFs(where)
    finally:
        if run("umount", str(where), check=False).returncode:
            run("umount", "-l", str(where))


def alive(m) -> bool:
    """The daemon still runs and its mount still answers."""
    return m.proc.poll() is None and (m.mountpoint / "status").read_text() != ""


def events(m) -> list[dict]:
    return [json.loads(line) for line in (m.mountpoint / "events").read_text().splitlines()]


def fsync_errno(fd: int) -> int:
    """0 when fsync succeeds, else its errno."""
    try:
        os.fsync(fd)
    except OSError as err:
        return err.errno
    return 0


def sparse_copy(source: Path, target: Path) -> None:
    run("cp", "--sparse=always", str(source), str(target))


@pytest.mark.mount
def test_a_write_back_into_a_sparse_l2_table_on_a_full_filesystem_keeps_the_daemon(tmp_path, small_fs, mount):
    """The issue's case: the L2 table's pages past its first are holes; one allocating write
    takes the last free cluster, so the write-back of its entry finds no space."""
    original = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-o", f"cluster_size={CLUSTER}", str(original), "64M")
    run("qemu-io", "-f", "qed", "-c", f"write -P 7 0 {CLUSTER}", str(original))
    top = small_fs.path / "top.qed"
    sparse_copy(original, top)
    m = mount(top)
    small_fs.fill(leave=CLUSTER)
    data = random.Random(1).randbytes(4096)
    at = 40 << 20  # its L2 entry lies in a page of the table that is a hole
    fd = os.open(m.raw, os.O_RDWR)
    try:
        os.pwrite(fd, data, at)
        time.sleep(2.5)  # two write-backs of the timer
        assert alive(m)
        assert fsync_errno(fd) == errno.ENOSPC
        assert os.pread(fd, 4096, at) == data and os.pread(fd, 4096, 0) == bytes([7]) * 4096
        reported = [e for e in events(m) if e["event"] == "BLOCK_IO_ERROR"]
        assert reported and reported[0]["data"]["nospace"] is True and reported[0]["image"] == "top.raw"
        small_fs.empty()
        assert fsync_errno(fd) == 0
    finally:
        os.close(fd)
    m.umount()
    assert qemu_check(top).returncode == 0
    expected = bytearray(64 << 20)
    expected[:CLUSTER] = bytes([7]) * CLUSTER
    expected[at : at + 4096] = data
    assert qemu_convert(top, tmp_path / "after.raw") == expected
