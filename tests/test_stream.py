"""The stream job on real image files, with trio's MockClock for every timing question.

The copy steps run inline (not in threads) here so that virtual time is deterministic; real
mounts (test_stream_mount.py) cover the threaded path.
"""

from __future__ import annotations

import errno
import functools
import json
import platform
import random

import pytest
import trio
import trio.testing
from conftest import (
    FaultyLayer,
    inline,
    qemu_check,
    qemu_convert,
    qemu_img,
    qemu_io,
    run,
    run_with_streamer,
    stream_to_end,
)

from fusestream import ioprio, stream
from fusestream.control import Control, EventLog, parse_command, render_status
from fusestream.copy import MAX_COPY, Copier
from fusestream.faults import WriteErrors
from fusestream.formats import qcow2
from fusestream.formats.layer import BlockStatus
from fusestream.sources import ReadFor
from fusestream.stream import (
    CANCELLED,
    COMPLETED,
    FAILED,
    GENTLE_COPY,
    PAUSED,
    RUNNING,
    CommandError,
    Streamer,
    StreamStatistics,
)


def test_full_stream_merges_every_layer(tmp_path, chain, open_chains):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    names = run_with_streamer(c, stream_to_end)
    assert c.top.backing_filename is None and len(c.layers) == 1
    assert c.read(0, chain.size) == expected
    c.close()
    assert names == ["STREAM_STARTED", "BACKING_CHANGED", "STREAM_COMPLETED"]
    info = json.loads(qemu_img("info", "--output=json", str(chain.top)))
    assert "backing-filename" not in info
    assert qemu_check(chain.top).returncode == 0
    assert qemu_convert(chain.top, tmp_path / "after.raw") == expected


