"""Shared pieces of the side-by-side benchmarks: fusestream against qemu-storage-daemon.

* ``build_chain`` makes (once, cached in bench/.cache/) a three-layer chain
  ``base.raw <- mid.qed <- top.qed`` and the oracle ``reference.raw`` from
  ``qemu-img convert -O raw``.
* ``fusestream_mount`` and ``qsd_export`` serve that chain as one raw file, each daemon in its own
  session so that Ctrl-C reaches only the benchmark, which then stops them in order.
* ``check_same_bytes`` refuses to benchmark a mount that reads wrong data.
* ``run_fio_cold`` takes one cold-cache measurement with fio.
* ``nginx_serving`` serves a directory on loopback with Debian's nginx (a remote base).

Every daemon is stopped with SIGTERM, on which both fusestream and qemu-storage-daemon unmount
cleanly; only a mount left behind after that gets ``fusermount3 -u``, then ``-uz``. (qemu-storage-
daemon 7.2 spins at 100% CPU if its export is unmounted under it, so it is never stopped that way.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from fusestream.mount import unescape_mount_path
from fusestream.units import format_size, parse_size

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
VENV_BIN = Path(os.path.abspath(sys.executable)).parent  # not resolved: that would leave the venv
MOUNT_FUSESTREAM = VENV_BIN / "mount.fusestream"

CHAIN_LAYOUT = "v1"  # bump when build_chain changes what it writes, so old caches are not reused
CLUSTER = 64 * 1024  # QED's default cluster size
MiB = 1 << 20
BASE_STRIDE = 5 * MiB  # the base holds data in the first 4 MiB of every 5 MiB: 80% data, 20% holes
BASE_DATA = 4 * MiB
MOUNT_TIMEOUT = 10.0
STOP_TIMEOUT = 30.0


# -- the chain -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chain:
    """A cached backing chain and the flat raw image it means."""

    base: Path
    mid: Path
    top: Path
    reference: Path
    size: int


def build_chain(size: int, cache_dir: Path = CACHE_DIR) -> Chain:
    """Return the cached chain of `size` virtual bytes, building it first if needed.

    It is built in a scratch directory and renamed into place only when complete, so an
    interrupted build is never reused. Backing names are relative, so the rename keeps them valid.
    """
    if size % CLUSTER:
        raise ValueError(f"size must be a multiple of {CLUSTER} bytes")
    final = cache_dir / f"chain-{CHAIN_LAYOUT}-{size}"
    if not final.is_dir():
        scratch = cache_dir / f"{final.name}.building"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        _build_chain_in(scratch, size)
        scratch.rename(final)
    return Chain(final / "base.raw", final / "mid.qed", final / "top.qed", final / "reference.raw", size)


def _build_chain_in(directory: Path, size: int) -> None:
    base, mid, top = directory / "base.raw", directory / "mid.qed", directory / "top.qed"
    _write_base(base, size)
    run_quiet(["qemu-img", "create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", str(mid), str(size)])
    qemu_io_commands(mid, _scattered_writes(size, seed=1, pattern=0x11, unaligned=False))
    run_quiet(["qemu-img", "create", "-q", "-f", "qed", "-b", mid.name, "-F", "qed", str(top), str(size)])
    qemu_io_commands(top, _scattered_writes(size, seed=2, pattern=0x22, unaligned=True))
    run_quiet(["qemu-img", "convert", "-O", "raw", str(top), str(directory / "reference.raw")])


def _write_base(path: Path, size: int) -> None:
    """Pseudo-random data in 80% of the disk, holes in the rest (read back as zeros)."""
    rng = random.Random(0)
    with open(path, "wb") as f:
        f.truncate(size)
        for start in range(0, size, BASE_STRIDE):
            f.seek(start)
            for chunk in range(start, min(start + BASE_DATA, size), MiB):
                f.write(rng.randbytes(min(MiB, size - chunk)))


def _scattered_writes(size: int, seed: int, pattern: int, unaligned: bool) -> list[str]:
    """qemu-io commands touching about 1 cluster in 16: whole clusters, or (unaligned) 4-64 KiB
    writes at 512-byte offsets plus some whole zero clusters (QED_ZERO_CLUSTER)."""
    rng = random.Random(seed)
    commands = []
    for _ in range(size // CLUSTER // 16):
        cluster_start = rng.randrange(size // CLUSTER) * CLUSTER
        if not unaligned:
            commands.append(f"write -P {pattern:#x} {cluster_start} {CLUSTER}")
        elif rng.random() < 0.1:
            commands.append(f"write -z {cluster_start} {CLUSTER}")
        else:
            offset = min(cluster_start + rng.randrange(0, CLUSTER, 512), size - 4096)
            length = min(rng.randrange(4096, CLUSTER + 1, 512), size - offset)
            commands.append(f"write -P {pattern + rng.randrange(16):#x} {offset} {length}")
    return commands


def qemu_io_commands(image: Path, commands: list[str], batch: int = 500) -> None:
    for i in range(0, len(commands), batch):
        argv = ["qemu-io", "-f", "qed"]
        for command in commands[i : i + batch]:
            argv += ["-c", command]
        run_quiet([*argv, str(image)])


def run_quiet(argv: Sequence[str]) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


# -- mounts ----------------------------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    """Whether anything is mounted exactly on `path` (a directory or, for qsd, a file)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            if unescape_mount_path(line.split()[1]) == target:
                return True
    return False


