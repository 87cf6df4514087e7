"""The stream job: copy the data of the backing chain into the top image while it is in use.

QEMU's block-stream, as a trio service (`Streamer`, started with `nursery.start`) that runs one
job at a time. The copying itself (copy.Copier) is synchronous and runs in a worker thread, a
step at a time, so guest I/O keeps flowing on the event loop; between steps the job honours
pause, cancel, the rate limit and a busy guest. Guest writes win because the copy only fills
clusters that are still unallocated when it takes the allocation lock (QedImage.populate).
Copy-on-read (`CopyOnRead`) copies what guest reads touch with copiers of its own.

Progress follows QEMU's block-job meaning: `offset` of `len` bytes of the virtual disk. Time is
trio's clock throughout, so tests drive the job with trio.testing.MockClock.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import outcome
import trio

from .chain import Chain, StatusWalk
from .copy import Copier
from .errors import BackingFileError, CommandError, FusestreamError, StreamError
from .faults import EventSink
from .formats.layer import Layer
from .services import Service
from .sources import ReadFor, display_name

if TYPE_CHECKING:
    from .faults import WriteErrors

log = logging.getLogger(__name__)

# While the guest is busy (it read or wrote within GUEST_BUSY_SECONDS), the job gives way:
# gentle steps of at most GENTLE_COPY, read exactly (no readahead) and populated before the next
# read, so the guest's next request finds at most one small I/O of the stream ahead of it at the
# device, not megabytes. Measured with bench/stream_bench.py (docs/performance.md).
GENTLE_COPY = 64 * 1024
GUEST_BUSY_SECONDS = 0.1
# Copy-on-read copies in flight at once (more guest reads wait): each copier keeps a buffer of
# one step, up to 64 MiB with 64 MiB clusters, and is reused by the reads that follow.
COPY_ON_READ_COPIERS = 2
# The job's count of what to copy walks a window of the disk per worker-thread call: the first
# COUNT_WINDOW_CLUSTERS, then twice as many after a call shorter than COUNT_CALL_SECONDS and half
# as many after one more than twice as long. Over sparse space a window costs little and the
# hand-off is the cost: a 1 TiB disk in fixed 64 MiB windows took 16384 calls, whose thread
# hand-offs cost the stream beside it a fifth of its time (bench/shapes_bench.py, terabyte).
# The cap keeps one call short where allocated tables follow a sparse stretch: 65536 lookups,
# a few tenths of a second, which a cancel or the job's end waits for.
COUNT_WINDOW_CLUSTERS = 1024
MAX_COUNT_WINDOW_CLUSTERS = 1 << 16
COUNT_CALL_SECONDS = 0.005
RATE_WINDOW = 3.0  # seconds of progress history behind the measured rate
RATE_LAG = 1.0  # seconds without a step after which the measured rate starts to fall

IDLE, RUNNING, PAUSED, COMPLETED, CANCELLED, FAILED = "idle", "running", "paused", "completed", "cancelled", "failed"


@dataclasses.dataclass(frozen=True)
class StreamStatistics:
    """A snapshot of the job, with the keys of status.json's "stream" object (the stable ones of
    docs/mount.fusestream.md first, then those that issue 12 added)."""

    state: str
    offset: int
    len: int
    speed: int
    rate: int  # bytes read from the backing chain per second: what `speed` limits
    base: str | None
    error: str | None
    backing_file: str | None  # the top's backing file once the job ended
    copied: int = 0  # bytes read from the backing chain so far
    remaining: int | None = None  # bytes still to copy, once the job has counted them
    progress_rate: int = 0  # bytes of `offset` per second (skipped space included)

    @property
    def seconds_left(self) -> float | None:
        """The bytes still to copy at the copy rate; with nothing left to copy, the rest of the
        disk at the rate of progress. None while a rate is still being measured, and when no
        job runs."""
        if self.state != RUNNING or self.remaining is None:
            return None
        if self.remaining:
            return self.remaining / self.rate if self.rate else None
        skipped = self.len - self.offset
        if not skipped:
            return 0.0
        return skipped / self.progress_rate if self.progress_rate else None


class ProgressRate:
    """Bytes copied and bytes of progress per second over the last RATE_WINDOW seconds:
    measured, not guessed.

    A sample is taken when a step has been paid for (after the rate limit's wait), so the rate
    is the true one from the first step on: a step that was read at once but is paid for over
    the next tenth of a second does not count as done in no time. Between samples the
    measurement ends at the last one, unless it is more than RATE_LAG old: then the silence
    counts too, so a stalled job shows its rate falling."""

    def __init__(self) -> None:
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def record(self, now: float, offset: int, copied: int) -> None:
        self._samples.append((now, offset, copied))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()

    @property
    def started(self) -> bool:
        return bool(self._samples)

    def rates(self, now: float) -> tuple[int, int]:
        """(bytes copied per second, bytes of progress per second); zeros until measured."""
        if len(self._samples) < 2:
            return 0, 0
        (t0, offset0, copied0), (t1, offset1, copied1) = self._samples[0], self._samples[-1]
        elapsed = max(t1, now - RATE_LAG) - t0
        if elapsed <= 0:
            return 0, 0
        return int((copied1 - copied0) / elapsed), int((offset1 - offset0) / elapsed)

    def reset(self) -> None:
        self._samples.clear()


RunSync = Callable[..., Awaitable]


class GuestActivity:
    """When the guest last read, wrote or discarded, on trio's clock: fs.Operations notes each
    request of the raw file as it arrives (on the event loop), and the stream job gives way
    while the last one is recent."""

    def __init__(self) -> None:
        self.last = -math.inf
        self.last_in_thread = -math.inf  # note_in_thread's, on the monotonic clock
        self.served_elsewhere: Callable[[], int] | None = None  # a count of requests note() does not see
        self._seen_elsewhere = 0

    def note(self) -> None:
        self.last = trio.current_time()

    def note_in_thread(self) -> None:
        """note() for a request served outside the event loop, from any thread (trio's clock is
        the loop's): a native thread's read through the chain (Operations.read_unmapped)."""
        self.last_in_thread = time.monotonic()

    def busy(self) -> bool:
        if self.served_elsewhere is not None:  # the mount's native reads (native_reads.py)
            seen = self.served_elsewhere()
            if seen != self._seen_elsewhere:
                self._seen_elsewhere = seen
                self.note()
        return (trio.current_time() - self.last < GUEST_BUSY_SECONDS
                or time.monotonic() - self.last_in_thread < GUEST_BUSY_SECONDS)


def shown_backing_file(chain: Chain) -> str | None:
    """The top image's backing file name as status and events show it: a URL without
    credentials."""
    name = chain.backing_filename
    return None if name is None else display_name(name)


class StreamJob:
    """One run of streaming over the whole virtual disk."""

    def __init__(self, chain: Chain, base: Layer | None, speed: int, emit: EventSink, guest: GuestActivity,
                 run_sync: RunSync = trio.to_thread.run_sync):
        self.chain = chain
        self.guest = guest
        self.run_sync = run_sync  # how blocking copy steps run: worker threads, or inline in tests
        self.copier = Copier(chain, base, pipelined=True)
        self.base_path = base.path if base is not None else None
        self.speed = speed
        self.emit = emit
        self.state = RUNNING
        self.offset = 0
        self.len = chain.size
        self.error: str | None = None
        self._progress = ProgressRate()
        self.copied = 0  # bytes read from the backing chain
        self.to_copy: int | None = None  # what the whole job reads, once counted (_count_to_copy)
        self._wakeup = trio.Event()
        self._cancel_requested = False
        self._completing = False  # past the point of no return: the rebase has begun
        self._next_slot = 0.0
        self._held_back = True  # the speed limit made the last step wait (until shown otherwise)
        self._finished = trio.Event()

    # -- commands (called on the event loop) ----------------------------------------------------

    def pause(self) -> None:
        self.state = PAUSED
        self._progress.reset()
        self.emit("STREAM_PAUSED", {"offset": self.offset, "len": self.len})

    def resume(self) -> None:
        self.state = RUNNING
        self._wake()
        self.emit("STREAM_RESUMED", {"offset": self.offset, "len": self.len})

    def cancel(self) -> None:
        """Cancel the job, unless it is already completing: then the command is refused, so
        that its answer is what happens."""
        if self._completing:
            raise CommandError("cannot cancel: the stream is completing")
        self._cancel_requested = True
        self._wake()

    def set_speed(self, speed: int) -> None:
        self.speed = speed
        self._next_slot = 0.0
        self._held_back = True
        self._wake()

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = trio.Event()

    async def wait_finished(self) -> None:
        await self._finished.wait()

    def statistics(self) -> StreamStatistics:
        rate, progress_rate = self._progress.rates(trio.current_time()) if self.state == RUNNING else (0, 0)
        remaining = None if self.to_copy is None else max(0, self.to_copy - self.copied)
        if self.offset >= self.len:
            remaining = 0
        return StreamStatistics(self.state, self.offset, self.len, self.speed, rate, self.base_path, self.error,
                                shown_backing_file(self.chain), self.copied, remaining, progress_rate)

    # -- the job ----------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            # Even when the mount is going away (cancelled), the populate in flight must finish
            # before anyone may close the image.
            with trio.CancelScope(shield=True):
                await self._close_copier()
            self._finished.set()

    async def _close_copier(self) -> None:
        try:
            await self.run_sync(self.copier.close)
        except (OSError, FusestreamError) as err:  # a populate that failed after the job ended
            log.error("stream of %s: %s", self.chain.path, err)

    async def _run(self) -> None:
        try:
            await self._copy_all()
            await self.run_sync(self.copier.drain)
            if self._cancel_requested:
                self.state = CANCELLED
                self.emit("STREAM_CANCELLED", {"offset": self.offset, "len": self.len})
                return
            self._completing = True  # no await since the check above: a cancel is seen or refused
            base = await self.run_sync(self.chain.rebase, self.copier.base_index)
            self.state = COMPLETED
            self.emit("BACKING_CHANGED", {"backing_file": shown_backing_file(self.chain),
                                          "base": base.path if base is not None else None})
            self.emit("STREAM_COMPLETED", {"offset": self.offset, "len": self.len})
        except (OSError, FusestreamError) as err:
            self.state = FAILED
            self.error = str(err) if isinstance(err, StreamError) else f"offset {self.offset}: {err}"
            log.error("stream of %s failed: %s", self.chain.path, self.error)
            self.emit("STREAM_FAILED", {"offset": self.offset, "len": self.len, "error": self.error})

    async def _copy_all(self) -> None:
        """Copy step by step, while a second task counts what there is to copy. An error of the
        copy leaves as itself, not inside the nursery's exception group, for _run to report."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._count_to_copy)
            result = await outcome.acapture(self._copy_steps)
            nursery.cancel_scope.cancel()
        result.unwrap()

    async def _copy_steps(self) -> None:
        while self.offset < self.len:
            await self._wait_while_paused()
            if self._cancel_requested:
                return
            if not self._progress.started:  # the start, or a resume
                self._progress.record(trio.current_time(), self.offset, self.copied)
            gentle = self.guest.busy()
            throttled = self._throttled()
            started = trio.current_time()
            self.offset, transferred = await self.run_sync(
                self.copier.copy_step, self.offset, self.len, self._max_read(gentle), gentle, throttled)
            self.copied += transferred
            await self._throttle(transferred, trio.current_time() - started)
            if self.state == RUNNING:  # a pause meanwhile starts the measurement again at the resume
                self._progress.record(trio.current_time(), self.offset, self.copied)

    async def _count_to_copy(self) -> None:
        """Set `to_copy`, for the time left: the bytes the whole job reads, counted by walking its
        plan (copy.Copier.bytes_to_copy, no data read: linear in the chain, about 0.06 s per GiB of
        disk under allocated tables) a window at a time (next_count_window), in a worker thread
        beside the copy, so that counting does not delay it.

        The count stays exact although the copy allocates in the top image meanwhile: a window
        counts only if, once counted, no step taken so far reaches into it (Copier.taken is
        set before a step populates anything). Otherwise the copy got there first: the count
        goes on from where the steps taken end, plus the bytes those read."""
        walk = StatusWalk(self.len)
        clusters = COUNT_WINDOW_CLUSTERS
        pos, counted = 0, 0
        while pos < self.len:
            window = clusters * self.chain.cluster_size
            started = time.monotonic()
            try:
                ahead = await self.run_sync(self.copier.bytes_to_copy, pos, min(self.len, pos + window), walk)
            except (OSError, FusestreamError) as err:  # the copy meets it too, and fails with it
                log.warning("stream of %s: cannot count what is left to copy: %s", self.chain.path, err)
                return
            clusters = next_count_window(clusters, time.monotonic() - started)
            taken_to, taken_bytes = self.copier.taken
            if taken_to > pos:
                pos, counted = taken_to, taken_bytes
            else:
                pos, counted = min(self.len, pos + window), counted + ahead
        self.to_copy = counted

    def _max_read(self, gentle: bool) -> int:
        """Read at most a tenth of a second's worth per step at the speed limit, in whole
        clusters, so that pause, cancel and speed changes take effect quickly; less while the
        guest is busy. Unlimited: the copier's largest step (bigger for remote layers)."""
        cs = self.chain.cluster_size
        limit = GENTLE_COPY if gentle else self.copier.max_step
        if self.speed:
            limit = min(limit, self.speed // 10)
        return max(cs, limit - limit % cs)

    async def _wait_while_paused(self) -> None:
        while self.state == PAUSED and not self._cancel_requested:
            await self._wakeup.wait()

    def _throttled(self) -> bool:
        """Whether the speed limit, not the device, sets the pace: it cuts the steps below
        max_step (see _max_read) and made the last one wait. A step that could not keep up
        with the limit is followed by a full-speed one (prefetched, through the caches)."""
        return bool(self.speed) and self.speed // 10 < self.copier.max_step and self._held_back

    async def _throttle(self, transferred: int, took: float) -> None:
        """QEMU's rate limit: bytes read from the backing chain (not skipped ones) are paid for
        at `speed` bytes/s. A step that `took` less than its share holds the job back."""
        if not self.speed or not transferred:
            return
        now = trio.current_time()
        self._held_back = took < transferred / self.speed
        self._next_slot = max(self._next_slot, now) + transferred / self.speed
        while trio.current_time() < self._next_slot and not self._cancel_requested and self.speed:
            with trio.move_on_at(self._next_slot):
                await self._wakeup.wait()


def next_count_window(clusters: int, seconds: float) -> int:
    """The count's next window, in clusters, after one of `clusters` took `seconds`: calls of
    about COUNT_CALL_SECONDS, each short enough to leave the copy and the event loop their
    turns, and few enough over sparse space that the hand-offs cost nothing."""
    if seconds < COUNT_CALL_SECONDS:
        return min(MAX_COUNT_WINDOW_CLUSTERS, clusters * 2)
    if seconds > 2 * COUNT_CALL_SECONDS:
        return max(COUNT_WINDOW_CLUSTERS, clusters // 2)
    return clusters


class Streamer(Service):
    """The stream service of one mounted image: runs one job at a time in its own nursery,
    started by the mount or by ctl commands, which it checks against the job's state. Stopping
    the service cancels a running job between two steps; the next mount resumes it."""

    def __init__(self, chain: Chain, emit: EventSink, default_base: str | None = None, default_speed: int = 0,
                 run_sync: RunSync = trio.to_thread.run_sync):
        super().__init__()
        self.chain = chain
        self.run_sync = run_sync
        self.emit = emit
        self.default_base = default_base  # -o base=PATH: for `stream` without base= and copy-on-read
        self.default_speed = default_speed
        self.guest = GuestActivity()
        self.job: StreamJob | None = None
        self._nursery: trio.Nursery | None = None  # the jobs', while the service runs

    async def serve(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    @property
    def active(self) -> bool:
        return self.job is not None and self.job.state in (RUNNING, PAUSED)

    def statistics(self) -> StreamStatistics:
        if self.job is None:
            return StreamStatistics(IDLE, 0, self.chain.size, self.default_speed, 0, None, None,
                                    shown_backing_file(self.chain))
        return self.job.statistics()

    def start(self, base: str | None = None, speed: int | None = None) -> StreamJob:
        """Start a job (the service must be running)."""
        if self.active:
            raise CommandError("a stream is already running (cancel it first)")
        if not self.chain.writable:
            raise CommandError("the image is mounted read-only")
        base_layer = self._base_layer(base or self.default_base)
        speed = self.default_speed if speed is None else speed
        self.job = StreamJob(self.chain, base_layer, speed, self.emit, self.guest, self.run_sync)
        self.emit("STREAM_STARTED", {"len": self.job.len, "speed": speed, "base": self.job.base_path})
        self._nursery.start_soon(self.job.run)
        return self.job

    def _base_layer(self, base: str | None) -> Layer | None:
        if base is None:
            return None
        try:
            return self.chain.base_layer_named(base)
        except BackingFileError as err:
            raise CommandError(str(err)) from None

    def copy_on_read_base(self) -> Layer | None:
        """The base a copy-on-read stops above: the running job's, else the mount's, unless a
        finished stream has already merged it away."""
        if self.active:
            return self.job.copier.base
        return self.chain.find_layer(self.default_base) if self.default_base else None

    def pause(self) -> None:
        self._require(RUNNING, "pause").pause()

    def resume(self) -> None:
        self._require(PAUSED, "resume").resume()

    def cancel(self) -> None:
        if not self.active:
            ended = {COMPLETED: "has completed", CANCELLED: "was cancelled", FAILED: "has failed"}
            state = self.job.state if self.job else IDLE
            raise CommandError(f"cannot cancel: the stream {ended[state]}" if state in ended else "no stream to cancel")
        self.job.cancel()

    def set_speed(self, speed: int) -> None:
        self.default_speed = speed
        if self.active:
            self.job.set_speed(speed)

    def _require(self, state: str, command: str) -> StreamJob:
        if self.job is None or self.job.state != state:
            current = self.job.state if self.job else IDLE
            raise CommandError(f"cannot {command}: the stream is {current}")
        return self.job


class CopyOnRead:
    """Guest reads that first copy the clusters they touch into the top image (-o copy_on_read;
    called in worker threads).

    It owns COPY_ON_READ_COPIERS copiers, made here and each lent to one read at a time (more
    reads wait for one), so that a read builds no copier and the copiers' buffers stay bounded.
    A failed copy is logged and the read still served; if the read works, the copy's write to
    the top image failed, and that is reported as a write error."""

    def __init__(self, streamer: Streamer, write_errors: WriteErrors):
        self.streamer = streamer
        self.chain = streamer.chain
        self.write_errors = write_errors
        self._idle: queue.SimpleQueue[Copier] = queue.SimpleQueue()
        for _ in range(COPY_ON_READ_COPIERS):
            self._idle.put(Copier(self.chain, None, reads_for=ReadFor.GUEST))

    def read(self, offset: int, length: int) -> bytes | bytearray:
        try:
            self.copy(offset, length)
        except (OSError, FusestreamError) as err:
            log.warning("copy-on-read at offset %d failed: %s", offset, err)
            data = self.chain.read(offset, length)
            self.write_errors.report("copy-on-read", err)
            return data
        return self.chain.read(offset, length)

    def copy(self, offset: int, length: int) -> int:
        """Copy the clusters a guest read touches into the top image; returns the bytes read."""
        if not self.chain.backing_layers or not self.chain.writable:
            return 0
        cs = self.chain.cluster_size
        start = offset - offset % cs
        end = min(-(-(offset + length) // cs) * cs, self.chain.size)
        copier = self._idle.get()
        try:
            copier.base = self.streamer.copy_on_read_base()
            return copier.copy_range(start, end - start)
        finally:
            self._idle.put(copier)