def test_what_no_layer_holds_stays_unallocated(tmp_path, open_chains):
    """A sparse chain streams into a sparse image: holes and zeros are not written."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"\x01" * 65536)
        f.seek(20 << 20)
        f.write(bytes(1 << 20))  # written zeros: data that reads zero
    qemu_img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(tmp_path / "top.qed"))
    c = open_chains(tmp_path / "top.qed")
    run_with_streamer(c, stream_to_end)
    allocated = [e for e in c.top.extents(0, c.size) if e.status is not BlockStatus.UNALLOCATED]
    assert [(e.status, e.offset, e.length) for e in allocated] == [(BlockStatus.FOUND, 10 << 20, 65536)]
    c.close()
    assert (tmp_path / "top.qed").stat().st_blocks * 512 < 1 << 20


def allocated_clusters(image, cluster_size: int) -> set[int]:
    return {
        cluster
        for e in image.extents(0, image.size)
        if e.status is not BlockStatus.UNALLOCATED
        for cluster in range(e.offset // cluster_size, (e.offset + e.length) // cluster_size)
    }


def test_stream_onto_a_base_merges_only_the_layers_above_it(tmp_path, chain, open_chains):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    cs = chain.cluster_size
    before = allocated_clusters(c.top, cs) | allocated_clusters(c.layers[1], cs)
    run_with_streamer(c, stream_to_end, default_base=str(chain.base))
    assert [layer.path for layer in c.layers] == [str(chain.top), str(chain.base)]
    assert c.read(0, chain.size) == expected
    assert allocated_clusters(c.top, cs) == before  # mid merged; nothing only the base holds was copied
    c.close()
    info = json.loads(qemu_img("info", "--output=json", str(chain.top)))
    assert info["backing-filename"] == "base.raw" and info["backing-filename-format"] == "raw"
    assert qemu_check(chain.top).returncode == 0
    assert qemu_convert(chain.top, tmp_path / "after.raw") == expected


def test_a_zero_cluster_over_base_data_survives_the_rebase(tmp_path, open_chains):
    (tmp_path / "base.raw").write_bytes(b"\xee" * (1 << 20))
    qemu_img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", str(tmp_path / "mid.qed"))
    qemu_io(tmp_path / "mid.qed", "write -z 128K 64K", "write -P 3 512K 64K")
    qemu_img("create", "-f", "qed", "-b", "mid.qed", "-F", "qed", str(tmp_path / "top.qed"))
    expected = qemu_convert(tmp_path / "top.qed", tmp_path / "expected.raw")
    assert expected[128 << 10 : 192 << 10] == bytes(65536)
    c = open_chains(tmp_path / "top.qed")
    run_with_streamer(c, stream_to_end, default_base=str(tmp_path / "base.raw"))
    assert c.top.block_status(128 << 10, 65536) == (BlockStatus.ZERO, 65536)
    assert c.top.block_status(0, 65536)[0] is BlockStatus.UNALLOCATED  # base data, not copied
    c.close()
    assert qemu_convert(tmp_path / "top.qed", tmp_path / "after.raw") == expected


def test_speed_limits_the_copy_rate_in_virtual_time(chain, open_chains):
    c = open_chains(chain.top)
    speed = 512 * 1024
    result = {"top_before": sum(e.length for e in c.top.extents(0, c.size) if e.status is BlockStatus.FOUND)}

    async def body(streamer, events):
        start = trio.current_time()
        job = await stream_to_end(streamer, events, speed=speed)
        result["elapsed"] = trio.current_time() - start
        result["copied"] = sum(e.length for e in c.top.extents(0, c.size) if e.status is BlockStatus.FOUND)
        result["copied"] -= result["top_before"]
        assert job.state == COMPLETED

    run_with_streamer(c, body)
    c.close()
    # every copied byte is paid for at `speed`; the last chunk's payment ends the job
    assert result["elapsed"] == pytest.approx(result["copied"] / speed, rel=0.1)


def record_reads_for(c, monkeypatch, before=lambda: None) -> list[ReadFor]:
    """Whom each of the chain's backing reads is for, in order; `before` runs ahead of each."""
    reads: list[ReadFor] = []
    read_backing_into = c.read_backing_into

    def read(view, offset, read_for=ReadFor.GUEST):
        reads.append(read_for)
        before()
        return read_backing_into(view, offset, read_for)

    monkeypatch.setattr(c, "read_backing_into", read)
    return reads


@pytest.mark.parametrize(("speed", "quiet"), [(1 << 20, True), (10 * MAX_COPY, False), (0, False)],
                         ids=["throttled", "limit-above-max-step", "unlimited"])
def test_a_throttled_stream_reads_past_caches_and_prefetches_nothing(tmp_path, chain, monkeypatch, open_chains,
                                                                      speed, quiet):
    """The speed limit sets a throttled stream's pace: its data, read once, must not push the
    guest's out of the caches (direct reads), and prefetching gains it nothing. A limit that no
    step reaches leaves the full-speed path as it is."""
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    reads = record_reads_for(c, monkeypatch)
    prefetches: list[int] = []
    prefetch_backing = c.prefetch_backing

    def prefetch(offset, length, read_for=ReadFor.GUEST):
        prefetches.append(offset)
        prefetch_backing(offset, length, read_for)

    monkeypatch.setattr(c, "prefetch_backing", prefetch)
    run_with_streamer(c, functools.partial(stream_to_end, speed=speed))
    assert reads and set(reads) == {ReadFor.GENTLE if quiet else ReadFor.STREAM}
    assert bool(prefetches) is not quiet
    assert c.read(0, chain.size) == expected


def test_a_throttled_step_reads_a_plan_that_a_full_step_prefetched_where_the_prefetch_put_it(
        chain, open_chains, monkeypatch):
    """A full step prefetches the next one into the page cache; read O_DIRECT, as a throttled
    step reads, that data would come from the device a second time."""
    c = open_chains(chain.top)
    reads = record_reads_for(c, monkeypatch)
    copier = Copier(c, None)
    step = 4 * chain.cluster_size
    offset, _ = copier.copy_step(0, chain.size, step)  # full: plans and prefetches the next
    per_step = []
    for _ in range(2):
        reads.clear()
        offset, _ = copier.copy_step(offset, chain.size, step, throttled=True)
        per_step.append(set(reads))
    copier.close()
    assert per_step == [{ReadFor.STREAM}, {ReadFor.GENTLE}]


