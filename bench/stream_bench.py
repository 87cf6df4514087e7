"""Stream benchmark for issue 3: fusestream's stream job against QEMU's block-stream and qemu-img
rebase, and what a running stream does to the latency of guest reads.

Method. One cached chain, ``base.raw <- mid.qed <- top.qed`` (see ``common.build_chain``). Every
timed run works on its own fresh copy of top.qed (streaming rewrites the top; base.raw and mid.qed
are only read). The copies live in a scratch directory beside the chain, on the same filesystem,
and name mid.qed by its absolute path (``common.relocated_copy``). Each round times, in an order
that is reversed from one round to the next:

* ``fusestream stream``: ``mount.fusestream -o nostream`` on the copy, then the wall time from
  ``fusestream stream MNT`` to ``fusestream wait MNT`` returning 0 (two command starts and
  ``wait``'s 0.2 s polling included); the job's own time, from STREAM_STARTED to
  STREAM_COMPLETED in the events file, is shown beside it;
* ``block-stream``: qemu-storage-daemon with the copy as a writable QED node (backing files
  opened from its header) and a QMP monitor; the time from sending ``block-stream`` to the
  BLOCK_JOB_COMPLETED event. Once without an export and once with a read-only FUSE export of
  the node, the nearest QEMU gets to fusestream's mount: a writable export makes QEMU refuse the
  job (a 'resize' permission conflict);
* ``qemu-img rebase -b ""``: offline, the time of the command.

Every timed run starts on a cold page cache (``drop_caches`` after the daemon is up, right before
the timed command). Before that drop, the benchmark reads reference.raw and base.raw (twice the
virtual size, about as much page cache as a stream fills), untimed. That replaces read_bench's
"untimed identical run first": on a VM with free page reporting, a run that follows a quiet
spell is 2-3 times slower than one right after big I/O (measured here with qemu-img rebase,
3.0 s against 1.1 s), whoever it is. Repeating the whole job would cure that as well, but it
costs a stream per run, and the fixed read gives every peer the same history, not each its own.

After each run the image is closed (daemon stopped) and checked: ``qemu-img info`` names no
backing file, ``qemu-img check`` is clean, ``qemu-img compare`` finds it identical to
reference.raw, and its disk usage (st_blocks) is recorded. The data in the chain is the number
of 64 KiB clusters of reference.raw that are not all zeros; a fresh ``qemu-img convert -O qed``
of reference.raw adds the tables any QED needs.

Latency: fio random 4 KiB reads (psync, buffered) on the raw file of a ``-o nostream`` mount,
first idle, then with a stream, each on a cold cache. fio logs every I/O with its Unix time. For
the second run, fio starts first and the stream once fio is reading (``FIO_STARTUP``); the reads
that completed between the job's STREAM_STARTED and STREAM_COMPLETED events (the mount's events
file) are the ones during the stream. fio repeats its offsets (randrepeat), so both runs read
the same sequence of blocks (the second's count from the stream's start, just after fio's). A stream is over in about a
second, so a round takes several segments, each on a fresh copy and mount, until fio has read
during streams for the runtime; p99 is taken exactly over all the segments of a round. The
streams run at full speed; since the job gives way to a busy guest, they last longer under fio
than idle (each segment's line says how long). A stream too short for any segment (a --quick
chain) is rate-limited for the latency runs, and the table says so: that figure is a smoke test,
not a result.

Goals: issue 3's (block-stream at least 2x slower, p99 at most 3x idle) and issue 5's (3x, 2x).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    CLUSTER,
    VENV_BIN,
    Chain,
    Latency,
    LoggedFio,
    MiB,
    Qmp,
    Settings,
    StreamedImage,
    check_streamed,
    copy_image,
    disk_usage,
    fio_argv,
    fusestream_argv,
    fusestream_daemon,
    fusestream_mount,
    nonzero_clusters,
    peak_rss,
    percentile,
    qsd_qmp,
    qsd_stream_argv,
    relocated_copy,
    run_as_root,
    run_fio_latencies,
    scratch_dirs,
    settings_from_argv,
    spread,
    start_run,
    verdicts,
    warm_up_and_drop_caches,
)

from fusestream.units import format_size

FUSESTREAM_CLI = VENV_BIN / "fusestream"
STREAM_TIMEOUT = 900.0  # seconds any one stream may take before the benchmark gives up
# The job gives way to a busy guest (small steps while fio reads), so under fio a stream lasts
# longer than the fastest idle one: fio reads for this many times that once the stream starts.
GUEST_SLOWDOWN = 3.0
MIN_SEGMENT = 0.1  # seconds of fio during a stream, at least, or the streams are rate-limited
FIO_STARTUP = 0.3  # seconds fio takes to start its job (measured: 0.27-0.28 s); the stream starts after
SLOW_STREAM = 4.0  # seconds: a stream too short for a segment is rate-limited to last about this long

# Goals of issue 3, then issue 5:
GOALS_QSD = (2.0, 3.0)  # block-stream time / fusestream time, at least
GOALS_REBASE = (1.0,)  # qemu-img rebase time / fusestream time, at least
GOALS_P99 = (3.0, 2.0)  # p99 during a stream / p99 idle, at most

FUSESTREAM, QSD, QSD_EXPORT, REBASE = "fusestream stream", "block-stream", "block-stream, ro export", "qemu-img rebase"
QMP_STREAM = {"job-id": "stream0", "device": "disk0"}


FULL = Settings(size=1 << 30, rounds=3, runtime=10)
QUICK = Settings(size=64 * MiB, rounds=1, runtime=1)


@dataclasses.dataclass(frozen=True)
class Run:
    seconds: float
    job_seconds: float | None  # fusestream: the job alone, from its events file
    image: StreamedImage


@dataclasses.dataclass(frozen=True)
class Segment:
    window: float  # seconds of fio while the job ran
    stream_seconds: float  # the job's own time, from its events file
    idle_ns: list[int]
    during_ns: list[int]


class StreamBench:
    """The runs of one benchmark: fresh copies in `scratch` (beside the chain), mount points and
    sockets in `tmp`."""

    def __init__(self, chain: Chain, scratch: Path, tmp: Path):
        self.chain = chain
        self.scratch = scratch
        self.tmp = tmp
        self.template = relocated_copy(chain, scratch / "template.qed")
        self.copy = scratch / "top-run.qed"
        self.mountdir = tmp / "mnt"
        self.qmp_socket = tmp / "qmp.sock"
        self.export_file = tmp / "qsd.raw"
        self.problems: list[str] = []  # failed checks, with the run they came from
        self.rss: list[int] = []  # the daemon's peak RSS of each fusestream run

    def fresh_copy(self) -> Path:
        return copy_image(self.template, self.copy)

    def cold_start(self) -> None:
        warm_up_and_drop_caches([self.chain.reference, self.chain.base])

    def checked(self, label: str, seconds: float, job_seconds: float | None = None) -> Run:
        image = check_streamed(self.copy, self.chain.reference)
        self.copy.unlink()
        self.problems += [f"{label}: {problem}" for problem in image.problems]
        return Run(seconds, job_seconds, image)

    # -- the peers -------------------------------------------------------------------------------

    def fusestream(self) -> Run:
        with fusestream_daemon(self.fresh_copy(), self.mountdir, ("nostream",)) as (_, proc):
            self.cold_start()
            started = time.monotonic()
            fusestream_cli("stream", self.mountdir)
            fusestream_cli("wait", self.mountdir)
            seconds = time.monotonic() - started
            job = job_seconds(self.mountdir)
            self.rss.append(peak_rss(proc.pid))
        return self.checked(FUSESTREAM, seconds, job)

    def block_stream(self, export: bool) -> Run:
        with qsd_qmp(self.fresh_copy(), self.qmp_socket, self.export_file if export else None) as qmp:
            self.cold_start()
            seconds = timed_block_stream(qmp)
        return self.checked(QSD_EXPORT if export else QSD, seconds)

    def rebase(self) -> Run:
        image = self.fresh_copy()
        self.cold_start()
        started = time.monotonic()
        subprocess.run(rebase_argv(image), check=True, timeout=STREAM_TIMEOUT)
        return self.checked(REBASE, time.monotonic() - started)

    # -- latency ---------------------------------------------------------------------------------

    def latency_segment(self, fio_seconds: float, speed: int) -> Segment:
        """Idle, then during a stream, on one fresh mount, each on a cold cache. Idle, fio reads
        for `fio_seconds`. Then fio starts again, the stream once fio is reading, and fio goes on
        for `fio_seconds` more: the reads that completed between the job's STREAM_STARTED and
        STREAM_COMPLETED events are those during the stream."""
        log_prefix = self.tmp / "lat"
        with fusestream_mount(self.fresh_copy(), self.mountdir, ("nostream",)) as raw:
            self.cold_start()
            idle = run_fio_latencies(raw, randread_params(fio_seconds), log_prefix)
            self.cold_start()
            with LoggedFio(raw, randread_params(FIO_STARTUP + fio_seconds), log_prefix) as fio:
                time.sleep(FIO_STARTUP)
                fusestream_cli("stream", self.mountdir, "--speed", str(speed))
                fusestream_cli("wait", self.mountdir)
                reads = fio.wait()
            job = job_window(self.mountdir)
        return self.finish_segment(idle, reads, job)

    def finish_segment(self, idle: list[Latency], reads: list[Latency], job: tuple[float, float]) -> Segment:
        """Check the streamed copy (its mount gone) and keep the reads that completed between the
        job's STREAM_STARTED and STREAM_COMPLETED (`job`, from the events file)."""
        started, completed = job
        run = self.checked("stream during fio", 0.0)
        during = [io for io in reads if started <= io.done <= completed]
        window = max(io.done for io in during) - max(started, min(io.done for io in during)) if during else 0.0
        print(
            f"           segment: stream lasted {completed - started:.2f} s, fio read during {window:.2f} s of it "
            f"({len(during)} reads); {'; '.join(run.image.problems) or 'checks ok'}"
        )
        return Segment(window, completed - started, [io.clat_ns for io in idle], [io.clat_ns for io in during])


