"""Power-loss replay (as SQLite's and ALICE's crash tests do).

A stream with fsync'ed guest writes runs in-process while every write, flush and truncate that
fusestream makes to the top image is recorded. Then the image is rebuilt as a power cut would
leave it: every prefix of the operations cut at a flush, and, after each cut, the writes that were
not yet flushed persisted one at a time, partly dropped, or applied out of order. Every such image must open (after the
check and repair a read-write mount does), have no corruption, keep every write acknowledged
before the cut, and still finish streaming.
"""

from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass, field

import pytest
from conftest import build_chain, qemu_check

from fusestream.chain import open_chain
from fusestream.copy import Copier
from fusestream.formats import qed, qed_check
from fusestream.sources import local


@dataclass
class Recording:
    fds: set[int]  # the top image's descriptors: ordinary and O_DIRECT
    ops: list[tuple] = field(default_factory=list)  # ("write", offset, bytes) | ("flush",) | ("truncate", size)
    issued: list[tuple[int, bytes]] = field(default_factory=list)  # every guest write, in order
    acked_at: dict[int, int] = field(default_factory=dict)  # flush index -> how many of `issued` it acked


@pytest.fixture
def recorder(monkeypatch):
    """Record the top image's writes, flushes and truncates (and still perform them)."""
    recording = Recording(fds=set())
    real_pwrite, real_fdatasync, real_ftruncate = local._pwrite_all, os.fdatasync, os.ftruncate
    real_punch = local.punch_hole

    def pwrite(fd, data, offset):
        if fd in recording.fds:
            whole = b"".join(bytes(b) for b in data) if isinstance(data, list) else bytes(data)
            recording.ops.append(("write", offset, whole))
        real_pwrite(fd, data, offset)

    def fdatasync(fd):
        if fd in recording.fds:
            recording.ops.append(("flush",))
        real_fdatasync(fd)

    def ftruncate(fd, size):
        if fd in recording.fds:
            recording.ops.append(("truncate", size))
        real_ftruncate(fd, size)

    def punch_hole(fd, offset, length):  # the range reads zeros: as a write of zeros, just as unordered
        if fd in recording.fds:
            recording.ops.append(("write", offset, bytes(length)))
        real_punch(fd, offset, length)

    monkeypatch.setattr(local, "_pwrite_all", pwrite)
    monkeypatch.setattr(local, "punch_hole", punch_hole)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    return recording


def run_workload(top, recording: Recording, rng: random.Random, stream: bool) -> None:
    """Interleave stream steps, guest writes and discards; every few writes the guest fsyncs."""
    chain = open_chain(str(top))
    recording.fds = {chain.top.source.fd, chain.top.source.direct.fd}
    copier = Copier(chain, base=None)
    offset = 0
    try:
        while offset < chain.size:
            if stream:
                offset, _ = copier.copy_step(offset, chain.size, 64 * 1024)
            else:
                offset += chain.size // 40
            for _ in range(rng.randrange(0, 4)):
                length = rng.randrange(1, 20_000)
                write = (rng.randrange(chain.size - length), rng.randbytes(length))
                chain.write(*write)
                recording.issued.append(write)
            if rng.random() < 0.3:  # a discard: a write of zeros that frees clusters for reuse
                length = rng.randrange(1, 64 * 1024)
                at = rng.randrange(chain.size - length)
                chain.discard(at, length)
                recording.issued.append((at, bytes(length)))
            if rng.random() < 0.4:
                chain.flush()
                recording.acked_at[len(recording.ops) - 1] = len(recording.issued)
        if stream:
            copier.drain()
            chain.rebase(len(chain.layers))
    finally:
        recording.fds = set()
        chain.close()


def run_concurrent_workload(top, recording: Recording, seed: int, writers: int) -> None:
    """The stream in this thread while `writers` threads write, discard and fsync at once, each
    in its own slice of the disk (so that which of two writes landed last is never in doubt). A
    write counts as acknowledged by a flush that started after it had returned."""
    chain = open_chain(str(top))
    recording.fds = {chain.top.source.fd, chain.top.source.direct.fd}
    lock = threading.Lock()  # orders `issued` and the flush records between the writers
    slice_size = chain.size // writers

    def writer(index: int) -> None:
        rng = random.Random(seed + index)
        start = index * slice_size
        for _ in range(40):
            length = rng.randrange(1, 20_000)
            at = start + rng.randrange(slice_size - length)
            data = rng.randbytes(length) if rng.random() < 0.8 else None
            if data is None:  # a discard: a write of zeros that frees clusters for reuse
                chain.discard(at, length)
            else:
                chain.write(at, data)
            with lock:
                recording.issued.append((at, data if data is not None else bytes(length)))
            if rng.random() < 0.3:
                with lock:
                    acked = len(recording.issued)
                chain.flush()
                with lock:
                    recording.acked_at[len(recording.ops) - 1] = max(
                        acked, recording.acked_at.get(len(recording.ops) - 1, 0))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    copier = Copier(chain, base=None)
    try:
        for thread in threads:
            thread.start()
        offset = 0
        while offset < chain.size:
            offset, _ = copier.copy_step(offset, chain.size, 64 * 1024)
        copier.drain()
        for thread in threads:
            thread.join()
        chain.rebase(len(chain.layers))
    finally:
        for thread in threads:
            thread.join()
        recording.fds = set()
        chain.close()


def pending_after(ops: list[tuple], cut: int) -> list[tuple]:
    """The operations after a flush and before the next one: what a power cut may half-apply."""
    following = ops[cut + 1 :]
    return following[: next((i for i, op in enumerate(following) if op[0] == "flush"), len(following))]


