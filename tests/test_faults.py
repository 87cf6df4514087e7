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
from conftest import FUSESTREAM, ctl, qemu_check, qemu_convert, qemu_img, run

from fusestream.copy import Copier
from fusestream.errors import FusestreamError
from fusestream.formats import qed, qed_sync
from fusestream.sources import local

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


# -- in-process: the image's state after each kind of failed write or flush ---------------------


class LosingDisk:
    """Stands in for the top image's device: writes reach it, and the chosen fdatasync fails
    with EIO and puts back what every write since the last good one replaced, as Linux may
    after a failed writeback (the pages are dropped, and the next fdatasync reports success)."""

    def __init__(self, monkeypatch, image):
        self.fd = image.source.fd
        self.undo: list[tuple[int, bytes]] = []
        self.fail_next = False
        real_pwrite, real_fdatasync = local._pwrite_all, os.fdatasync

        def pwrite(fd, data, offset):
            if fd == self.fd:
                length = sum(memoryview(b).nbytes for b in data) if isinstance(data, list) else memoryview(data).nbytes
                old = os.pread(fd, length, offset)
                self.undo.append((offset, old + bytes(length - len(old))))
            real_pwrite(fd, data, offset)

        def fdatasync(fd):
            if fd == self.fd and self.fail_next:
                self.fail_next = False
                for offset, old in reversed(self.undo):
                    os.pwrite(fd, old, offset)
                self.undo = []
                raise OSError(errno.EIO, "Input/output error")
            real_fdatasync(fd)
            if fd == self.fd:
                self.undo = []

        monkeypatch.setattr(local, "_pwrite_all", pwrite)
        monkeypatch.setattr(os, "fdatasync", fdatasync)


def backed_image(tmp_path: Path, size: int = 4 << 20) -> tuple[Path, bytes]:
    base = tmp_path / "base.raw"
    content = random.Random(5).randbytes(size)
    base.write_bytes(content)
    top = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-o", f"cluster_size={CLUSTER}", "-b", "base.raw", "-F", "raw", str(top))
    return top, content


def test_clusters_written_before_a_failed_flush_are_written_again_before_their_entries(
    tmp_path, monkeypatch, open_chains
):
    top, model = backed_image(tmp_path)
    model = bytearray(model)
    chain = open_chains(top)
    disk = LosingDisk(monkeypatch, chain.top)
    writes = [(100, b"a" * 3000), (CLUSTER * 3 + 5, b"b" * 70000), (50, b"c" * 100), (CLUSTER * 3 + 9, b"d" * 9)]
    chain.write(*writes[0])
    chain.flush()  # makes the L2 table: the next writes only change entries
    for offset, data in writes[1:]:  # new clusters, then writes in place into both
        chain.write(offset, data)
    Copier(chain, base=None).copy_range(0, 16 * CLUSTER)  # clusters copied from the backing file
    for _ in range(2):  # the second time, it is the writing again that fails
        disk.fail_next = True
        with pytest.raises(OSError) as failed:
            chain.flush()
        assert failed.value.errno == errno.EIO
    chain.flush()  # nothing was written in place: all of it is written again, then flushed
    chain.close()
    for offset, data in writes:
        model[offset : offset + len(data)] = data
    assert qemu_check(top).returncode == 0
    assert qemu_convert(top, tmp_path / "after.raw") == model


def test_a_failed_flush_after_more_writes_than_are_kept_fails_every_later_flush(tmp_path, monkeypatch, open_chains):
    top, _ = backed_image(tmp_path)
    monkeypatch.setattr(qed_sync, "UNSYNCED_DATA_MAX", 4 * CLUSTER)
    chain = open_chains(top)
    disk = LosingDisk(monkeypatch, chain.top)
    chain.write(0, b"x" * CLUSTER)
    chain.flush()
    for _ in range(5):  # partly in place, partly new: past the limit, not all of it is kept
        chain.write(CLUSTER - 50, b"y" * CLUSTER)
    disk.fail_next = True
    for _ in range(3):
        with pytest.raises(OSError) as failed:
            chain.flush()
        assert failed.value.errno == errno.EIO
    chain.write(CLUSTER * 5, b"z" * 10)  # the image still takes writes
    with pytest.raises(FusestreamError, match="not everything could be written at close"):
        chain.close()
    assert qemu_check(top).returncode == 0


def test_a_failed_need_check_update_is_not_remembered_as_done(tmp_path, monkeypatch, open_chains):
    top = tmp_path / "solo.qed"
    qed.create(str(top), 4 << 20)
    chain = open_chains(top)
    disk = LosingDisk(monkeypatch, chain.top)
    disk.fail_next = True  # the first fdatasync: QED_F_NEED_CHECK, before the data is referenced
    with pytest.raises(OSError):
        chain.write(0, b"q" * 512)
    assert not chain.top.header.features & qed.QED_F_NEED_CHECK
    chain.write(0, b"r" * 512)
    assert chain.top.need_check_set_by_us
    chain.close()
    assert qemu_check(top).returncode == 0
    assert qemu_convert(top, tmp_path / "after.raw")[:1024] == b"r" * 512 + bytes(512)


