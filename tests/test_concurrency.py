"""Many I/Os in flight on one mount: every read of the raw file returns what the last completed
write or discard left there, whichever descriptor, thread or request path serves it, and also
while the stream job copies and rebases underneath. Black-box: only the raw file (and the
status of the stream) is used while mounted; qemu-img is the oracle after the unmount.

The operations are seeded (FUSESTREAM_RACE_SEED, named in every failure); the interleaving of
the threads is whatever the machine gives, so a run explores a new one. Reads that must reach
the daemon whatever the kernel's page cache holds go through an O_DIRECT descriptor.

Where several threads write, the owner tests keep buffered reads out of each other's pages
(buffered descriptors read no ahead, open_buffered, and a thread reads what others write only
through O_DIRECT), so that a failure there names the daemon's answers. The kernel's page cache
under such races has a test of its own (the last one): with FUSE's auto_inval_data, which the
mount now turns off, the kernel dropped the whole cache whenever it saw the mtime another write
had changed, possibly while a write-through was in flight, and a racing read filled the pages
again before that write landed: a read after the write returned saw the old data."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import mmap
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from conftest import (
    FUSESTREAM,
    build_chain,
    fallocate,
    qemu_check,
    qemu_convert,
    qemu_img,
    run,
    write_random,
)

from fusestream.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE

pytestmark = pytest.mark.mount

SEED = int(os.environ.get("FUSESTREAM_RACE_SEED", "1313"))
ALIGN = 4096  # what O_DIRECT asks of the buffer's address, the file offset and the length
PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO_RANGE = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
MiB = 1 << 20
SMALLEST_READ, LARGEST_READ = 512, 256 * 1024  # of random reads that are not within a run


# -- what is read and written -------------------------------------------------------------------


def aligned_span(offset: int, length: int) -> tuple[int, int]:
    """The smallest range of whole ALIGN blocks that holds [offset, offset + length)."""
    return offset - offset % ALIGN, -(-(offset + length) // ALIGN) * ALIGN


def read_direct(fd: int, offset: int, length: int) -> bytes:
    """pread through an O_DIRECT descriptor: the aligned span around the range into an aligned
    buffer, so that the request goes to the daemon whatever the page cache holds."""
    start, end = aligned_span(offset, length)
    with mmap.mmap(-1, end - start) as buffer:
        got = os.preadv(fd, [buffer], start)
        return buffer[offset - start : min(got, offset - start + length)]


def open_buffered(path: Path, flags: int) -> int:
    """A descriptor through the page cache that reads only the pages asked for, no readahead
    into other threads' ranges (see the module's docstring)."""
    fd = os.open(path, flags)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


def write_direct(fd: int, offset: int, data: bytes) -> int:
    """pwrite through an O_DIRECT descriptor, from an aligned buffer (the range is aligned)."""
    with mmap.mmap(-1, len(data)) as buffer:
        buffer[:] = data
        return os.pwritev(fd, [buffer], offset)


def differs(what: str, offset: int, got: bytes, want: bytes, before: bytes) -> str:
    """A failure line: where a read first differs from the model, and what it read instead."""
    if len(got) != len(want):
        return f"{what} at {offset}: {len(got)} bytes read, {len(want)} expected"
    first = next(i for i in range(len(got)) if got[i] != want[i])
    if got == before:
        kind = "what the chain held before the mount (stale)"
    elif not any(got[first:]):
        kind = "zeros"
    else:
        kind = "other data"
    return f"{what} of {len(got)} bytes at {offset}: differs from byte {offset + first} on, reads {kind}"


@dataclasses.dataclass
class Disk:
    """What the raw file must read: the chain's bytes before the mount (`before`), with every
    completed write and discard applied (`model`). Each thread changes only its own ranges."""

    raw: Path
    before: bytes
    model: bytearray

    def expect(self, what: str, offset: int, length: int, got: bytes) -> None:
        want = bytes(self.model[offset : offset + length])
        if got != want:
            raise AssertionError(differs(what, offset, got, want, self.before[offset : offset + length]))


def carve(rng: random.Random, size: int, cluster_size: int, owners: int, runs_each: int,
          max_clusters: int) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]]]:
    """Disjoint runs of whole clusters at random places, `runs_each` for each owner, each in a
    slot of max_clusters clusters; returns them (offset, length) and the slots no one owns."""
    slot = max_clusters * cluster_size
    slots = [(start, slot) for start in range(0, size - slot + 1, slot)]
    rng.shuffle(slots)
    taken = owners * runs_each
    assert len(slots) > taken
    runs = [[(start, rng.randint(1, max_clusters) * cluster_size) for start, _ in slots[i:taken:owners]]
            for i in range(owners)]
    return runs, slots[taken:]


@dataclasses.dataclass
class Mix:
    """How an Owner spends its steps: the weights of its operations, and whether its writes may
    go through its O_DIRECT descriptor and its buffered reader caches a range before it is written."""

    write: int = 25
    discard: int = 15
    burst: int = 10
    read_own: int = 20
    read_untouched: int = 5
    read_peers: int = 25
    direct_writes: bool = False
    prime_cache: bool = False


class Owner:
    """One thread's part of the disk. It alone writes and discards its runs, a few steps on one
    run (`current`) before it moves to another, and checks every read of them against the
    model, through two buffered and two O_DIRECT descriptors (every one but the writer's after a
    write). It reads the slots no one owns against the model too, and its peers' runs, mostly
    the ones they are changing, only for an answer of the right length: those reads race the
    changes in the daemon, and whatever mapping they leave behind, the owner's next reads must
    not see it."""

    def __init__(self, name: str, disk: Disk, runs: list[tuple[int, int]], untouched: list[tuple[int, int]],
                 mix: Mix):
        self.name, self.disk, self.runs, self.untouched, self.mix = name, disk, runs, untouched, mix
        self.rng = random.Random(f"{SEED}-{name}")
        self.peers: list[Owner] = []
        self.current = runs[0]
        self.changed: collections.deque[tuple[int, int]] = collections.deque(maxlen=8)
        self.steps = 0
        self.fds: list[int] = []
        self.buffered = [self._open(open_buffered, os.O_RDWR), self._open(open_buffered, os.O_RDWR)]
        self.direct = [self._open(os.open, os.O_RDWR | os.O_DIRECT), self._open(os.open, os.O_RDWR | os.O_DIRECT)]
        self.operations = [self.write, self.discard, self.burst, self.read_own, self.read_untouched, self.read_peers]
        self.weights = [mix.write, mix.discard, mix.burst, mix.read_own, mix.read_untouched, mix.read_peers]

    def _open(self, opener: Callable[[Path, int], int], flags: int) -> int:
        fd = opener(self.disk.raw, flags)
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)

    def step(self) -> None:
        if self.rng.random() < 0.2:
            self.current = self.rng.choice(self.runs)
        self.rng.choices(self.operations, self.weights)[0]()
        self.steps += 1

    def pick(self, run: tuple[int, int]) -> tuple[int, int]:
        """A range inside `run`: short or up to the run's end, so often across clusters."""
        start, length = run
        offset = start + self.rng.randrange(length)
        room = start + length - offset
        return offset, self.rng.randint(1, min(room, 600) if self.rng.random() < 0.3 else room)

    def write(self) -> None:
        self.check("a read after a write", *self._write())

    def discard(self) -> None:
        self.check("a read after a discard", *self._discard())

    def burst(self) -> None:
        """A few writes and discards back to back in the current run, checked after the last:
        mappings change while peers' reads may be filling in the ones before."""
        changes = [self.rng.choice([self._write, self._discard])() for _ in range(self.rng.randint(2, 4))]
        for offset, length, _ in changes:
            self.check("a read after a burst of changes", offset, length)

    def _write(self) -> tuple[int, int, int]:
        direct = self.mix.direct_writes and self.rng.random() < 0.5
        offset, length = self.pick(self.current)
        if direct:
            offset, end = aligned_span(offset, length)
            length = end - offset
        data = bytes(length) if self.rng.random() < 0.1 else self.rng.randbytes(length)
        if self.mix.prime_cache and self.rng.random() < 0.5:
            self.disk.expect("a read before the write", offset, length, os.pread(self.buffered[1], length, offset))
        writer = self.direct[0] if direct else self.buffered[0]
        written = write_direct(writer, offset, data) if direct else os.pwrite(writer, data, offset)
        assert written == length
        self.disk.model[offset : offset + length] = data
        self.changed.append((offset, length))
        return offset, length, writer

    def _discard(self) -> tuple[int, int, int]:
        offset, length = self.pick(self.current)
        mode = self.rng.choice([PUNCH_HOLE, ZERO_RANGE])
        assert fallocate(self.buffered[0], mode, offset, length) == 0
        self.disk.model[offset : offset + length] = bytes(length)
        self.changed.append((offset, length))
        return offset, length, -1

    def check(self, what: str, offset: int, length: int, skip: int = -1) -> None:
        """Read the range through every descriptor but `skip` (the one that wrote it)."""
        for fd in self.buffered + self.direct:
            if fd != skip:
                self.read(what, fd, offset, length)

    def read(self, what: str, fd: int, offset: int, length: int) -> None:
        got = read_direct(fd, offset, length) if fd in self.direct else os.pread(fd, length, offset)
        self.disk.expect(f"{what} ({'O_DIRECT' if fd in self.direct else 'buffered'})", offset, length, got)

    def read_own(self) -> None:
        """A range it changed lately, a whole run of its own (every cluster whose mapping may
        have gone stale), or any range of its own."""
        choice = self.rng.randrange(3)
        if choice == 0 and self.changed:
            offset, length = self.rng.choice(self.changed)
        elif choice == 1:
            offset, length = self.rng.choice(self.runs)
        else:
            offset, length = self.pick(self.rng.choice(self.runs))
        self.read("a read of its own", self.rng.choice(self.fds), offset, length)

    def read_untouched(self) -> None:
        offset, length = self.pick(self.rng.choice(self.untouched))
        self.read("a read of an untouched range", self.rng.choice(self.fds), offset, length)

    def read_peers(self) -> None:
        """The run a peer is changing now, any run of a peer's, or up to 256 KiB anywhere, with
        O_DIRECT (see the module's docstring)."""
        peer = self.rng.choice(self.peers)
        choice = self.rng.randrange(4)
        if choice < 2:
            offset, length = peer.current
        elif choice == 2:
            offset, length = self.rng.choice(peer.runs)
        else:
            length = self.rng.randint(1, LARGEST_READ)
            offset = self.rng.randrange(len(self.disk.model) - length)
        got = read_direct(self.rng.choice(self.direct), offset, length)
        assert len(got) == length, f"a read of a peer's range at {offset}: {len(got)} of {length} bytes"


