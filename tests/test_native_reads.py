"""The mount's native reads (native_reads.py, patches/pyfuse3/0002): Chain.locate, which fills
their map, tells the truth on every layer kind; the chain says when a location may change; and
through a real mount, reads answered by the native threads see every write, discard and stream
step at once."""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import (
    FUSESTREAM,
    build_chain,
    fallocate,
    qemu_convert,
    qemu_img,
    qemu_io,
    run,
    write_random,
)

from fusestream import native_reads
from fusestream.chain import open_chain
from fusestream.errors import UsageError
from fusestream.formats.layer import PLACED_ZEROS, BlockStatus
from fusestream.formats.raw import RawLayer
from fusestream.fs import RAW_INODE
from fusestream.mount import parse_options
from fusestream.sources.local import LocalFile

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def qcow2_chain(tmp: Path) -> Path:
    """raw base <- zlib-compressed qcow2 <- extended-L2 qcow2 <- QED top, written by QEMU."""
    rng = random.Random(3)
    size = 4 * MiB
    base = tmp / "base.raw"
    data = bytearray(size)
    for _ in range(40):
        at, length = rng.randrange(size - 70_000), rng.randrange(1, 70_000)
        data[at : at + length] = rng.randbytes(11) * (length // 11) + bytes(length % 11)
    base.write_bytes(data)
    full = tmp / "full.raw"
    full.write_bytes((rng.randbytes(97) * (size // 97 + 1))[:size])  # compresses
    compressed, ext, top = tmp / "c.qcow2", tmp / "ext.qcow2", tmp / "top.qed"
    qemu_img("convert", "-c", "-O", "qcow2", "-B", base.name, "-F", "raw", str(full), str(compressed))
    qemu_io(compressed, "write -z 1M 64k", fmt="qcow2")  # a zero cluster among compressed ones
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", "-b", compressed.name, "-F", "qcow2", str(ext))
    qemu_io(ext, "write -P 7 8k 6k", "write -z 200k 4k", "write -P 9 2M 128k", fmt="qcow2")
    qemu_img("create", "-f", "qed", "-b", ext.name, "-F", "qcow2", str(top))
    write_random(top, tmp, rng, 3 * MiB + 100, 70_000, "qed")
    return top


def assert_located_truly(top: Path, size: int, expect_unplaced: bool) -> None:
    """Every run Chain.locate places reads, by pread of its descriptor, what the chain reads."""
    chain = open_chain(str(top), writable=False)
    try:
        unplaced = 0
        for window in range(0, size, 1 * MiB):
            placed = chain.locate(window, 1 * MiB)
            assert placed[0][0] == window and sum(run[1] for run in placed) == min(1 * MiB, size - window)
            for (offset, length, fd, file_offset, _), following in zip(placed, placed[1:] + [None], strict=True):
                if following is not None:
                    assert following[0] == offset + length  # in order, nothing left out
                expected = bytes(chain.read(offset, length))
                if fd is None:
                    unplaced += 1
                elif fd == PLACED_ZEROS:
                    assert expected == bytes(length), (offset, length)
                else:
                    got = os.pread(fd, length, file_offset)
                    assert got + bytes(length - len(got)) == expected, (offset, length, fd, file_offset)
        assert bool(unplaced) == expect_unplaced
    finally:
        chain.close()


def test_locate_places_every_run_of_a_qed_chain_over_raw(tmp_path):
    c = build_chain(tmp_path, size=8 * MiB + 512, cluster_size=4096, table_size=2)
    assert_located_truly(c.top, c.size, expect_unplaced=False)


def test_locate_places_qcow2_runs_but_not_compressed_clusters(tmp_path):
    top = qcow2_chain(tmp_path)
    assert_located_truly(top, 4 * MiB, expect_unplaced=True)


def test_a_raw_layer_places_its_holes_by_whole_units(tmp_path):
    """The whole units of a raw file's holes are zeros (no pread, no page cache for them); a
    unit where data and a hole meet is data that may hold holes (an lseek must ask the loop)."""
    K = 1024
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(1 * MiB)
        for at, length in ((0, 4 * K), (200 * K, 56 * K), (512 * K, 128 * K)):
            f.seek(at)
            f.write(b"\x11" * length)
    layer = RawLayer(LocalFile(str(base)))
    try:
        fd = layer.source.descriptor()
        found = [(loc.offset, loc.length, loc.status, loc.holes) for loc in layer.locate(0, 1 * MiB, 64 * K)]
        assert found == [
            (0, 64 * K, BlockStatus.FOUND, True),  # 4 KiB of data, then a hole
            (64 * K, 128 * K, BlockStatus.ZERO, False),
            (192 * K, 64 * K, BlockStatus.FOUND, True),  # the hole's end, then data
            (256 * K, 256 * K, BlockStatus.ZERO, False),
            (512 * K, 128 * K, BlockStatus.FOUND, False),  # whole units of data
            (640 * K, 384 * K, BlockStatus.ZERO, False),
        ]
        assert all(loc.fd == fd and loc.file_offset == loc.offset
                   for loc in layer.locate(0, 1 * MiB, 64 * K) if loc.status is BlockStatus.FOUND)
    finally:
        layer.close()


def test_a_window_evicted_by_another_that_shares_its_slots_is_filled_again(tmp_path, open_chains, monkeypatch):
    c = build_chain(tmp_path, size=16 * MiB, cluster_size=65536)
    chain = open_chains(c.top, writable=False)
    monkeypatch.setattr(native_reads, "MAX_SLOTS", 64)  # a map of 4 MiB: windows 0 and 4 MiB share its slots
    reads = native_reads.NativeReads(chain, RAW_INODE, 1)
    located = []
    locate = chain.locate
    monkeypatch.setattr(chain, "locate", lambda offset, length: located.append(offset) or locate(offset, length))
    for offset in (0, 65536, 4 * MiB, 0):
        reads.fill_around(offset, sequential=False)
    assert located == [0, 4 * MiB, 0]


class Recorder:
    """A MapListener that checks, when told, that the change is already made."""

    def __init__(self, chain, check):
        self.chain, self.check, self.calls = chain, check, []

    def remapped(self, offset, length):
        self.calls.append(("remapped", offset, length))
        self.check(offset, length)

    def retiring(self):
        self.calls.append(("retiring",))
        self.check(None, None)


def test_the_chain_tells_its_listener_after_each_change(tmp_path, open_chains):
    c = build_chain(tmp_path, size=2 * MiB, cluster_size=65536)
    chain = open_chains(c.top)
    seen = []
    chain.map_listener = Recorder(chain, lambda offset, length: seen.append(
        None if offset is None else bytes(chain.read(offset, min(length, 8)))))
    chain.write(70_000, b"new data")
    assert seen[-1] == b"new data" and chain.map_listener.calls[-1] == ("remapped", 70_000, 8)
    chain.discard(65536, 65536)
    assert seen[-1] == bytes(8) and chain.map_listener.calls[-1] == ("remapped", 65536, 65536)
    data = bytes(chain.read(4 * 65536, 2 * 65536))
    chain.populate([(4 * 65536, data[:65536]), (5 * 65536, data[65536:])], zero_clusters=False)
    assert chain.map_listener.calls[-1] == ("remapped", 4 * 65536, 2 * 65536)


def test_a_change_that_fails_half_way_is_told_too(tmp_path, open_chains, monkeypatch):
    """A write or discard may change the cached tables and then fail (a failed fdatasync in the
    write-back): its range must still be dropped, or native reads keep the old place."""
    c = build_chain(tmp_path, size=2 * MiB, cluster_size=65536)
    chain = open_chains(c.top)
    chain.map_listener = Recorder(chain, lambda *_: None)
    for name, call in (("write", lambda: chain.write(4096, b"x" * 100)), ("discard", lambda: chain.discard(0, 65536))):
        monkeypatch.setattr(chain.top, name, lambda *args, **kwargs: (_ for _ in ()).throw(OSError(5, "EIO")))
        with pytest.raises(OSError):
            call()
        assert chain.map_listener.calls[-1][0] == "remapped", name


def test_a_long_discard_is_told_batch_by_batch(tmp_path, open_chains, monkeypatch):
    """Clusters freed by one batch may be reused before the next batch is done."""
    c = build_chain(tmp_path, size=8 * MiB, cluster_size=4096, table_size=2)
    chain = open_chains(c.top)
    monkeypatch.setattr("fusestream.formats.qed.DISCARD_BATCH", 256)  # 1 MiB of 4 KiB clusters
    chain.map_listener = Recorder(chain, lambda *_: None)
    chain.discard(100, 3 * MiB)
    assert [call[1:] for call in chain.map_listener.calls] == [
        (100, MiB - 100), (MiB, MiB), (2 * MiB, MiB), (3 * MiB, 100)]


def test_rebase_clears_the_listener_before_closing_the_merged_layers(tmp_path, open_chains):
    c = build_chain(tmp_path, size=1 * MiB, cluster_size=65536)
    chain = open_chains(c.top)
    merged = chain.layers[1:]
    open_when_told = []
    chain.map_listener = Recorder(chain, lambda *_: open_when_told.append(
        [layer.source.descriptor() for layer in merged]))
    chain.rebase(len(chain.layers))  # nothing copied: only the order of the calls matters here
    assert chain.map_listener.calls == [("retiring",)]
    assert all(fd is not None and fd >= 0 for fd in open_when_told[0])  # still open when told
    assert all(layer.source.descriptor() == -1 for layer in merged)  # closed after


def test_read_threads_option():
    assert parse_options(["read_threads=4"]).read_threads == 4
    assert parse_options(["read_threads=0"]).read_threads == 0
    for bad in ("read_threads=65", "read_threads=-1", "read_threads=many", "read_threads="):
        with pytest.raises(UsageError):
            parse_options([bad])


# -- through a mount ---------------------------------------------------------------------------


def native_stats(m) -> dict | None:
    return json.loads((m.mountpoint / "status.json").read_text())["images"][0].get("native_reads")


class DirectFile:
    """The raw file opened with O_DIRECT, so that every read reaches the daemon (no page cache)."""

    def __init__(self, path: Path, writable: bool = False):
        self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_DIRECT)
        self.buffer = mmap.mmap(-1, 4 * MiB)

    def read(self, offset: int, length: int) -> bytes:
        view = memoryview(self.buffer)[:length]
        got = os.preadv(self.fd, [view], offset)
        return bytes(view[:got])

    def write(self, offset: int, data: bytes) -> None:
        self.buffer[: len(data)] = data
        assert os.pwritev(self.fd, [memoryview(self.buffer)[: len(data)]], offset) == len(data)

    def close(self) -> None:
        os.close(self.fd)
        self.buffer.close()


@pytest.mark.mount
def test_native_threads_answer_reads_and_see_every_write_and_discard(tmp_path, mount):
    c = build_chain(tmp_path, size=16 * MiB, cluster_size=65536)
    expected = bytearray(qemu_convert(c.top, tmp_path / "before.raw"))
    m = mount(c.top, "nostream")
    f = DirectFile(m.raw, writable=True)
    try:
        rng = random.Random(11)
        for _ in range(3):  # the event loop serves the first read of each window and maps it
            for offset in range(0, len(expected), 256 * 1024):
                assert f.read(offset, 256 * 1024) == expected[offset : offset + 256 * 1024]
        assert native_stats(m)["served"] > 100
        for _ in range(200):
            offset = rng.randrange(len(expected) // 4096) * 4096
            if rng.random() < 0.2:
                length = rng.choice([4096, 65536, 3 * 65536])
                assert fallocate(f.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0
                expected[offset : offset + length] = bytes(length)
            else:
                data = rng.randbytes(rng.choice([4096, 8192, 65536, 2 * 65536]))
                f.write(offset, data)
                expected[offset : offset + len(data)] = data
            probe = max(0, offset - 65536)
            assert f.read(probe, 4 * 65536) == expected[probe : probe + 4 * 65536], probe
        assert f.read(0, len(expected) // 4) == expected[: len(expected) // 4]
    finally:
        f.close()
    m.umount()
    assert qemu_convert(c.top, tmp_path / "after.raw") == expected


@pytest.mark.mount
def test_native_reads_stay_right_across_a_stream_and_its_rebase(tmp_path, mount):
    c = build_chain(tmp_path, size=16 * MiB, cluster_size=65536)
    expected = qemu_convert(c.top, tmp_path / "before.raw")
    m = mount(c.top, "speed=8M")
    f = DirectFile(m.raw)
    try:
        status = "running"
        while status != "completed":
            for offset in range(0, len(expected), 1 * MiB):
                assert f.read(offset, 1 * MiB) == expected[offset : offset + 1 * MiB], offset
            status = json.loads((m.mountpoint / "status.json").read_text())["images"][0]["stream"]["state"]
        for offset in range(0, len(expected), 1 * MiB):  # after the rebase: the top's own clusters
            assert f.read(offset, 1 * MiB) == expected[offset : offset + 1 * MiB], offset
        assert native_stats(m)["served"] > 0
    finally:
        f.close()
    m.umount()
    assert qemu_img("info", "--output=json", str(c.top)).find("backing-filename") == -1


@pytest.mark.mount
def test_without_read_threads_or_with_copy_on_read_the_event_loop_serves_every_read(tmp_path, mount):
    c = build_chain(tmp_path, size=4 * MiB, cluster_size=65536)
    expected = qemu_convert(c.top, tmp_path / "ref.raw")
    for options in (("nostream", "read_threads=0"), ("nostream", "copy_on_read")):
        m = mount(c.top, *options)
        f = DirectFile(m.raw)
        try:
            for _ in range(2):
                assert f.read(0, len(expected)) == expected
        finally:
            f.close()
        assert native_stats(m) is None
        m.umount()


@pytest.mark.mount
def test_sigterm_with_the_file_still_open_stops_the_threads(tmp_path, mount):
    """The mount is detached but the kernel keeps the connection while the file is open: the
    threads still wait for requests, and the daemon must stop them rather than wait forever."""
    c = build_chain(tmp_path, size=4 * MiB, cluster_size=65536)
    m = mount(c.top, "nostream")
    fd = os.open(m.raw, os.O_RDONLY)
    os.pread(fd, 4096, 0)
    m.proc.send_signal(signal.SIGTERM)
    m.proc.wait(timeout=20)  # TimeoutExpired if a thread still waits for a request
    assert m.proc.returncode == 0, m.proc.stderr.read()
    with pytest.raises(OSError) as closing:  # the connection ended with the daemon
        os.close(fd)
    assert closing.value.errno == errno.ENOTCONN


@pytest.mark.mount
def test_a_lazy_unmount_ends_the_daemon_once_the_file_is_closed(tmp_path, mount):
    c = build_chain(tmp_path, size=4 * MiB, cluster_size=65536)
    expected = qemu_convert(c.top, tmp_path / "ref.raw")
    m = mount(c.top, "nostream")
    fd = os.open(m.raw, os.O_RDONLY)
    try:
        run("fusermount3", "-u", "-z", str(m.mountpoint))
        assert os.pread(fd, 65536, 65536) == expected[65536 : 2 * 65536]  # still served
    finally:
        os.close(fd)
    m.proc.wait(timeout=20)
    assert m.proc.returncode == 0, m.proc.stderr.read()


@pytest.mark.mount
def test_status_json_counts_the_native_reads(tmp_path, mount):
    c = build_chain(tmp_path, size=4 * MiB, cluster_size=65536)
    m = mount(c.top, "nostream", "read_threads=3")
    f = DirectFile(m.raw)
    try:
        for _ in range(3):
            f.read(0, 4 * MiB)
    finally:
        f.close()
    stats = native_stats(m)
    assert stats["threads"] == 3 and stats["served"] >= 1 and stats["bytes"] >= 1 * MiB
    assert stats["forwarded"] >= 1  # the first read of each window, and every other request
    shown = subprocess.run([FUSESTREAM, "status", str(m.mountpoint)], check=True, capture_output=True, text=True)
    assert "No active stream" in shown.stdout
    m.umount()
