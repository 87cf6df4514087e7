"""The mount's background services (services.py) on trio's MockClock: no real time passes."""

from __future__ import annotations

import errno

import trio
import trio.testing
from conftest import read_alone

from fusestream.chain import open_chain
from fusestream.control import EventLog
from fusestream.faults import WriteErrors
from fusestream.formats import qed
from fusestream.formats.qed_structs import QED_F_NEED_CHECK, QED_HEADER, QED_HEADER_SIZE
from fusestream.mount import MountOptions, build_mount
from fusestream.services import NEED_CHECK_IDLE, NEED_CHECK_POLL, WRITE_BACK_INTERVAL, NeedCheckTimer, WriteBackTimer
from fusestream.stream import Streamer

TIMEOUT = 600  # virtual seconds


async def inline(fn, *args):
    return fn(*args)


def run_on_mock_clock(body) -> EventLog:
    """Run `await body(nursery, write_errors)` on a MockClock; returns the events emitted."""
    events = EventLog("top.raw", clock=lambda: 0.0)

    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                await body(nursery, WriteErrors("top.raw", events.emit))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return events


def fail_once(monkeypatch, obj, name: str, error: OSError) -> None:
    """Make the method `name` of `obj` raise `error` at its first call, and work after."""
    real = getattr(obj, name)
    failures = [error]

    def failing_once():
        if failures:
            raise failures.pop()
        real()

    monkeypatch.setattr(obj, name, failing_once)


def need_check_on_disk(path) -> bool:
    return bool(QED_HEADER.parse(path.read_bytes()[:QED_HEADER_SIZE]).features & QED_F_NEED_CHECK)


def test_need_check_is_cleared_once_allocating_writes_pause(tmp_path):
    """QEMU's timer: an image without a backing file is marked clean NEED_CHECK_IDLE seconds
    after the last allocating write (at most one look later), long before the unmount; an
    allocation meanwhile starts the wait again."""
    image = tmp_path / "solo.qed"
    qed.create(str(image), 16 << 20)
    top = qed.open_image(str(image), writable=True)
    seen: dict[str, bool] = {}

    async def body(nursery, write_errors):
        timer = NeedCheckTimer(top, write_errors, run_sync=inline)
        await nursery.start(timer.run)
        start = trio.current_time()
        top.write(0, b"first" * 1000, below=None)
        assert need_check_on_disk(image)
        await trio.sleep_until(start + NEED_CHECK_IDLE - 0.5)
        top.write(1 << 20, b"again" * 1000, below=None)  # a new allocation: the wait starts again
        second = trio.current_time()
        await trio.sleep_until(start + NEED_CHECK_IDLE + NEED_CHECK_POLL + 0.5)
        seen["after the first write's wait"] = need_check_on_disk(image)
        await trio.sleep_until(second + NEED_CHECK_IDLE - 0.01)
        seen["just before the second write's wait ends"] = need_check_on_disk(image)
        await trio.sleep_until(second + NEED_CHECK_IDLE + NEED_CHECK_POLL + 0.01)
        seen["after the second write's wait"] = need_check_on_disk(image)
        timer.stop()

    try:
        run_on_mock_clock(body)
        assert seen == {"after the first write's wait": True, "just before the second write's wait ends": True,
                        "after the second write's wait": False}
        assert read_alone(top, 1 << 20, 5000) == b"again" * 1000
    finally:
        top.close()


def test_a_failed_need_check_clear_is_reported_as_need_check_and_tried_again(tmp_path, monkeypatch):
    image = tmp_path / "solo.qed"
    qed.create(str(image), 16 << 20)
    top = qed.open_image(str(image), writable=True)
    fail_once(monkeypatch, top, "clear_need_check", OSError(errno.EIO, "Input/output error"))
    seen: list[tuple[str | None, bool]] = []

    async def body(nursery, write_errors):
        timer = NeedCheckTimer(top, write_errors, run_sync=inline)
        await nursery.start(timer.run)
        start = trio.current_time()
        top.write(0, b"data" * 1000, below=None)
        cleared_at = start + NEED_CHECK_POLL + NEED_CHECK_IDLE  # the look that sees the write, then the wait
        for at in (cleared_at + 0.01, cleared_at + NEED_CHECK_POLL + 0.01):  # it fails, then the next look clears
            await trio.sleep_until(at)
            seen.append((write_errors.error, need_check_on_disk(image)))
        timer.stop()

    try:
        events = run_on_mock_clock(body)
    finally:
        top.close()
    # The error stays the state until a write-back or a guest fsync succeeds (faults.WriteErrors).
    assert seen == [("need-check: Input/output error", True), ("need-check: Input/output error", False)]
    assert [(e["event"], e["data"]["origin"]) for e in events.events()] == [("BLOCK_IO_ERROR", "need-check")]


def test_the_write_back_timer_writes_l2_entries_every_interval_and_reports_a_failure(tmp_path, chain, monkeypatch):
    c = open_chain(str(chain.top))
    top = c.top
    unallocated = next(e for e in top.extents(0, chain.size) if e.status.value == "unallocated")
    fail_once(monkeypatch, top, "write_back", OSError(errno.ENOSPC, "No space left on device"))
    pending: list[bool] = []
    errors: list[str | None] = []

    async def body(nursery, write_errors):
        timer = WriteBackTimer(top, write_errors, run_sync=inline)
        await nursery.start(timer.run)
        start = trio.current_time()
        c.write(unallocated.offset, b"guest data")
        for tick in (1, 2):  # the first write-back fails, the second writes the entries
            await trio.sleep_until(start + tick * WRITE_BACK_INTERVAL - 0.01)
            pending.append(top.needs_write_back)
            await trio.sleep_until(start + tick * WRITE_BACK_INTERVAL + 0.01)
            errors.append(write_errors.error)
        pending.append(top.needs_write_back)
        timer.stop()

    try:
        events = run_on_mock_clock(body)
    finally:
        c.close()
    assert pending == [True, True, False]
    assert errors == ["write-back: No space left on device", None]
    assert [e["event"] for e in events.events()] == ["BLOCK_IO_ERROR"]


def test_a_mount_runs_the_stream_and_both_timers_and_read_only_only_the_stream(chain):
    for opts, writable, expected in ((MountOptions(), True, [Streamer, WriteBackTimer, NeedCheckTimer]),
                                     (MountOptions(ro=True), False, [Streamer])):
        c = open_chain(str(chain.top), writable=writable)
        try:
            assert [type(service) for service in build_mount(c, opts).services] == expected
        finally:
            c.close()


def test_stopping_the_stream_service_ends_a_running_job_between_steps(tmp_path, chain):
    c = open_chain(str(chain.top))
    finished: list[tuple[str, int]] = []

    async def body(nursery, _):
        streamer = Streamer(c, lambda *_: None, run_sync=inline)
        await nursery.start(streamer.run)
        job = streamer.start(speed=1 << 20)
        await trio.sleep(0.5)
        streamer.stop()
        await job.wait_finished()
        finished.append((job.state, job.offset))

    try:
        run_on_mock_clock(body)
        [(state, offset)] = finished
        assert state == "running" and 0 < offset < c.size  # not cancelled: the next mount resumes it
    finally:
        c.close()