def run_together(workers: Sequence[Owner | Reader], more: Callable[[Owner | Reader], bool],
                 during: Callable[[], None] = lambda: None) -> None:
    """Step every worker in a thread of its own while more(worker); `during` runs in this thread
    meanwhile. The first failure stops the others and is raised, naming the worker and the seed."""
    stop = threading.Event()
    failures: list[tuple[Owner | Reader, BaseException]] = []

    def work(worker: Owner | Reader) -> None:
        try:
            while not stop.is_set() and more(worker):
                worker.step()
        except BaseException as err:  # handed to the test's thread below
            failures.append((worker, err))
            stop.set()

    threads = [threading.Thread(target=work, args=(w,), name=w.name) for w in workers]
    for thread in threads:
        thread.start()
    try:
        during()
    except BaseException:
        stop.set()
        raise
    finally:
        for thread in threads:
            thread.join()
    if failures:
        worker, err = failures[0]
        raise AssertionError(f"{worker.name}, step {worker.steps} (FUSESTREAM_RACE_SEED={SEED}): {err}") from err


@contextlib.contextmanager
def owners_of(disk: Disk, cluster_size: int, count: int, mix: Mix, runs_each: int = 5,
              max_clusters: int = 20) -> Iterator[list[Owner]]:
    """`count` Owners of random runs of the disk; their descriptors are closed after."""
    runs, untouched = carve(random.Random(SEED), len(disk.model), cluster_size, count, runs_each, max_clusters)
    owners: list[Owner] = []
    try:
        for i, own in enumerate(runs):
            owners.append(Owner(f"owner{i}", disk, own, untouched, mix))
        for owner in owners:
            owner.peers = [peer for peer in owners if peer is not owner]
        yield owners
    finally:
        for owner in owners:
            owner.close()