def test_a_throttled_stream_that_cannot_keep_up_with_its_limit_reads_at_full_speed(chain, open_chains, monkeypatch):
    """The limit holds a stream back only if its steps are quicker than it: steps whose reads
    take longer than their share of it (a slow device, a far server) are not throttled ones,
    and get full speed's prefetching and caches back."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    c = open_chains(chain.top)
    reads = record_reads_for(c, monkeypatch, before=lambda: clock.jump(1.0))  # 10x the step's 0.1 s share

    async def main():
        async with trio.open_nursery() as nursery:
            streamer = Streamer(c, EventLog("top.raw").emit, run_sync=inline)
            await nursery.start(streamer.run)
            job = await stream_to_end(streamer, None, speed=1 << 20)
            assert job.state == COMPLETED
            streamer.stop()

    trio.run(main, clock=clock)
    full = reads.index(ReadFor.STREAM)  # the first step is throttled (its ranges' reads), none after
    assert full > 0 and set(reads[:full]) == {ReadFor.GENTLE} and set(reads[full:]) == {ReadFor.STREAM}, reads


def test_speed_can_change_while_running(chain, open_chains):
    c = open_chains(chain.top)

    async def body(streamer, events):
        job = streamer.start(speed=64 * 1024)
        await trio.sleep(2)
        streamer.set_speed(0)
        start = trio.current_time()
        await job.wait_finished()
        assert trio.current_time() - start < 0.01  # unlimited: no more waiting
        assert job.state == COMPLETED

    run_with_streamer(c, body)


def test_pause_holds_progress_still_and_resume_finishes(tmp_path, chain, open_chains):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)

    async def body(streamer, events):
        job = streamer.start(speed=256 * 1024)
        await trio.sleep(1.0)
        streamer.pause()
        assert job.state == PAUSED
        await trio.sleep(0.2)  # the step in progress ends
        held = job.offset
        assert 0 < held < job.len
        await trio.sleep(30)
        assert job.offset == held and job.statistics().rate == 0
        with pytest.raises(CommandError):
            streamer.pause()
        streamer.resume()
        await job.wait_finished()
        assert job.state == COMPLETED

    names = run_with_streamer(c, body)
    assert names == ["STREAM_STARTED", "STREAM_PAUSED", "STREAM_RESUMED", "BACKING_CHANGED", "STREAM_COMPLETED"]
    assert c.read(0, chain.size) == expected


def test_cancel_takes_effect_at_once_and_leaves_the_chain_valid(tmp_path, chain, open_chains):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)

    async def body(streamer, events):
        job = streamer.start(speed=128 * 1024)
        await trio.sleep(1.0)
        streamer.cancel()
        cancelled_at = trio.current_time()
        await job.wait_finished()
        assert trio.current_time() - cancelled_at < 0.1
        assert job.state == CANCELLED and job.offset < job.len

    names = run_with_streamer(c, body)
    assert names == ["STREAM_STARTED", "STREAM_CANCELLED"]
    assert c.top.backing_filename == "mid.qed"
    c.close()
    assert qemu_check(chain.top).returncode == 0
    assert qemu_convert(chain.top, tmp_path / "after.raw") == expected


def test_guest_writes_during_a_stream_win(tmp_path, chain, open_chains):
    model = bytearray(qemu_convert(chain.top, tmp_path / "expected.raw"))
    c = open_chains(chain.top)
    rng = random.Random(5)

    async def body(streamer, events):
        job = streamer.start(speed=1 << 20)
        while job.state == RUNNING:
            for _ in range(20):
                length = rng.randrange(1, 20000)
                offset = rng.randrange(chain.size - length)
                data = rng.randbytes(length)
                c.write(offset, data)
                model[offset : offset + length] = data
            await trio.sleep(0.05)
        assert job.state == COMPLETED

    run_with_streamer(c, body)
    assert c.read(0, chain.size) == model
    c.close()
    assert qemu_check(chain.top).returncode == 0
    assert qemu_convert(chain.top, tmp_path / "after.raw") == model


def test_a_guest_write_racing_the_copy_wins(tmp_path, chain, open_chains):
    """The guest writes into a range after the job has read it from the backing chain and before
    it installs it: the guest's data must survive."""
    c = open_chains(chain.top)
    read_backing_into = c.read_backing_into
    raced: list[int] = []

    def read_then_guest_writes(view, offset, read_for=ReadFor.GUEST):
        filled = read_backing_into(view, offset, read_for)
        if not raced:
            c.write(offset + 100, b"guest" * 1000)
            raced.append(offset + 100)
        return filled

    c.read_backing_into = read_then_guest_writes
    run_with_streamer(c, stream_to_end)
    assert raced and c.read(raced[0], 5000) == b"guest" * 1000
    c.close()
    assert qemu_check(chain.top).returncode == 0


