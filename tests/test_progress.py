"""Progress that tells the truth (issue 12): the rates and the time left of a running stream, in
virtual time (trio's MockClock; the copy steps run inline)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import qemu_img, qemu_io, sample_stream

from fusestream.cli import progress_bar, wait_poll_seconds
from fusestream.control import render_status, render_status_json
from fusestream.stream import RUNNING, StreamStatistics

MiB = 1 << 20
CLUSTER = 65536


def fragmented_chain(tmp: Path, size: int) -> Path:
    """A raw base with random data in 75% of its 64 KiB pieces, under an empty QED top."""
    rng = random.Random(4)
    pieces = list(range(size // CLUSTER))
    rng.shuffle(pieces)
    with open(tmp / "base.raw", "wb") as f:
        f.truncate(size)
        for piece in sorted(pieces[: len(pieces) * 3 // 4]):
            f.seek(piece * CLUSTER)
            f.write(rng.randbytes(CLUSTER))
    qemu_img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(tmp / "top.qed"), str(size))
    return tmp / "top.qed"


def sparse_chain(tmp: Path) -> Path:
    """256 MiB of disk with 16 MiB of data in the middle: a half of nothing, then data."""
    with open(tmp / "base.raw", "wb") as f:
        f.truncate(256 * MiB)
        f.seek(128 * MiB)
        f.write(random.Random(5).randbytes(16 * MiB))
    qemu_img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(tmp / "top.qed"))
    qemu_io(tmp / "top.qed", "write -P 7 200M 64K")
    return tmp / "top.qed"


def assert_time_left_is_true(stats: StreamStatistics, t: float, end: float) -> None:
    assert stats.state == RUNNING
    assert stats.seconds_left == pytest.approx(end - t, rel=0.03, abs=0.15), (t, end, stats)


def test_the_rate_and_time_left_are_right_from_the_first_second(tmp_path):
    """speed=10M over a base with holes: the rate is 10 MiB/s of copied bytes and the time left
    is the time the job really still takes, from the first second on (it used to show the
    first samples: a much higher rate, and a time left from skipped space)."""
    speed = 10 * MiB
    times = [1.05, 1.55, 2.05, 3.05, 4.05]
    samples, end = sample_stream(fragmented_chain(tmp_path, 64 * MiB), speed, times)
    assert end == pytest.approx(48 * MiB / speed, rel=0.02)  # 75% of 64 MiB, paid at `speed`
    for t in times:
        stats = samples[t]
        assert stats.rate == pytest.approx(speed, rel=0.02), (t, stats)
        assert stats.progress_rate == pytest.approx(speed * 4 / 3, rel=0.1), (t, stats)
        assert_time_left_is_true(stats, t, end)
        assert stats.copied + stats.remaining == 48 * MiB


def test_time_left_comes_from_what_remains_to_copy_not_from_skipped_space(tmp_path):
    """Half of the disk is crossed at once; what is left is 16 MiB to copy at 4 MiB/s."""
    speed = 4 * MiB
    times = [0.55, 1.05, 2.05, 3.05]
    samples, end = sample_stream(sparse_chain(tmp_path), speed, times)
    assert end == pytest.approx(4.0, rel=0.02)
    for t in times:
        stats = samples[t]
        assert stats.rate == pytest.approx(speed, rel=0.02), (t, stats)
        assert stats.progress_rate > 10 * stats.rate  # both rates are reported
        assert_time_left_is_true(stats, t, end)


def test_after_a_pause_the_rate_is_measured_afresh(tmp_path):
    speed = 8 * MiB
    samples, end = sample_stream(fragmented_chain(tmp_path, 64 * MiB), speed, [1.5, 11.05, 11.55, 12.05],
                                 pause=(1.0, 10.0))
    assert samples[1.5].state == "paused" and samples[1.5].rate == 0
    assert samples[11.05].seconds_left is None  # resumed at 11: its first step is not paid for yet
    for t in (11.55, 12.05):
        assert samples[t].rate == pytest.approx(speed, rel=0.02), (t, samples[t])
        assert_time_left_is_true(samples[t], t, end)


def test_status_status_json_and_the_watch_bar_show_both_rates_and_the_time_left(tmp_path, open_chains):
    running = StreamStatistics(RUNNING, 512 * MiB, 1024 * MiB, 0, 100 * MiB, None, None, "base.raw",
                               copied=300 * MiB, remaining=250 * MiB, progress_rate=200 * MiB)
    assert render_status("top.raw", running) == (
        "Streaming top.raw: Completed 536870912 of 1073741824 bytes (50.0%, 100 MiB/s, 2 s left)\n")
    c = open_chains(sparse_chain(tmp_path), writable=False)
    stream = json.loads(render_status_json("top.raw", c, running))["images"][0]["stream"]
    c.close()
    assert stream == {"state": "running", "offset": 512 * MiB, "len": 1024 * MiB, "speed": 0,
                      "rate": 100 * MiB, "base": None, "error": None, "copied": 300 * MiB,
                      "remaining": 250 * MiB, "progress_rate": 200 * MiB, "seconds_left": 2.5}
    bar = progress_bar(stream)
    assert "100 MiB/s copied, 200 MiB/s through" in bar and bar.endswith("2 s left")
    # With nothing left to copy, the rest of the disk is crossed at the rate of progress.
    crossing = StreamStatistics(RUNNING, 512 * MiB, 1024 * MiB, 0, 0, None, None, "base.raw",
                                copied=300 * MiB, remaining=0, progress_rate=256 * MiB)
    assert crossing.seconds_left == 2.0
    measuring = StreamStatistics(RUNNING, 0, 1024 * MiB, 0, 0, None, None, "base.raw")
    assert measuring.seconds_left is None
    assert render_status("top.raw", measuring).endswith("(0.0%, 0 B/s, measuring)\n")


def test_wait_polls_by_the_time_left_that_status_json_measured():
    """`rate` counts copied bytes only, so the rest of the disk at `rate` is no time left:
    `fusestream wait` uses seconds_left, and only without it (an older mount) the old guess."""
    near_the_end = {"state": "running", "offset": 0, "len": 1 << 30, "rate": 1 << 20, "seconds_left": 0.2}
    assert wait_poll_seconds(near_the_end) == pytest.approx(0.05)
    older_mount = {"state": "running", "offset": 0, "len": 1 << 30, "rate": 1 << 30}
    assert wait_poll_seconds(older_mount) == pytest.approx(0.25)
