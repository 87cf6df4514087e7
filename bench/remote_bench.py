"""Remote base benchmark (issue 15): a raw base on nginx (loopback) under a local top.qed,
streamed and read through fusestream's mount, against curl and qemu-storage-daemon's curl
driver, in the same run.

Setup. A base of random data (every cluster data), cached in bench/.cache/remote-SIZE/, served
by Debian's nginx on loopback (one worker, sendfile, keep-alive); for every run a fresh, empty
``top.qed`` made by ``qemu-img create -f qed -b URL -F raw``, so fusestream and
qemu-storage-daemon (whose backing node, opened from the header, is QEMU's curl driver
``driver=http``; the benchmark checks that) read the same chain. Each timed run starts right
after ``drop_caches`` and an untimed read of the base: nginx serves from memory, every peer
after the same memory history (see stream_bench.py), and the top is written cold. The peers
alternate, their order reversed every round.

1. Streaming the whole base: ``curl -o /dev/null`` of the file (its ``time_total``); fusestream,
   ``mount.fusestream -o nostream``, then ``fusestream stream MNT`` .. ``fusestream wait MNT``
   as stream_bench.py times it (the job's own time from the events file beside it, and the
   daemon's CPU seconds); block-stream over QMP on qemu-storage-daemon, from the command to
   BLOCK_JOB_COMPLETED. For reference: ``curl -o FILE`` (the same fetch plus a local write),
   HttpSource alone (8 MiB reads, each after a prefetch of the next, as the stream reads), and
   the disk's ceiling: the base's size written alone into a fresh file beside the top, in the
   stream's steps (connections x request size), O_DIRECT, then fdatasync, as the stream's
   populates write it. Every streamed top is checked with qemu-img (no backing file, check
   clean, identical to the base).
2. Through a second nginx with ``limit_rate R`` (a WAN stand-in), a base of
   connections x R x RATE_SECONDS bytes: fusestream's stream to the end against connections x R.
   nginx lets each request send R bytes before it limits (its allowance counts from the
   request's first second), so a request of S bytes gets up to S / (S - R) x R per second:
   ``curl -r`` of one request of HttpSource's request size, run beside the qemu-storage-daemon
   job, shows the rate one connection really gets. block-stream (one request at a time) would
   take minutes, so it runs for QSD_RATE_SECONDS and its offset counts.
3. Random 4 KiB reads of remote data through the raw file of a ``-o ro`` mount, O_DIRECT preads
   each in a MiB of the base no read asked for before (no cache or readahead can serve it), every
   one checked against the base: p50 against p50 of one ``curl -r`` range request's
   ``time_total`` (a new connection each); qemu-storage-daemon's read-only FUSE export of the
   same chain and HttpSource alone (``read``) for reference.

Goals (issue 15): stream >= 0.9x curl's throughput and >= 2x block-stream's; >= 0.9 x
connections x R; p50 <= 1.5x curl's. Needs nginx, curl and qemu-block-extra (QEMU's curl driver).
"""

from __future__ import annotations

import argparse
import dataclasses
import mmap
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    CACHE_DIR,
    MiB,
    Qmp,
    WebServer,
    check_streamed,
    describe_setup,
    drop_caches,
    fusestream_argv,
    fusestream_daemon,
    fusestream_mount,
    nginx_serving,
    percentile,
    qsd_argv,
    qsd_export,
    qsd_qmp,
    qsd_stream_argv,
    run_as_root,
    scratch_dirs,
    spread,
    verdicts,
)
from stream_bench import FUSESTREAM_CLI, QMP_STREAM, STREAM_TIMEOUT, fusestream_cli, job_seconds, timed_block_stream

from fusestream.sources import ReadFor
from fusestream.sources.http import HttpOptions, HttpSource
from fusestream.units import format_size, parse_size

