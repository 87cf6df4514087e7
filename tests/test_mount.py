"""Real FUSE mounts: the raw file reads what QEMU reads and keeps what is written to it."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import (
    MOUNT_HELPER,
    MOUNT_TIMEOUT,
    Mount,
    build_chain,
    qemu_check,
    qemu_convert,
    random_writes,
    run,
    sha256,
)

from fusestream.formats import qed
from fusestream.formats.qed_structs import QED_F_NEED_CHECK, QED_HEADER
from fusestream.mount import READAHEAD_KIB

pytestmark = pytest.mark.mount


@pytest.mark.parametrize("cluster_size", [4096, 65536, 1 << 20])
def test_mounted_chain_reads_like_qemu(tmp_path, mount, cluster_size):
    size = 5 * cluster_size * 4 + 3584  # not a multiple of the cluster size
    c = build_chain(tmp_path, size=size, cluster_size=cluster_size, seed=cluster_size)
    expected = qemu_convert(c.top, tmp_path / "expected.raw")
    m = mount(c.top, "ro")
    assert m.raw.stat().st_size == size
    rng = random.Random(cluster_size)
    with open(m.raw, "rb", buffering=0) as f:
        for _ in range(300):
            off = rng.randrange(size)
            length = rng.randrange(1, 3 * cluster_size)
            assert os.pread(f.fileno(), length, off) == expected[off : off + length], (off, length)
    assert m.raw.read_bytes() == expected
    m.umount()


def test_random_writes_through_the_mount(tmp_path, mount, chain):
    """Hundreds of unaligned writes, 1 byte to 300 KB, across cluster and L2-table boundaries,
    into unallocated, zero and backing-covered clusters."""
    backing_before = {p: sha256(p) for p in chain.backing_files}
    model = bytearray(qemu_convert(chain.top, tmp_path / "before.raw"))
    m = mount(chain.top)
    fd = os.open(m.raw, os.O_RDWR)
    try:
        for offset, data in random_writes(random.Random(11), chain.size, 300):
            assert os.pwrite(fd, data, offset) == len(data)
            model[offset : offset + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    assert m.raw.read_bytes() == model
    m.umount()
    check = qemu_check(chain.top)
    assert check.returncode == 0, check.stdout + check.stderr
    assert qemu_convert(chain.top, tmp_path / "after.raw") == model
    assert {p: sha256(p) for p in chain.backing_files} == backing_before


def test_qemu_img_and_dd_use_the_raw_file(tmp_path, mount, chain):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    m = mount(chain.top)
    assert qemu_convert(m.raw, tmp_path / "through-mount.raw") == expected
    run("dd", "if=/dev/zero", f"of={m.raw}", "bs=4096", "seek=3", "count=2", "conv=notrunc,fsync")
    assert m.raw.read_bytes()[3 * 4096 : 5 * 4096] == bytes(8192)
    m.umount()


def test_read_only_mount_refuses_writes(chain, mount):
    before = sha256(chain.top)
    m = mount(chain.top, "ro")
    assert stat.S_IMODE(m.raw.stat().st_mode) == 0o444
    with pytest.raises(OSError) as err:
        os.open(m.raw, os.O_WRONLY)
    assert err.value.errno in (errno.EROFS, errno.EACCES)
    m.umount()
    assert sha256(chain.top) == before


def test_unwritable_image_is_served_read_only(tmp_path, chain, mount):
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    run("mount", "--bind", str(chain.top.parent), str(ro_dir))
    try:
        run("mount", "-o", "remount,bind,ro", str(ro_dir))
        m = mount(ro_dir / chain.top.name)
        assert stat.S_IMODE(m.raw.stat().st_mode) == 0o444
        with pytest.raises(OSError):
            os.open(m.raw, os.O_WRONLY)
        m.umount()
    finally:
        run("umount", str(ro_dir))


def test_file_semantics_of_a_disk(chain, mount):
    m = mount(chain.top)
    with pytest.raises(OSError) as err:
        os.truncate(m.raw, 4096)
    assert err.value.errno == errno.EPERM
    fd = os.open(m.raw, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as err:
            os.pwrite(fd, b"x", chain.size)
        assert err.value.errno == errno.ENOSPC
        assert os.pwrite(fd, b"abc", chain.size - 2) == 2  # a write across the end is cut short
    finally:
        os.close(fd)
    assert sorted(os.listdir(m.mountpoint)) == ["ctl", "events", "status", "status.json", "top.raw"]
    m.umount()


def test_st_blocks_follow_allocation(chain, mount):
    fresh = chain.top.with_name("fresh.qed")
    qed.create(str(fresh), chain.size, backing_filename=chain.mid.name)
    m = mount(fresh, "nostream")
    blocks = m.raw.stat().st_blocks
    with open(m.raw, "r+b") as f:
        f.seek(chain.size // 2)
        f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    time.sleep(1.1)  # attributes are cached for a second
    assert m.raw.stat().st_blocks >= blocks + (1 << 20) // 512
    m.umount()


def test_generic_mount_options_are_understood(chain, mount):
    m = mount(chain.top, "rw", "defaults", "noatime", "nosuid", "nodev", "nofail", "x-systemd.automount", "nostream",
              "relatime", "nodiratime")
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    options = next(line for line in mounts if str(m.mountpoint) in line).split()[3]
    assert {"nosuid", "nodev", "noatime"} <= set(options.split(","))
    m.umount()


def wait_until_released(image: Path) -> None:
    """The daemon holds an exclusive flock on the image until it has closed it cleanly."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    with open(image, "rb") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the daemon did not close the image"
                time.sleep(0.05)


