"""qcow2 benchmark for issue 14: a zlib-compressed qcow2 base under QED layers, against QEMU.

Method. The stream benchmark's cached chain (``common.build_chain``) with its raw base converted
to qcow2: ``qemu-img convert -c -O qcow2`` (zlib, 64 KiB clusters) of base.raw, and copies of
mid.qed (rebased with ``qemu-img rebase -u`` onto base.qcow2) and top.qed, cached in
bench/.cache/ with a reference.raw from ``qemu-img convert -O raw`` of the new top. The bench's
base is pseudo-random, which zlib cannot shrink, so qemu-img stores most of its clusters
uncompressed; ``--compressible`` builds the base from the same bytes with the second half of
every 4 KiB block zeroed (about 2:1, like an OS image), so that every data cluster is
compressed. The share of compressed clusters (``qemu-img check``) is printed either way.

* Stream time: ``stream_bench.StreamBench`` on this chain: ``fusestream stream`` .. ``wait`` on
  a ``-o nostream`` mount, qemu-storage-daemon's ``block-stream`` (with and without a read-only
  export) and ``qemu-img rebase -b ""``, each on a fresh copy of the top and a cold page cache,
  each result checked (no backing file, a clean ``qemu-img check``, QEMU's bytes).
* Random reads: fio ``randread bs=4k ioengine=psync`` (buffered, time-based) on the raw file of
  ``mount.fusestream -o ro`` and on qemu-storage-daemon's read-only FUSE export of the same top,
  cold cache, peers alternating; both first read the reference's bytes at sampled offsets.
* Memory: the fusestream daemon's peak RSS (VmHWM) after that fio run, on this chain and on the
  chain with the raw base (whose IOPS are shown too).

Goals (issue 14): stream >= 2x faster than block-stream and >= 1x qemu-img rebase; random reads
>= 1x the export; the daemon's RSS within 64 MiB of a raw-base mount.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    CACHE_DIR,
    Chain,
    MiB,
    Settings,
    check_same_bytes,
    copy_image,
    fusestream_daemon,
    peak_rss,
    qsd_export,
    run_as_root,
    run_fio_cold,
    scratch_dirs,
    settings_from_argv,
    spread,
    start_run,
    verdicts,
)
from stream_bench import FUSESTREAM, QSD, QSD_EXPORT, REBASE, StreamBench, measure_streams, median

QCOW2_LAYOUT = "v1"  # bump when build_qcow2_chain changes what it writes
GOALS_QSD = (2.0,)  # block-stream time / fusestream time, at least
GOALS_REBASE = (1.0,)  # qemu-img rebase time / fusestream time, at least
GOALS_READS = (1.0,)  # fusestream IOPS / export IOPS, at least
RSS_MARGIN = 64 * MiB  # the daemon's peak RSS over a raw-base mount's, at most

FULL = Settings(size=1 << 30, rounds=3, runtime=10)
QUICK = Settings(size=64 * MiB, rounds=1, runtime=2)


def build_qcow2_chain(chain: Chain, compressible: bool) -> Chain:
    """The cached qcow2 variant of `chain` (built in a scratch directory, renamed when complete)."""
    final = CACHE_DIR / f"qcow2-{QCOW2_LAYOUT}-{chain.size}-{'compressible' if compressible else 'base'}"
    if not final.is_dir():
        scratch = final.with_name(final.name + ".building")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        source = chain.base
        if compressible:
            source = scratch / "compressible.raw"
            write_compressible(chain.base, source)
        run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zlib", str(source),
             str(scratch / "base.qcow2")])
        if compressible:
            source.unlink()
        copy_image(chain.mid, scratch / "mid.qed")
        run(["qemu-img", "rebase", "-u", "-f", "qed", "-b", "base.qcow2", "-F", "qcow2", str(scratch / "mid.qed")])
        copy_image(chain.top, scratch / "top.qed")  # names mid.qed, relative: the rename keeps it
        run(["qemu-img", "convert", "-O", "raw", str(scratch / "top.qed"), str(scratch / "reference.raw")])
        scratch.rename(final)
    return Chain(final / "base.qcow2", final / "mid.qed", final / "top.qed", final / "reference.raw", chain.size)


def write_compressible(source: Path, dest: Path) -> None:
    """`source` with the second half of every 4 KiB block zeroed; holes stay holes."""
    half = bytes(2048)
    with open(source, "rb") as src, open(dest, "wb") as out:
        out.truncate(source.stat().st_size)
        offset = 0
        while chunk := src.read(MiB):
            if chunk.count(0) != len(chunk):
                data = bytearray(chunk)
                for at in range(2048, len(data), 4096):
                    data[at : at + 2048] = half[: len(data) - at]
                out.seek(offset)
                out.write(data)
            offset += len(chunk)


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def compressed_share(image: Path) -> str:
    """qemu-img check's share of compressed clusters, e.g. '98.4%'."""
    out = run(["qemu-img", "check", str(image)])
    found = re.search(r"([\d.]+)% compressed clusters", out)
    return f"{found.group(1)}%" if found else "?"


def randread_params(runtime: float) -> dict[str, str]:
    return {"rw": "randread", "bs": "4k", "ioengine": "psync", "direct": "0", "time_based": "",
            "runtime": f"{runtime:g}s"}


