"""Stream benchmark on the chain shapes real images have (issue 12): fusestream's stream job
against QEMU's block-stream and ``qemu-img rebase -b ""``, on every shape of ``bench/shapes.py``.

Method, per shape, as stream_bench.py: every timed run works on a fresh copy of the shape's top
(naming its backing file by absolute path), on a cold page cache after an untimed read of the
data of reference.raw and the base; the peers alternate, their order reversed every round:

* ``fusestream``: ``mount.fusestream -o nostream``, then from ``fusestream stream`` to
  ``fusestream wait`` returning 0 (the job's own time from the events file beside it); the
  daemon's peak RSS (VmHWM) is read before it is stopped;
* ``block-stream``: qemu-storage-daemon with the copy as a writable QED node and a read-only
  FUSE export of it, from sending ``block-stream`` over QMP to BLOCK_JOB_COMPLETED;
* ``qemu-img rebase -b ""``: offline, the time of the command;
* ``qemu-img convert -O qed`` of the chain into a new image (the stretch goal), timed too.

After each stream the image is closed and checked (no backing file, ``qemu-img check`` clean,
``qemu-img compare`` identical to reference.raw) and its disk usage compared with the data.
On the fragmented shape, fio's 4 KiB random reads are timed idle and during full-speed streams
(stream_bench.py's latency segments). The 1 TiB shape's stream time is compared with its 4 GiB
twin holding the same data.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time

from common import (
    MiB,
    Settings,
    check_streamed,
    run_as_root,
    scratch_dirs,
    spread,
    verdicts,
)
from shapes import SHAPES, chain_of
from stream_bench import (
    FUSESTREAM,
    GOALS_P99,
    QSD_EXPORT,
    REBASE,
    STREAM_TIMEOUT,
    Run,
    StreamBench,
    StreamTooShort,
    chain_data,
    measure_latency,
)

from fusestream.units import format_size, parse_size

CONVERT = "qemu-img convert -O qed"
GOAL_QSD = 3.0  # block-stream time / fusestream time, at least
GOAL_REBASE = 1.5  # qemu-img rebase time / fusestream time, at least
GOAL_CONVERT = 1.5  # fusestream time / convert time, at most (stretch)
GOAL_SIZE_INDEPENDENCE = 1.5  # 1 TiB stream time / its 4 GiB twin's, at most
GOAL_RSS = 150 * MiB
LATENCY_SHAPE = "fragmented"


@dataclasses.dataclass
class ShapeResult:
    name: str
    runs: dict[str, list[Run]]
    rss: list[int]
    data: int  # non-zero 64 KiB clusters of reference.raw, in bytes
    fresh_qed: int
    latency: list[tuple[float, float]] | None = None


class ShapeBench(StreamBench):
    """StreamBench's peers, plus qemu-img convert."""

    def convert(self) -> Run:
        """qemu-img convert of the chain into a fresh QED: what writing the data costs QEMU."""
        self.cold_start()
        out = self.scratch / "converted.qed"
        started = time.monotonic()
        subprocess.run(["qemu-img", "convert", "-O", "qed", str(self.chain.top), str(out)], check=True,
                       timeout=STREAM_TIMEOUT)
        seconds = time.monotonic() - started
        image = check_streamed(out, self.chain.reference)
        out.unlink()
        self.problems += [f"{CONVERT}: {problem}" for problem in image.problems]
        return Run(seconds, None, image)


def measure_shape(name: str, bench: ShapeBench, rounds: int, qemu_peers: bool) -> dict[str, list[Run]]:
    peers = {FUSESTREAM: bench.fusestream}
    if qemu_peers:
        peers |= {QSD_EXPORT: lambda: bench.block_stream(export=True), REBASE: bench.rebase, CONVERT: bench.convert}
    runs: dict[str, list[Run]] = {peer: [] for peer in peers}
    for round_no in range(rounds):
        for peer in list(peers) if round_no % 2 == 0 else list(peers)[::-1]:
            run = peers[peer]()
            runs[peer].append(run)
            print(f"round {round_no + 1}/{rounds}  {name:<14} {peer:<24} {run.seconds:8.2f} s"
                  f"  top {run.image.disk_usage / MiB:8.1f} MiB  {'; '.join(run.image.problems) or 'checks ok'}",
                  flush=True)
    return runs


def run_shape(shape, settings: Settings, latency: bool) -> tuple[ShapeResult, list[str]]:
    started = time.monotonic()
    chain = chain_of(shape, settings.size)
    print(f"shape:   {shape.name}: {shape.description}; {format_size(chain.size)}, {chain.top.parent} "
          f"(ready after {time.monotonic() - started:.0f} s)", flush=True)
    with scratch_dirs(f"shape-{shape.name}") as (scratch, tmp):
        bench = ShapeBench(chain, scratch, tmp)
        data = chain_data(chain, scratch)
        runs = measure_shape(shape.name, bench, settings.rounds, shape.qemu_peers)
        result = ShapeResult(shape.name, runs, bench.rss, data.clusters, data.fresh_qed)
        if latency:
            fastest = min(r.job_seconds for r in runs[FUSESTREAM])
            try:
                result.latency = measure_latency(bench, settings, max(0.1, fastest * 3.0), 0)
            except StreamTooShort as err:
                print(f"latency: {err}: not measured on this size")
    return result, bench.problems