KiB = 1 << 10
GOAL_CURL = 0.9  # the stream's throughput / curl's, at least
GOAL_QSD = 2.0  # the stream's throughput / block-stream's, at least
GOAL_RATE = 0.9  # the stream's throughput / (connections x limit_rate), at least
GOAL_LATENCY = 1.5  # p50 of a 4 KiB read / p50 of one curl range request, at most
RATE_SECONDS = 15.0  # a rate-limited stream lasts about this long at connections x R
QSD_RATE_SECONDS = 10.0  # how long block-stream runs through the rate-limited server
STEP = 8 * MiB  # HttpSource alone reads in the stream's steps
READ = 4 * KiB

CURL, CURL_FILE, FUSESTREAM, SOURCE, QSD, DISK = (
    "curl -o /dev/null", "curl -o FILE (fetch + local write)", "fusestream stream (stream .. wait)",
    "HttpSource alone, 8 MiB reads, next prefetched", "qemu-storage-daemon block-stream",
    "local writes alone (the disk's ceiling)")
CURL_RANGE, RAW_FILE, SOURCE_READ, QSD_FUSE = (
    "curl -r (one range request)", "fusestream raw file", "HttpSource alone (read)",
    "qemu-storage-daemon FUSE export")


@dataclasses.dataclass(frozen=True)
class Settings:
    size: int  # the base streamed in part 1 and read in part 3
    rounds: int
    rate: int  # limit_rate of the slow server, bytes/s per connection
    samples: int  # random reads per peer and round


FULL = Settings(size=1 << 30, rounds=3, rate=512 * KiB, samples=300)
QUICK = Settings(size=128 * MiB, rounds=1, rate=2 * MiB, samples=100)


@dataclasses.dataclass(frozen=True)
class StreamRun:
    seconds: float
    job_seconds: float | None = None  # fusestream: the job alone, from its events file
    cpu_seconds: float | None = None  # fusestream: the daemon's CPU time during the run


def cached_base(size: int) -> Path:
    """bench/.cache/remote-SIZE/base.raw: random data, written once."""
    path = CACHE_DIR / f"remote-{size}" / "base.raw"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(".building")
        rng = random.Random(0)
        with open(scratch, "wb") as f:
            for start in range(0, size, MiB):
                f.write(rng.randbytes(min(MiB, size - start)))
        scratch.rename(path)
    return path


def cached_head(base: Path, size: int) -> Path:
    """The first `size` bytes of `base`, beside it (the rate-limited part's smaller base)."""
    path = base.with_name(f"head-{size}.raw")
    if not path.exists():
        scratch = path.with_suffix(".building")
        with open(base, "rb") as src, open(scratch, "wb") as dst:
            dst.write(src.read(size))
        scratch.rename(path)
    return path


def curl_argv(url: str, byte_range: str | None = None, output: str = "/dev/null") -> list[str]:
    return ["curl", "-s", "-f", "-o", output, "-w", "%{time_total}", *(["-r", byte_range] if byte_range else []), url]