@pytest.fixture
def background_mountpoint(tmp_path):
    """A mount point for daemonized mounts, lazily unmounted if a test fails half-way."""
    mountpoint = tmp_path / "bg"
    mountpoint.mkdir()
    yield mountpoint
    if os.path.ismount(mountpoint):
        run("fusermount3", "-u", "-z", str(mountpoint), check=False)


def test_background_mount_is_ready_when_the_helper_returns(tmp_path, chain, background_mountpoint):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    result = subprocess.run([MOUNT_HELPER, str(chain.top), str(background_mountpoint)], capture_output=True,
                            text=True, timeout=MOUNT_TIMEOUT)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""
    assert os.path.ismount(background_mountpoint)
    raw = background_mountpoint / "top.raw"
    assert raw.read_bytes() == expected
    with open(raw, "r+b") as f:
        f.write(b"written in the background")
    run("fusermount3", "-u", str(background_mountpoint))
    wait_until_released(chain.top)
    assert qemu_check(chain.top).returncode == 0
    assert qemu_convert(chain.top, tmp_path / "after.raw")[:25] == b"written in the background"


def test_sslverify_off_is_said_at_mount_even_in_the_background(chain, background_mountpoint):
    result = subprocess.run([MOUNT_HELPER, "-o", "sslverify=off,nostream", str(chain.top), str(background_mountpoint)],
                            capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    try:
        assert result.returncode == 0 and os.path.ismount(background_mountpoint)
        assert result.stderr.startswith("mount.fusestream: warning: sslverify=off: the certificates of HTTPS "
                                        "layers are not verified") and result.stderr.count("\n") == 1
    finally:
        run("fusermount3", "-u", str(background_mountpoint))
        wait_until_released(chain.top)


@pytest.fixture
def sbin_helpers():
    """Install the helper as /sbin/mount.fusestream and /sbin/mount.fuse.fusestream (the name
    mount(8) looks for with -t fuse.fusestream, the type /proc/mounts shows) for the test,
    where they are not installed."""
    installed = []
    for target in (Path("/sbin/mount.fusestream"), Path("/sbin/mount.fuse.fusestream")):
        if not target.exists():
            target.symlink_to(MOUNT_HELPER)
            installed.append(target)
    try:
        yield
    finally:
        for target in installed:
            target.unlink()


@pytest.mark.parametrize("fstype", ["fusestream", "fuse.fusestream"])
def test_mount_t_fusestream_and_umount(tmp_path, chain, sbin_helpers, background_mountpoint, fstype):
    assert shutil.which("mount")
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    run("mount", "-t", fstype, "-o", "nostream", str(chain.top), str(background_mountpoint))
    assert (background_mountpoint / "top.raw").read_bytes() == expected
    run("umount", str(background_mountpoint))
    wait_until_released(chain.top)
    assert not os.path.ismount(background_mountpoint)
    assert qemu_check(chain.top).returncode == 0


def test_sigterm_unmounts_cleanly(chain, mount):
    m = mount(chain.top)
    m.proc.terminate()
    m.proc.wait(timeout=MOUNT_TIMEOUT)
    assert m.proc.returncode == 0
    assert not os.path.ismount(m.mountpoint)


def test_an_image_path_with_a_comma(tmp_path, mount):
    image = tmp_path / "disk,1.qed"
    qed.create(str(image), 1 << 20)
    m = mount(image)
    assert m.raw.name == "disk,1.raw" and m.raw.stat().st_size == 1 << 20
    m.umount()


def test_a_crashed_mount_point_is_named_as_such(chain, mount, tmp_path):
    m = mount(chain.top, "nostream")
    m.proc.kill()
    m.proc.wait()
    result = subprocess.run([MOUNT_HELPER, str(chain.top), str(m.mountpoint)], capture_output=True, text=True)
    assert result.returncode == 1
    # depending on whether the kernel still caches the root's attributes
    assert ("Transport endpoint is not connected (a crashed mount?" in result.stderr
            or "something is already mounted there" in result.stderr), result.stderr


def test_table_updates_reach_the_disk_within_seconds_without_fsync(chain, mount):
    """Allocations write their L2 entries in batches: at fsync, and every second anyway."""
    image = qed.open_image(str(chain.top), lock=False)
    cluster = next(c for c in range(chain.size // chain.cluster_size) if image.tables.cluster_entry(c) == 0)
    image.close()
    m = mount(chain.top, "nostream")
    with open(m.raw, "r+b", buffering=0) as f:
        f.seek(cluster * chain.cluster_size)
        f.write(b"written, never fsynced")
    deadline = time.monotonic() + 10
    while True:
        on_disk = qed.open_image(str(chain.top), lock=False)
        entry = on_disk.tables.cluster_entry(cluster)
        on_disk.close()
        if entry > 1:
            break
        assert time.monotonic() < deadline, "the L2 entry is still not on disk"
        time.sleep(0.2)
    m.umount()


def test_the_raw_file_reads_ahead_in_megabytes(chain, mount):
    """FUSE's default readahead (128 KiB) makes every sequential read a 128 KiB request; the
    mount widens it so that they can be 1 MiB, FUSE's largest."""
    m = mount(chain.top, "ro")
    dev = os.stat(m.mountpoint).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert int(bdi.read_text()) == READAHEAD_KIB >= 1024
    assert m.raw.read_bytes() == qemu_convert(chain.top, m.mountpoint.parent / "expected.raw")


def test_sigterm_right_after_unmount_still_closes_cleanly(tmp_path, mount):
    image = tmp_path / "solo.qed"
    qed.create(str(image), 64 << 20)
    m = mount(image)
    with open(m.raw, "r+b") as f:
        f.write(os.urandom(8 << 20))
    run("fusermount3", "-u", str(m.mountpoint))
    m.proc.terminate()  # what systemd does after ExecStop
    m.proc.wait(timeout=MOUNT_TIMEOUT)
    assert m.proc.returncode == 0
    assert not QED_HEADER.parse(image.read_bytes()[:64]).features & QED_F_NEED_CHECK
    assert qemu_check(image).returncode == 0


def test_the_raw_file_can_be_handed_to_another_user(chain):
    """libvirt chowns a disk to the QEMU user; the mount keeps the change while mounted."""
    public = Path(tempfile.mkdtemp(prefix="fusestream-public-"))  # pytest's own tmp is root-only
    public.chmod(0o755)
    (public / "mnt").mkdir(mode=0o755)
    m = Mount(chain.top, public / "mnt", ["nostream", "allow_other"])
    try:
        hand_over_and_write(m)
        m.umount()
    finally:
        m.cleanup()
        shutil.rmtree(public)


def hand_over_and_write(m) -> None:
    os.chown(m.raw, 65534, 65534)
    os.chmod(m.raw, 0o600)
    st = m.raw.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600)
    writer = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "dd", "if=/dev/zero",
                             f"of={m.raw}", "bs=4096", "count=1", "conv=notrunc"], capture_output=True, text=True)
    assert writer.returncode == 0, writer.stderr
    with pytest.raises(OSError):
        os.chmod(m.mountpoint / "status", 0o666)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MiB tmpfs, unmounted after the test."""
    directory = tmp_path / "small"
    directory.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(directory))
    yield directory
    run("umount", "-l", str(directory), check=False)


def test_a_full_disk_under_the_top_image_is_enospc_for_the_guest(tmp_path, mount, small_filesystem):
    """ENOSPC reaches the guest as ENOSPC (not EIO), the image stays consistent, and the same
    write succeeds once there is room again."""
    (tmp_path / "base.raw").write_bytes(bytes(16 << 20))
    top = small_filesystem / "top.qed"
    qed.create(str(top), 16 << 20, backing_filename=str(tmp_path / "base.raw"), backing_raw=True)
    m = mount(top, "nostream")
    chunk = os.urandom(1 << 20)
    fd = os.open(m.raw, os.O_RDWR)
    try:
        failed_at = None
        for offset in range(0, 16 << 20, 1 << 20):
            try:
                os.pwrite(fd, chunk, offset)
            except OSError as err:
                assert err.errno == errno.ENOSPC
                failed_at = offset
                break
        assert failed_at is not None, "the 4 MiB filesystem never filled up"
        run("mount", "-o", "remount,size=64m", str(small_filesystem))
        assert os.pwrite(fd, chunk, failed_at) == len(chunk)
        os.fsync(fd)
        assert os.pread(fd, len(chunk), failed_at) == chunk
    finally:
        os.close(fd)
    m.umount()
    assert qemu_check(top).returncode in (0, 3)  # leaks allowed: a cluster written but not linked
    assert qemu_convert(top, tmp_path / "after.raw")[failed_at : failed_at + len(chunk)] == chunk