def choose_cuts(recording: Recording, metadata_end: int, rng: random.Random, cuts: int) -> list[int]:
    """Every flush when `cuts` allows; else first those followed by a rewrite of the header or the
    L1 table (where the order of writes matters most), then random ones."""
    flushes = [i for i, op in enumerate(recording.ops) if op[0] == "flush"]
    if cuts >= len(flushes):
        return flushes
    structural = [f for f in flushes
                  if any(op[0] == "write" and op[1] < metadata_end for op in pending_after(recording.ops, f))]
    others = [f for f in flushes if f not in structural]
    return sorted(structural[:cuts] + rng.sample(others, max(0, min(len(others), cuts - len(structural)))))


def crash_images(initial: bytes, recording: Recording, rng: random.Random, cuts: int):
    """(name, file content, number of guest writes acknowledged) for power cuts at chosen
    flushes."""
    header = qed.QED_HEADER.parse(initial[: qed.QED_HEADER_SIZE])
    metadata_end = header.l1_table_offset + header.cluster_size * header.table_size
    for cut in choose_cuts(recording, metadata_end, rng, cuts):
        acked = max((n for i, n in recording.acked_at.items() if i <= cut), default=0)
        durable = recording.ops[: cut + 1]
        unflushed = pending_after(recording.ops, cut)
        yield f"cut {cut}", apply(initial, durable), acked
        for i, op in enumerate(unflushed if len(unflushed) > 1 else []):  # each pending write alone
            yield f"cut {cut} + only unflushed op {i}", apply(initial, durable + [op]), acked
        if unflushed:
            kept = [op for op in unflushed if rng.random() < 0.5]
            yield f"cut {cut} + some unflushed", apply(initial, durable + kept), acked
            shuffled = rng.sample(unflushed, len(unflushed))[: rng.randrange(1, len(unflushed) + 1)]
            yield f"cut {cut} + unflushed reordered", apply(initial, durable + shuffled), acked


def apply(initial: bytes, ops: list[tuple]) -> bytes:
    image = bytearray(initial)
    for op in ops:
        if op[0] == "write":
            _, offset, data = op
            if offset > len(image):
                image.extend(bytes(offset - len(image)))
            image[offset : offset + len(data)] = data
        elif op[0] == "truncate":
            del image[op[1] :]
            image.extend(bytes(op[1] - len(image)))
    return bytes(image)


def verify_crash_image(path, original: bytes, issued: list[tuple[int, bytes]], acked: int, name: str) -> None:
    """`issued[:acked]` were acknowledged before the cut; a byte that a later write covers may
    hold that write's data instead (it may have reached the disk)."""
    repaired = qed_check.repair_if_needed(str(path))  # what a read-write mount does first
    assert repaired is None or not repaired.corruptions, f"{name}: {repaired}"
    result = qed_check.check_file(str(path))
    assert not result.corruptions, f"{name}: {result.problems}"
    chain = open_chain(str(path))
    try:
        content = chain.read(0, chain.size)
        model = bytearray(original)
        for offset, data in issued[:acked]:
            model[offset : offset + len(data)] = data
        must_hold = {i for offset, data in issued[:acked] for i in range(offset, offset + len(data))}
        must_hold -= {i for offset, data in issued[acked:] for i in range(offset, offset + len(data))}
        assert all(content[i] == model[i] for i in must_hold), f"{name}: an acknowledged write is lost"
        touched = bytearray(len(original))  # bytes no guest write covered must read as before
        for offset, data in issued:
            touched[offset : offset + len(data)] = b"\x01" * len(data)
        untouched = [i for i in range(0, len(original), 64) if not touched[i]]
        assert all(content[i] == original[i] for i in untouched), f"{name}: data the guest never wrote changed"
        if chain.backing_layers:
            Copier(chain, base=None).copy_range(0, chain.size)
            chain.rebase(len(chain.layers))
        assert chain.read(0, chain.size) == content, f"{name}: finishing the stream changed the data"
    finally:
        chain.close()


@pytest.mark.parametrize("workload", ["stream", "solo", "concurrent"],
                         ids=["stream-with-backing", "writes-without-backing", "stream-with-4-concurrent-writers"])
def test_every_power_cut_leaves_a_valid_image(tmp_path, recorder, request, workload, open_chains):
    rng = random.Random(7)
    if workload != "solo":  # a fresh top over the chain: its L2 tables (4 MiB of disk each) are all made during the run
        c = build_chain(tmp_path, size=12 << 20, cluster_size=4096, table_size=2, seed=3, writes=6)
        top = c.top.with_name("fresh.qed")
        qed.create(str(top), c.size, backing_filename=c.mid.name, cluster_size=4096, table_size=2)
    else:
        top = tmp_path / "solo.qed"
        qed.create(str(top), 2 << 20, cluster_size=4096, table_size=2)
    original_chain = open_chains(top, writable=False, lock=False)
    original = original_chain.read(0, original_chain.size)
    original_chain.close()
    initial = top.read_bytes()
    if workload == "concurrent":
        run_concurrent_workload(top, recorder, seed=11, writers=4)
    else:
        run_workload(top, recorder, rng, workload == "stream")
    assert any(op[0] == "flush" for op in recorder.ops)

    crash = top.with_name("crash.qed")  # beside the backing files, so relative names resolve
    images = 0
    for name, content, acked in crash_images(initial, recorder, rng, request.config.getoption("--replay-cuts")):
        crash.write_bytes(content)
        verify_crash_image(crash, original, recorder.issued, acked, name)
        images += 1
    assert images >= 3
    print(f"{images} crash images from {sum(op[0] == 'flush' for op in recorder.ops)} flushes")
    check = qemu_check(crash)  # QEMU agrees on the last one
    assert check.returncode in (0, 3), check.stdout