def full_chain(tmp: Path, size: int, cluster_size: int, table_size: int) -> Path:
    """raw base <- QED mid <- QED top, made by QEMU. The base holds random data everywhere, so no
    range of the chain reads zeros by chance and a stale mapping of a discarded cluster shows;
    the mid has long random writes anywhere (a quarter of the disk or so: what a stream onto
    the base copies), the top short ones in the first half only, so that the tables of the
    second half are allocated during the test."""
    rng = random.Random(SEED)
    base, mid, top = tmp / "base.raw", tmp / "mid.qed", tmp / "top.qed"
    base.write_bytes(rng.randbytes(size))
    opts = f"cluster_size={cluster_size},table_size={table_size}"
    qemu_img("create", "-f", "qed", "-o", opts, "-b", base.name, "-F", "raw", str(mid), str(size))
    qemu_img("create", "-f", "qed", "-o", opts, "-b", mid.name, "-F", "qed", str(top), str(size))
    for layer, span, longest in ((mid, size, size // 12), (top, size // 2, 4 * cluster_size)):
        for _ in range(6):
            length = rng.randrange(1, longest)
            write_random(layer, tmp, rng, rng.randrange(span - length), length, "qed")
    return top


def after_unmount(top: Path, tmp: Path, model: bytearray) -> None:
    """QEMU reads the model, and finds no corruption (discarded clusters may remain as leaks)."""
    assert qemu_convert(top, tmp / "after.raw") == model, f"FUSESTREAM_RACE_SEED={SEED}"
    check = qemu_check(top)
    assert check.returncode in (0, 3), check.stdout + check.stderr


def steps_each(count: int) -> Callable[[Owner | Reader], bool]:
    return lambda worker: worker.steps < count


# -- the tests ----------------------------------------------------------------------------------


def test_twelve_owners_write_discard_and_read_back_over_a_full_backing_chain(tmp_path, mount):
    """Twelve threads, each the only writer of its runs of 4 KiB clusters, over a chain whose
    backing data is nowhere zeros: every read of a thread's own runs, through any descriptor,
    reads its last writes and discards, however the others' reads and changes interleave."""
    top = full_chain(tmp_path, size=8 * MiB, cluster_size=4096, table_size=2)
    before = qemu_convert(top, tmp_path / "before.raw")
    m = mount(top, "nostream")
    disk = Disk(m.raw, before, bytearray(before))
    with owners_of(disk, 4096, 12, Mix()) as owners:
        run_together(owners, steps_each(400))
    m.umount()
    after_unmount(top, tmp_path, disk.model)


def stream_state(m) -> str:
    return json.loads((m.mountpoint / "status.json").read_text())["images"][0]["stream"]["state"]


@pytest.mark.parametrize("base", [None, "base.raw"])
def test_owners_and_readers_through_a_stream_and_its_rebase(tmp_path, mount, base):
    """The stream copies the backing data (all of it, or the mid's onto the base) under the
    owners' writes and discards, then drops the layers it merged while every thread keeps going;
    the owners go on for a while after that."""
    top = full_chain(tmp_path, size=8 * MiB, cluster_size=4096, table_size=2)
    before = qemu_convert(top, tmp_path / "before.raw")
    # About two seconds of stream either way: 8 MiB to copy, or the mid's 2 MiB or so.
    m = mount(top, f"base={tmp_path / base}", "speed=1M") if base else mount(top, "speed=4M")
    disk = Disk(m.raw, before, bytearray(before))
    completed = threading.Event()
    last_step: dict[str, int] = {}

    def until_after_the_stream(owner: Owner) -> bool:
        return not completed.is_set() or owner.steps < last_step.setdefault(owner.name, owner.steps + 60)

    def wait_for_the_stream() -> None:
        assert stream_state(m) == "running"  # the owners have started: they overlap the stream
        run(FUSESTREAM, "wait", str(m.mountpoint), timeout=60)
        completed.set()

    with owners_of(disk, 4096, 12, Mix()) as owners:
        run_together(owners, until_after_the_stream, during=wait_for_the_stream)
    m.umount()
    assert json.loads(qemu_img("info", "--output=json", str(top))).get("backing-filename") == base
    after_unmount(top, tmp_path, disk.model)


def test_a_completed_write_is_read_back_through_every_descriptor(tmp_path, mount):
    """Four threads write their runs of 64 KiB clusters (mostly parts of clusters, the rest
    filled from below) through a buffered or an O_DIRECT descriptor, the range often read (and
    so cached) through another one just before; after the write returns, every other descriptor
    reads it."""
    top = full_chain(tmp_path, size=8 * MiB, cluster_size=65536, table_size=4)
    before = qemu_convert(top, tmp_path / "before.raw")
    m = mount(top, "nostream")
    disk = Disk(m.raw, before, bytearray(before))
    mix = Mix(write=60, discard=0, burst=0, read_own=20, read_untouched=10, read_peers=10, direct_writes=True,
              prime_cache=True)
    with owners_of(disk, 65536, 4, mix, runs_each=4, max_clusters=3) as owners:
        run_together(owners, steps_each(600))
    m.umount()
    after_unmount(top, tmp_path, disk.model)


class Reader:
    """A thread that reads random ranges of SMALLEST_READ to LARGEST_READ bytes (as many small
    ones as large) at any offset of the disk, through a buffered or an O_DIRECT descriptor, and
    checks them against `want` (or only their length, without it)."""

    def __init__(self, name: str, raw: Path, want: Disk | None = None):
        self.name, self.want = name, want
        self.size = raw.stat().st_size
        self.rng = random.Random(f"{SEED}-{name}")
        self.buffered = os.open(raw, os.O_RDONLY)
        self.direct = os.open(raw, os.O_RDONLY | os.O_DIRECT)
        self.steps = 0

    def close(self) -> None:
        os.close(self.buffered)
        os.close(self.direct)

    def step(self) -> None:
        length = int(2 ** self.rng.uniform(math.log2(SMALLEST_READ), math.log2(LARGEST_READ)))
        offset = self.rng.randrange(self.size - length + 1)
        direct = self.rng.random() < 0.5
        got = read_direct(self.direct, offset, length) if direct else os.pread(self.buffered, length, offset)
        what = f"a read ({'O_DIRECT' if direct else 'buffered'})"
        if self.want:
            self.want.expect(what, offset, length, got)
        else:
            assert len(got) == length, f"{what} at {offset}: {len(got)} of {length} bytes"
        self.steps += 1


@contextlib.contextmanager
def readers_of(raw: Path, count: int, want: Disk | None = None) -> Iterator[list[Reader]]:
    """`count` Readers of the raw file; their descriptors are closed after."""
    readers: list[Reader] = []
    try:
        for i in range(count):
            readers.append(Reader(f"reader{i}", raw, want))
        yield readers
    finally:
        for reader in readers:
            reader.close()


def test_a_discarded_cluster_reads_zeros_and_its_reuse_elsewhere_never_shows_there(tmp_path, mount):
    """Each round: a cluster written, read (so cached) and discarded reads zeros at once, not the
    backing data; the fsync after makes its space free, the next allocation elsewhere takes it
    (the image does not grow), and the discarded offset still reads zeros. Two readers read the
    same area meanwhile, so that lookups race the discards."""
    cs = 65536
    size = 8 * MiB
    top = full_chain(tmp_path, size=size, cluster_size=cs, table_size=4)
    before = qemu_convert(top, tmp_path / "before.raw")
    m = mount(top, "nostream")
    disk = Disk(m.raw, before, bytearray(before))
    rng = random.Random(SEED)
    first_half = list(range(0, size // 2, cs))  # the discarded clusters; the top holds some of them
    second_half = list(range(size // 2, size, cs))  # new allocations: the top holds none there
    rng.shuffle(first_half)
    rng.shuffle(second_half)
    buffered, direct = os.open(m.raw, os.O_RDWR), os.open(m.raw, os.O_RDWR | os.O_DIRECT)

    def read_back(what: str, offset: int, length: int) -> None:
        disk.expect(f"{what} (buffered)", offset, length, os.pread(buffered, length, offset))
        disk.expect(f"{what} (O_DIRECT)", offset, length, read_direct(direct, offset, length))

    def rounds() -> None:
        for round_ in range(24):
            discarded, allocated = first_half.pop(), second_half.pop()
            head = rng.choice([0, 0, rng.randrange(1, cs)]) if discarded else 0  # with part of the cluster before
            data = rng.randbytes(cs)
            os.pwrite(buffered, data, discarded)
            disk.model[discarded : discarded + cs] = data
            os.fsync(buffered)
            read_back(f"round {round_}: the written cluster", discarded, cs)
            assert fallocate(buffered, rng.choice([PUNCH_HOLE, ZERO_RANGE]), discarded - head, cs + head) == 0
            disk.model[discarded - head : discarded + cs] = bytes(cs + head)
            read_back(f"round {round_}: the discarded range", discarded - head, cs + head)
            os.fsync(buffered)
            file_size = top.stat().st_size
            data = rng.randbytes(cs)
            os.pwrite(buffered, data, allocated)
            disk.model[allocated : allocated + cs] = data
            read_back(f"round {round_}: the new allocation", allocated, cs)
            read_back(f"round {round_}: the discarded range after the allocation", discarded - head, cs + head)
            assert top.stat().st_size <= file_size, f"round {round_}: the allocation did not reuse the freed space"
        done.set()

    done = threading.Event()
    try:
        with readers_of(m.raw, 2) as readers:
            run_together(readers, lambda reader: not done.is_set(), during=rounds)
    finally:
        os.close(buffered)
        os.close(direct)
    m.umount()
    after_unmount(top, tmp_path, disk.model)


def test_sixteen_readers_of_a_read_only_mount_read_what_qemu_reads(tmp_path, mount):
    """Sixteen threads of random reads, 512 bytes to 256 KiB at any offset, buffered (with the
    kernel's readahead) or O_DIRECT, over the three-layer chain with zero clusters and a short
    base: each reads what QEMU reads."""
    c = build_chain(tmp_path, size=16 * MiB + 512, cluster_size=65536, seed=SEED)
    expected = qemu_convert(c.top, tmp_path / "expected.raw")
    m = mount(c.top, "ro", "nostream")
    want = Disk(m.raw, expected, bytearray(expected))
    with readers_of(m.raw, 16, want) as readers:
        run_together(readers, steps_each(500))
    m.umount()


@pytest.mark.mount
def test_a_buffered_read_racing_other_readers_and_a_writer_sees_a_completed_write(tmp_path, mount):
    """A write of more than 64 KiB (a worker thread's), then a buffered read of it through
    another descriptor, while three threads read the same pages buffered and another writes
    elsewhere: the read must see the write, every time. With auto_inval_data on, about 1 read
    in 100 saw the old data."""
    size, at, length = 4 * MiB, 1000, 85_000
    base, top = tmp_path / "base.raw", tmp_path / "top.qed"
    base.write_bytes(random.Random(1).randbytes(size))
    qemu_img("create", "-f", "qed", "-b", base.name, "-F", "raw", str(top), str(size))
    m = mount(top, "nostream")
    stop = threading.Event()

    def read_along() -> None:
        fd = os.open(m.raw, os.O_RDONLY)
        try:
            while not stop.is_set():
                os.pread(fd, length + 8192, 0)
        finally:
            os.close(fd)

    def write_elsewhere() -> None:
        fd = os.open(m.raw, os.O_RDWR)
        try:
            while not stop.is_set():
                os.pwrite(fd, b"x" * 512, size // 2)
        finally:
            os.close(fd)

    others = [threading.Thread(target=read_along) for _ in range(3)] + [threading.Thread(target=write_elsewhere)]
    writer, reader = os.open(m.raw, os.O_RDWR), os.open(m.raw, os.O_RDONLY)
    rng = random.Random(SEED)
    stale = []
    for thread in others:
        thread.start()
    try:
        for step in range(1500):
            data = rng.randbytes(length)
            os.pread(reader, length, at)  # the old data is in the page cache
            os.pwrite(writer, data, at)
            if os.pread(reader, length, at) != data:
                stale.append(step)
    finally:
        stop.set()
        for thread in others:
            thread.join()
        os.close(writer)
        os.close(reader)
    assert not stale, f"seed {SEED}: {len(stale)} of 1500 reads after a completed write saw the old data"
    m.umount()