def fusestream_argv(image: Path, mountdir: Path, options: Sequence[str] = ("ro",)) -> list[str]:
    """mount.fusestream in the foreground, from this venv."""
    return [str(MOUNT_FUSESTREAM), "-f", *(["-o", ",".join(options)] if options else []), str(image), str(mountdir)]


@contextlib.contextmanager
def fusestream_mount(image: Path, mountdir: Path, options: Sequence[str] = ("ro",)) -> Iterator[Path]:
    """Mount `image` with mount.fusestream; yield the path of its raw file."""
    with fusestream_daemon(image, mountdir, options) as (raw, _):
        yield raw


@contextlib.contextmanager
def fusestream_daemon(
    image: Path, mountdir: Path, options: Sequence[str] = ("ro",)
) -> Iterator[tuple[Path, subprocess.Popen]]:
    """Mount `image` with mount.fusestream; yield its raw file and the daemon process."""
    mountdir.mkdir(exist_ok=True)
    with _daemon(fusestream_argv(image, mountdir, options), mountdir, mountdir.with_suffix(".log")) as proc:
        yield mountdir / (image.stem + ".raw"), proc


@contextlib.contextmanager
def pyfuse3_floor_mount(raw_file: Path, mountdir: Path) -> Iterator[Path]:
    """bench/pyfuse3_floor.py serving `raw_file` (pyfuse3 and trio with nothing of ours); yield
    the file it serves."""
    mountdir.mkdir(exist_ok=True)
    argv = [sys.executable, str(BENCH_DIR / "pyfuse3_floor.py"), str(raw_file), str(mountdir)]
    with _daemon(argv, mountdir, mountdir.with_suffix(".log")):
        yield mountdir / "floor.raw"


def qsd_argv(image: Path, export_file: Path, writable: bool = False) -> list[str]:
    """qemu-storage-daemon exporting a QED image over FUSE; backing files open from its header."""
    ro = "off" if writable else "on"
    return [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={image},read-only={ro}",
        "--blockdev", f"driver=qed,node-name=disk0,file=file0,read-only={ro}",
        "--export", f"type=fuse,id=exp0,node-name=disk0,mountpoint={export_file},"
        f"writable={'on' if writable else 'off'}",
    ]  # fmt: skip


@contextlib.contextmanager
def qsd_export(image: Path, export_file: Path, writable: bool = False) -> Iterator[Path]:
    """Export `image` with qemu-storage-daemon; yield the export, a regular file it mounts over."""
    export_file.touch()
    with _daemon(qsd_argv(image, export_file, writable), export_file, export_file.with_suffix(".log")):
        yield export_file