def test_a_failed_rebase_keeps_the_backing_file_in_memory_and_on_disk(tmp_path, monkeypatch, open_chains):
    top, content = backed_image(tmp_path, size=1 << 20)
    chain = open_chains(top)
    Copier(chain, base=None).copy_range(0, chain.size)
    disk = LosingDisk(monkeypatch, chain.top)
    real_write_header = chain.top._write_header
    calls = []

    def failing_header():
        calls.append(1)
        real_write_header()
        disk.fail_next = True  # the fdatasync that would make the new header durable

    monkeypatch.setattr(chain.top, "_write_header", failing_header)
    with pytest.raises(OSError):
        chain.rebase(len(chain.layers))
    monkeypatch.setattr(chain.top, "_write_header", real_write_header)
    assert chain.top.backing_filename == "base.raw" and chain.top.header.features & qed.QED_F_BACKING_FILE
    chain.flush()  # writes the header the disk must hold again: the old one
    assert json.loads(qemu_img("info", "--force-share", "--output=json", str(top)))["backing-filename"] == "base.raw"
    chain.rebase(len(chain.layers))
    chain.close()
    assert "backing-filename" not in json.loads(qemu_img("info", "--output=json", str(top)))
    assert qemu_check(top).returncode == 0
    assert qemu_convert(top, tmp_path / "after.raw") == content


# -- real mounts over a filesystem that fills up --------------------------------------------------

SMALL_CLUSTER = 4096  # with table_size 2, an L2 table is two pages: the second one can be a hole
IMAGE_SIZE = 6 << 20


def sparse_backed_top(tmp_path: Path, small_fs: SmallFs) -> tuple[Path, bytearray]:
    """A top image over a random raw base, its first L2 table written by QEMU with one entry and
    copied sparse onto the small filesystem: entries for 2-4 MiB of the disk fall in a hole.
    Returns the image and what the disk reads."""
    base = tmp_path / "base.raw"
    content = bytearray(random.Random(9).randbytes(IMAGE_SIZE))
    base.write_bytes(content)
    made = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-o", f"cluster_size={SMALL_CLUSTER},table_size=2",
             "-b", str(base), "-F", "raw", str(made), str(IMAGE_SIZE))
    run("qemu-io", "-f", "qed", "-c", f"write -P 7 0 {SMALL_CLUSTER}", str(made))
    content[:SMALL_CLUSTER] = bytes([7]) * SMALL_CLUSTER
    top = small_fs.path / "top.qed"
    sparse_copy(made, top)
    return top, content


