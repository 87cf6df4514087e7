"""QEMU's image locks: while fusestream uses an image, QEMU's tools refuse to write it (and still
read it with -U); fusestream refuses an image that a QEMU process holds for writing."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MOUNT_HELPER, qemu_img, run

from fusestream.chain import open_chain
from fusestream.errors import ImageBusyError
from fusestream.formats import qed


def qemu_io_result(image: Path, command: str, *flags: str) -> subprocess.CompletedProcess:
    return run("qemu-io", *flags, "-c", command, str(image), check=False)


@pytest.fixture
def small_chain(tmp_path) -> tuple[Path, Path]:
    base, top = tmp_path / "base.raw", tmp_path / "top.qed"
    base.write_bytes(os.urandom(1 << 20))
    qed.create(str(top), 1 << 20, backing_filename=base.name, backing_raw=True)
    return base, top


def locked_bytes(path: Path) -> set[int]:
    """The bytes of `path` that some process holds an OFD lock on (from /proc/locks)."""
    st = os.stat(path)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "OFDLCK" in fields and inode in fields:
            start, end = fields[-2:]
            held |= set(range(int(start), int(end) + 1))
    return held


@contextlib.contextmanager
def qemu_holding(image: Path, read_only: bool) -> Iterator[None]:
    """qemu-storage-daemon with `image` open (QED over the file driver) until the block exits."""
    node = f"driver=qed,node-name=q,file.driver=file,file.filename={image},read-only={'on' if read_only else 'off'}"
    proc = subprocess.Popen(["qemu-storage-daemon", "--blockdev", node],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while 100 not in locked_bytes(image):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "qemu-storage-daemon took no lock"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stderr.close()


def test_a_writable_chain_holds_qemus_locks(small_chain, open_chains):
    base, top = small_chain
    chain = open_chains(top)
    assert {100, 101, 103, 201, 203} <= locked_bytes(top)  # what a QEMU writer holds
    assert {100, 201, 203} <= locked_bytes(base)  # read, and nobody may write under us
    refused = qemu_io_result(top, "write 0 4k")
    assert refused.returncode and 'Failed to get "write" lock' in refused.stderr
    refused = qemu_io_result(base, "write 0 4k", "-f", "raw")
    assert refused.returncode and 'Failed to get "write" lock' in refused.stderr
    shared = qemu_io_result(top, "read 0 4k", "-U", "-r")  # force-share still reads
    assert shared.returncode == 0, shared.stderr
    assert "virtual size" in qemu_img("info", "-U", str(top))
    chain.close()
    assert qemu_io_result(top, "write 0 4k").returncode == 0  # released on close
    assert not locked_bytes(top)


def test_a_read_only_chain_lets_qemu_read_but_not_write(small_chain, open_chains):
    _, top = small_chain
    open_chains(top, writable=False)
    assert qemu_io_result(top, "read 0 4k", "-r").returncode == 0
    refused = qemu_io_result(top, "write 0 4k")
    assert refused.returncode and 'Failed to get "write" lock' in refused.stderr


def test_an_image_qemu_writes_is_refused(small_chain):
    base, top = small_chain
    with qemu_holding(top, read_only=False):
        with pytest.raises(ImageBusyError, match=r'top\.qed: failed to get "write" lock'):
            open_chain(str(top))
        with pytest.raises(ImageBusyError, match=r'top\.qed: failed to get shared "write" lock'):
            open_chain(str(top), writable=False)
        with pytest.raises(ImageBusyError, match=r"top\.qed: failed to get"):
            qed.create(str(top), 1 << 20, overwrite=True)
    assert base.stat().st_size == 1 << 20 and top.stat().st_size > 0  # nothing was truncated


def test_an_image_qemu_reads_can_be_read_but_not_written(small_chain):
    _, top = small_chain
    with qemu_holding(top, read_only=True):
        with pytest.raises(ImageBusyError, match=r'failed to get "write" lock'):
            open_chain(str(top))
        open_chain(str(top), writable=False).close()


@pytest.mark.mount
def test_mount_refuses_an_image_qemu_writes_with_one_line(small_chain, tmp_path):
    _, top = small_chain
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        with qemu_holding(top, read_only=False):
            result = run(MOUNT_HELPER, str(top), str(mountpoint), check=False, timeout=30)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and 'failed to get "write" lock' in result.stderr, result.stderr
        assert not os.path.ismount(mountpoint)
    finally:
        if os.path.ismount(mountpoint):  # a mount that should have been refused
            run("fusermount3", "-u", "-z", str(mountpoint), check=False)


@pytest.mark.mount
def test_qemu_cannot_write_a_mounted_image(small_chain, mount):
    base, top = small_chain
    m = mount(top, "nostream")
    try:
        for image, fmt in ((top, "qed"), (base, "raw")):
            refused = qemu_io_result(image, "write 0 4k", "-f", fmt)
            assert refused.returncode and 'Failed to get "write" lock' in refused.stderr
        assert qemu_io_result(top, "read 0 4k", "-U", "-r").returncode == 0
    finally:
        m.umount()


def test_a_qcow2_backing_file_carries_the_locks_too(tmp_path, open_chains):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qed"
    qemu_img("create", "-f", "qcow2", str(base), "1M")
    qed.create(str(top), 1 << 20, backing_filename=base.name)
    chain = open_chains(top)
    refused = qemu_io_result(base, "write 0 4k", "-f", "qcow2")
    assert refused.returncode and 'Failed to get "write" lock' in refused.stderr
    chain.close()
    assert qemu_io_result(base, "write 0 4k", "-f", "qcow2").returncode == 0
