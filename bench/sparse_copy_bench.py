"""Sparse copy benchmark (issue 16): ``cp --sparse=always`` of the raw file of a half-empty chain,
from fusestream's mount and from qemu-storage-daemon's FUSE export, against ``qemu-img convert
-O raw`` of the image itself.

cp finds the holes with SEEK_DATA/SEEK_HOLE, so a mount that answers them from the chain's
allocation reads only the data; one that does not (the kernel's default) makes cp read every
byte and look for zeros. Each run starts on a cold page cache after an untimed read of the
chain's data, the peers alternate, their order reversed every round, and every copy is checked
with ``qemu-img compare`` against the chain's reference.raw; its disk usage is shown beside it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    MiB,
    disk_usage,
    fusestream_mount,
    qsd_export,
    run_as_root,
    scratch_dirs,
    spread,
    verdicts,
    warm_up_and_drop_caches,
)
from shapes import HALF_EMPTY, chain_of

from fusestream.units import parse_size

FUSESTREAM, QSD, CONVERT = "cp from fusestream", "cp from qemu-storage-daemon", "qemu-img convert -O raw"
GOAL_QSD = 1.0  # qemu-storage-daemon's time / fusestream's, at least
GOAL_CONVERT = 2.0  # fusestream's time / qemu-img convert's, at most


def timed_copy(source: Path, dest: Path, files_to_warm: list[Path]) -> float:
    warm_up_and_drop_caches(files_to_warm)
    started = time.monotonic()
    subprocess.run(["cp", "--sparse=always", str(source), str(dest)], check=True)
    return time.monotonic() - started


def main_run(size: int, rounds: int) -> int:
    print("command:", " ".join([sys.executable, *sys.argv]))
    chain = chain_of(HALF_EMPTY, size)
    warm = [chain.reference, chain.base]
    problems: list[str] = []
    times: dict[str, list[float]] = {FUSESTREAM: [], QSD: [], CONVERT: []}
    usage: dict[str, int] = {}
    with scratch_dirs("sparse-copy") as (scratch, tmp):
        out = scratch / "copy.raw"

        def fusestream() -> float:
            with fusestream_mount(chain.top, tmp / "mnt", ("ro", "nostream")) as raw:
                return timed_copy(raw, out, warm)

        def qsd() -> float:
            with qsd_export(chain.top, tmp / "qsd.raw") as raw:
                return timed_copy(raw, out, warm)

        def convert() -> float:
            warm_up_and_drop_caches(warm)
            started = time.monotonic()
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(chain.top), str(out)], check=True)
            return time.monotonic() - started

        peers = {FUSESTREAM: fusestream, QSD: qsd, CONVERT: convert}
        for round_no in range(rounds):
            for name in list(peers) if round_no % 2 == 0 else list(peers)[::-1]:
                seconds = peers[name]()
                same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(out),
                                       str(chain.reference)]).returncode == 0
                if not same:
                    problems.append(f"{name}: the copy differs from reference.raw")
                times[name].append(seconds)
                usage[name] = disk_usage(out)
                out.unlink()
                print(f"round {round_no + 1}/{rounds}  {name:<28} {seconds:7.2f} s  copy uses "
                      f"{usage[name] / MiB:7.1f} MiB  {'checks ok' if same else 'DIFFERS'}", flush=True)
    ours = statistics.median(times[FUSESTREAM])
    print(f"\n{'half-empty chain of ' + str(size // MiB) + ' MiB, median [min-max]':<44} {'seconds':>20}"
          f" {'copy MiB':>9} {'ratio':>7}  goal")
    for name in peers:
        theirs = statistics.median(times[name])
        if name == QSD:
            ratio, goal = theirs / ours, f"{verdicts(theirs / ours, (GOAL_QSD,))} (its time / fusestream's)"
        elif name == CONVERT:
            ratio = ours / theirs
            goal = f"{verdicts(ratio, (GOAL_CONVERT,), at_least=False)} (fusestream's time / its)"
        else:
            ratio, goal = 1.0, ""
        print(f"{name:<44} {spread(times[name], 2):>20} {usage[name] / MiB:9.1f} {ratio:6.2f}x  {goal}")
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="virtual size (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per peer; the median counts")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 1 round")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    size, rounds = (64 * MiB, 1) if args.quick else (args.size, args.rounds)
    return run_as_root("sparse_copy_bench", lambda: main_run(size, rounds))


if __name__ == "__main__":
    sys.exit(main())
