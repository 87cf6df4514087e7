"""Shared test helpers: QEMU as the oracle, chains built by QEMU, and real FUSE mounts that are
always unmounted (cleanup as in pyfuse3's own tests: fusermount3 -u, then lazy, then kill)."""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Fuzzing (test_fuzz.py): a quick set on every run; `--hypothesis-profile long` for the long tier.
settings.register_profile("default", max_examples=150, deadline=2000,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=3000, deadline=2000,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("default")

BIN = Path(sys.executable).parent
MOUNT_HELPER = str(BIN / "mount.fusestream")
FUSESTREAM = str(BIN / "fusestream")
MOUNT_TIMEOUT = 15.0


def pytest_addoption(parser):
    parser.addoption("--crash-rounds", type=int, default=3,
                     help="kill -9 rounds in test_crash.py (the long tier runs 20 or more)")
    parser.addoption("--replay-cuts", type=int, default=25,
                     help="power cuts replayed per scenario in test_power_loss.py (the long tier: 100000 = all)")


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def qemu_img(*args: str) -> str:
    return run("qemu-img", *args).stdout


def qemu_io(image: Path, *commands: str, fmt: str | None = None) -> None:
    args = ["qemu-io"] + (["-f", fmt] if fmt else [])
    for command in commands:
        args += ["-c", command]
    result = run(*args, str(image))
    assert "error" not in result.stdout.lower() + result.stderr.lower(), result.stdout + result.stderr


def qemu_convert(image: Path, out: Path) -> bytes:
    run("qemu-img", "convert", "-O", "raw", str(image), str(out))
    return out.read_bytes()


def qemu_check(image: Path) -> subprocess.CompletedProcess:
    return run("qemu-img", "check", str(image), check=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_alone(layer, offset: int, length: int, direct: bool = False) -> bytearray:
    """What one layer alone reads, as qemu-img reads an image without its backing file: its
    read_into into a buffer of garbage, with the UNALLOCATED ranges it hands back as zeros."""
    data = bytearray(b"\xa5" * length)
    for start, run in layer.read_into(memoryview(data), offset, direct):
        data[start - offset : start - offset + run] = bytes(run)
    return data


@dataclasses.dataclass
class TestChain:
    """raw base <- QED middle <- QED top, every layer written by QEMU with random data."""

    base: Path
    mid: Path
    top: Path
    size: int
    cluster_size: int

    @property
    def backing_files(self) -> list[Path]:
        return [self.mid, self.base]


def write_random(image: Path, tmp: Path, rng: random.Random, offset: int, length: int, fmt: str) -> None:
    """Have qemu-io write `length` random bytes at `offset` into the image."""
    source = tmp / "qemu-io-source"
    source.write_bytes(rng.randbytes(length))
    qemu_io(image, f"write -s {source} {offset} {length}", fmt=fmt)


def build_chain(
    tmp: Path,
    size: int,
    cluster_size: int = 65536,
    table_size: int = 4,
    seed: int = 1,
    writes: int = 12,
) -> TestChain:
    """A three-layer chain made by QEMU: scattered unaligned data and zero clusters in each layer;
    the raw base is shorter than the image to exercise reads past a backing file's end."""
    rng = random.Random(seed)
    base, mid, top = tmp / "base.raw", tmp / "mid.qed", tmp / "top.qed"
    base_size = size - size // 8
    with open(base, "wb") as f:
        f.truncate(base_size)
        for _ in range(writes):
            f.seek(rng.randrange(base_size - 4096))
            f.write(rng.randbytes(rng.randrange(1, min(base_size // 8, 1 << 20))))
    opts = f"cluster_size={cluster_size},table_size={table_size}"
    qemu_img("create", "-f", "qed", "-o", opts, "-b", base.name, "-F", "raw", str(mid), str(size))
    qemu_img("create", "-f", "qed", "-o", opts, "-b", mid.name, "-F", "qed", str(top), str(size))
    for layer in (mid, top):
        for _ in range(writes):
            length = rng.randrange(1, min(size // 8, 3 * cluster_size))
            write_random(layer, tmp, rng, rng.randrange(size - length), length, "qed")
        zero_at = rng.randrange(size // cluster_size) * cluster_size
        qemu_io(layer, f"write -z {zero_at} {cluster_size}", fmt="qed")
    return TestChain(base, mid, top, size, cluster_size)


@pytest.fixture
def chain(tmp_path) -> TestChain:
    return build_chain(tmp_path, size=8 * 1024 * 1024 + 512, cluster_size=4096, table_size=2)


# -- real mounts -------------------------------------------------------------------------------


class Mount:
    """A mount.fusestream -f process serving `image` on `mountpoint`."""

    def __init__(self, image: Path, mountpoint: Path, options: list[str]):
        self.image, self.mountpoint = image, mountpoint
        args = [MOUNT_HELPER, "-f", str(image), str(mountpoint)]
        if options:
            args += ["-o", ",".join(options)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._wait_for_mount()

    @property
    def raw(self) -> Path:
        return self.mountpoint / (self.image.stem + ".raw")

    def _wait_for_mount(self) -> None:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                raise AssertionError(f"mount.fusestream exited {self.proc.returncode}: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                self.cleanup()
                raise AssertionError("mount did not appear in time")
            time.sleep(0.02)

    def umount(self) -> str:
        """Unmount as a user would and check the daemon exits 0; returns its stderr."""
        run("fusermount3", "-u", str(self.mountpoint))
        _, stderr = self.proc.communicate(timeout=MOUNT_TIMEOUT)
        assert self.proc.returncode == 0, stderr
        assert not os.path.ismount(self.mountpoint)
        return stderr

    def cleanup(self) -> None:
        """Last resort after a failed test: lazy unmount, then terminate, then kill."""
        if os.path.ismount(self.mountpoint):
            run("fusermount3", "-u", "-z", str(self.mountpoint), check=False)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def mount(tmp_path):
    """mount(image, *options) -> Mount; every mount is torn down after the test, pass or fail."""
    mounts: list[Mount] = []

    def _mount(image: Path, *options: str) -> Mount:
        mountpoint = tmp_path / f"mnt{len(mounts)}"
        mountpoint.mkdir()
        m = Mount(image, mountpoint, list(options))
        mounts.append(m)
        return m

    yield _mount
    for m in mounts:
        m.cleanup()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any test left a fusestream mount behind."""
    with open("/proc/self/mounts") as f:
        left = [line for line in f if line.split()[2] == "fuse.fusestream" and "/pytest-of-" in line]
    if left:
        print("\nfusestream mounts left behind:\n" + "".join(left), file=sys.stderr)
        session.exitstatus = 1


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) on a descriptor (Python has only posix_fallocate); 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return 0 if libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()
