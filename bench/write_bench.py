"""Write benchmark (issue 5): random 4 KiB writes into unallocated clusters over a backing file.

Method. One cached chain, ``base.raw <- mid.qed <- top.qed`` (see ``common.build_chain``); most of
top.qed's clusters are unallocated, so nearly every write allocates a cluster and fills the rest
of it from the backing chain. Every run works on a fresh copy of top.qed (in a scratch directory
beside the chain, naming mid.qed by its absolute path) served writable: ``mount.fusestream -o
nostream`` and qemu-storage-daemon's FUSE export with ``writable=on``. Each run starts on a cold
page cache (after an untimed read of reference.raw and base.raw, as stream_bench does), then fio
writes (``rw=randwrite bs=4k ioengine=psync``, time-based, the same offsets for both peers), and
then one ``fsync`` of the raw file makes it all durable. The figure is the number of writes
divided by fio's time plus the fsync's. Peers alternate from round to round; the median counts.

After each run the image is closed and ``qemu-img check`` must find it clean (the tests check
that writes read back right; here only the figure and the image's health count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    Chain,
    MiB,
    Settings,
    copy_image,
    fusestream_argv,
    fusestream_mount,
    qsd_argv,
    qsd_export,
    relocated_copy,
    run_as_root,
    scratch_dirs,
    settings_from_argv,
    spread,
    start_run,
    warm_up_and_drop_caches,
)

GOAL = 2.0  # issue 5: at least twice the writable qemu-storage-daemon export's IOPS
FUSESTREAM, QSD = "fusestream", "qemu-storage-daemon"
FULL = Settings(size=1 << 30, rounds=3, runtime=5)
QUICK = Settings(size=64 * MiB, rounds=1, runtime=1)


@dataclasses.dataclass(frozen=True)
class WriteRun:
    writes: int
    fio_seconds: float
    fsync_seconds: float
    check_ok: bool
    check_output: str

    @property
    def iops(self) -> float:
        return self.writes / (self.fio_seconds + self.fsync_seconds)


def fio_write_argv(path: Path | str, runtime: float) -> list[str]:
    return [
        "fio", "--output-format=json", "--name=bench", f"--filename={path}", "--rw=randwrite", "--bs=4k",
        "--ioengine=psync", "--direct=0", "--time_based", f"--runtime={round(runtime * 1000)}ms",
        "--randrepeat=1", "--randseed=7",
    ]  # fmt: skip


def fio_writes(path: Path, runtime: float) -> tuple[int, float]:
    """Run the fio job; (writes completed, seconds fio spent writing)."""
    out = subprocess.run(fio_write_argv(path, runtime), check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio on {path} failed with error {job['error']}")
    return job["write"]["total_ios"], job["write"]["runtime"] / 1000


def timed_fsync(path: Path) -> float:
    fd = os.open(path, os.O_WRONLY)
    try:
        started = time.monotonic()
        os.fsync(fd)
        return time.monotonic() - started
    finally:
        os.close(fd)


class WriteBench:
    def __init__(self, chain: Chain, scratch: Path, tmp: Path):
        self.chain = chain
        self.template = relocated_copy(chain, scratch / "template.qed")
        self.copies = {FUSESTREAM: scratch / "fusestream.qed", QSD: scratch / "qsd.qed"}
        self.tmp = tmp

    def served(self, peer: str) -> contextlib.AbstractContextManager[Path]:
        image = copy_image(self.template, self.copies[peer])
        if peer == FUSESTREAM:
            return fusestream_mount(image, self.tmp / "mnt", ("nostream",))
        return qsd_export(image, self.tmp / "qsd.raw", writable=True)

    def run(self, peer: str, runtime: float) -> WriteRun:
        with self.served(peer) as raw:
            warm_up_and_drop_caches([self.chain.reference, self.chain.base])
            writes, fio_seconds = fio_writes(raw, runtime)
            fsync_seconds = timed_fsync(raw)
        check = subprocess.run(["qemu-img", "check", "-f", "qed", str(self.copies[peer])], capture_output=True,
                               text=True)
        return WriteRun(writes, fio_seconds, fsync_seconds, check.returncode == 0, check.stdout.strip())


def measure(bench: WriteBench, settings: Settings) -> dict[str, list[WriteRun]]:
    results: dict[str, list[WriteRun]] = {FUSESTREAM: [], QSD: []}
    for round_no in range(settings.rounds):
        order = [FUSESTREAM, QSD] if round_no % 2 == 0 else [QSD, FUSESTREAM]
        for peer in order:
            run = bench.run(peer, settings.runtime)
            results[peer].append(run)
            print(f"round {round_no + 1}/{settings.rounds}  {peer:<20} {run.writes:7d} writes in "
                  f"{run.fio_seconds:.2f} s + fsync {run.fsync_seconds * 1000:.1f} ms = {run.iops:7.0f} IOPS"
                  f"  {'check ok' if run.check_ok else 'CHECK FAILED: ' + run.check_output}")
    return results


def print_table(results: dict[str, list[WriteRun]], rounds: int) -> None:
    ours, peer = ([r.iops for r in results[name]] for name in (FUSESTREAM, QSD))
    ratio = statistics.median(ours) / statistics.median(peer)
    verdict = "met" if ratio >= GOAL else "NOT met"
    print(f"\n{f'median of {rounds} [min-max]':<36} {FUSESTREAM:>20} {QSD:>20} {'ratio':>6}  goal")
    print(f"{'random write 4 KiB + fsync (IOPS)':<36} {spread(ours):>20} {spread(peer):>20} {ratio:5.2f}x"
          f"  >= {GOAL:.1f}x {verdict}")


def run(settings: Settings) -> int:
    started = time.monotonic()
    chain = start_run(settings.size)
    with scratch_dirs("write-bench") as (scratch, tmp):
        bench = WriteBench(chain, scratch, tmp)
        print("peers:  ", shlex.join(fusestream_argv(bench.copies[FUSESTREAM], bench.tmp / "mnt", ("nostream",))))
        print("        ", shlex.join(qsd_argv(bench.copies[QSD], bench.tmp / "qsd.raw", writable=True)))
        print("fio:    ", shlex.join(fio_write_argv("FILE", settings.runtime)), "; then fsync(FILE)")
        print(f"method:  {settings.rounds} round(s), peers alternating; each run on a fresh copy of top.qed and a "
              "cold page cache\n")
        results = measure(bench, settings)
    print_table(results, settings.rounds)
    failed = [r for runs in results.values() for r in runs if not r.check_ok]
    print(f"\ntotal time: {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_argv(sys.argv[1:] if argv is None else argv, __doc__, FULL, QUICK,
                                  "runs per peer", "seconds of fio per run")
    return run_as_root("write_bench", lambda: run(settings))


if __name__ == "__main__":
    sys.exit(main())
