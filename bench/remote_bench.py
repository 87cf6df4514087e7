"""Remote source benchmark (issue 15; the source alone for now: the stream and
qemu-storage-daemon's curl driver join it when remote layers are wired into the chain).

Against Debian's nginx on loopback, serving a file of random data (cached in bench/.cache/):

1. big sequential reads: HttpSource.read_into over the whole file, in reads of 8 MiB (the
   stream's step today; alone, and each after a prefetch of the next, as the stream reads) and
   of 64 MiB, against ``curl -o /dev/null`` of the same file; the peers alternate, their order
   reversed every round, after one untimed read of each kind;
2. through a second nginx with ``limit_rate R`` (a WAN stand-in): our throughput with N
   connections against N x R. nginx lets each request send R bytes at once before it limits (its
   allowance counts from the request's first second), so the per-connection rate curl sees for one
   request of the same size is printed beside it;
3. random 4 KiB reads, each of a block no read asked for before (cache misses), p50 of their
   latency against p50 of one ``curl -r`` range request's ``time_total`` (a new connection each).

Goals (issue 15): >= 0.9x curl; >= 0.9 x N x R; p50 <= 1.5x curl's. Needs nginx and curl on PATH.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CACHE_DIR, MiB, percentile, spread, verdicts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import start_nginx  # noqa: E402 (the tests' nginx, outside the package)

from fusestream.sources.http import HttpOptions, HttpSource  # noqa: E402
from fusestream.units import format_size, parse_size  # noqa: E402

KiB = 1 << 10
GOAL_CURL = 0.9  # our sequential throughput / curl's, at least
GOAL_RATE = 0.9  # our throughput / (connections x limit_rate), at least
GOAL_LATENCY = 1.5  # our p50 / curl's p50, at most
READS = ((8 * MiB, False), (8 * MiB, True), (64 * MiB, False))  # (size, prefetch the next)


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


def curl_seconds(url: str, byte_range: str | None = None) -> float:
    argv = ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{time_total}"]
    if byte_range:
        argv += ["-r", byte_range]
    return float(subprocess.run([*argv, url], check=True, capture_output=True, text=True).stdout)


def read_through(url: str, size: int, read_size: int, options: HttpOptions, base: Path,
                 prefetch_next: bool = False) -> float:
    """Seconds to read [0, size) through a fresh HttpSource in reads of `read_size`, each
    (`prefetch_next`) after a prefetch of the next, as the stream reads; the last buffer is
    checked against the file."""
    source = HttpSource(url, options)
    buf = bytearray(read_size)
    view = memoryview(buf)
    try:
        started = time.perf_counter()
        offset = 0
        while offset < size:
            if prefetch_next and offset + read_size < size:
                source.prefetch(offset + read_size, min(read_size, size - offset - read_size))
            filled = source.read_into(view[: min(read_size, size - offset)], offset)
            offset += filled
        seconds = time.perf_counter() - started
    finally:
        source.close()
    last = size - filled
    with open(base, "rb") as f:
        f.seek(last)
        if f.read(filled) != buf[:filled]:
            raise SystemExit(f"remote_bench: HttpSource read wrong data at {last}")
    return seconds


def sequential(url: str, base: Path, size: int, rounds: int) -> dict[str, list[float]]:
    peers = {"curl -o /dev/null": lambda: curl_seconds(url)}
    for read_size, prefetch_next in READS:
        name = f"HttpSource, {format_size(read_size)} reads" + (", next prefetched" if prefetch_next else "")
        peers[name] = lambda read_size=read_size, prefetch_next=prefetch_next: read_through(
            url, size, read_size, HttpOptions(), base, prefetch_next)
    for peer in peers.values():  # untimed: page cache, nginx, connections warm
        peer()
    rates: dict[str, list[float]] = {name: [] for name in peers}
    for round_no in range(rounds):
        for name in list(peers) if round_no % 2 == 0 else list(peers)[::-1]:
            rate = size / peers[name]() / MiB
            rates[name].append(rate)
            print(f"round {round_no + 1}/{rounds}  {name:<42} {rate:8.0f} MiB/s", flush=True)
    return rates


def rate_limited(url: str, base: Path, rate: int, connections: int,
                 rounds: int) -> tuple[dict[str, list[float]], list[float]]:
    """Our MiB/s reading 2 x connections requests' worth, in one read and in 8 MiB reads each
    after a prefetch of the next; curl's MiB/s for one request of the same size."""
    options = HttpOptions(connections=connections)
    amount = 2 * connections * options.request_size
    ours: dict[str, list[float]] = {"one read": [], "8 MiB reads, next prefetched": []}
    curl = []
    for round_no in range(rounds):
        ours["one read"].append(amount / read_through(url, amount, amount, options, base) / MiB)
        ours["8 MiB reads, next prefetched"].append(
            amount / read_through(url, amount, 8 * MiB, options, base, prefetch_next=True) / MiB)
        curl.append(options.request_size / curl_seconds(url, f"0-{options.request_size - 1}") / MiB)
        print(f"round {round_no + 1}/{rounds}  limit_rate {format_size(rate)}/s: HttpSource x{connections} "
              + ", ".join(f"{name} {rates[-1]:.2f} MiB/s" for name, rates in ours.items())
              + f"; curl one request {curl[-1]:.2f} MiB/s", flush=True)
    return ours, curl