@contextlib.contextmanager
def _daemon(argv: Sequence[str], mountpoint: Path, log_path: Path) -> Iterator[subprocess.Popen]:
    """Run a FUSE daemon until the block ends; whatever happens, leave no process or mount behind."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        _wait_for_mount(proc, mountpoint, log_path)
    except BaseException:
        _stop(proc, mountpoint)
        raise
    try:
        yield proc
    finally:
        _stop(proc, mountpoint)
        if proc.returncode != 0:
            print(f"warning: {argv[0]} exited with {proc.returncode}: {_tail(log_path)}", file=sys.stderr)


def _wait_for_mount(proc: subprocess.Popen, mountpoint: Path, log_path: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mounted(mountpoint):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]}: {mountpoint} not mounted after {MOUNT_TIMEOUT:.0f} s")
        time.sleep(0.005)


def _stop(proc: subprocess.Popen, mountpoint: Path) -> None:
    """SIGTERM (a clean unmount for both daemons), then SIGKILL; then unmount whatever is left."""
    terminate(proc)
    for flags in ("-u", "-uz"):
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", flags, str(mountpoint)], check=False)


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited after STOP_TIMEOUT."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(log_path: Path, lines: int = 5) -> str:
    text = log_path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) or "(no output)"


# -- a web server on loopback (remote_bench) -------------------------------------------------------


LOOPBACK = "127.0.0.1"
NGINX_CONFIG = """\
user root;
worker_processes 1;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {state}/body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    sendfile on;
    keepalive_requests 1000000;
    server {{ listen {address}; root {root}; {limit} }}
}}
"""


@dataclasses.dataclass(frozen=True)
class WebServer:
    """A web server serving one directory on a loopback port."""

    port: int
    limit_rate: int | None  # bytes/s per connection, nginx's limit_rate; None: unlimited

    def url(self, name: str) -> str:
        return f"http://{LOOPBACK}:{self.port}/{name}"


@contextlib.contextmanager
def nginx_serving(root: Path, state_dir: Path, limit_rate: int | None = None) -> Iterator[WebServer]:
    """Debian's nginx (one worker, sendfile, keep-alive) serving `root` on a free loopback port,
    in its own session; stopped whatever happens. Workers run
    as root, like the benchmarks, so they read bench/.cache whatever its permissions."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    config = state_dir / "nginx.conf"
    limit = f"limit_rate {limit_rate};" if limit_rate else ""
    config.write_text(NGINX_CONFIG.format(state=state_dir, address=f"{LOOPBACK}:{port}", root=root, limit=limit))
    argv = ["nginx", "-p", str(state_dir), "-e", str(state_dir / "error.log"), "-c", str(config), "-g", "daemon off;"]
    log_path = state_dir / "nginx.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        _wait_listening(proc, port, log_path)
        yield WebServer(port, limit_rate)
    finally:
        terminate(proc)  # nginx's fast shutdown


def _wait_listening(proc: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}: {_tail(log_path)}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx: nothing listens on port {port} after {MOUNT_TIMEOUT:.0f} s") from None
            time.sleep(0.02)


# -- checking and measuring ------------------------------------------------------------------------


def check_same_bytes(path: Path, reference: Path, samples: int = 256, length: int = 64 * 1024) -> None:
    """Compare `samples` pseudo-random unaligned ranges (and both ends) with the reference image."""
    size = reference.stat().st_size
    rng = random.Random(3)
    offsets = [0, max(0, size - length)] + [rng.randrange(size) for _ in range(samples)]
    with open(path, "rb", buffering=0) as got, open(reference, "rb", buffering=0) as want:
        for offset in offsets:
            if os.pread(got.fileno(), length, offset) != os.pread(want.fileno(), length, offset):
                raise RuntimeError(f"{path}: bytes at offset {offset} differ from {reference}")


def drop_caches() -> None:
    """Empty the page cache, so that a run reads the images (and the mount) cold."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


@dataclasses.dataclass(frozen=True)
class FioResult:
    bw_bytes: float  # bytes per second
    iops: float
    clat_p50_us: float
    clat_p99_us: float


def fio_argv(path: Path | str, params: dict[str, str], readonly: bool = True) -> list[str]:
    """One fio job (read-only unless told): fio's JSON output, the given job parameters."""
    argv = ["fio", "--output-format=json", "--name=bench", f"--filename={path}", *(["--readonly"] if readonly else [])]
    return argv + [f"--{key}={value}" if value else f"--{key}" for key, value in params.items()]


def run_fio_cold(path: Path, params: dict[str, str]) -> FioResult:
    """The second of two identical runs, each on a cold page cache; the first is not timed.

    Why two: a VM may hand the memory freed by drop_caches back to its host (virtio-balloon free
    page reporting), and then the next run to fill the page cache pays to fault it back in. After
    a quiet spell or a small run, that made a sequential read 2-7 times slower than the same read
    right after a big one, whichever peer it was. The untimed run gives every timed run the
    same history.
    """
    for _ in range(2):
        drop_caches()
        result = run_fio(path, params)
    return result


def run_fio(path: Path, params: dict[str, str]) -> FioResult:
    out = subprocess.run(fio_argv(path, params), check=True, capture_output=True, text=True).stdout
    return _fio_result(path, out)