def measure_reads(qchain: Chain, raw_chain: Chain, tmp: Path, settings: Settings) -> dict[str, list[float]]:
    """IOPS of the export of the qcow2 chain, and of fusestream (with its daemon's peak RSS) on
    it and on the raw-base chain, `settings.rounds` times."""
    params = randread_params(settings.runtime)
    results: dict[str, list[float]] = {"fusestream": [], "export": [], "fusestream raw": [], "rss qcow2": [],
                                       "rss raw": []}
    for round_no in range(settings.rounds):
        peers = ["fusestream", "export"] if round_no % 2 == 0 else ["export", "fusestream"]
        for peer in peers:
            if peer == "export":
                with qsd_export(qchain.top, tmp / "qsd.raw") as export:
                    check_same_bytes(export, qchain.reference)
                    results[peer].append(run_fio_cold(export, params).iops)
                continue
            for label, chain in (("fusestream", qchain), ("fusestream raw", raw_chain)):
                with fusestream_daemon(chain.top, tmp / "mnt") as (raw_file, proc):
                    check_same_bytes(raw_file, chain.reference)
                    results[label].append(run_fio_cold(raw_file, params).iops)
                    results["rss qcow2" if chain is qchain else "rss raw"].append(peak_rss(proc.pid))
        print(f"round {round_no + 1}/{settings.rounds}  random read 4 KiB: fusestream {results['fusestream'][-1]:.0f} "
              f"IOPS (raw base: {results['fusestream raw'][-1]:.0f}), export {results['export'][-1]:.0f} IOPS; "
              f"daemon peak RSS {results['rss qcow2'][-1] / MiB:.1f} "
              f"MiB (raw base: {results['rss raw'][-1] / MiB:.1f} MiB)")
    return results


def print_table(streams, reads: dict[str, list[float]], rounds: int) -> None:
    ours = median(r.seconds for r in streams[FUSESTREAM])
    print(f"\n{f'stream time, median of {rounds} [min-max]':<44} {'seconds':>20} {'/ fusestream':>13}  goal")
    print(f"{FUSESTREAM + ' (stream .. wait)':<44} {spread((r.seconds for r in streams[FUSESTREAM]), 2):>20}")
    for name, label, goal in ((QSD, "qemu-storage-daemon block-stream", GOALS_QSD),
                              (QSD_EXPORT, "  the same, with a read-only FUSE export", GOALS_QSD),
                              (REBASE, 'qemu-img rebase -b "" (offline)', GOALS_REBASE)):
        ratio = median(r.seconds for r in streams[name]) / ours
        times = spread((r.seconds for r in streams[name]), 2)
        print(f"{label:<44} {times:>20} {ratio:12.2f}x  {verdicts(ratio, goal)}")
    ratio = statistics.median(reads["fusestream"]) / statistics.median(reads["export"])
    print(f"\n{f'random read 4 KiB, median of {rounds}':<44} {'IOPS':>20} {'ratio':>13}  goal")
    print(f"{'fusestream mount':<44} {spread(reads['fusestream']):>20}")
    print(f"{'  the same chain over the raw base':<44} {spread(reads['fusestream raw']):>20}")
    print(f"{'qemu-storage-daemon export':<44} {spread(reads['export']):>20} {ratio:12.2f}x  "
          f"{verdicts(ratio, GOALS_READS)}")
    over = statistics.median(reads["rss qcow2"]) - statistics.median(reads["rss raw"])
    print(f"\n{'daemon peak RSS after the reads, median':<44} {'MiB':>20}")
    print(f"{'qcow2 base':<44} {statistics.median(reads['rss qcow2']) / MiB:20.1f}")
    print(f"{'raw base':<44} {statistics.median(reads['rss raw']) / MiB:20.1f}  "
          f"+{over / MiB:.1f} MiB: <= +{RSS_MARGIN // MiB} MiB {'met' if over <= RSS_MARGIN else 'NOT met'}")


def bench(settings: Settings, compressible: bool) -> int:
    started = time.monotonic()
    raw_chain = start_run(settings.size)
    qchain = build_qcow2_chain(raw_chain, compressible)
    print(f"qcow2:   {qchain.base} (zlib, {compressed_share(qchain.base)} of its clusters compressed, "
          f"{qchain.base.stat().st_blocks * 512 / MiB:.0f} MiB on disk) <- {qchain.mid} <- {qchain.top}")
    with scratch_dirs("qcow2-bench") as (scratch, tmp):
        stream_bench = StreamBench(qchain, scratch, tmp)
        streams = measure_streams(stream_bench, settings.rounds)
        reads = measure_reads(qchain, raw_chain, tmp, settings)
    print_table(streams, reads, settings.rounds)
    for problem in stream_bench.problems:
        print(f"CHECK FAILED: {problem}")
    print(f"\ntotal time: {time.monotonic() - started:.0f} s")
    return 1 if stream_bench.problems else 0


def main(argv: list[str] | None = None) -> int:
    content = argparse.ArgumentParser(add_help=False)  # the rest is the benchmarks' shared command line
    content.add_argument("--compressible", action="store_true")
    known, rest = content.parse_known_args(sys.argv[1:] if argv is None else argv)
    settings = settings_from_argv(rest, __doc__, FULL, QUICK, "runs per peer", "seconds per random-read run")
    return run_as_root("qcow2_bench", lambda: bench(settings, known.compressible))


if __name__ == "__main__":
    sys.exit(main())