def curl_seconds(url: str, byte_range: str | None = None, output: str = "/dev/null") -> float:
    """curl's own time_total for one fetch (its process start left out)."""
    return float(subprocess.run(curl_argv(url, byte_range, output), check=True, capture_output=True, text=True).stdout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


class RemoteBench:
    """The runs of one benchmark: the top image in `scratch` (beside the cache), mount points
    and sockets in `tmp`."""

    def __init__(self, base: Path, scratch: Path, tmp: Path):
        self.base = base
        self.top = scratch / "top.qed"
        self.local_copy = scratch / "curl.raw"
        self.mountdir = tmp / "mnt"
        self.qmp_socket = tmp / "qmp.sock"
        self.export_file = tmp / "qsd.raw"
        self.problems: list[str] = []

    def fresh_top(self, url: str) -> Path:
        """An empty top.qed over the remote base, as qemu-img names it."""
        self.top.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qed", "-b", url, "-F", "raw", str(self.top)], check=True)
        return self.top

    def cold_start(self, served: Path) -> None:
        """Sync and drop the page cache, then read the served file: nginx serves from memory, the
        top is written cold."""
        drop_caches()
        with open(served, "rb", buffering=0) as f:
            while f.read(8 * MiB):
                pass

    def check(self, label: str, reference: Path) -> None:
        image = check_streamed(self.top, reference)
        self.problems += [f"{label}: {problem}" for problem in image.problems]

    # -- 1. streaming ----------------------------------------------------------------------------

    def curl(self, url: str) -> StreamRun:
        self.cold_start(self.base)
        return StreamRun(curl_seconds(url))

    def curl_file(self, url: str) -> StreamRun:
        self.cold_start(self.base)
        try:
            return StreamRun(curl_seconds(url, output=str(self.local_copy)))
        finally:
            self.local_copy.unlink(missing_ok=True)

    def disk_alone(self) -> StreamRun:
        self.cold_start(self.base)
        options = HttpOptions()
        try:
            return StreamRun(fresh_direct_writes(self.local_copy, self.base.stat().st_size,
                                                 options.connections * options.request_size))
        finally:
            self.local_copy.unlink(missing_ok=True)

    def source_alone(self, url: str) -> StreamRun:
        self.cold_start(self.base)
        return StreamRun(read_through(url, self.base, STEP))

    def fusestream(self, url: str, served: Path) -> StreamRun:
        with fusestream_daemon(self.fresh_top(url), self.mountdir, ("nostream",)) as (_, proc):
            self.cold_start(served)
            cpu = cpu_seconds(proc.pid)
            started = time.monotonic()
            fusestream_cli("stream", self.mountdir)
            fusestream_cli("wait", self.mountdir)
            seconds = time.monotonic() - started
            run = StreamRun(seconds, job_seconds(self.mountdir), cpu_seconds(proc.pid) - cpu)
        self.check(FUSESTREAM, served)
        return run

    def block_stream(self, url: str) -> StreamRun:
        with qsd_qmp(self.fresh_top(url), self.qmp_socket) as qmp:
            self.check_curl_driver(qmp)
            self.cold_start(self.base)
            seconds = timed_block_stream(qmp)
        self.check(QSD, self.base)
        return StreamRun(seconds)

    def check_curl_driver(self, qmp: Qmp) -> None:
        """The backing node qemu-storage-daemon opened from the header is QEMU's curl driver."""
        drivers = {node["drv"] for node in qmp.command("query-named-block-nodes")}
        if "http" not in drivers:
            raise RuntimeError(f"qemu-storage-daemon opened no http node for the backing file: {sorted(drivers)}")

    # -- 2. rate-limited -------------------------------------------------------------------------

    def block_stream_for(self, url: str, served: Path, seconds: float, beside: list[str]) -> tuple[float, float]:
        """block-stream's bytes/s over `seconds` (its offset then, the job then cancelled) or to
        its end if sooner; the command `beside` runs meanwhile and its output (a float) is
        returned second."""
        with qsd_qmp(self.fresh_top(url), self.qmp_socket) as qmp:
            self.check_curl_driver(qmp)
            self.cold_start(served)
            started = time.monotonic()
            qmp.command("block-stream", **QMP_STREAM)
            with subprocess.Popen(beside, stdout=subprocess.PIPE, text=True) as other:
                while True:  # polled: a QMP read that times out would leave its socket unusable
                    time.sleep(0.1)
                    jobs = qmp.command("query-block-jobs")
                    elapsed = time.monotonic() - started
                    if not jobs:
                        rate = qmp.wait_event("BLOCK_JOB_COMPLETED", STREAM_TIMEOUT)["data"]["len"] / elapsed
                        break
                    if elapsed >= seconds:
                        rate = jobs[0]["offset"] / elapsed
                        qmp.command("block-job-cancel", device=QMP_STREAM["job-id"])
                        qmp.wait_event("BLOCK_JOB_CANCELLED", STREAM_TIMEOUT)
                        break
                out, _ = other.communicate(timeout=STREAM_TIMEOUT)
            if other.returncode:
                raise RuntimeError(f"{shlex.join(beside)} exited with {other.returncode}")
        return rate, float(out)

    # -- 3. random reads -------------------------------------------------------------------------

    def reads_raw_file(self, url: str, offsets: list[int]) -> list[float]:
        with fusestream_mount(self.fresh_top(url), self.mountdir, ("ro",)) as raw:
            self.cold_start(self.base)
            return timed_preads(raw, offsets, self.base)

    def reads_qsd(self, url: str, offsets: list[int]) -> list[float]:
        with qsd_export(self.fresh_top(url), self.export_file) as raw:
            self.cold_start(self.base)
            return timed_preads(raw, offsets, self.base)

    def reads_source(self, url: str, offsets: list[int]) -> list[float]:
        self.cold_start(self.base)
        source = HttpSource(url, HttpOptions())
        seconds = []
        try:
            for offset in offsets:
                started = time.perf_counter()
                data = source.read(offset, READ)
                seconds.append(time.perf_counter() - started)
                same_as_base(data, self.base, offset)
        finally:
            source.close()
        return seconds

    def reads_curl(self, url: str, offsets: list[int]) -> list[float]:
        self.cold_start(self.base)
        return [curl_seconds(url, f"{offset}-{offset + READ - 1}") for offset in offsets]


def read_through(url: str, base: Path, step: int) -> float:
    """Seconds to read the whole of `url` through a fresh HttpSource in reads of `step`, each
    after a prefetch of the next (as the stream reads); the last buffer is checked."""
    source = HttpSource(url, HttpOptions())
    view = memoryview(bytearray(step))
    size = source.size
    try:
        started = time.perf_counter()
        offset = filled = 0
        while offset < size:
            if offset + step < size:
                source.prefetch(offset + step, min(step, size - offset - step), ReadFor.STREAM)
            filled = source.read_into(view[: min(step, size - offset)], offset, ReadFor.STREAM)
            offset += filled
        seconds = time.perf_counter() - started
    finally:
        source.close()
    same_as_base(view[:filled], base, size - filled)
    return seconds


def fresh_direct_writes(path: Path, size: int, step: int) -> float:
    """Seconds to write `size` bytes of random data into a new file at `path` in O_DIRECT writes
    of `step` bytes from one page-aligned buffer, then fdatasync: what the disk takes of the
    stream's writes, with no fetch beside them."""
    buffer = mmap.mmap(-1, step)
    buffer.write(random.Random(1).randbytes(step))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    try:
        started = time.perf_counter()
        for offset in range(0, size, step):
            view = memoryview(buffer)[: min(step, size - offset)]
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        os.fdatasync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def same_as_base(data: bytes | memoryview, base: Path, offset: int) -> None:
    with open(base, "rb") as f:
        f.seek(offset)
        if f.read(len(data)) != bytes(data):
            raise RuntimeError(f"remote_bench: wrong data read at offset {offset}")


def timed_preads(path: Path, offsets: list[int], base: Path) -> list[float]:
    """Seconds per O_DIRECT pread of READ bytes at each offset of `path`, each checked."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, READ)  # page-aligned, as O_DIRECT wants
    seconds = []
    try:
        for offset in offsets:
            started = time.perf_counter()
            got = os.preadv(fd, [buf], offset)
            seconds.append(time.perf_counter() - started)
            if got != READ:
                raise RuntimeError(f"{path}: short read of {got} bytes at {offset}")
            same_as_base(buf, base, offset)
    finally:
        buf.close()
        os.close(fd)
    return seconds


def random_offsets(size: int, samples: int, seed: int) -> list[int]:
    """4 KiB-aligned offsets, each in a MiB of its own: no read finds another's block cached or
    read ahead (HttpSource's blocks are 64 KiB, QEMU curl's readahead 256 KiB)."""
    rng = random.Random(seed)
    return [mib * MiB + rng.randrange(0, MiB, READ) for mib in rng.sample(range(size // MiB), samples)]


# -- measuring -------------------------------------------------------------------------------------


def alternate(rounds: int, peers: dict[str, Callable[[], object]], show: Callable[[str, object], str]) -> dict:
    """Every peer once per round, the order reversed every round; a line per run."""
    results: dict[str, list] = {name: [] for name in peers}
    for round_no in range(rounds):
        for name in list(peers) if round_no % 2 == 0 else list(peers)[::-1]:
            result = peers[name]()
            results[name].append(result)
            print(f"round {round_no + 1}/{rounds}  {name:<48} {show(name, result)}", flush=True)
    return results


def measure_streams(bench: RemoteBench, server: WebServer, rounds: int) -> dict[str, list[StreamRun]]:
    url = server.url(bench.base.name)
    size = bench.base.stat().st_size
    peers = {
        CURL: lambda: bench.curl(url),
        FUSESTREAM: lambda: bench.fusestream(url, bench.base),
        QSD: lambda: bench.block_stream(url),
        CURL_FILE: lambda: bench.curl_file(url),
        SOURCE: lambda: bench.source_alone(url),
        DISK: bench.disk_alone,
    }

    def show(name: str, run: StreamRun) -> str:
        job = f"  job {run.job_seconds:.2f} s, daemon CPU {run.cpu_seconds:.2f} s" if run.job_seconds else ""
        return f"{run.seconds:7.2f} s {size / run.seconds / MiB:8.0f} MiB/s{job}"

    return alternate(rounds, peers, show)


def measure_rate_limited(bench: RemoteBench, server: WebServer, head: Path, rounds: int) -> dict[str, list[float]]:
    """MiB/s of fusestream's stream of `head` through the limited server, of block-stream over
    QSD_RATE_SECONDS, and of one curl request of HttpSource's request size run beside it."""
    url = server.url(head.name)
    request = HttpOptions().request_size
    rates: dict[str, list[float]] = {FUSESTREAM: [], QSD: [], "curl": []}
    for round_no in range(rounds):
        for name in (FUSESTREAM, QSD) if round_no % 2 == 0 else (QSD, FUSESTREAM):
            if name == FUSESTREAM:
                run = bench.fusestream(url, head)
                rates[FUSESTREAM].append(head.stat().st_size / run.seconds / MiB)
                shown = f"{run.seconds:.2f} s, {rates[FUSESTREAM][-1]:.2f} MiB/s (job {run.job_seconds:.2f} s)"
            else:
                qsd, curl = bench.block_stream_for(url, head, QSD_RATE_SECONDS, curl_argv(url, f"0-{request - 1}"))
                rates[QSD].append(qsd / MiB)
                rates["curl"].append(request / curl / MiB)
                shown = (f"{rates[QSD][-1]:.2f} MiB/s over {QSD_RATE_SECONDS:.0f} s; beside it curl, one "
                         f"{format_size(request)} request: {rates['curl'][-1]:.2f} MiB/s")
            print(f"round {round_no + 1}/{rounds}  limit_rate {format_size(server.limit_rate)}/s  {name:<36} {shown}",
                  flush=True)
    return rates


def measure_reads(bench: RemoteBench, server: WebServer, settings: Settings) -> dict[str, list[float]]:
    """p50 and p99 (seconds) per peer and round, each round on offsets of its own."""
    url = server.url(bench.base.name)
    curl_samples = max(30, settings.samples // 5)  # a process each: fewer, for the run's length
    readers = {
        CURL_RANGE: lambda offsets: bench.reads_curl(url, offsets[:curl_samples]),
        RAW_FILE: lambda offsets: bench.reads_raw_file(url, offsets),
        QSD_FUSE: lambda offsets: bench.reads_qsd(url, offsets),
        SOURCE_READ: lambda offsets: bench.reads_source(url, offsets),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in readers}
    for round_no in range(settings.rounds):
        offsets = random_offsets(settings.size, settings.samples, seed=round_no)
        for name in list(readers) if round_no % 2 == 0 else list(readers)[::-1]:
            seconds = readers[name](offsets)
            results[name].append((percentile(seconds, 0.5), percentile(seconds, 0.99)))
            print(f"round {round_no + 1}/{settings.rounds}  random 4 KiB reads  {name:<32} p50 "
                  f"{results[name][-1][0] * 1e6:6.0f} us  p99 {results[name][-1][1] * 1e6:6.0f} us  "
                  f"({len(seconds)} reads)", flush=True)
    return results


# -- reporting -------------------------------------------------------------------------------------


def print_commands(bench: RemoteBench, fast: WebServer, slow: WebServer, head: Path) -> None:
    url, top, mnt = fast.url(bench.base.name), bench.top, bench.mountdir
    print("servers: ", f"nginx on {url} and, with limit_rate {slow.limit_rate}, on {slow.url(head.name)}")
    print("top:     ", f"qemu-img create -q -f qed -b {url} -F raw {top} (fresh for every run)")
    print(f"{CURL}:", shlex.join(curl_argv(url)))
    print(f"{FUSESTREAM}:", shlex.join(fusestream_argv(top, mnt, ("nostream",))), "; timed:",
          f"{FUSESTREAM_CLI} stream {mnt} && {FUSESTREAM_CLI} wait {mnt}")
    print(f"{QSD}:", shlex.join(qsd_stream_argv(top, bench.qmp_socket)), "; timed: block-stream",
          QMP_STREAM, "until BLOCK_JOB_COMPLETED")
    print(f"{DISK}:", f"O_DIRECT writes of {format_size(HttpOptions().connections * HttpOptions().request_size)} "
          f"into a new file beside the top, then fdatasync")
    print("checks:  ", f"qemu-img info, qemu-img check, qemu-img compare -f qed -F raw {top} BASE")
    print(f"{RAW_FILE}:", shlex.join(fusestream_argv(top, mnt, ("ro",))),
          "; O_DIRECT preads of 4 KiB, each in a MiB of its own")
    print(f"{QSD_FUSE}:", shlex.join(qsd_argv(top, bench.export_file)))
    print(f"{CURL_RANGE}:", shlex.join(curl_argv(url, "OFFSET-END")), "\n", flush=True)


def print_streams(results: dict[str, list[StreamRun]], size: int, rounds: int) -> None:
    rate = {name: statistics.median(size / run.seconds / MiB for run in runs) for name, runs in results.items()}
    ours, job = rate[FUSESTREAM], statistics.median(size / r.job_seconds / MiB for r in results[FUSESTREAM])
    print(f"\nstreaming a {format_size(size)} raw base from nginx on loopback into a local top.qed, "
          f"median [min-max] of {rounds} rounds")
    print(f"{'':<50} {'MiB/s':>18}  {'fusestream / it':>15}  goal")
    for name, runs in results.items():
        shown = spread(size / run.seconds / MiB for run in runs)
        goal = {CURL: (GOAL_CURL,), QSD: (GOAL_QSD,)}.get(name)
        ratio = f"{ours / rate[name]:14.2f}x" if name != FUSESTREAM else f"{'':15}"
        print(f"{name:<50} {shown:>18}  {ratio}  {verdicts(ours / rate[name], goal) if goal else ''}")
        if name == FUSESTREAM:
            cpu = statistics.median(run.cpu_seconds for run in results[FUSESTREAM])
            print(f"{'  its job alone (events file)':<50} {spread(size / r.job_seconds / MiB for r in runs):>18}"
                  f"  (job against curl {job / rate[CURL]:.2f}x, block-stream {job / rate[QSD]:.2f}x; "
                  f"daemon CPU {cpu:.2f} s)")
    print(f"the disk's ceiling is {rate[DISK] / rate[CURL]:.2f}x curl's rate: no stream that stores the base goes "
          f"faster; the stream is at {ours / rate[DISK]:.2f}x of it (its job alone {job / rate[DISK]:.2f}x)")


def print_rate_limited(rates: dict[str, list[float]], head: Path, rate: int, rounds: int) -> None:
    connections = HttpOptions().connections
    target = connections * rate / MiB
    ours = statistics.median(rates[FUSESTREAM])
    per_connection = statistics.median(rates["curl"])
    print(f"\nthrough nginx with limit_rate {format_size(rate)}/s per connection: a {format_size(head.stat().st_size)} "
          f"base, median [min-max] of {rounds} rounds")
    print(f"{'':<50} {'MiB/s':>18}  {'/ N x R':>15}  goal")
    print(f"{FUSESTREAM:<50} {spread(rates[FUSESTREAM], 2):>18}  {ours / target:14.2f}x  "
          f"{verdicts(ours / target, (GOAL_RATE,))} (N x R = {connections} x {format_size(rate)}/s)")
    print(f"{'curl, one ' + format_size(HttpOptions().request_size) + ' request (one connection)':<50} "
          f"{spread(rates['curl'], 2):>18}  {per_connection / (rate / MiB):14.2f}x of R  "
          f"(fusestream: {ours / (connections * per_connection):.2f}x of N x this)")
    print(f"{QSD + f' ({QSD_RATE_SECONDS:.0f} s)':<50} {spread(rates[QSD], 2):>18}  "
          f"{statistics.median(rates[QSD]) / target:14.2f}x  (fusestream: {ours / statistics.median(rates[QSD]):.1f}x)")


def print_reads(results: dict[str, list[tuple[float, float]]], rounds: int) -> None:
    curl = statistics.median(p50 for p50, _ in results[CURL_RANGE])
    print(f"\nrandom 4 KiB reads of remote data, each in a MiB not read before, median [min-max] of {rounds} rounds")
    print(f"{'':<50} {'p50 us':>18} {'p99 us':>18}  {'p50 / curl':>10}  goal")
    for name, pairs in results.items():
        p50 = statistics.median(p for p, _ in pairs)
        goal = verdicts(p50 / curl, (GOAL_LATENCY,), at_least=False) if name == RAW_FILE else ""
        print(f"{name:<50} {spread((p * 1e6 for p, _ in pairs)):>18} {spread((p * 1e6 for _, p in pairs)):>18}  "
              f"{p50 / curl:9.2f}x  {goal}")


# -- main ------------------------------------------------------------------------------------------


def run(settings: Settings) -> int:
    started, load_before = time.monotonic(), load_average()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("setup:  ", describe_setup())
    base = cached_base(settings.size)
    connections = HttpOptions().connections
    head_size = -(-int(connections * settings.rate * RATE_SECONDS) // MiB) * MiB
    head = cached_head(base, min(head_size, settings.size))
    with scratch_dirs("remote-bench") as (scratch, tmp), \
            nginx_serving(base.parent, tmp / "nginx-fast") as fast, \
            nginx_serving(base.parent, tmp / "nginx-slow", limit_rate=settings.rate) as slow:
        bench = RemoteBench(base, scratch, tmp)
        print_commands(bench, fast, slow, head)
        streams = measure_streams(bench, fast, settings.rounds)
        limited = measure_rate_limited(bench, slow, head, settings.rounds)
        reads = measure_reads(bench, fast, settings)
    print_streams(streams, settings.size, settings.rounds)
    print_rate_limited(limited, head, settings.rate, settings.rounds)
    print_reads(reads, settings.rounds)
    for problem in bench.problems:
        print(f"CHECK FAILED: {problem}")
    print(f"\nload average (1, 5, 15 min): {load_before} before, {load_average()} after; "
          f"total time: {time.monotonic() - started:.0f} s")
    return 1 if bench.problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, help=f"base size (default {format_size(FULL.size)})")
    parser.add_argument("--rounds", type=int, help=f"runs per peer; the median counts (default {FULL.rounds})")
    parser.add_argument("--rate", type=parse_size,
                        help=f"limit_rate of the slow server, bytes/s a connection (default {format_size(FULL.rate)})")
    parser.add_argument("--samples", type=int, help=f"random 4 KiB reads per peer and round (default {FULL.samples})")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {format_size(QUICK.size)}, {QUICK.rounds} "
                        f"round, limit_rate {format_size(QUICK.rate)}/s, {QUICK.samples} reads")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    defaults = QUICK if args.quick else FULL
    settings = Settings(args.size or defaults.size, args.rounds or defaults.rounds, args.rate or defaults.rate,
                        args.samples or defaults.samples)
    return run_as_root("remote_bench", lambda: run(settings))


if __name__ == "__main__":
    sys.exit(main())