@pytest.mark.parametrize("busy", [True, False], ids=["guest-busy", "guest-quiet"])
def test_the_job_gives_way_to_a_busy_guest(tmp_path, chain, monkeypatch, busy, open_chains):
    """While the guest reads or writes, each step is small, read exactly (O_DIRECT, no
    readahead) and installed before the next read starts; when it is quiet, full steps."""
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    monkeypatch.setattr(stream, "GUEST_BUSY_SECONDS", 3600.0 if busy else 0.0)
    c = open_chains(chain.top)
    steps: list[tuple[int, bool, bool]] = []  # (max_read, gentle, an install still pending after it)
    reads_for: set[ReadFor] = set()
    read_backing_into = c.read_backing_into

    def recording_read(view, offset, read_for=ReadFor.GUEST):
        reads_for.add(read_for)
        return read_backing_into(view, offset, read_for)

    async def recording_run_sync(fn, *args):
        result = fn(*args)
        if fn.__name__ == "copy_step":
            steps.append((args[2], args[3], fn.__self__._pending is not None))
        return result

    c.read_backing_into = recording_read
    prefetches: list[int] = []
    prefetch_backing = c.prefetch_backing
    c.prefetch_backing = lambda offset, length, read_for: prefetches.append(offset) or prefetch_backing(
        offset, length, read_for)
    events = EventLog("top.raw")

    async def main():
        async with trio.open_nursery() as nursery:
            streamer = Streamer(c, events.emit, run_sync=recording_run_sync)
            await nursery.start(streamer.run)
            streamer.guest.note()  # the guest
            job = streamer.start()
            await job.wait_finished()
            assert job.state == COMPLETED
            streamer.stop()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert c.read(0, chain.size) == expected
    c.close()
    if busy:
        assert steps and all(step == (GENTLE_COPY, True, False) for step in steps)
        assert reads_for == {ReadFor.GENTLE} and not prefetches
    else:
        assert steps and all(max_read == MAX_COPY and not gentle for max_read, gentle, _ in steps)
        assert reads_for == {ReadFor.STREAM} and prefetches


def record_steps(c, monkeypatch) -> list[tuple[str, int]]:
    """Record ("prefetch", offset) and ("read", offset) of the chain's backing I/O, in order."""
    calls: list[tuple[str, int]] = []
    prefetch_backing, read_backing_into = c.prefetch_backing, c.read_backing_into

    def prefetch(offset, length, read_for=ReadFor.GUEST):
        calls.append(("prefetch", offset))
        prefetch_backing(offset, length, read_for)

    def read(view, offset, read_for=ReadFor.GUEST):
        calls.append(("read", offset))
        return read_backing_into(view, offset, read_for)

    monkeypatch.setattr(c, "prefetch_backing", prefetch)
    monkeypatch.setattr(c, "read_backing_into", read)
    return calls