def _fio_result(path: Path, out: str) -> FioResult:
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio on {path} failed with error {job['error']}")
    read = job["read"]
    percentiles = read["clat_ns"]["percentile"]
    return FioResult(read["bw_bytes"], read["iops"], percentiles["50.000000"] / 1e3, percentiles["99.000000"] / 1e3)


# -- streaming: fresh copies, qemu-storage-daemon over QMP, checking a streamed image ---------------


def copy_image(source: Path, dest: Path) -> Path:
    """A private copy of an image file, holes kept; never a reflink, whose first writes would pay
    for unsharing extents."""
    dest.unlink(missing_ok=True)
    subprocess.run(["cp", "--reflink=never", "--sparse=auto", str(source), str(dest)], check=True)
    return dest


def relocated_copy(chain: Chain, dest: Path) -> Path:
    """A copy of the chain's top that names its backing file by absolute path, so that it works
    from any directory (`qemu-img rebase -u` changes only the header)."""
    copy_image(chain.top, dest)
    fmt = "raw" if chain.mid.suffix == ".raw" else "qed"
    run_quiet(["qemu-img", "rebase", "-u", "-f", "qed", "-b", str(chain.mid.resolve()), "-F", fmt, str(dest)])
    return dest


def warm_up_and_drop_caches(files: Sequence[Path]) -> None:
    """Read `files` (untimed), then empty the page cache: the run that follows starts cold but
    finds memory the VM has just used (see run_fio_cold for why that history matters)."""
    for path in files:
        with open(path, "rb", buffering=0) as f:
            for start, end in data_extents(f.fileno()):
                for offset in range(start, end, 8 * MiB):
                    os.pread(f.fileno(), min(8 * MiB, end - offset), offset)
    drop_caches()


def data_extents(fd: int) -> Iterator[tuple[int, int]]:
    """The (start, end) runs of a file that hold data (SEEK_DATA/SEEK_HOLE): reading only these,
    a 1 TiB sparse file costs what its data costs."""
    size = os.fstat(fd).st_size
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole from here on
            return
        pos = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, pos


def peak_rss(pid: int) -> int:
    """A process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def disk_usage(path: Path) -> int:
    """Bytes allocated to a file (st_blocks), as du counts them."""
    return path.stat().st_blocks * 512


def nonzero_clusters(path: Path, cluster: int = CLUSTER) -> int:
    """How many `cluster`-sized pieces of a raw file hold anything but zeros: the data an image
    with that cluster size cannot do without."""
    counted = set()
    with open(path, "rb", buffering=0) as f:
        for start, end in data_extents(f.fileno()):
            for index in range(start // cluster, -(-end // cluster)):
                if index not in counted and os.pread(f.fileno(), cluster, index * cluster).strip(b"\0"):
                    counted.add(index)
    return len(counted)


@dataclasses.dataclass(frozen=True)
class StreamedImage:
    """What the qemu-img checks say about an image after a stream (or rebase) into it."""

    backing_file: str | None  # qemu-img info's backing-filename; None when there is none
    check_ok: bool  # qemu-img check exit status 0: no corruption, no leaks
    check_output: str
    same_bytes: bool  # qemu-img convert -O raw is byte-identical to the chain's reference
    disk_usage: int

    @property
    def problems(self) -> list[str]:
        found = []
        if self.backing_file is not None:
            found.append(f"still has backing file {self.backing_file}")
        if not self.check_ok:
            found.append(f"qemu-img check: {self.check_output}")
        if not self.same_bytes:
            found.append("reads differently from reference.raw")
        return found


def check_streamed(image: Path, reference: Path) -> StreamedImage:
    """Run qemu-img info and check on a (closed) image, and qemu-img compare with the reference."""
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", "qed", str(image)], check=True, capture_output=True, text=True
        ).stdout
    )
    check = subprocess.run(["qemu-img", "check", "-f", "qed", str(image)], capture_output=True, text=True)
    # qemu-img compare reads both through their allocation, so a 1 TiB sparse disk costs its data
    compare = ["qemu-img", "compare", "-q", "-f", "qed", "-F", "raw", str(image), str(reference)]
    same = subprocess.run(compare).returncode == 0
    output = " | ".join((check.stdout + check.stderr).strip().splitlines())
    return StreamedImage(info.get("backing-filename"), check.returncode == 0, output, same, disk_usage(image))


def qsd_stream_argv(image: Path, qmp_socket: Path, export_file: Path | None = None) -> list[str]:
    """qemu-storage-daemon with a writable QED node (backing files opened from its header) and a
    QMP monitor; optionally a read-only FUSE export of the node. A writable export would hold the
    'resize' permission that block-stream's job refuses to share, and the job would not start."""
    argv = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--blockdev", "driver=qed,node-name=disk0,file=file0",
        "--chardev", f"socket,path={qmp_socket},server=on,wait=off,id=qmp0",
        "--monitor", "chardev=qmp0",
    ]  # fmt: skip
    if export_file is not None:
        argv += ["--export", f"type=fuse,id=exp0,node-name=disk0,mountpoint={export_file},writable=off"]
    return argv


