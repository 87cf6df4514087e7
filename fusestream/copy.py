"""The copier: what a stream step and a copy-on-read do, synchronously, in the caller's thread.

A step plans which clusters of a range to copy (those the top image leaves unallocated and the
layers above base say something about), reads their data from the backing chain and hands it
to the top image's `populate`, which fills only the clusters that are still unallocated (guest
writes win). The stream job (stream.py) owns one pipelined copier per job; copy-on-read owns a
few, each lent to one guest read at a time (stream.CopyOnRead).

The words: `base` is the layer the copy stops above (None: every backing layer is merged);
`range_end` is where the range being copied ends; a step goes from `offset` to its `end`.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from . import ioprio
from .chain import Chain, StatusWalk
from .errors import StreamError
from .formats.layer import BlockStatus, Layer
from .sources import ReadFor

MAX_COPY = 8 * 1024 * 1024  # bytes copied per step at most (one read, one write), unless a cluster is larger
MAX_SCAN_CLUSTERS = 16384  # clusters of the top image looked up per step (1 GiB at 64 KiB clusters)

Copies = list[tuple[int, memoryview]]  # (offset, data) read from the backing chain, as populate takes them


@dataclasses.dataclass(frozen=True)
class Step:
    """One planned step of a copy from `offset` towards `range_end`: the cluster-aligned ranges
    to copy, at most `max_read` bytes, and the `end` where the step stops (the next one starts)."""

    offset: int
    range_end: int
    max_read: int
    ranges: tuple[tuple[int, int], ...]
    end: int
    prefetched: bool  # its data hinted to the layers (Layer.prefetch): it must be read where that put it


class Copier:
    """Copies what the layers above `base` hold for a range into the top image (synchronous).

    Where those layers hold nothing, the top stays unallocated. Where they say zero, the top
    gets zero clusters only when a base remains below that they must hide; with no base,
    unallocated already reads as zeros.
    """

    def __init__(self, chain: Chain, base: Layer | None, pipelined: bool = False,
                 reads_for: ReadFor = ReadFor.STREAM):
        self.chain = chain
        self.base = base
        # Whose reads the steps are: the stream's, or a guest's (copy-on-read), which must not
        # queue behind the stream's transfers on a remote layer's bulk connections.
        self.reads_for = reads_for
        # Pipelined: a step's populate (its write and table updates) runs in a second thread
        # while the next step is planned and read. At most one populate is in flight.
        self._populate_thread = ThreadPoolExecutor(1, thread_name_prefix="fusestream-populate") if pipelined else None
        self._pending: Future | None = None
        self._next_step: Step | None = None  # planned one step early, its data prefetched
        self._walk = StatusWalk(0)  # the runs of the layers above base, along the steps' walk to range_end
        # (where the steps taken so far end, the bytes they read): the copy never populates
        # anything at or past that end before it has moved on. Read by the job's count.
        self.taken = (0, 0)
        # The most one step reads and populates: MAX_COPY, or one cluster where clusters are
        # larger (up to 64 MiB), since a cluster is copied whole or not at all. Over remote
        # layers, what keeps their connections busy (Source.bulk_size: 8 MiB steps over 4 MiB
        # requests got 0.86x of curl on loopback, 64 MiB reads 1.13x), the next step prefetched
        # meanwhile, and no more: a source stages two bulk_size reads of prefetched pieces, and
        # a larger step would push its own out before reading them (fetched twice).
        bulk = [layer.source.bulk_size for layer in chain.backing_layers if layer.source.bulk_size]
        self.max_step = max(chain.cluster_size, *bulk) if bulk else max(MAX_COPY, chain.cluster_size)
        # One read buffer per step in flight, reused: fresh memory would cost a page fault per
        # page on every step. Anonymous mmaps are page-aligned, as O_DIRECT wants.
        self._buffers = [mmap.mmap(-1, self.max_step) for _ in range(2 if pipelined else 1)]

    @property
    def base_index(self) -> int:
        """Chain.base_index of base: the layers above base are chain.layers[1:base_index]."""
        return self.chain.base_index(self.base)

    def copy_range(self, offset: int, length: int) -> int:
        """Copy all of [offset, offset+length), cluster-aligned; returns the bytes read."""
        transferred = 0
        range_end = offset + length
        self._next_step = None  # a plan left by an earlier range that failed half-way
        while offset < range_end:
            offset, step = self.copy_step(offset, range_end)
            transferred += step
        self.drain()
        return transferred

    def copy_step(self, offset: int, range_end: int, max_read: int = MAX_COPY,
                  gentle: bool = False, throttled: bool = False) -> tuple[int, int]:
        """Copy from `offset` (cluster-aligned) towards `range_end`: plan up to `max_read` bytes
        of backing data to copy (whole clusters: at least one, at most max_step), looking up at
        most MAX_SCAN_CLUSTERS of the top image (and only as far as needed), read it, and hand
        it to one populate (in the background when pipelined: drain() waits for it). Returns
        (the step's end, bytes read): empty space is crossed quickly and one step's work stays
        bounded.

        Unless `gentle`, the next step is planned here too, and its data prefetched
        (Layer.prefetch): the device reads it while this step is read and populated, and the
        scattered clusters of each step come in together. A plan made a step early stays right:
        the layers above base do not change while a job runs, top clusters never become
        unallocated again, and populate skips those allocated since.

        `gentle`: give way to a busy guest, with one I/O at a time and no more than asked for:
        no prefetching, the reads bypass readahead (ReadFor.GENTLE) and are in the idle
        I/O class (ioprio.py: the kernel holds them back while a guest read is at the device),
        and the populate finishes here, in the normal class (it holds the allocation lock that
        guest writes wait for). (The first gentle step after full ones plans again; what the
        last full step prefetched for it, up to max_step, has already gone to the device.)

        `throttled`: the job's speed limit, not the device, sets the pace (the step is smaller
        than max_step): nothing is prefetched, as the step waits out its time anyway, and the
        reads bypass caches, as for a gentle step: data read once to be stored in the top image
        must not push the guest's out of the page cache or a remote layer's block cache. (A step
        that a full one planned and prefetched is read where its prefetch put it.)"""
        quiet = gentle or throttled
        step = self._take_step(offset, range_end, self._whole_clusters(max_read), prefetch=not quiet)
        self.taken = (step.end, self.taken[1] + self._read_size(step.ranges))  # before any populate of it
        if not quiet and step.end < range_end:
            self._next_step = self._plan(step.end, range_end, step.max_read, prefetch=True)
        exact = gentle or (throttled and not step.prefetched)  # not a plan a full step prefetched
        with ioprio.idle_class(gentle):
            copies = self._read(step.ranges, ReadFor.GENTLE if exact else self.reads_for)
        self._start_populate(copies)
        if gentle:
            self.drain()
        return step.end, sum(len(data) for _, data in copies)

    def _whole_clusters(self, max_read: int) -> int:
        """`max_read` as a step may read it: whole clusters, at least one, at most max_step
        (a cluster is always populated whole, never in parts)."""
        cs = self.chain.cluster_size
        limit = max(cs, min(max_read, self.max_step))
        return limit - limit % cs

    def _take_step(self, offset: int, range_end: int, max_read: int, prefetch: bool) -> Step:
        """The step the previous call planned, if this is the one; else a new plan."""
        planned, self._next_step = self._next_step, None
        if planned is not None and (planned.offset, planned.range_end, planned.max_read) == (
                offset, range_end, max_read):
            return planned
        return self._plan(offset, range_end, max_read, prefetch)

    def _plan(self, offset: int, range_end: int, max_read: int, prefetch: bool) -> Step:
        cs = self.chain.cluster_size
        scan_end = min(range_end, offset + MAX_SCAN_CLUSTERS * cs)
        ranges: list[tuple[int, int]] = []
        planned = 0
        end = scan_end
        if self._walk.horizon != range_end:
            self._walk = StatusWalk(range_end)
        for lo, hi in self._unallocated_ranges_to_copy(offset, scan_end, max(1, max_read // cs), self._walk):
            copy_end = min(hi, lo + max_read - planned)
            if ranges and ranges[-1][1] == lo:  # a range that went on into the next top run
                ranges[-1] = (ranges[-1][0], copy_end)
            else:
                ranges.append((lo, copy_end))
            planned += copy_end - lo
            if planned >= max_read:
                end = copy_end
                break
        if prefetch:
            for lo, hi in ranges:
                self.chain.prefetch_backing(lo, hi - lo, self.reads_for)
        return Step(offset, range_end, max_read, tuple(ranges), end, prefetch)

    def _unallocated_ranges_to_copy(self, offset: int, end: int, top_lookups: int,
                                    walk: StatusWalk) -> Iterator[tuple[int, int]]:
        """_ranges_to_copy over the runs of [offset, end) that the top image leaves unallocated;
        both look up only as far as the caller goes (a step stops at max_read, however far an
        unallocated run goes): the top is asked `top_lookups` lookups at a time, so a step that
        stops looks at most that far past its end, which the next step looks up again. The top
        is asked afresh by every step (the guest may allocate in it at any time); the layers
        above base, which do not change, along the caller's `walk`."""
        pos = offset
        while pos < end:
            status, run = self.chain.top_status(pos, end - pos, top_lookups)
            if status is BlockStatus.UNALLOCATED:
                yield from self._ranges_to_copy(pos, run, walk)
            pos += run

    def bytes_to_copy(self, offset: int, end: int, walk: StatusWalk) -> int:
        """What copying [offset, end) reads from the backing chain, as the top image is now:
        the walk of the planning alone (linear in the chain), no data read. `walk`: the
        caller's, along its forward walk. Safe beside the copy in another thread."""
        return self._read_size(self._unallocated_ranges_to_copy(offset, end, MAX_SCAN_CLUSTERS, walk))

    def _read_size(self, ranges: Iterable[tuple[int, int]]) -> int:
        """The bytes _read reads for these ranges (nothing past the virtual size)."""
        return sum(min(hi, self.chain.size) - lo for lo, hi in ranges)

    def _start_populate(self, copies: Copies) -> None:
        """Populate the copies: here, or in the populate thread when pipelined."""
        self.drain()  # the previous step first: errors surface in order, memory stays bounded
        if not copies:
            return
        if self._populate_thread is None:
            self._populate(copies)
        else:
            self._pending = self._populate_thread.submit(self._populate, copies)

    def drain(self) -> None:
        """Wait for the populate in flight, if any; its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the populate in flight and stop the populate thread."""
        try:
            self.drain()
        finally:
            if self._populate_thread is not None:
                self._populate_thread.shutdown()

    def _ranges_to_copy(self, offset: int, length: int, walk: StatusWalk) -> Iterator[tuple[int, int]]:
        """Cluster-aligned ranges of [offset, offset+length) that the layers above base say
        something about, adjacent ones merged; a cluster partly covered is copied whole."""
        cs = self.chain.cluster_size
        base_index, keep_zeros = self.base_index, self.base is not None
        end = offset + length
        current: tuple[int, int] | None = None
        pos = offset
        while pos < end:
            status, run = self.chain.status_above(pos, end - pos, base_index, walk)
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

    def _read(self, plan: tuple[tuple[int, int], ...], read_for: ReadFor) -> Copies:
        """The planned ranges (max_step bytes at most), read from the backing chain straight into
        the next page-aligned buffer: preadv copies without holding the GIL, so guest requests on
        the event loop are not held up, and the alignment lets populate bypass the page cache."""
        self._buffers.append(buffer := self._buffers.pop(0))  # not the one a populate may be using
        copies = []
        used = 0
        for start, hi in plan:
            data = memoryview(buffer)[used : used + min(hi, self.chain.size) - start]
            used += len(data)
            try:
                filled = self.chain.read_backing_into(data, start, read_for)
            except OSError as err:
                raise StreamError(f"read error in the backing chain at offset {start}: {err.strerror or err}") from None
            if filled != len(data):  # never let a short read become zeros on disk
                raise StreamError(f"short read from the backing chain at offset {start}: {filled} of {len(data)} bytes")
            copies.append((start, data))
        return copies

    def _populate(self, copies: Copies) -> None:
        try:
            self.chain.populate(copies, zero_clusters=self.base is not None)
        except OSError as err:
            raise StreamError(f"write error in {self.chain.path} at offset {copies[0][0]}: "
                              f"{err.strerror or err}") from None
        except ValueError as err:  # a copy short of its cluster: refused, never padded with zeros
            raise StreamError(str(err)) from None