def test_each_step_prefetches_the_next_steps_data_before_reading_its_own(tmp_path, chain, monkeypatch, open_chains):
    """So the device reads a step ahead of the copy. Every range is planned and prefetched once,
    one step before it is read (the first step's own, just before)."""
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    calls = record_steps(c, monkeypatch)
    copier = Copier(c, None, pipelined=True)
    offset, step = 0, 0
    prefetched_in: dict[int, int] = {}
    read_in: dict[int, int] = {}
    while offset < chain.size:
        calls.clear()
        offset, _ = copier.copy_step(offset, chain.size, max_read=4 * chain.cluster_size)
        for kind, at in calls:
            record = prefetched_in if kind == "prefetch" else read_in
            assert at not in record, f"{kind} of {at} twice"
            record[at] = step
        step += 1
    copier.close()
    assert step > 10 and read_in
    assert prefetched_in.keys() == read_in.keys()
    first = min(read_in.values())
    assert all(prefetched_in[at] == max(first, read_in[at] - 1) for at in read_in)
    c.rebase(copier.base_index)
    assert c.read(0, chain.size) == expected
    c.close()
    assert qemu_check(chain.top).returncode == 0


def copy_until_a_step_is_planned_ahead(copier, calls, size: int, max_read: int) -> tuple[int, list[int]]:
    """Copy steps until one prefetches data for the next; returns where it stopped and the
    offsets of the next step's ranges."""
    offset = 0
    while offset < size:
        calls.clear()
        offset, _ = copier.copy_step(offset, size, max_read)
        read = {at for kind, at in calls if kind == "read"}
        ahead = [at for kind, at in calls if kind == "prefetch" and at not in read and at >= offset]
        if ahead:
            return offset, ahead
    raise AssertionError("no step was planned ahead")


def test_a_step_planned_ahead_is_planned_again_when_asked_for_less(tmp_path, chain, monkeypatch, open_chains):
    """The speed limit or a busy guest may shrink the next step: the plan made for a bigger one
    must not be used for it, and the smaller steps still copy every byte of the chain."""
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    calls = record_steps(c, monkeypatch)
    copier = Copier(c, None, pipelined=True)
    big, small = 16 * chain.cluster_size, chain.cluster_size
    offset, _ = copy_until_a_step_is_planned_ahead(copier, calls, chain.size, big)
    while offset < chain.size:
        offset, transferred = copier.copy_step(offset, chain.size, max_read=small, gentle=True)
        assert transferred <= small
    copier.close()
    c.rebase(copier.base_index)
    assert c.read(0, chain.size) == expected
    c.close()
    assert qemu_check(chain.top).returncode == 0
    assert qemu_convert(chain.top, tmp_path / "after.raw") == expected  # the top alone, no backing file


@pytest.fixture
def normal_io_class(monkeypatch):
    """The test's thread, and the daemon's class as ioprio remembers it, in the class a thread
    has without ionice, so that a runner under `ionice -c3` still tells idle from normal; the
    thread's class back after. Skipped only where ioprio does not know the machine's syscall
    numbers: there idle_class does nothing, by design."""
    before = ioprio.get()
    if before is None:
        pytest.skip(f"no ioprio syscall numbers for {platform.machine()}: idle_class does nothing here")
    assert ioprio._set(0)
    monkeypatch.setattr(ioprio, "STARTED_WITH", 0)
    yield
    ioprio._set(before)