class Guest:
    """Writes to the raw file, each into a 64 KiB slot of its own (so that a failed write never
    overlaps another), and keeps the model: writes whose write() succeeded are in it; a failed
    write's range may hold either state (taken from the image at the end)."""

    def __init__(self, raw: Path, model: bytearray, seed: int):
        self.fd = os.open(raw, os.O_RDWR)
        self.model = model
        self.rng = random.Random(seed)
        self.slots = self.rng.sample(range(1, IMAGE_SIZE // CLUSTER), IMAGE_SIZE // CLUSTER - 1)
        self.failed: list[tuple[int, int]] = []
        self.acked: list[tuple[int, int]] = []  # ranges written before a successful fsync
        self._unacked: list[tuple[int, int]] = []

    def write(self, low: int = 0, high: int = IMAGE_SIZE, one_cluster: bool = False) -> int:
        """One write in a free slot within [low, high) (`one_cluster`: within one cluster of the
        image); returns 0 or the write's errno."""
        slot = next(s for s in self.slots if low <= s * CLUSTER < high)
        self.slots.remove(slot)
        length = self.rng.randrange(1, SMALL_CLUSTER if one_cluster else 3 * SMALL_CLUSTER)
        offset = slot * CLUSTER + self.rng.randrange((SMALL_CLUSTER if one_cluster else CLUSTER) - length)
        data = self.rng.randbytes(length)
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as err:
            self.failed.append((offset, length))
            return err.errno
        self.model[offset : offset + length] = data
        self._unacked.append((offset, length))
        return 0

    def fsync(self) -> int:
        code = fsync_errno(self.fd)
        if code == 0:
            self.acked += self._unacked
            self._unacked = []
        return code

    def reads_back_what_was_acknowledged(self) -> bool:
        return all(os.pread(self.fd, length, offset) == self.model[offset : offset + length]
                   for offset, length in self.acked)

    def expected(self, actual: bytes) -> bytes:
        model = bytearray(self.model)
        for offset, length in self.failed:
            model[offset : offset + length] = actual[offset : offset + length]
        return bytes(model)

    def close(self) -> None:
        os.close(self.fd)


def image_status(m) -> dict:
    try:
        return json.loads((m.mountpoint / "status.json").read_text())["images"][0]
    except OSError as err:  # say why, if the daemon is gone
        said = m.proc.stderr.read() if m.proc.poll() is not None else "(daemon still running)"
        raise AssertionError(f"status.json: {err}; daemon: {said}") from None


def stream_state(m) -> str:
    return image_status(m)["stream"]["state"]


def wait_for_state(m, state: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while stream_state(m) != state:
        assert time.monotonic() < deadline, f"stream is {stream_state(m)}, not {state}"
        time.sleep(0.05)


def stream_to_the_end(m) -> None:
    ctl(m, "stream speed=0")
    assert run(FUSESTREAM, "wait", str(m.mountpoint), timeout=60).returncode == 0


def unmount_and_verify(m, top: Path, guest: Guest, tmp_path: Path) -> None:
    """A clean unmount, a clean image, and every acknowledged write in it."""
    m.umount()
    assert qemu_check(top).returncode == 0
    actual = qemu_convert(top, tmp_path / "after.raw")
    assert actual == guest.expected(actual)


@pytest.mark.mount
def test_guest_writes_and_a_stream_over_a_filesystem_that_fills_up_and_empties(tmp_path, small_fs, mount):
    top, model = sparse_backed_top(tmp_path, small_fs)
    m = mount(top, "speed=1M")
    guest = Guest(m.raw, model, seed=3)
    try:
        for _ in range(4):
            assert guest.write(0, 2 << 20) == 0
        assert guest.fsync() == 0
        ctl(m, "pause")  # so that the stream takes none of the last free page
        wait_for_state(m, "paused")
        small_fs.fill(leave=SMALL_CLUSTER)
        assert guest.write(2 << 20, 4 << 20, one_cluster=True) == 0  # takes the last page
        assert guest.fsync() == errno.ENOSPC  # its L2 entry lies in a hole of the table
        assert all(guest.write(4 << 20) == errno.ENOSPC for _ in range(3))  # allocating writes fail at once
        ctl(m, "resume")
        wait_for_state(m, "failed")  # the stream meets the full filesystem too
        assert alive(m) and guest.reads_back_what_was_acknowledged()
        assert "write error" in (m.mountpoint / "status").read_text()
        assert guest.fsync() == errno.ENOSPC  # still full: still failing, still serving
        reported = [e["data"] for e in events(m) if e["event"] == "BLOCK_IO_ERROR"]
        assert reported and all(r["nospace"] and r["operation"] == "write" for r in reported)
        small_fs.empty()
        assert guest.fsync() == 0
        assert image_status(m)["write_error"] is None
        stream_to_the_end(m)
        for _ in range(3):
            assert guest.write() == 0
        assert guest.fsync() == 0
    finally:
        guest.close()
    unmount_and_verify(m, top, guest, tmp_path)


@pytest.mark.mount
def test_guest_fsyncs_after_a_stream_failed_with_enospc_keep_the_daemon(tmp_path, small_fs, mount):
    top, model = sparse_backed_top(tmp_path, small_fs)
    small_fs.fill(leave=64 * SMALL_CLUSTER)
    m = mount(top)
    guest = Guest(m.raw, model, seed=4)
    try:
        wait_for_state(m, "failed")
        assert "No space left on device" in image_status(m)["stream"]["error"]
        codes = [guest.fsync()]
        for _ in range(3):
            guest.write()
            codes.append(guest.fsync())
        time.sleep(2.5)
        assert alive(m) and errno.ENOSPC in codes
        small_fs.empty()
        assert guest.fsync() == 0
        stream_to_the_end(m)
    finally:
        guest.close()
    unmount_and_verify(m, top, guest, tmp_path)


# -- real mounts over a top image whose device returns EIO ----------------------------------------

SHIM_SOURCE = Path(__file__).parent / "shims" / "eio.c"


@pytest.fixture(scope="session")
def eio_shim(tmp_path_factory) -> Path:
    """The LD_PRELOAD fault layer, built for this run (device-mapper is not available here)."""
    library = tmp_path_factory.mktemp("shim") / "eio.so"
    run("gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(library), str(SHIM_SOURCE), "-ldl")
    return library


@dataclasses.dataclass
class FaultyDevice:
    """What the shim reads before each write and flush of the top image."""

    control: Path

    def fail(self, *kinds: str) -> None:
        """Make "write" (pwrite) and/or "sync" (fdatasync) of the top image fail with EIO."""
        self.control.write_text(" ".join(kinds))

    def heal(self) -> None:
        self.control.write_text("")


@pytest.fixture
def faulty_mount(tmp_path, mount, eio_shim, monkeypatch):
    """faulty_mount(image, *options) -> (Mount, FaultyDevice): a mount whose daemon sees the
    image's device fail on demand."""

    def _mount(image: Path, *options: str):
        device = FaultyDevice(tmp_path / "device-faults")
        device.heal()
        with monkeypatch.context() as env:  # for the daemon only, not for qemu-img afterwards
            env.setenv("LD_PRELOAD", str(eio_shim))
            env.setenv("FUSESTREAM_FAULT_PATH", os.path.realpath(image))
            env.setenv("FUSESTREAM_FAULT_CONTROL", str(device.control))
            return mount(image, *options), device

    return _mount


def backed_top(tmp_path: Path) -> tuple[Path, bytearray]:
    base = tmp_path / "base.raw"
    content = bytearray(random.Random(11).randbytes(IMAGE_SIZE))
    base.write_bytes(content)
    top = tmp_path / "top.qed"
    qemu_img("create", "-f", "qed", "-o", f"cluster_size={CLUSTER}", "-b", "base.raw", "-F", "raw",
             str(top), str(IMAGE_SIZE))
    return top, content


@pytest.mark.mount
def test_a_top_device_that_returns_eio_and_recovers(tmp_path, faulty_mount):
    top, model = backed_top(tmp_path)
    m, device = faulty_mount(top, "speed=512K")
    guest = Guest(m.raw, model, seed=5)
    high = 4 << 20  # where the guest writes: far ahead of the stream, so every write allocates
    try:
        for _ in range(3):
            assert guest.write(high) == 0
        assert guest.fsync() == 0
        for _ in range(3):
            assert guest.write(high) == 0
        device.fail("sync")
        assert guest.fsync() == errno.EIO
        assert guest.fsync() == errno.EIO
        device.fail("write", "sync")
        assert guest.write(high) == errno.EIO
        assert guest.fsync() == errno.EIO
        wait_for_state(m, "failed")  # the stream's next write failed too
        assert alive(m) and guest.reads_back_what_was_acknowledged()
        assert "Input/output error" in image_status(m)["write_error"]
        reported = [e["data"] for e in events(m) if e["event"] == "BLOCK_IO_ERROR"]
        assert reported and not any(r["nospace"] for r in reported)
        device.heal()
        assert guest.fsync() == 0  # what the failed flushes covered was written again first
        stream_to_the_end(m)
        assert guest.write() == 0 and guest.fsync() == 0
    finally:
        guest.close()
    unmount_and_verify(m, top, guest, tmp_path)


@pytest.mark.mount
def test_a_failed_flush_after_more_writes_than_are_kept_is_reported_until_the_unmount(tmp_path, faulty_mount):
    top, model = backed_top(tmp_path)
    m, device = faulty_mount(top, "nostream")
    guest = Guest(m.raw, model, seed=6)
    chunk = random.Random(6).randbytes(1 << 20)
    try:
        os.pwrite(guest.fd, chunk, 0)
        assert guest.fsync() == 0
        for _ in range(qed_sync.UNSYNCED_DATA_MAX // len(chunk) + 2):  # more than the daemon keeps
            os.pwrite(guest.fd, chunk, 0)
        device.fail("sync")
        assert guest.fsync() == errno.EIO
        device.heal()
        assert guest.fsync() == errno.EIO  # some of it may be lost: a success would be a lie
        assert alive(m) and os.pread(guest.fd, len(chunk), 0) == chunk
    finally:
        guest.close()
    run("fusermount3", "-u", str(m.mountpoint))
    _, stderr = m.proc.communicate(timeout=30)
    assert m.proc.returncode == 1
    assert stderr.strip().splitlines()[-1].startswith("mount.fusestream: ")
    assert "not everything could be written at close" in stderr
    assert qemu_check(top).returncode == 0


@pytest.mark.mount
def test_a_copy_on_read_that_cannot_write_still_serves_the_read_and_is_reported(tmp_path, faulty_mount):
    top, model = backed_top(tmp_path)
    m, device = faulty_mount(top, "nostream", "copy_on_read")
    device.fail("write")
    with open(m.raw, "rb", buffering=0) as raw:
        assert raw.read(CLUSTER) == model[:CLUSTER]
    assert alive(m)
    reported = [e["data"] for e in events(m) if e["event"] == "BLOCK_IO_ERROR"]
    assert [r["origin"] for r in reported] == ["copy-on-read"] and reported[0]["reason"] == "Input/output error"
    device.heal()
    m.umount()
    assert qemu_check(top).returncode == 0
