"""Run every benchmark, one after another on the same machine, and write docs/performance.md.

Each benchmark runs fusestream and its QEMU peers in the same run and checks every result
against QEMU's reading; this command only gathers their summary tables, with the command, the
date and the commit, so the figures in docs/ always come from one run of one command.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys

from common import BENCH_DIR, describe_setup

DOC = BENCH_DIR.parent / "docs" / "performance.md"
HAND_WRITTEN = "## What each lever gave"  # from this heading on, the doc is written by hand and kept
BENCHES = [
    ("Reads: fusestream against qemu-storage-daemon's FUSE export", "read_bench.py", []),
    ("Streaming: against block-stream and qemu-img rebase; guest read latency during a stream",
     "stream_bench.py", ["--runtime", "4"]),
    ("Writes: random 4 KiB writes into unallocated clusters, then fsync, against a writable export",
     "write_bench.py", []),
    ("Concurrency: reads and writes at 1, 4 and 16 jobs and iodepth 16, against the export and the raw file",
     "concurrency_bench.py", []),
    ("Scale: a 1 TiB disk", "scale_bench.py", []),
    ("Streaming on the chain shapes real images have: fragmented, 4 KiB-sparse, deep, ext4, 1 TiB",
     "shapes_bench.py", []),
    ("Sparse copy: cp --sparse=always of the raw file of a half-empty chain", "sparse_copy_bench.py", []),
    ("qcow2: a zlib-compressed qcow2 base (every data cluster compressed)", "qcow2_bench.py", ["--compressible"]),
    ("Remote base: a raw base on nginx (loopback) streamed and read, against curl and QEMU's curl driver",
     "remote_bench.py", []),
]


def summary(output: str) -> str:
    """The benchmark's closing tables: everything after its last per-run line."""
    lines = output.rstrip().splitlines()
    per_run = [i for i, line in enumerate(lines) if line.startswith(("round ", "           segment"))]
    start = per_run[-1] + 1 if per_run else next(i for i, line in enumerate(lines) if line.startswith("setup:")) + 1
    return "\n".join(lines[start:]).strip()


def hand_written_part() -> str:
    """What docs/performance.md holds from HAND_WRITTEN on: kept as it is. A doc without that
    heading is an error, not a part to drop."""
    if not DOC.exists():
        return ""
    text = DOC.read_text()
    at = text.find("\n" + HAND_WRITTEN)
    if at < 0:
        raise SystemExit(f"{DOC} has no {HAND_WRITTEN!r} heading: restore it, or the hand-written part would be lost")
    return text[at:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of each benchmark; docs/ is not written")
    args = parser.parse_args(argv)
    sections = []
    for title, script, extra in BENCHES:
        command = [sys.executable, str(BENCH_DIR / script), *(["--quick"] if args.quick and script != "scale_bench.py"
                                                                else extra)]
        print(f"== {' '.join(command)}", flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        print(result.stdout[-3000:], result.stderr[-2000:], sep="\n")
        if result.returncode:
            print(f"{script} failed with exit status {result.returncode}", file=sys.stderr)
            return 1
        shown = " ".join(["bench/" + script, *extra])
        sections.append(f"## {title}\n\n`.venv/bin/python {shown}`\n\n```\n{summary(result.stdout)}\n```\n")
    if args.quick:
        return 0
    DOC.write_text(
        "# Performance\n\n"
        f"Written by `.venv/bin/python bench/all.py` on {datetime.date.today()}: {describe_setup()}.\n"
        "Each table compares fusestream with its peers measured in the same run, on a cold page cache;\n"
        "absolute figures on these shared 2-vCPU machines are noise, the ratios are what counts.\n"
        "What each lever gave, and what was tried and dropped, follows the tables (written by hand).\n\n"
        + "\n".join(sections)
        + hand_written_part()
    )
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