def test_gentle_steps_read_in_the_idle_io_class(tmp_path, chain, monkeypatch, open_chains, normal_io_class):
    """A gentle step's reads are in the idle I/O class, so that the kernel holds them back while
    a guest read is at the device; its populate (in the populate thread, holding the allocation
    lock that guest writes wait for) is not, nor are full-speed steps; and the reading thread,
    a worker that serves guest requests too, gets its class back after the step."""
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    seen: list[tuple[str, bool, int]] = []  # (what, gentle, the I/O priority it ran with)
    read_backing_into, populate = c.read_backing_into, c.populate
    gentle_now = False

    def read(view, offset, read_for=ReadFor.GUEST):
        seen.append(("read", gentle_now, ioprio.get()))
        return read_backing_into(view, offset, read_for)

    def record_populate(copies, zero_clusters):
        seen.append(("populate", gentle_now, ioprio.get()))
        return populate(copies, zero_clusters)

    monkeypatch.setattr(c, "read_backing_into", read)
    monkeypatch.setattr(c, "populate", record_populate)
    copier = Copier(c, None, pipelined=True)
    before = ioprio.get()
    offset = 0
    while offset < chain.size:
        gentle_now = not gentle_now
        offset, _ = copier.copy_step(offset, chain.size, max_read=4 * chain.cluster_size, gentle=gentle_now)
        copier.drain()
        assert ioprio.get() == before
    copier.close()
    assert {what for what, gentle, _ in seen if gentle} == {"read", "populate"}
    assert {what for what, gentle, _ in seen if not gentle} == {"read", "populate"}
    assert all((priority == ioprio.IDLE) == (gentle and what == "read") for what, gentle, priority in seen), seen
    c.rebase(copier.base_index)
    assert c.read(0, chain.size) == expected
    c.close()


def test_threads_a_gentle_read_starts_do_not_keep_its_idle_io_class(monkeypatch, normal_io_class):
    """A gentle read of compressed qcow2 clusters may start the inflate pool's threads; Linux
    gives a new thread its creator's class, and the pool serves guest reads for good after."""
    monkeypatch.setattr(qcow2, "_POOL", None)
    with ioprio.idle_class():
        assert ioprio.get() == ioprio.IDLE
        pool = qcow2._inflate_pool()
        started_inside = pool.submit(ioprio.get).result()
    pool.shutdown()
    assert started_inside == ioprio.STARTED_WITH != ioprio.IDLE


def test_a_step_looks_up_the_merged_layers_only_as_far_as_it_copies(tmp_path, chain, monkeypatch, open_chains):
    """Over a fresh top, one unallocated run covers the whole disk; a small step must not ask
    the layers below about all of it."""
    fresh = tmp_path / "fresh.qed"
    qemu_img("create", "-f", "qed", "-o", f"cluster_size={chain.cluster_size}", "-b", chain.mid.name, "-F", "qed",
             str(fresh), str(chain.size))
    c = open_chains(fresh)
    lookups = []
    status_above = c.status_above
    monkeypatch.setattr(c, "status_above", lambda *args: lookups.append(args) or status_above(*args))
    copier = Copier(c, None)
    end, _ = copier.copy_step(0, chain.size, max_read=2 * chain.cluster_size)  # and plans the next step
    first_step = len(lookups)
    copier.copy_range(end, chain.size - end)
    copier.close()
    c.close()
    assert len(lookups) > 20 and first_step * 4 < len(lookups), (first_step, len(lookups))


def test_a_guest_write_into_a_step_planned_ahead_wins(chain, monkeypatch, open_chains):
    """A step's plan is made while the step before it is copied; the guest writes into its range
    in between. The guest's data must survive the step."""
    c = open_chains(chain.top)
    calls = record_steps(c, monkeypatch)
    copier = Copier(c, None, pipelined=True)
    offset, ahead = copy_until_a_step_is_planned_ahead(copier, calls, chain.size, 4 * chain.cluster_size)
    target = ahead[0] + 100
    c.write(target, b"guest" * 1000)
    while offset < chain.size:
        offset, _ = copier.copy_step(offset, chain.size, max_read=4 * chain.cluster_size)
    copier.close()
    assert c.read(target, 5000) == b"guest" * 1000
    c.close()
    assert qemu_check(chain.top).returncode == 0


