"""Scale benchmark (issue 5): a 1 TiB virtual disk with a 1 TiB sparse raw base.

Measures, on one mount: how long mounting takes (from starting mount.fusestream until the mount
is there), the daemon's resident memory after mounting, after random reads across the whole
disk and after streaming it (VmHWM, the peak), how long the stream takes, and what reading
status.json costs on the 1 TiB disk against a 1 GiB one (it must not grow with the virtual
size). Goals: mount < 1 s, peak RSS < 150 MiB, status cost independent of size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CACHE_DIR, VENV_BIN, describe_setup, fio_argv, fusestream_daemon

FUSESTREAM = str(VENV_BIN / "fusestream")
TiB, GiB, MiB = 1 << 40, 1 << 30, 1 << 20
DATA_SPOTS = 16  # 4 MiB of data every 64 GiB of the base


def sparse_chain(directory: Path, size: int) -> Path:
    """(Cached) a sparse raw base of `size` with DATA_SPOTS spots of data, a QED middle layer with a
    few writes far apart; returns the middle layer, over which each run creates a fresh top."""
    directory.mkdir(parents=True, exist_ok=True)
    base, mid = directory / "base.raw", directory / "mid.qed"
    if not mid.exists():
        with open(base, "wb") as f:
            f.truncate(size)
            for spot in range(DATA_SPOTS):
                f.seek(spot * (size // DATA_SPOTS))
                f.write(bytes([spot + 1]) * (4 * MiB))
        subprocess.run(["qemu-img", "create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", str(mid)], check=True)
        commands = [arg for i in range(8) for arg in ("-c", f"write -P {i + 1} {i * (size // 8) + MiB} 1M")]
        subprocess.run(["qemu-io", "-f", "qed", *commands, str(mid)], check=True, capture_output=True)
    return mid


def rss_mib(proc: subprocess.Popen, field: str) -> float:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {proc.pid}")


def status_cost_us(mountpoint: Path, reads: int = 200) -> float:
    status = mountpoint / "status.json"
    start = time.perf_counter()
    for _ in range(reads):
        status.read_bytes()
    return (time.perf_counter() - start) / reads * 1e6


def measure(mid: Path, work: Path, size: int, read_seconds: int) -> dict[str, float]:
    top = work / "top.qed"
    top.unlink(missing_ok=True)
    subprocess.run([FUSESTREAM, "create", "-b", str(mid), str(top)], check=True, capture_output=True)
    started = time.perf_counter()
    with fusestream_daemon(top, work / "mnt", ("nostream",)) as (raw, proc):
        figures = {"mount_s": time.perf_counter() - started, "rss_mounted": rss_mib(proc, "VmRSS")}
        figures["status_idle_us"] = status_cost_us(raw.parent)
        fio = {"rw": "randread", "bs": "4k", "ioengine": "psync", "time_based": "1", "runtime": f"{read_seconds}s",
               "size": str(size)}
        subprocess.run(fio_argv(raw, fio), check=True, capture_output=True)
        figures["rss_after_reads"] = rss_mib(proc, "VmHWM")
        began = time.perf_counter()
        subprocess.run([FUSESTREAM, "stream", str(raw.parent)], check=True)
        figures["status_streaming_us"] = status_cost_us(raw.parent, reads=20)
        subprocess.run([FUSESTREAM, "wait", str(raw.parent)], check=True)
        figures["stream_s"] = time.perf_counter() - began
        figures["rss_peak"] = rss_mib(proc, "VmHWM")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--read-seconds", type=int, default=5, help="seconds of random reads (default 5)")
    args = parser.parse_args(argv)
    print(f"command: {' '.join([sys.executable, *sys.argv])}\nsetup:   {describe_setup()}")
    with tempfile.TemporaryDirectory(prefix="fusestream-scale-", dir=CACHE_DIR) as scratch:
        results = {}
        for label, size in (("1 TiB", TiB), ("1 GiB", GiB)):
            mid = sparse_chain(CACHE_DIR / f"scale-{size}", size)
            results[label] = measure(mid, Path(scratch), size, args.read_seconds)
    big, small = results["1 TiB"], results["1 GiB"]
    rows = [
        ("mount time (s)", "mount_s", "< 1 s", big["mount_s"] < 1),
        ("RSS after mounting (MiB)", "rss_mounted", "", None),
        ("peak RSS after random reads (MiB)", "rss_after_reads", "< 150 MiB", big["rss_after_reads"] < 150),
        ("stream time (s)", "stream_s", "", None),
        ("peak RSS after streaming (MiB)", "rss_peak", "< 150 MiB", big["rss_peak"] < 150),
        ("status.json read, idle (us)", "status_idle_us", "", None),
        ("status.json read, streaming (us)", "status_streaming_us", "", None),
    ]
    print(f"\n{'':38}{'1 TiB':>10}{'1 GiB':>10}  goal (1 TiB)")
    for name, key, goal, met in rows:
        verdict = "" if met is None else ("met" if met else "NOT met")
        print(f"{name:38}{big[key]:10.2f}{small[key]:10.2f}  {goal} {verdict}")
    ratio = big["status_idle_us"] / small["status_idle_us"]
    print(f"status cost, 1 TiB / 1 GiB: {ratio:.2f}x (does not grow with the virtual size when ~1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