def median(values) -> float:
    return statistics.median(list(values))


def print_table(results: list[ShapeResult], rounds: int) -> None:
    print(f"\nstream time in seconds, median of {rounds} [min-max]; ratios: the peer's time / fusestream's "
          f"(convert: fusestream's / the peer's)")
    header = (f"{'shape':<14} {'fusestream':>20} {'block-stream':>20} {'ratio':>7} {'rebase':>20} {'ratio':>7}"
              f" {'convert -O qed':>20} {'ratio':>7}  goals (>= {GOAL_QSD:g}x, >= {GOAL_REBASE:g}x, "
              f"<= {GOAL_CONVERT:g}x stretch)")
    print(header)
    for r in results:
        ours = median(x.seconds for x in r.runs[FUSESTREAM])
        if QSD_EXPORT not in r.runs:
            print(f"{r.name:<14} {spread((x.seconds for x in r.runs[FUSESTREAM]), 2):>20}  (QEMU's peers read all of "
                  "a raw base: not run, see shapes.py)")
            continue
        qsd, rebase, convert = (median(x.seconds for x in r.runs[p]) for p in (QSD_EXPORT, REBASE, CONVERT))
        cells = [spread((x.seconds for x in r.runs[p]), 2) for p in (FUSESTREAM, QSD_EXPORT, REBASE, CONVERT)]
        print(f"{r.name:<14} {cells[0]:>20} {cells[1]:>20} {qsd / ours:6.2f}x {cells[2]:>20} {rebase / ours:6.2f}x"
              f" {cells[3]:>20} {ours / convert:6.2f}x  {verdicts(qsd / ours, (GOAL_QSD,))}, "
              f"{verdicts(rebase / ours, (GOAL_REBASE,))}, {verdicts(ours / convert, (GOAL_CONVERT,), at_least=False)}")

    print(f"\n{'shape':<14} {'data MiB':>10} {'fresh QED':>10} {'top after':>10}  {'daemon RSS':>11}  goals")
    for r in results:
        top = median(x.image.disk_usage for x in r.runs[FUSESTREAM])
        rss = max(r.rss)
        print(f"{r.name:<14} {r.data / MiB:10.1f} {r.fresh_qed / MiB:10.1f} {top / MiB:10.1f}  {rss / MiB:8.0f} MiB"
              f"  top <= fresh QED {'met' if top <= r.fresh_qed else 'NOT met'}, "
              f"RSS < {GOAL_RSS // MiB} MiB {'met' if rss < GOAL_RSS else 'NOT met'}")

    by_name = {r.name: r for r in results}
    if "terabyte" in by_name and "terabyte-twin" in by_name:
        big, twin = (median(x.seconds for x in by_name[n].runs[FUSESTREAM]) for n in ("terabyte", "terabyte-twin"))
        print(f"\n1 TiB disk / 4 GiB disk with the same data: {big:.2f} s / {twin:.2f} s = {big / twin:.2f}x  "
              f"{verdicts(big / twin, (GOAL_SIZE_INDEPENDENCE,), at_least=False)}")
    for r in results:
        if r.latency:
            idle, during = median(p[0] for p in r.latency), median(p[1] for p in r.latency)
            print(f"\n{r.name}: random read 4 KiB p99 idle {idle:.0f} us, during a full-speed stream {during:.0f} us,"
                  f" {during / idle:.2f}x  {verdicts(during / idle, GOALS_P99[1:], at_least=False)}")


def parse_args(argv: list[str]) -> tuple[Settings, list]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [shape.name for shape in SHAPES]
    parser.add_argument("--size", type=parse_size, default=1 << 30,
                        help="virtual size of the shapes without a size of their own (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per peer and shape; the median counts")
    parser.add_argument("--runtime", type=float, default=4.0, help="seconds of fio per latency figure")
    parser.add_argument("--shapes", default=",".join(names), help=f"comma-separated, of {', '.join(names)}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 64 MiB, 1 round, the shapes without a fixed size")
    args = parser.parse_args(argv)
    chosen = [s for s in SHAPES if s.name in args.shapes.split(",") and not (args.quick and s.size)]
    settings = Settings(64 * MiB if args.quick else args.size, 1 if args.quick else args.rounds,
                        1.0 if args.quick else args.runtime)
    return settings, chosen


def run(settings: Settings, shapes: list) -> int:
    started = time.monotonic()
    print("command:", " ".join([sys.executable, *sys.argv]))
    results, problems = [], []
    for shape in shapes:
        result, found = run_shape(shape, settings, latency=shape.name == LATENCY_SHAPE)
        results.append(result)
        problems += [f"{shape.name}: {p}" for p in found]
    print_table(results, settings.rounds)
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    print(f"\ntotal time: {time.monotonic() - started:.0f} s")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    settings, shapes = parse_args(sys.argv[1:] if argv is None else argv)
    return run_as_root("shapes_bench", lambda: run(settings, shapes))


if __name__ == "__main__":
    sys.exit(main())
