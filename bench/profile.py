"""Where the daemon's time goes: py-spy samples mount.fusestream while fio drives it.

``.venv/bin/python bench/profile.py randread|randwrite [--seconds N]`` mounts the cached 1 GiB
bench chain (read-only for randread; a fresh writable copy of its top, ``-o nostream``, for
randwrite), starts fio's 4 KiB psync job on a cold page cache, samples the daemon with py-spy
(wall clock: ``--idle``, so waiting shows too) and prints the functions that take the largest
share of the samples, by their own time and including what they call. py-spy comes with the
``profile`` extra: ``.venv/bin/pip install -e '.[profile]'``.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    CACHE_DIR,
    VENV_BIN,
    build_chain,
    copy_image,
    fusestream_daemon,
    relocated_copy,
    warm_up_and_drop_caches,
)

PY_SPY = VENV_BIN / "py-spy"
TOP = 12


def fio_argv(raw: Path, rw: str, seconds: float) -> list[str]:
    return ["fio", "--name=profile", f"--filename={raw}", f"--rw={rw}", "--bs=4k", "--ioengine=psync",
            "--time_based", f"--runtime={seconds + 1:g}s", "--output-format=terse"]


def sample(pid: int, seconds: float, output: Path) -> None:
    subprocess.run([str(PY_SPY), "record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate", "500",
                    "--idle", "--format", "raw", "--output", str(output)], check=True, capture_output=True)


def summarize(collapsed: Path) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    print(f"{total} samples\n\nown time:")
    for frame, count in own.most_common(TOP):
        print(f"{count / total:6.1%}  {frame}")
    print("\nincluding callees:")
    for frame, count in inclusive.most_common(TOP * 2):
        print(f"{count / total:6.1%}  {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=["randread", "randwrite"])
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of sampling (default 4)")
    args = parser.parse_args()
    if not PY_SPY.exists():
        print(f"profile: {PY_SPY} not found: .venv/bin/pip install -e '.[profile]'", file=sys.stderr)
        return 1
    chain = build_chain(1 << 30)
    with tempfile.TemporaryDirectory(prefix="profile-", dir=CACHE_DIR, ignore_cleanup_errors=True) as scratch:
        scratch_dir = Path(scratch)
        if args.workload == "randread":
            image, options = chain.top, ("ro",)
        else:
            image = copy_image(relocated_copy(chain, scratch_dir / "template.qed"), scratch_dir / "top.qed")
            options = ("nostream",)
        with fusestream_daemon(image, scratch_dir / "mnt", options) as (raw, daemon):
            warm_up_and_drop_caches([chain.reference, chain.base])
            fio = subprocess.Popen(fio_argv(raw, args.workload, args.seconds), stdout=subprocess.PIPE, text=True)
            time.sleep(0.5)  # past fio's start
            sample(daemon.pid, args.seconds, scratch_dir / "samples.txt")
            fields = fio.communicate()[0].split(";")
            print(f"fio {args.workload}: {fields[7] if args.workload == 'randread' else fields[48]} IOPS")
            summarize(scratch_dir / "samples.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