class Qmp:
    """A minimal QMP client: commands and their replies, and the events that arrive meanwhile."""

    def __init__(self, path: Path, timeout: float = MOUNT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._sock.connect(str(path))
                break
            except OSError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QMP: cannot connect to {path} after {timeout:.0f} s") from None
                time.sleep(0.05)
        self._reader = self._sock.makefile("rb")
        self._events: list[dict] = []
        self._receive(timeout)  # the greeting
        self.command("qmp_capabilities")

    def command(self, name: str, timeout: float = STOP_TIMEOUT, **arguments: object) -> object:
        """Run one command and return its "return" value; a QMP error raises RuntimeError."""
        self._sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline - time.monotonic())
            if "event" in message:
                self._events.append(message)
            elif "error" in message:
                raise RuntimeError(f"QMP {name}: {message['error'].get('desc', message['error'])}")
            elif "return" in message:
                return message["return"]

    def wait_event(self, name: str, timeout: float) -> dict:
        """The first event called `name` (including those that came during earlier commands)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self._events):
                if event["event"] == name:
                    return self._events.pop(i)
            self._events.append(self._receive(deadline - time.monotonic()))

    def _receive(self, timeout: float) -> dict:
        if timeout <= 0:
            raise TimeoutError("QMP: no answer in time")
        self._sock.settimeout(timeout)
        line = self._reader.readline()
        if not line:
            raise RuntimeError("QMP: qemu-storage-daemon closed the connection")
        return json.loads(line)

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


@contextlib.contextmanager
def qsd_qmp(image: Path, qmp_socket: Path, export_file: Path | None = None) -> Iterator[Qmp]:
    """Run qemu-storage-daemon (qsd_stream_argv) and yield a QMP connection to it; the daemon is
    stopped with SIGTERM and any export unmounted, whatever happens."""
    argv = qsd_stream_argv(image, qmp_socket, export_file)
    log_path = qmp_socket.with_suffix(".log")
    if export_file is not None:
        export_file.touch()
        with _daemon(argv, export_file, log_path):
            qmp = Qmp(qmp_socket)
            try:
                yield qmp
            finally:
                qmp.close()
        return
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        qmp = Qmp(qmp_socket)
    except BaseException:
        _stop(proc, qmp_socket)  # nothing is mounted there: this only stops the daemon
        raise
    try:
        yield qmp
    finally:
        qmp.close()
        _stop(proc, qmp_socket)
        if proc.returncode != 0:
            print(f"warning: {argv[0]} exited with {proc.returncode}: {_tail(log_path)}", file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class Latency:
    """One I/O of a logged fio run."""

    done: float  # when it completed, in seconds since the epoch (time.time())
    clat_ns: int  # its completion latency


class LoggedFio:
    """One fio run in the background that logs every I/O (fio's latency log, with Unix times), so
    that percentiles can be taken exactly over several runs together, and over the I/Os that
    completed while something else ran. With ``numjobs``, fio writes one log per job: all count."""

    def __init__(self, path: Path, params: dict[str, str], log_prefix: Path):
        self.path = path
        jobs = range(1, int(params.get("numjobs", "1")) + 1)
        self.clat_logs = [Path(f"{log_prefix}_clat.{job}.log") for job in jobs]
        self.log_files = [Path(f"{log_prefix}_{kind}.{job}.log") for job in jobs for kind in ("clat", "lat", "slat")]
        logged = {**params, "write_lat_log": str(log_prefix), "log_avg_msec": "0", "log_unix_epoch": "1"}
        self.proc = subprocess.Popen(fio_argv(path, logged), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self) -> list[Latency]:
        out, err = self.proc.communicate()
        try:
            if self.proc.returncode != 0:
                raise RuntimeError(f"fio on {self.path} exited with {self.proc.returncode}: {err.strip()}")
            _fio_result(self.path, out)
            return [
                Latency(int(fields[0]) / 1e3, int(fields[1]))
                for clat_log in self.clat_logs
                for fields in (line.split(",") for line in clat_log.read_text().splitlines())
            ]
        finally:
            self._remove_logs()

    def _remove_logs(self) -> None:
        for log_file in self.log_files:
            log_file.unlink(missing_ok=True)

    def __enter__(self) -> LoggedFio:
        return self

    def __exit__(self, *exc) -> None:
        """If the block ended before wait() (an error), stop fio and remove its logs."""
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.communicate()
            self._remove_logs()


def run_fio_latencies(path: Path, params: dict[str, str], log_prefix: Path) -> list[Latency]:
    """LoggedFio, waited for."""
    with LoggedFio(path, params, log_prefix) as fio:
        return fio.wait()


def verdicts(ratio: float, goals: Sequence[float], at_least: bool = True) -> str:
    """">= 2.0x met, >= 3.0x NOT met": the ratio against each goal, in the order given."""
    sign = ">=" if at_least else "<="
    return ", ".join(
        f"{sign} {goal:.1f}x {'met' if (ratio >= goal if at_least else ratio <= goal) else 'NOT met'}" for goal in goals
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction 0.99 for p99)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * fraction) - 1)] if ordered else float("nan")


# -- command line --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """How big and how long a benchmark runs."""

    size: int
    rounds: int
    runtime: float


def chain_size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if size <= 0 or size % CLUSTER:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of {format_size(CLUSTER)}")
    return size


def settings_from_argv(argv: list[str], doc: str, full: Settings, quick: Settings, rounds_help: str,
                       runtime_help: str) -> Settings:
    """The --size/--rounds/--runtime/--quick command line both benchmarks share."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--size", type=chain_size, help=f"virtual size of the chain (default {format_size(full.size)})")
    parser.add_argument("--rounds", type=int, help=f"{rounds_help}; the median counts (default {full.rounds})")
    parser.add_argument("--runtime", type=float, help=f"{runtime_help} (default {full.runtime:g})")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {format_size(quick.size)}, {quick.rounds} "
                        f"round, {quick.runtime:g} s (explicit options still win)")
    args = parser.parse_args(argv)
    defaults = quick if args.quick else full
    return Settings(args.size or defaults.size, args.rounds or defaults.rounds, args.runtime or defaults.runtime)

