"""Shared test helpers: QEMU as the oracle, chains built by QEMU and chains opened by us that are
always closed, the stream job on trio's MockClock, and real FUSE mounts that are always
unmounted (cleanup as in pyfuse3's own tests: fusermount3 -u, then lazy, then kill)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings

from fusestream.chain import Chain, open_chain
from fusestream.control import EventLog
from fusestream.formats.layer import BlockStatus, Location, ShortRead, fill_zeros
from fusestream.sources import ReadFor
from fusestream.stream import COMPLETED, Streamer, StreamStatistics

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

pytest_plugins = ["servers"]  # web servers on loopback: nginx, a fault-injecting one, S3 (moto)


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


def read_alone(layer, offset: int, length: int, read_for: ReadFor = ReadFor.GUEST) -> bytearray:
    """What one layer alone reads, as qemu-img reads an image without its backing file: its
    read_into into a buffer of garbage, with the UNALLOCATED ranges it hands back as zeros."""
    data = bytearray(b"\xa5" * length)
    for start, run in layer.read_into(memoryview(data), offset, read_for):
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


def random_writes(rng: random.Random, size: int, count: int) -> list[tuple[int, bytes]]:
    writes = []
    for _ in range(count):
        length = rng.choice([1, rng.randrange(1, 4096), rng.randrange(1, 300_000)])
        offset = rng.randrange(size - length)
        data = bytes(length) if rng.random() < 0.1 else rng.randbytes(length)
        writes.append((offset, data))
    return writes


# -- chains opened by us -----------------------------------------------------------------------


@pytest.fixture
def open_chains():
    """open_chains(path, **options) -> Chain: open_chain, and every chain it opened is closed
    after the test, pass or fail, the last opened first. A test that checks what closing does
    (the clean header, qemu-img check, opening the image again) closes its chain itself at that
    point; closing a closed chain again does nothing."""
    with contextlib.ExitStack() as opened:

        def _open(path: str | Path, **options) -> Chain:
            c = open_chain(str(path), **options)
            opened.callback(c.close)
            return c

        yield _open


class FaultyLayer:
    """Wraps a layer; reads overlapping [fail_start, fail_end) fail with `err` (or come back short
    when `short`) while `failing`; every read takes `delay` seconds."""

    def __init__(self, layer, fail_start: int, fail_end: int, err: int = errno.EIO, short: bool = False,
                 delay: float = 0.0):
        self.layer, self.fail_start, self.fail_end, self.err = layer, fail_start, fail_end, err
        self.short, self.delay = short, delay
        self.failing = True
        self.source, self.path, self.format_name, self.size = layer.source, layer.path, layer.format_name, layer.size

    def read_into(self, view, offset, read_for=ReadFor.GUEST):
        time.sleep(self.delay)
        if self.failing and offset < self.fail_end and offset + len(view) > self.fail_start:
            if self.short:
                self.layer.read_into(view[: len(view) // 2], offset, read_for)
                fill_zeros(view[len(view) // 2 :])
                raise ShortRead(offset + len(view) // 2)
            raise OSError(self.err, "Input/output error")
        return self.layer.read_into(view, offset, read_for)

    def prefetch(self, offset, length, read_for=ReadFor.GUEST):  # a hint: a failing device says nothing, as fadvise
        return self.layer.prefetch(offset, length, read_for)

    def block_status(self, offset, length):
        return self.layer.block_status(offset, length)

    def locate(self, offset, length, unit):  # only its read_into gives its bytes (and its faults)
        return [Location(offset, length, BlockStatus.FOUND, None)]

    def close(self):
        self.layer.close()


# -- the stream job on trio's MockClock, its copy steps inline ---------------------------------

STREAM_TIMEOUT = 600  # virtual seconds


async def inline(fn, *args):
    return fn(*args)


def run_with_streamer(chain, body, **streamer_args):
    """Run `await body(streamer, events)` with a Streamer on a MockClock; returns the events."""
    events = EventLog("top.raw", clock=lambda: 0.0)

    async def main():
        with trio.fail_after(STREAM_TIMEOUT):
            async with trio.open_nursery() as nursery:
                streamer = Streamer(chain, events.emit, run_sync=inline, **streamer_args)
                await nursery.start(streamer.run)
                await body(streamer, events)
                streamer.stop()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return [e["event"] for e in events.events()]


async def stream_to_end(streamer, events, **args):
    job = streamer.start(**args)
    await job.wait_finished()
    return job


def sample_stream(top: Path, speed: int, times: list[float], pause: tuple[float, float] | None = None):
    """Stream the image at `speed`; returns ({t: statistics at t}, seconds the job took). With
    `pause` (at, seconds): paused at `at` for `seconds`."""
    c = open_chain(str(top))
    samples: dict[float, StreamStatistics] = {}
    result = {}

    async def main():
        with trio.fail_after(STREAM_TIMEOUT):
            async with trio.open_nursery() as nursery:
                streamer = Streamer(c, EventLog("top.raw").emit, run_sync=inline)
                await nursery.start(streamer.run)
                start = trio.current_time()
                job = streamer.start(speed=speed)

                async def sampler():
                    for t in times:
                        await trio.sleep_until(start + t)
                        samples[t] = job.statistics()

                async def pauser():
                    await trio.sleep_until(start + pause[0])
                    streamer.pause()
                    await trio.sleep(pause[1])
                    streamer.resume()

                nursery.start_soon(sampler)
                if pause:
                    nursery.start_soon(pauser)
                await job.wait_finished()
                result["seconds"] = trio.current_time() - start
                result["state"] = job.state
                streamer.stop()

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        c.close()
    assert result["state"] == COMPLETED
    return samples, result["seconds"]


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
def mount(request, tmp_path):
    """mount(image, *options) -> Mount; every mount is torn down after the test, pass or fail.
    Only a test with the mount marker may use it, so that `-m "not mount"` leaves out every test
    that mounts through it."""
    assert request.node.get_closest_marker("mount"), f"{request.node.nodeid} mounts: mark it @pytest.mark.mount"
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


def ctl(m: Mount, command: str) -> None:
    """Write one command line to the mount's ctl file."""
    fd = os.open(m.mountpoint / "ctl", os.O_WRONLY)
    try:
        os.write(fd, command.encode() + b"\n")
    finally:
        os.close(fd)


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