def test_a_new_job_resumes_where_the_allocation_says_and_copies_nothing_twice(tmp_path, chain, open_chains):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    for path in (chain.base, chain.mid, chain.top):
        run("cp", "--sparse=always", str(path), str(reference_dir / path.name))  # holes stay holes
    copied: list[int] = []  # bytes each step read from the backing chain

    async def counting(fn, *args):
        result = fn(*args)
        if fn.__name__ == "copy_step":
            copied.append(result[1])
        return result

    def run_job(image, interrupt_after: float | None) -> int:
        copied.clear()
        c = open_chains(image)

        async def main():
            async with trio.open_nursery() as nursery:
                streamer = Streamer(c, lambda *_: None, run_sync=counting)
                await nursery.start(streamer.run)
                job = streamer.start(speed=256 * 1024)
                if interrupt_after is not None:
                    await trio.sleep(interrupt_after)
                    job.cancel()
                await job.wait_finished()
                streamer.stop()

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        c.close()
        return sum(copied)

    first = run_job(chain.top, interrupt_after=2.0)
    second = run_job(chain.top, interrupt_after=None)  # as a new mount would
    whole = run_job(reference_dir / chain.top.name, interrupt_after=None)
    assert 0 < first < whole
    assert first + second == whole
    assert qemu_img("info", str(chain.top)).count("backing file") == 0


def test_a_backing_read_error_fails_the_job_and_a_later_stream_completes(tmp_path, chain, open_chains):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    faulty = FaultyLayer(c.layers[2], 0, chain.size)  # the raw base fails everywhere
    c.layers[2] = faulty
    events = EventLog("top.raw")

    async def body(streamer, _):
        job = await stream_to_end(streamer, events)
        assert job.state == FAILED
        assert "read error in the backing chain at offset" in job.error and "Input/output error" in job.error
        assert "last stream failed: read error" in render_status("top.raw", streamer.statistics())
        faulty.failing = False
        job = await stream_to_end(streamer, events)
        assert job.state == COMPLETED

    async def main():
        async with trio.open_nursery() as nursery:
            streamer = Streamer(c, events.emit, run_sync=inline)
            await nursery.start(streamer.run)
            await body(streamer, events)
            streamer.stop()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    failed = next(e for e in events.events() if e["event"] == "STREAM_FAILED")
    assert "offset" in failed["data"] and "Input/output error" in failed["data"]["error"]
    assert c.read(0, chain.size) == expected
    c.close()
    assert qemu_check(chain.top).returncode == 0


def test_a_short_read_from_a_layer_fails_the_job_and_is_never_written_as_zeros(tmp_path, chain, open_chains):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    faulty = FaultyLayer(c.layers[2], 0, chain.size, short=True)
    c.layers[2] = faulty

    async def body(streamer, events):
        job = await stream_to_end(streamer, events)
        assert job.state == FAILED and "short read from the backing chain" in job.error
        faulty.failing = False
        assert (await stream_to_end(streamer, events)).state == COMPLETED

    run_with_streamer(c, body)
    assert c.read(0, chain.size) == expected


def test_a_slow_layer_streams_correctly_and_cancel_is_prompt(tmp_path, chain, open_chains):
    """Real worker threads and real time: each backing read takes 20 ms."""
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    slow = FaultyLayer(c.layers[2], 0, 0, delay=0.02)
    c.layers[2] = slow
    events = EventLog("top.raw")

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                streamer = Streamer(c, events.emit)
                await nursery.start(streamer.run)
                job = streamer.start(speed=1 << 20)
                await trio.sleep(0.3)
                assert job.state == RUNNING
                streamer.cancel()
                cancelled_at = trio.current_time()
                await job.wait_finished()
                assert job.state == CANCELLED and trio.current_time() - cancelled_at < 3.0  # uncancelled: 7 s more
                job = streamer.start()
                await job.wait_finished()
                assert job.state == COMPLETED
                streamer.stop()

    trio.run(main)
    assert c.read(0, chain.size) == expected


