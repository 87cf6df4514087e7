"""Concurrency benchmark (issue 13): several I/Os in flight, fusestream against
qemu-storage-daemon's FUSE export and the raw file.

Method. One cached chain, ``base.raw <- mid.qed <- top.qed`` (see ``common.build_chain``), and
the raw image it means, reference.raw. Three peers, measured in the same run:

* fusestream: ``mount.fusestream -f -o ro,nostream`` for the read tests; ``-o nostream`` on a
  fresh copy of top.qed for the tests that write;
* qemu-storage-daemon's FUSE export: ``writable=off`` for reads; ``writable=on`` on a fresh copy
  for the tests that write;
* the raw file, read directly (no FUSE: what the disk gives); for the tests that write, a fresh
  copy of reference.raw.

Before anything is timed, the read-only peers must read the same bytes as reference.raw at
sampled offsets. Fresh copies are write_bench's (``relocated_copy`` once, then ``copy_image`` per
run, beside the chain), so nearly every write allocates a cluster; after each run the copy is
closed and ``qemu-img check`` must find it clean. Every timed run starts on a cold page cache
right after an untimed read of reference.raw and base.raw (``warm_up_and_drop_caches``, as
write_bench and stream_bench do: every peer gets the same recent memory history, see
``common.run_fio_cold``). That read stands in for read_bench's untimed repeat of each job, which
would double the time of the 4 time-based read tests and take the full run past 15 minutes.
Peers alternate from round to round; a figure is the median over the rounds.

Tests (fio, 4 KiB blocks unless said, each job on its own part of the disk, for at most the
runtime; several jobs are reported as one, ``--group_reporting``; psync jobs are buffered, as a VM
using the host page cache reads):

* random reads, psync, 1, 4 and 16 jobs, IOPS; each job reads its own 1/N of the disk (``size``
  and ``offset_increment``) and ends once through it or at the runtime, so no block is read
  twice and no job finds a page another brought into the cache (with the whole disk for every
  job and time-based runs, the faster peers read mostly cached pages: a first version of this
  benchmark gave fusestream 15x the export at 16 jobs that way);
* random reads, libaio at iodepth 16 with ``--direct=1`` (as QEMU's ``cache=none`` guest issues
  them), one job, IOPS;
* random allocating writes, psync, 1, 4 and 16 jobs, each job ending with an fsync
  (``end_fsync=1``): IOPS over fio's runtime, which includes that final fsync;
* sequential 1 MiB reads, psync, 4 jobs, each of its own quarter of the disk (``size`` and
  ``offset_increment``), MiB/s;
* a 70/30 random read/write mix, psync, 4 jobs, also ending with ``end_fsync=1`` (so that a peer
  cannot gain by leaving its writes undone), IOPS of reads and writes together;
* the p99 of random reads (psync, 4 jobs) during a full-speed stream against the same idle
  (fusestream only), by stream_bench's latency segments: fio logs every I/O, and the reads that
  completed between the job's STREAM_STARTED and STREAM_COMPLETED events count. Here the mount
  starts the stream itself: each segment reads idle on a ``-o nostream`` mount of a fresh copy,
  then on a writable mount of another fresh copy without ``nostream``, fio starting as soon as
  it is mounted.

Goals (issue 13, fusestream / qemu-storage-daemon, same run): random reads >= 1.0x at 1 job and
>= 1.5x at 4 and 16 jobs; allocating writes >= 2x at 1, 4 and 16 jobs; sequential reads at 4
jobs >= 1.5x; the mix >= 1.5x; the p99 during a stream at most 2x idle. The issue sets none
for libaio at iodepth 16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common import (
    CLUSTER,
    Chain,
    MiB,
    Settings,
    check_same_bytes,
    copy_image,
    fio_argv,
    fusestream_argv,
    fusestream_mount,
    nonzero_clusters,
    qsd_argv,
    qsd_export,
    run_as_root,
    run_fio_latencies,
    scratch_dirs,
    settings_from_argv,
    spread,
    start_run,
    verdicts,
    warm_up_and_drop_caches,
)
from stream_bench import (
    Segment,
    StreamBench,
    fusestream_cli,
    job_window,
    measure_latency_or_smoke,
    print_latency_table,
    randread_params,
)

FUSESTREAM, QSD, RAW = "fusestream", "qemu-storage-daemon", "raw file"
PEERS = (FUSESTREAM, QSD, RAW)
READ_OPTIONS = ("ro", "nostream")
WRITE_OPTIONS = ("nostream",)
JOBS = (1, 4, 16)
LATENCY_JOBS = 4
GOAL_P99 = (2.0,)  # p99 during a stream / p99 idle, at most

FULL = Settings(size=1 << 30, rounds=3, runtime=5)
QUICK = Settings(size=64 * MiB, rounds=1, runtime=1)


@dataclasses.dataclass(frozen=True)
class Test:
    name: str
    unit: str  # "IOPS" or "MiB/s"
    params: dict[str, str]
    goal: float | None  # fusestream / qemu-storage-daemon, at least; None: the issue sets none
    writes: bool  # on fresh writable copies; otherwise on the read-only peers


def jobs(count: int) -> dict[str, str]:
    return {"numjobs": str(count), "group_reporting": ""}


def regions(count: int, size: int) -> dict[str, str]:
    """`count` jobs, each on its own 1/count of the disk, done once it has done all of it (or at
    the runtime): no job reads a page another brought into the cache, and none a page twice
    (a time-based job starts its random map again once through it)."""
    region = str(size // count)
    return {**jobs(count), "size": region, "offset_increment": region}


def make_tests(size: int, runtime: float) -> list[Test]:
    """Issue 13's tests, in the order of its goals."""
    capped = {"runtime": f"{round(runtime * 1000)}ms"}  # at most; a job also ends once through its region
    psync = {"bs": "4k", "ioengine": "psync", "direct": "0", **capped}
    libaio = {"bs": "4k", "ioengine": "libaio", "iodepth": "16", "direct": "1", **capped}
    quarters = {"bs": "1M", "ioengine": "psync", "direct": "0", **regions(4, size)}
    return [
        *(Test(f"random read 4 KiB, psync, {n} job{'s' * (n > 1)}", "IOPS",
               {"rw": "randread", **psync, **regions(n, size)}, 1.0 if n == 1 else 1.5, writes=False) for n in JOBS),
        Test("random read 4 KiB, libaio iodepth 16, direct", "IOPS", {"rw": "randread", **libaio}, None, writes=False),
        *(Test(f"random write 4 KiB + fsync, psync, {n} job{'s' * (n > 1)}", "IOPS",
               {"rw": "randwrite", **psync, **regions(n, size), "end_fsync": "1"}, 2.0, writes=True) for n in JOBS),
        Test("sequential read 1 MiB, psync, 4 jobs", "MiB/s", {"rw": "read", **quarters}, 1.5, writes=False),
        Test("random 70/30 read/write 4 KiB, psync, 4 jobs", "IOPS",
             {"rw": "randrw", "rwmixread": "70", **psync, **regions(4, size), "end_fsync": "1"}, 1.5, writes=True),
    ]  # fmt: skip


