"""The stream job: copy the data of the backing chain into the top image while it is in use.

QEMU's block-stream, as a trio task. The copying itself (`Copier`) is synchronous and runs in a
worker thread, a chunk at a time, so guest I/O keeps flowing on the event loop; between chunks
the job honours pause, cancel and the rate limit. Guest writes win because the copy only fills
clusters that are still unallocated when it takes the allocation lock (QedImage.populate).

Progress follows QEMU's block-job meaning: `offset` of `len` bytes of the virtual disk.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import mmap
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import outcome
import trio

from .chain import Chain, StatusWalk, resolve_backing
from .errors import CommandError, FusestreamError, StreamError
from .formats.layer import BlockStatus, Layer

log = logging.getLogger(__name__)

MAX_COPY = 8 * 1024 * 1024  # bytes copied per step at most (one read, one write), unless a cluster is larger
# While the guest is busy (it read or wrote within GUEST_BUSY_SECONDS), the job gives way:
# gentle steps of at most GENTLE_COPY, read exactly (no readahead) and installed before the next
# read, so the guest's next request finds at most one small I/O of the stream ahead of it at the
# device, not megabytes. Measured with bench/stream_bench.py (docs/performance.md).
GENTLE_COPY = 64 * 1024
GUEST_BUSY_SECONDS = 0.1
# Copy-on-read copies in flight at once (more guest reads wait): each copier keeps a buffer of
# one step, up to 64 MiB with 64 MiB clusters, and is reused by the reads that follow.
COPY_ON_READ_COPIERS = 2
MAX_SCAN_CLUSTERS = 16384  # clusters of the top image looked up per step (1 GiB at 64 KiB clusters)
COUNT_WINDOW_CLUSTERS = 1024  # clusters the job's count of what to copy walks per call (a few ms)
RATE_WINDOW = 3.0  # seconds of progress history behind the measured rate
RATE_LAG = 1.0  # seconds without a step after which the measured rate starts to fall

IDLE, RUNNING, PAUSED, COMPLETED, CANCELLED, FAILED = "idle", "running", "paused", "completed", "cancelled", "failed"


@dataclasses.dataclass(frozen=True)
class Step:
    """One planned step of a copy: the cluster-aligned ranges to copy, and where it stops."""

    offset: int
    end: int
    max_read: int
    ranges: tuple[tuple[int, int], ...]
    stop: int


class Copier:
    """Copies what the merged layers hold for a range into the top image (synchronous).

    The merged layers are those above `base` (all of them when base is None). Where they hold
    nothing, the top stays unallocated. Where they say zero, the top gets zero clusters only when
    a base remains below that they must hide; with no base, unallocated already reads as zeros.
    """

    def __init__(self, chain: Chain, base: Layer | None, pipelined: bool = False):
        self.chain = chain
        self.base = base
        # Pipelined: a step's install (its write and table updates) runs in a second thread
        # while the next step is planned and read. At most one install is in flight.
        self._installer = ThreadPoolExecutor(1, thread_name_prefix="fusestream-install") if pipelined else None
        self._pending: Future | None = None
        self._next_step: Step | None = None  # planned one step early, its data prefetched
        self._walk = StatusWalk(0)  # the merged layers' runs, along the steps' walk to their end
        # (where the steps taken so far stop, the bytes they read): the copy never installs
        # anything at or past that stop before it has moved on. Read by the job's count.
        self.taken = (0, 0)
        # The most one step reads and installs: MAX_COPY, or one cluster where clusters are
        # larger (up to 64 MiB), since a cluster is copied whole or not at all.
        self.max_step = max(MAX_COPY, chain.top.cluster_size)
        # One read buffer per step in flight, reused: fresh memory would cost a page fault per
        # page on every step. Anonymous mmaps are page-aligned, as O_DIRECT wants.
        self._buffers = [mmap.mmap(-1, self.max_step) for _ in range(2 if pipelined else 1)]

    @property
    def stop(self) -> int:
        """Index of the first layer not merged (len(layers) when everything is)."""
        layers = self.chain.layers
        return layers.index(self.base) if self.base in layers else len(layers)

    def copy_range(self, offset: int, length: int) -> int:
        """Stream all of [offset, offset+length), cluster-aligned; returns the bytes read."""
        transferred = 0
        end = offset + length
        self._next_step = None  # a plan left by an earlier range that failed half-way
        while offset < end:
            offset, step = self.copy_step(offset, end)
            transferred += step
        self.drain()
        return transferred

    def copy_step(self, offset: int, end: int, max_read: int = MAX_COPY, gentle: bool = False) -> tuple[int, int]:
        """Stream from `offset` (cluster-aligned) towards `end`: plan up to `max_read` bytes of
        backing data to copy (whole clusters: at least one, at most max_step), looking up at
        most MAX_SCAN_CLUSTERS of the top image (and only as far as needed), read it, and
        install it with one populate (in the background when pipelined: drain() waits for it).
        Returns (where it stopped, bytes read): empty space is crossed quickly and one step's
        work stays bounded.

        Unless `gentle`, the next step is planned here too, and its data prefetched
        (Layer.prefetch): the device reads it while this step is read and installed, and the
        scattered clusters of each step come in together. A plan made a step early stays right:
        the merged layers do not change while a job runs, top clusters never become unallocated
        again, and populate skips those allocated since.

        `gentle`: give way to a busy guest, with one I/O at a time and no more than asked for:
        no prefetching, the reads bypass readahead (see Layer.read_into) and the install
        finishes here. (The first gentle step after full ones plans again; what the last full
        step prefetched for it, up to max_step, has already gone to the device.)"""
        step = self._take_step(offset, end, self._whole_clusters(max_read), prefetch=not gentle)
        self.taken = (step.stop, self.taken[1] + self._read_size(step.ranges))  # before any install of it
        if not gentle and step.stop < end:
            self._next_step = self._plan(step.stop, end, step.max_read, prefetch=True)
        pieces = self._read(step.ranges, direct=gentle)
        self._install(pieces)
        if gentle:
            self.drain()
        return step.stop, sum(len(data) for _, data in pieces)

    def _whole_clusters(self, max_read: int) -> int:
        """`max_read` as a step may read it: whole clusters, at least one, at most max_step
        (a cluster is always installed whole, never in parts)."""
        cs = self.chain.top.cluster_size
        limit = max(cs, min(max_read, self.max_step))
        return limit - limit % cs

    def _take_step(self, offset: int, end: int, max_read: int, prefetch: bool) -> Step:
        """The step the previous call planned, if this is the one; else a new plan."""
        planned, self._next_step = self._next_step, None
        if planned is not None and (planned.offset, planned.end, planned.max_read) == (offset, end, max_read):
            return planned
        return self._plan(offset, end, max_read, prefetch)

    def _plan(self, offset: int, end: int, max_read: int, prefetch: bool) -> Step:
        cs = self.chain.top.cluster_size
        scan_end = min(end, offset + MAX_SCAN_CLUSTERS * cs)
        ranges: list[tuple[int, int]] = []
        planned = 0
        stop = scan_end
        if self._walk.horizon != end:
            self._walk = StatusWalk(end)
        for start, range_end in self._unallocated_ranges_to_copy(offset, scan_end, max(1, max_read // cs), self._walk):
            piece_end = min(range_end, start + max_read - planned)
            if ranges and ranges[-1][1] == start:  # a range that went on into the next top run
                ranges[-1] = (ranges[-1][0], piece_end)
            else:
                ranges.append((start, piece_end))
            planned += piece_end - start
            if planned >= max_read:
                stop = piece_end
                break
        if prefetch:
            for start, range_end in ranges:
                self.chain.prefetch_backing(start, range_end - start)
        return Step(offset, end, max_read, tuple(ranges), stop)

    def _unallocated_ranges_to_copy(self, offset: int, end: int, top_pieces: int,
                                    walk: StatusWalk) -> Iterator[tuple[int, int]]:
        """_ranges_to_copy over the runs of [offset, end) that the top image leaves unallocated;
        both look up only as far as the caller goes (a step stops at max_read, however far an
        unallocated run goes): the top is asked `top_pieces` lookups at a time, so a step that
        stops looks at most that far past its end, which the next step looks up again. The top
        is asked afresh by every step (the guest may allocate in it at any time); the merged
        layers, which do not change, along the caller's `walk`."""
        pos = offset
        while pos < end:
            status, run = self.chain.top.block_status(pos, end - pos, top_pieces)
            if status is BlockStatus.UNALLOCATED:
                yield from self._ranges_to_copy(pos, run, walk)
            pos += run

    def bytes_to_copy(self, offset: int, end: int, walk: StatusWalk) -> int:
        """What streaming [offset, end) reads from the backing chain, as the top image is now:
        the walk of the planning alone (linear in the chain), no data read. `walk`: the
        caller's, along its forward walk. Safe beside the copy in another thread."""
        return self._read_size(self._unallocated_ranges_to_copy(offset, end, MAX_SCAN_CLUSTERS, walk))

    def _read_size(self, ranges: Iterable[tuple[int, int]]) -> int:
        """The bytes _read reads for these ranges (nothing past the virtual size)."""
        return sum(min(range_end, self.chain.size) - start for start, range_end in ranges)

    def _install(self, pieces: list[tuple[int, memoryview]]) -> None:
        self.drain()  # the previous step first: errors surface in order, memory stays bounded
        if not pieces:
            return
        if self._installer is None:
            self._populate(pieces)
        else:
            self._pending = self._installer.submit(self._populate, pieces)

    def drain(self) -> None:
        """Wait for the install in flight, if any; its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the install in flight and stop the installer thread."""
        try:
            self.drain()
        finally:
            if self._installer is not None:
                self._installer.shutdown()

    def _ranges_to_copy(self, offset: int, length: int, walk: StatusWalk) -> Iterator[tuple[int, int]]:
        """Cluster-aligned ranges of [offset, offset+length) that the merged layers say something
        about, adjacent ones merged; a cluster partly covered is copied whole."""
        cs = self.chain.top.cluster_size
        stop, keep_zeros = self.stop, self.base is not None
        end = offset + length
        current: tuple[int, int] | None = None
        pos = offset
        while pos < end:
            status, run = self.chain.status_above(pos, end - pos, stop, walk)
            if status is BlockStatus.FOUND or (status is BlockStatus.ZERO and keep_zeros):
                lo, hi = pos - pos % cs, min(-(-(pos + run) // cs) * cs, end)
                if current is not None and lo <= current[1]:
                    current = (current[0], hi)
                else:
                    if current is not None:
                        yield current
                    current = (lo, hi)
            pos += run
        if current is not None:
            yield current

    def _read(self, plan: tuple[tuple[int, int], ...], direct: bool) -> list[tuple[int, memoryview]]:
        """The planned ranges (max_step bytes at most), read from the backing chain straight into
        the next page-aligned buffer: preadv copies without holding the GIL, so guest requests on
        the event loop are not held up, and the alignment lets the install bypass the page
        cache."""
        self._buffers.append(buffer := self._buffers.pop(0))  # not the one an install may be using
        pieces = []
        used = 0
        for start, end in plan:
            data = memoryview(buffer)[used : used + min(end, self.chain.size) - start]
            used += len(data)
            try:
                filled = self.chain.read_backing_into(data, start, direct)
            except OSError as err:
                raise StreamError(f"read error in the backing chain at offset {start}: {err.strerror or err}") from None
            if filled != len(data):  # never let a short read become zeros on disk
                raise StreamError(f"short read from the backing chain at offset {start}: {filled} of {len(data)} bytes")
            pieces.append((start, data))
        return pieces

    def _populate(self, pieces: list[tuple[int, memoryview]]) -> None:
        try:
            self.chain.populate(pieces, zero_clusters=self.base is not None)
        except OSError as err:
            top = self.chain.top.path
            raise StreamError(f"write error in {top} at offset {pieces[0][0]}: {err.strerror or err}") from None
        except ValueError as err:  # a piece short of its cluster: refused, never padded with zeros
            raise StreamError(str(err)) from None


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


EventSink = Callable[[str, dict], None]
RunSync = Callable[..., Awaitable]


class StreamJob:
    """One run of streaming over the whole virtual disk."""

    def __init__(self, chain: Chain, base: Layer | None, speed: int, emit: EventSink,
                 run_sync: RunSync = trio.to_thread.run_sync):
        self.chain = chain
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
                                self.chain.top.backing_filename, self.copied, remaining, progress_rate)

    # -- the job ----------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            # Even when the mount is going away (cancelled), the install in flight must finish
            # before anyone may close the image.
            with trio.CancelScope(shield=True):
                await self._close_copier()
            self._finished.set()

    async def _close_copier(self) -> None:
        try:
            await self.run_sync(self.copier.close)
        except (OSError, FusestreamError) as err:  # an install that failed after the job ended
            log.error("stream of %s: %s", self.chain.top.path, err)

    async def _run(self) -> None:
        try:
            await self._copy_all()
            await self.run_sync(self.copier.drain)
            if self._cancel_requested:
                self.state = CANCELLED
                self.emit("STREAM_CANCELLED", {"offset": self.offset, "len": self.len})
                return
            self._completing = True  # no await since the check above: a cancel is seen or refused
            base = await self.run_sync(self.chain.rebase, self.copier.stop)
            self.state = COMPLETED
            self.emit("BACKING_CHANGED", {"backing_file": self.chain.top.backing_filename,
                                          "base": base.path if base is not None else None})
            self.emit("STREAM_COMPLETED", {"offset": self.offset, "len": self.len})
        except (OSError, FusestreamError) as err:
            self.state = FAILED
            self.error = str(err) if isinstance(err, StreamError) else f"offset {self.offset}: {err}"
            log.error("stream of %s failed: %s", self.chain.top.path, self.error)
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
            gentle = self._guest_busy()
            self.offset, transferred = await self.run_sync(
                self.copier.copy_step, self.offset, self.len, self._max_read(gentle), gentle)
            self.copied += transferred
            await self._throttle(transferred)
            if self.state == RUNNING:  # a pause meanwhile starts the measurement again at the resume
                self._progress.record(trio.current_time(), self.offset, self.copied)

    async def _count_to_copy(self) -> None:
        """Set `to_copy`, for the time left: the bytes the whole job reads, counted by walking its
        plan (Copier.bytes_to_copy, no data read: linear in the chain, about 0.06 s per GiB of
        disk under allocated tables) a COUNT_WINDOW_CLUSTERS window at a time, in a worker
        thread beside the copy, so that counting does not delay it.

        The count stays exact although the copy allocates in the top image meanwhile: a window
        counts only if, once counted, no step taken so far reaches into it (Copier.taken is
        set before a step installs anything). Otherwise the copy got there first: the count
        goes on from where the steps taken stop, plus the bytes those read."""
        walk = StatusWalk(self.len)
        window = COUNT_WINDOW_CLUSTERS * self.chain.top.cluster_size
        pos, counted = 0, 0
        while pos < self.len:
            try:
                ahead = await self.run_sync(self.copier.bytes_to_copy, pos, min(self.len, pos + window), walk)
            except (OSError, FusestreamError) as err:  # the copy meets it too, and fails with it
                log.warning("stream of %s: cannot count what is left to copy: %s", self.chain.top.path, err)
                return
            taken_to, taken_bytes = self.copier.taken
            if taken_to > pos:
                pos, counted = taken_to, taken_bytes
            else:
                pos, counted = min(self.len, pos + window), counted + ahead
        self.to_copy = counted

    def _guest_busy(self) -> bool:
        return time.monotonic() - self.chain.last_guest_io < GUEST_BUSY_SECONDS

    def _max_read(self, gentle: bool) -> int:
        """Read at most a tenth of a second's worth per step at the speed limit, in whole
        clusters, so that pause, cancel and speed changes take effect quickly; less while the
        guest is busy."""
        cs = self.chain.top.cluster_size
        limit = GENTLE_COPY if gentle else MAX_COPY
        if self.speed:
            limit = min(limit, self.speed // 10)
        return max(cs, limit - limit % cs)

    async def _wait_while_paused(self) -> None:
        while self.state == PAUSED and not self._cancel_requested:
            await self._wakeup.wait()

    async def _throttle(self, transferred: int) -> None:
        """QEMU's rate limit: bytes read from the backing chain (not skipped ones) are paid for
        at `speed` bytes/s."""
        if not self.speed or not transferred:
            return
        now = trio.current_time()
        self._next_slot = max(self._next_slot, now) + transferred / self.speed
        while trio.current_time() < self._next_slot and not self._cancel_requested and self.speed:
            with trio.move_on_at(self._next_slot):
                await self._wakeup.wait()


class Streamer:
    """The stream job of one mounted image: starts jobs and checks commands against its state."""

    def __init__(self, chain: Chain, nursery: trio.Nursery, emit: EventSink, default_base: str | None = None,
                 default_speed: int = 0, run_sync: RunSync = trio.to_thread.run_sync):
        self.chain = chain
        self.run_sync = run_sync
        self.nursery = nursery
        self.emit = emit
        self.default_base = default_base  # -o base=PATH: for `stream` without base= and copy-on-read
        self.default_speed = default_speed
        self.job: StreamJob | None = None
        self.write_errors = None  # faults.WriteErrors, set by the mount: where copy-on-read reports
        # Copy-on-read copiers not in use; COPY_ON_READ_COPIERS at most exist, one per slot.
        self._idle_copiers: list[Copier] = []
        self._copier_slots = threading.BoundedSemaphore(COPY_ON_READ_COPIERS)

    @property
    def active(self) -> bool:
        return self.job is not None and self.job.state in (RUNNING, PAUSED)

    def statistics(self) -> StreamStatistics:
        if self.job is None:
            return StreamStatistics(IDLE, 0, self.chain.size, self.default_speed, 0, None, None,
                                    self.chain.top.backing_filename)
        return self.job.statistics()

    def start(self, base: str | None = None, speed: int | None = None) -> StreamJob:
        if self.active:
            raise CommandError("a stream is already running (cancel it first)")
        if not self.chain.top.writable:
            raise CommandError("the image is mounted read-only")
        base_layer = self._base_layer(base or self.default_base)
        speed = self.default_speed if speed is None else speed
        self.job = StreamJob(self.chain, base_layer, speed, self.emit, self.run_sync)
        self.emit("STREAM_STARTED", {"len": self.job.len, "speed": speed, "base": self.job.base_path})
        self.nursery.start_soon(self.job.run)
        return self.job

    def _base_layer(self, base: str | None) -> Layer | None:
        if base is None:
            return None
        base = resolve_backing(self.chain.top.path, base)  # a relative name: beside the image
        layer = self.chain.find_layer(base)
        if layer is None:
            raise CommandError(f"base {base} is not in the backing chain of {self.chain.top.path}")
        return layer

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

    def read_copying(self, offset: int, length: int) -> bytes | bytearray:
        """A guest read with copy-on-read (run in a thread): the clusters it touches are copied
        into the top image first. A failed copy is logged and the read still served; if the read
        works, the copy's write to the top image failed, and that is a write error."""
        try:
            self.copy_on_read(offset, length)
        except (OSError, FusestreamError) as err:
            log.warning("copy-on-read at offset %d failed: %s", offset, err)
            data = self.chain.read(offset, length)
            if self.write_errors is not None:
                self.write_errors.report("copy-on-read", err)
            return data
        return self.chain.read(offset, length)

    def copy_on_read(self, offset: int, length: int) -> int:
        """Copy the clusters a guest read touches into the top image."""
        if not self.chain.backing_layers or not self.chain.top.writable:
            return 0
        cs = self.chain.top.cluster_size
        start = offset - offset % cs
        end = min(-(-(offset + length) // cs) * cs, self.chain.size)
        if self.active:
            base = self.job.copier.base
        else:  # the mount's base, unless a finished stream has already merged it away
            base = self.chain.find_layer(self.default_base) if self.default_base else None
        with self._copier_slots:
            copier = self._idle_copiers.pop() if self._idle_copiers else Copier(self.chain, base)
            copier.base = base
            try:
                return copier.copy_range(start, end - start)
            finally:
                self._idle_copiers.append(copier)