def test_enospc_on_the_top_image_fails_the_job_without_corruption(tmp_path, chain, monkeypatch, open_chains):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    c = open_chains(chain.top)
    real_append = c.top.alloc._append_clusters
    calls = {"n": 0}

    def append_until_full(data, below):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(data, below)

    monkeypatch.setattr(c.top.alloc, "_append_clusters", append_until_full)

    async def body(streamer, events):
        job = await stream_to_end(streamer, events)
        assert job.state == FAILED and "No space left on device" in job.error
        assert c.read(0, chain.size) == expected  # still served, still right
        job = await stream_to_end(streamer, events)
        assert job.state == COMPLETED

    names = run_with_streamer(c, body)
    assert names.count("STREAM_FAILED") == 1 and names[-1] == "STREAM_COMPLETED"
    c.close()
    assert qemu_check(chain.top).returncode == 0
    assert qemu_convert(chain.top, tmp_path / "after.raw") == expected


# -- commands and rendering ----------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [
    ("stream\n", ("stream", {})),
    ("stream speed=10M\n", ("stream", {"speed": 10 << 20})),
    ("stream base=/x/base.raw speed=0\n", ("stream", {"base": "/x/base.raw", "speed": 0})),
    ("rebase /x/base.raw\n", ("stream", {"base": "/x/base.raw"})),
    ("speed 1G\n", ("speed", {"speed": 1 << 30})),
    ("pause\n", ("pause", {})),
    ("resume", ("resume", {})),
    ("cancel\n", ("cancel", {})),
])
def test_valid_commands(text, parsed):
    assert parse_command(text) == parsed


@pytest.mark.parametrize("text", [
    "", "\n", "frobnicate\n", "stream base\n", "stream speed=fast\n", "stream bogus=1\n", "stream speed=1 speed=2\n",
    "rebase\n", "rebase a b\n", "speed\n", "pause now\n", "pause\nresume\n", "stream 'unterminated\n",
])
def test_invalid_commands(text):
    with pytest.raises(CommandError):
        parse_command(text)


def test_a_rejected_command_changes_nothing_and_is_an_event(chain, open_chains):
    c = open_chains(chain.top)

    async def body(streamer, events):
        control = Control("top.raw", c, streamer, events, WriteErrors("top.raw", events.emit))
        for bad in (b"resume\n", b"cancel\n", b"stream base=/not/in/chain\n", b"\xff\xfe\n", b"bogus\n"):
            with pytest.raises(CommandError):
                control.command(bad)
        assert streamer.job is None
        control.command(b"stream speed=1M\n")
        with pytest.raises(CommandError, match="already running"):
            control.command(b"stream\n")
        control.command(b"cancel\n")

    names = run_with_streamer(c, body)
    c.close()
    assert names[:5] == ["COMMAND_REJECTED"] * 5 and names[5] == "STREAM_STARTED"


def test_status_lines_use_the_seeds_wording():
    running = StreamStatistics(RUNNING, 536870912, 1073741824, 0, 410 << 20, None, None, "mid.qed",
                               remaining=536870912)
    assert render_status("top.raw", running) == (
        "Streaming top.raw: Completed 536870912 of 1073741824 bytes (50.0%, 410 MiB/s, 1 s left)\n")
    done = StreamStatistics(COMPLETED, 1 << 30, 1 << 30, 0, 0, None, None, None)
    assert render_status("top.raw", done) == "No active stream; last stream completed, backing file removed\n"
    idle = StreamStatistics("idle", 0, 1 << 30, 0, 0, None, None, "mid.qed")
    assert render_status("top.raw", idle) == "No active stream\n"