def run_fio_job(path: Path, test: Test) -> dict:
    """Run the test's fio job on `path`; fio's (group-reported) job, from its JSON output."""
    out = subprocess.run(fio_argv(path, test.params, readonly=not test.writes), check=True, capture_output=True,
                         text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio on {path} failed with error {job['error']}")
    return job


def figure(job: dict, unit: str) -> float:
    """IOPS: reads and writes together over the longer of their runtimes (a final fsync is inside
    the write runtime); MiB/s: the bytes moved per second."""
    directions = [job[d] for d in ("read", "write") if job[d]["total_ios"]]
    if not directions:
        raise RuntimeError("fio completed no I/O")
    seconds = max(d["runtime"] for d in directions) / 1000
    if unit == "MiB/s":
        return sum(d["io_bytes"] for d in directions) / seconds / MiB
    return sum(d["total_ios"] for d in directions) / seconds


def p99s(job: dict) -> str:
    """The completion latency p99 of each direction that did I/O."""
    return ", ".join(
        f"{d} p99 {job[d]['clat_ns']['percentile']['99.000000'] / 1e3:.0f} us"
        for d in ("read", "write")
        if job[d]["total_ios"]
    )


class ConcurrencyBench:
    """The peers of one benchmark: fresh copies of `template` (a relocated copy of the chain's
    top) in `scratch` (beside the chain), mount points in `tmp`."""

    def __init__(self, chain: Chain, template: Path, scratch: Path, tmp: Path):
        self.chain = chain
        self.template = template
        self.copies = {FUSESTREAM: scratch / "fusestream.qed", QSD: scratch / "qsd.qed", RAW: scratch / "raw.raw"}
        self.read_mount, self.read_export = tmp / "ro", tmp / "qsd-ro.raw"
        self.write_mount, self.write_export = tmp / "rw", tmp / "qsd-rw.raw"
        self.read_files: dict[str, Path] = {}  # the read-only peers' files, while they are served
        self.problems: list[str] = []  # failed checks, with the run they came from

    def cold_start(self) -> None:
        warm_up_and_drop_caches([self.chain.reference, self.chain.base])

    @contextlib.contextmanager
    def serving_read_only(self) -> Iterator[None]:
        """Serve the chain read-only by every peer, each checked against reference.raw."""
        with (
            fusestream_mount(self.chain.top, self.read_mount, READ_OPTIONS) as ours,
            qsd_export(self.chain.top, self.read_export) as theirs,
        ):
            self.read_files = {FUSESTREAM: ours, QSD: theirs, RAW: self.chain.reference}
            for path in self.read_files.values():
                check_same_bytes(path, self.chain.reference)
            try:
                yield
            finally:
                self.read_files = {}

    def read_run(self, test: Test, peer: str) -> tuple[dict, str]:
        self.cold_start()
        return run_fio_job(self.read_files[peer], test), ""

    def served_writable(self, peer: str) -> contextlib.AbstractContextManager[Path]:
        """A fresh copy, served writable by `peer`; the raw file's is a copy of reference.raw."""
        if peer == RAW:
            return contextlib.nullcontext(copy_image(self.chain.reference, self.copies[RAW]))
        image = copy_image(self.template, self.copies[peer])
        if peer == FUSESTREAM:
            return fusestream_mount(image, self.write_mount, WRITE_OPTIONS)
        return qsd_export(image, self.write_export, writable=True)

    def write_run(self, test: Test, peer: str) -> tuple[dict, str]:
        with self.served_writable(peer) as path:
            self.cold_start()
            job = run_fio_job(path, test)
        return job, self.check(f"{test.name}, {peer}", peer)

    def check(self, label: str, peer: str) -> str:
        """qemu-img check of the peer's copy, now closed; the raw file has nothing to check."""
        if peer == RAW:
            return ""
        check = subprocess.run(["qemu-img", "check", "-f", "qed", str(self.copies[peer])], capture_output=True,
                               text=True)
        if check.returncode == 0:
            return "check ok"
        output = " | ".join((check.stdout + check.stderr).strip().splitlines())
        self.problems.append(f"{label}: qemu-img check: {output}")
        return f"CHECK FAILED: {output}"


class StreamLatency(StreamBench):
    """stream_bench's latency segments with fio at LATENCY_JOBS jobs, the stream started by the
    mount itself."""

    def latency_segment(self, fio_seconds: float, speed: int) -> Segment:
        """Idle: fio reads for `fio_seconds` on a ``-o nostream`` mount of a fresh copy. During: a
        writable mount of another fresh copy, without nostream (and with ``speed`` if one is
        given), starts its stream as it mounts, and fio reads for `fio_seconds` from then on."""
        log_prefix = self.tmp / "lat"
        with fusestream_mount(self.fresh_copy(), self.mountdir, ("nostream",)) as raw:
            self.cold_start()
            idle = run_fio_latencies(raw, latency_params(fio_seconds), log_prefix)
        self.cold_start()
        with fusestream_mount(self.fresh_copy(), self.mountdir, (f"speed={speed}",) if speed else ()) as raw:
            reads = run_fio_latencies(raw, latency_params(fio_seconds), log_prefix)
            fusestream_cli("wait", self.mountdir)
            job = job_window(self.mountdir)
        return self.finish_segment(idle, reads, job)


def latency_params(seconds: float) -> dict[str, str]:
    return {**randread_params(seconds), **jobs(LATENCY_JOBS)}


# -- measuring and reporting -----------------------------------------------------------------------


Results = dict[tuple[str, str], list[float]]


def measure(tests: list[Test], rounds: int, run_one: Callable[[Test, str], tuple[dict, str]], results: Results) -> None:
    """Every test on every peer, `rounds` times, the peer order reversed from round to round."""
    for round_no in range(rounds):
        order = PEERS if round_no % 2 == 0 else PEERS[::-1]
        for test in tests:
            for peer in order:
                job, note = run_one(test, peer)
                value = figure(job, test.unit)
                results.setdefault((test.name, peer), []).append(value)
                print(f"round {round_no + 1}/{rounds}  {test.name:<46} {peer:<20} {value:8.0f} {test.unit:<5}  "
                      f"{p99s(job)}{'  ' + note if note else ''}")


def print_commands(settings: Settings, tests: list[Test], bench: ConcurrencyBench, latency: StreamLatency) -> None:
    top = bench.chain.top
    print("reads:  ", shlex.join(fusestream_argv(top, bench.read_mount, READ_OPTIONS)))
    print("        ", shlex.join(qsd_argv(top, bench.read_export)), f"; and {bench.chain.reference}")
    print("writes: ", shlex.join(fusestream_argv(bench.copies[FUSESTREAM], bench.write_mount, WRITE_OPTIONS)))
    print("        ", shlex.join(qsd_argv(bench.copies[QSD], bench.write_export, writable=True)),
          f"; and {bench.copies[RAW]}: each run on a fresh copy")
    for test in tests:
        print(f"fio:     {shlex.join(fio_argv('FILE', test.params, readonly=not test.writes))}")
    print("stream: ", shlex.join(fusestream_argv(latency.copy, latency.mountdir, ())), "; fio:",
          shlex.join(fio_argv("FILE", latency_params(1.0))).replace("1000ms", "SECONDS"),
          "--write_lat_log=... --log_avg_msec=0 --log_unix_epoch=1; idle: the same on a -o nostream mount")
    print(f"method:  {settings.rounds} round(s), peers alternating; each timed run on a cold page cache, after an "
          "untimed read of reference.raw and base.raw\n")


def print_table(tests: list[Test], results: Results, rounds: int) -> None:
    print(f"\n{f'median of {rounds} [min-max]':<52} {FUSESTREAM:>22} {QSD:>22} {RAW:>22} {'ratio':>6}  goal")
    for test in tests:
        ours, theirs, raw = (results[test.name, peer] for peer in PEERS)
        ratio = statistics.median(ours) / statistics.median(theirs)
        goal = verdicts(ratio, (test.goal,)) if test.goal else "(none set)"
        label = f"{test.name} ({test.unit})"
        print(f"{label:<52} {spread(ours):>22} {spread(theirs):>22} {spread(raw):>22} {ratio:5.2f}x  {goal}")


def run(settings: Settings) -> int:
    started = time.monotonic()
    tests = make_tests(settings.size, settings.runtime)
    chain = start_run(settings.size)
    with scratch_dirs("concurrency-bench") as (scratch, tmp):
        latency = StreamLatency(chain, scratch, tmp)
        bench = ConcurrencyBench(chain, latency.template, scratch, tmp)
        print_commands(settings, tests, bench, latency)
        results: Results = {}
        with bench.serving_read_only():
            measure([t for t in tests if not t.writes], settings.rounds, bench.read_run, results)
        measure([t for t in tests if t.writes], settings.rounds, bench.write_run, results)
        idle_stream = latency.fusestream()
        pairs, speed = measure_latency_or_smoke(latency, settings, idle_stream.job_seconds,
                                                nonzero_clusters(chain.reference) * CLUSTER)
    print_table(tests, results, settings.rounds)
    print_latency_table(pairs, settings.rounds, speed, f"fusestream, psync, {LATENCY_JOBS} jobs", GOAL_P99)
    problems = bench.problems + latency.problems
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    print(f"\ntotal time: {time.monotonic() - started:.0f} s")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_argv(sys.argv[1:] if argv is None else argv, __doc__, FULL, QUICK,
                                  "runs per test and peer", "seconds per time-based fio run")
    return run_as_root("concurrency_bench", lambda: run(settings))


if __name__ == "__main__":
    sys.exit(main())