def spread(values: Iterable[float], decimals: int = 0) -> str:
    """A benchmark figure: the median, then [min-max]."""
    values = list(values)
    return f"{statistics.median(values):.{decimals}f} [{min(values):.{decimals}f}-{max(values):.{decimals}f}]"


def start_run(size: int) -> Chain:
    """Print what runs (the command and the setup) and get the cached chain of `size`."""
    started = time.monotonic()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("setup:  ", describe_setup())
    chain = build_chain(size)
    print(f"chain:   {chain.top} ({format_size(size)}), ready after {time.monotonic() - started:.0f} s")
    return chain


@contextlib.contextmanager
def scratch_dirs(name: str) -> Iterator[tuple[Path, Path]]:
    """(scratch, tmp): image copies beside the chain (same filesystem), mount points in /tmp."""
    with (
        tempfile.TemporaryDirectory(prefix=f"{name}-", dir=CACHE_DIR, ignore_cleanup_errors=True) as scratch,
        tempfile.TemporaryDirectory(prefix="fusestream-bench-", ignore_cleanup_errors=True) as tmp,
    ):
        yield Path(scratch), Path(tmp)


def run_as_root(name: str, run: Callable[[], int | None]) -> int:
    """A benchmark's main: root only (it drops the page cache and mounts FUSE filesystems);
    SIGTERM and ^C unwind through the finally blocks, so no mount, daemon or copy is left."""
    if os.geteuid() != 0:
        print(f"{name}: must run as root (it drops the page cache and mounts FUSE filesystems)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run() or 0
    except KeyboardInterrupt:
        print("\ninterrupted; mounts, daemons and copies cleaned up", file=sys.stderr)
        return 130


def describe_setup() -> str:
    """One line naming what was measured, so figures from different runs can be compared."""
    rev = subprocess.run(
        ["git", "-C", str(BENCH_DIR), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    qsd = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    fio = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
    return f"fusestream {rev or '?'}; {qsd}; {fio}; {os.cpu_count()} CPUs; Linux {platform.release()}"