def fusestream_cli(command: str, mountdir: Path, *options: str) -> None:
    proc = subprocess.run(
        [str(FUSESTREAM_CLI), command, *options, str(mountdir)], capture_output=True, text=True, timeout=STREAM_TIMEOUT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fusestream {command} exited with {proc.returncode}: {proc.stderr.strip()}")


def timed_block_stream(qmp: Qmp) -> float:
    """Seconds from sending block-stream to its BLOCK_JOB_COMPLETED event; a job that ends in
    an error raises RuntimeError."""
    started = time.monotonic()
    qmp.command("block-stream", **QMP_STREAM)
    event = qmp.wait_event("BLOCK_JOB_COMPLETED", STREAM_TIMEOUT)
    seconds = time.monotonic() - started
    if event["data"].get("error"):
        raise RuntimeError(f"block-stream failed: {event['data']['error']}")
    return seconds


def job_window(mountdir: Path) -> tuple[float, float]:
    """When the last job sent STREAM_STARTED and STREAM_COMPLETED (seconds since the epoch), from
    the mount's events file."""
    times: dict[str, float] = {}
    for line in (mountdir / "events").read_text().splitlines():
        event = json.loads(line)
        times[event["event"]] = event["timestamp"]
    return times["STREAM_STARTED"], times["STREAM_COMPLETED"]


def job_seconds(mountdir: Path) -> float:
    started, completed = job_window(mountdir)
    return completed - started


def rebase_argv(image: Path | str) -> list[str]:
    return ["qemu-img", "rebase", "-f", "qed", "-b", "", str(image)]


def randread_params(seconds: float) -> dict[str, str]:
    return {
        "rw": "randread",
        "bs": "4k",
        "ioengine": "psync",
        "direct": "0",
        "time_based": "",
        "runtime": f"{round(seconds * 1000)}ms",
    }


# -- measuring -------------------------------------------------------------------------------------


def measure_streams(bench: StreamBench, rounds: int) -> dict[str, list[Run]]:
    peers: dict[str, Callable[[], Run]] = {
        FUSESTREAM: bench.fusestream,
        QSD: lambda: bench.block_stream(export=False),
        QSD_EXPORT: lambda: bench.block_stream(export=True),
        REBASE: bench.rebase,
    }
    results: dict[str, list[Run]] = {name: [] for name in peers}
    for round_no in range(rounds):
        order = list(peers) if round_no % 2 == 0 else list(peers)[::-1]
        for name in order:
            run = peers[name]()
            results[name].append(run)
            job = f" (job {run.job_seconds:.2f} s)" if run.job_seconds is not None else ""
            verdict = "; ".join(run.image.problems) or "checks ok"
            print(
                f"round {round_no + 1}/{rounds}  {name:<24} {run.seconds:7.2f} s{job:<15}"
                f"  top {run.image.disk_usage / MiB:7.1f} MiB  {verdict}"
            )
    return results


class StreamTooShort(RuntimeError):
    """Streams end before any fio segment of MIN_SEGMENT seconds can run during them."""


def measure_latency(
    bench: StreamBench, settings: Settings, fio_seconds: float, speed: int
) -> list[tuple[float, float]]:
    """(p99 idle, p99 during) in microseconds, one pair per round, each over segments until fio
    has read during streams for `settings.runtime` seconds; `speed` 0 streams at full speed."""
    pairs = []
    for round_no in range(settings.rounds):
        segments: list[Segment] = []
        while sum(s.window for s in segments) < settings.runtime:
            segment = bench.latency_segment(fio_seconds, speed)
            if segment.window < MIN_SEGMENT:
                raise StreamTooShort(f"fio read during less than {MIN_SEGMENT} s of a stream")
            segments.append(segment)
        idle = percentile([ns for s in segments for ns in s.idle_ns], 0.99) / 1e3
        during = percentile([ns for s in segments for ns in s.during_ns], 0.99) / 1e3
        ios_idle, ios_during = (sum(len(getattr(s, f)) for s in segments) for f in ("idle_ns", "during_ns"))
        print(
            f"round {round_no + 1}/{settings.rounds}  random read 4 KiB p99: idle {idle:.0f} us ({ios_idle} reads), "
            f"during a stream {during:.0f} us ({ios_during} reads), {during / idle:.2f}x; "
            f"{len(segments)} segment(s), fio read during {sum(s.window for s in segments):.1f} s of streams "
            f"of {min(s.stream_seconds for s in segments):.2f}-{max(s.stream_seconds for s in segments):.2f} s"
        )
        pairs.append((idle, during))
    return pairs


def measure_latency_or_smoke(
    bench: StreamBench, settings: Settings, fastest: float, data_bytes: int
) -> tuple[list[tuple[float, float]], int]:
    """measure_latency with full-speed streams, fio reading GUEST_SLOWDOWN times as long as the
    fastest idle stream took (`fastest` seconds); where streams are too short for that, with
    streams rate-limited to copy the chain's `data_bytes` in about SLOW_STREAM s (a smoke
    figure). Returns the pairs and the speed they were measured at (0: full speed)."""
    fio_seconds = max(MIN_SEGMENT, fastest * GUEST_SLOWDOWN)
    print(f"\nlatency: fio reads {fio_seconds:.2f} s idle, and as long once a stream starts "
          f"(the fastest idle stream took {fastest:.2f} s)")
    try:
        return measure_latency(bench, settings, fio_seconds, 0), 0
    except StreamTooShort as err:
        speed = int(data_bytes / SLOW_STREAM)
        print(f"latency: {err}; streams rate-limited to {format_size(speed)}/s instead, a smoke figure only")
        return measure_latency(bench, settings, SLOW_STREAM * 1.1, speed), speed


@dataclasses.dataclass(frozen=True)
class ChainData:
    """How much data the chain means, by three measures (bytes)."""

    clusters: int  # the 64 KiB clusters of reference.raw that are not all zeros
    raw_usage: int  # disk usage of reference.raw (qemu-img convert leaves zero 4 KiB blocks as holes)
    fresh_qed: int  # disk usage of a QED written fresh with the same bytes: data plus tables


def chain_data(chain: Chain, scratch: Path) -> ChainData:
    fresh = scratch / "fresh.qed"
    try:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qed", str(chain.reference), str(fresh)], check=True)
        return ChainData(nonzero_clusters(chain.reference) * CLUSTER, disk_usage(chain.reference), disk_usage(fresh))
    finally:
        fresh.unlink(missing_ok=True)


# -- reporting -------------------------------------------------------------------------------------


def print_commands(settings: Settings, bench: StreamBench) -> None:
    copy, mnt = bench.copy, bench.mountdir
    print(
        "copies:  ",
        f"cp --reflink=never {bench.chain.top} {bench.template}; "
        f"qemu-img rebase -u -f qed -b {bench.chain.mid} -F qed {bench.template}; then per run: "
        f"cp --reflink=never {bench.template} {copy}",
    )
    print(
        f"{FUSESTREAM}:",
        shlex.join(fusestream_argv(copy, mnt, ("nostream",))),
        "; timed:",
        f"{FUSESTREAM_CLI} stream {mnt} && {FUSESTREAM_CLI} wait {mnt}",
    )
    print(f"{QSD}:     ", shlex.join(qsd_stream_argv(copy, bench.qmp_socket)))
    print(
        "   timed:    ",
        json.dumps({"execute": "block-stream", "arguments": QMP_STREAM}),
        "until event BLOCK_JOB_COMPLETED",
    )
    print(f"{QSD_EXPORT}:", shlex.join(qsd_stream_argv(copy, bench.qmp_socket, bench.export_file)))
    print(f"{REBASE}:  ", shlex.join(rebase_argv(copy)))
    print(
        "checks:    ",
        f"qemu-img info --output=json {copy}; qemu-img check {copy}; "
        f"qemu-img compare -f qed -F raw {copy} {bench.chain.reference}; st_blocks",
    )
    print(
        "latency:   ",
        shlex.join(fio_argv("MNT/top-run.raw", randread_params(1.0))).replace("1000ms", "SECONDS"),
        "--write_lat_log=... --log_avg_msec=0 --log_unix_epoch=1",
    )
    print(
        f"method:    {settings.rounds} round(s), order reversed every round; each timed run on a fresh copy and "
        "a cold page cache, after an untimed read of reference.raw and base.raw\n"
    )


def print_table(
    results: dict[str, list[Run]], data: ChainData, latency: list[tuple[float, float]], rounds: int, speed: int
) -> None:
    ours = median(r.seconds for r in results[FUSESTREAM])
    ours_job = median(r.job_seconds for r in results[FUSESTREAM])
    print(f"\n{f'stream time, median of {rounds} [min-max]':<44} {'seconds':>20} {'/ fusestream':>13}  goal")
    print(f"{FUSESTREAM + ' (stream .. wait)':<44} {spread((r.seconds for r in results[FUSESTREAM]), 2):>20}")
    print(f"{'  its job alone (events file)':<44} {spread((r.job_seconds for r in results[FUSESTREAM]), 2):>20}")
    for name, label, goal in (
        (QSD, "qemu-storage-daemon block-stream", GOALS_QSD),
        (QSD_EXPORT, "  the same, with a read-only FUSE export", GOALS_QSD),
        (REBASE, 'qemu-img rebase -b "" (offline)', GOALS_REBASE),
    ):
        theirs = median(r.seconds for r in results[name])
        ratio = theirs / ours
        print(
            f"{label:<44} {spread((r.seconds for r in results[name]), 2):>20} {ratio:12.2f}x"
            f"  {verdicts(ratio, goal, at_least=True)}"
            f"  (against the job alone: {theirs / ours_job:.2f}x)"
        )

    print(f"\n{'top image after the run (disk usage, median)':<44} {'MiB':>20} {'/ data':>13}  goal")
    for label, usage in (
        ("data in the chain (non-zero 64 KiB clusters)", data.clusters),
        ("  reference.raw (non-zero 4 KiB blocks)", data.raw_usage),
        ("  a fresh QED of it (qemu-img convert -O qed)", data.fresh_qed),
    ):
        print(f"{label:<44} {usage / MiB:20.1f} {usage / data.clusters:12.2f}x")
    for name in results:
        usage = median(r.image.disk_usage for r in results[name])
        goal = f"  <= fresh QED {'met' if usage <= data.fresh_qed else 'NOT met'}" if name == FUSESTREAM else ""
        print(f"{name:<44} {usage / MiB:20.1f} {usage / data.clusters:12.2f}x{goal}")

    print_latency_table(latency, rounds, speed, "fusestream mount, fio psync", GOALS_P99)


def print_latency_table(
    latency: list[tuple[float, float]], rounds: int, speed: int, label: str, goals: tuple[float, ...]
) -> None:
    """The p99 during streams against idle (measure_latency's pairs), against `goals` (at most)."""
    idle, during = median(p[0] for p in latency), median(p[1] for p in latency)
    ratio = during / idle
    print(f"\n{f'random read 4 KiB p99, median of {rounds}':<44} {'idle us':>10} {'during us':>10} {'ratio':>6}  goal")
    print(
        f"{label:<44} {idle:10.0f} {during:10.0f} {ratio:5.2f}x  "
        f"{verdicts(ratio, goals, at_least=False)}  (per round: "
        f"{', '.join(f'{d / i:.2f}x' for i, d in latency)})"
    )
    if speed:
        print(f"  (streams rate-limited to {format_size(speed)}/s for this figure: a smoke test, not a result)")


def median(values) -> float:
    return statistics.median(list(values))


# -- main ------------------------------------------------------------------------------------------


def run(settings: Settings) -> int:
    started = time.monotonic()
    chain = start_run(settings.size)
    with scratch_dirs("stream-bench") as (scratch, tmp):
        bench = StreamBench(chain, scratch, tmp)
        print_commands(settings, bench)
        data = chain_data(chain, bench.scratch)
        results = measure_streams(bench, settings.rounds)
        fastest = min(r.job_seconds for r in results[FUSESTREAM])
        latency, speed = measure_latency_or_smoke(bench, settings, fastest, data.clusters)
    print_table(results, data, latency, settings.rounds, speed)
    for problem in bench.problems:
        print(f"CHECK FAILED: {problem}")
    print(f"\ntotal time: {time.monotonic() - started:.0f} s")
    return 1 if bench.problems else 0


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_argv(sys.argv[1:] if argv is None else argv, __doc__, FULL, QUICK,
                                  "runs per peer", "seconds of fio per latency figure")
    return run_as_root("stream_bench", lambda: run(settings))


if __name__ == "__main__":
    sys.exit(main())