def latencies(url: str, base: Path, size: int, samples: int) -> tuple[list[float], list[float]]:
    """(our seconds per 4 KiB read of a block not read before, curl's time_total per 4 KiB range)."""
    options = HttpOptions()
    rng = random.Random(2)
    blocks = rng.sample(range(1, size // options.block_size), samples)
    source = HttpSource(url, options)
    ours = []
    try:
        with open(base, "rb") as f:
            for block in blocks:
                offset = block * options.block_size + rng.randrange(0, options.block_size, 4 * KiB)
                started = time.perf_counter()
                data = source.read(offset, 4 * KiB)
                ours.append(time.perf_counter() - started)
                f.seek(offset)
                if f.read(4 * KiB) != data:
                    raise SystemExit(f"remote_bench: HttpSource read wrong data at {offset}")
    finally:
        source.close()
    curl = []
    for block in blocks[: max(20, samples // 5)]:
        offset = block * options.block_size
        curl.append(curl_seconds(url, f"{offset}-{offset + 4 * KiB - 1}"))
    return ours, curl


def main_run(size: int, rounds: int, rate: int, connections: int, samples: int) -> int:
    print("command:", " ".join([sys.executable, *sys.argv]))
    base = cached_base(size)
    with tempfile.TemporaryDirectory(prefix="remote-bench-") as state:
        fast = start_nginx(base.parent, Path(state) / "fast")
        slow = start_nginx(base.parent, Path(state) / "slow", limit_rate=rate)
        try:
            print(f"nginx on {fast.url('base.raw')} and, with limit_rate {rate}, on {slow.url('base.raw')}")
            seq = sequential(fast.url("base.raw"), base, size, rounds)
            limited, curl_limited = rate_limited(slow.url("base.raw"), base, rate, connections, rounds)
            ours_lat, curl_lat = latencies(fast.url("base.raw"), base, size, samples)
        finally:
            fast.stop()
            slow.stop()
    curl_rate = statistics.median(seq["curl -o /dev/null"])
    print(f"\n{format_size(size)} from nginx on loopback, median [min-max] of {rounds} rounds")
    for name, rates in seq.items():
        ratio = statistics.median(rates) / curl_rate
        goal = "" if name.startswith("curl") else verdicts(ratio, (GOAL_CURL,)) + " (of curl's)"
        print(f"  {name:<42} {spread(rates):>18} MiB/s  {ratio:5.2f}x  {goal}")
    target = connections * rate / MiB
    print(f"limit_rate {format_size(rate)}/s per connection; curl, one request: {spread(curl_limited, 2)} MiB/s")
    for name, rates in limited.items():
        ratio = statistics.median(rates) / target
        print(f"  HttpSource x{connections}, {name:<28} {spread(rates, 2):>18} MiB/s  {ratio:5.2f}x of "
              f"{connections} x R ({target:.2f} MiB/s)  {verdicts(ratio, (GOAL_RATE,))}")
    ours_p50, curl_p50 = percentile(ours_lat, 0.5), percentile(curl_lat, 0.5)
    ratio = ours_p50 / curl_p50
    ours_p99 = percentile(ours_lat, 0.99)
    print(f"  random 4 KiB reads (cache misses): p50 {ours_p50 * 1e6:.0f} us, p99 {ours_p99 * 1e6:.0f} us"
          f" ({len(ours_lat)} reads); curl range request p50 {curl_p50 * 1e6:.0f} us ({len(curl_lat)} requests):"
          f" {ratio:.2f}x  {verdicts(ratio, (GOAL_LATENCY,), at_least=False)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="file size (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per peer; the median counts (default 3)")
    parser.add_argument("--rate", type=parse_size, default=512 * KiB,
                        help="limit_rate of the slow server, bytes/s per connection (default 512K)")
    parser.add_argument("--connections", type=int, default=4, help="HttpSource connections (default 4)")
    parser.add_argument("--samples", type=int, default=1000, help="random 4 KiB reads (default 1000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 128 MiB, 1 round, 4M/s, 200 samples")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        return main_run(128 * MiB, 1, 4 * MiB, args.connections, 200)
    return main_run(args.size, args.rounds, args.rate, args.connections, args.samples)


if __name__ == "__main__":
    sys.exit(main())
