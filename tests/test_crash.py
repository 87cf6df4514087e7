"""kill -9 of the daemon at random moments during a stream with fsync'ed guest writes.

After each kill: qemu-img check finds no corruption (leaks are allowed), every write acknowledged
by fsync is there, nothing the guest did not write has changed, and the next mount resumes the
stream and completes it with exactly the content the image had after the kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time

import pytest
from conftest import FUSESTREAM, build_chain, fallocate, qemu_check, qemu_convert, qemu_img, run

from fusestream.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

DISCARD = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class GuestWriter(threading.Thread):
    """Writes random batches through the raw file (some of them discards, which read as zeros),
    each followed by fsync; remembers what fsync acknowledged, and which bytes a batch in flight
    at the kill may or may not hold."""

    def __init__(self, raw, size: int, seed: int):
        super().__init__(daemon=True)
        self.raw, self.size, self.rng = raw, size, random.Random(seed)
        self.acked: list[tuple[int, bytes]] = []  # (offset, data) in the order they were written
        self.in_flight: list[tuple[int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            fd = os.open(self.raw, os.O_RDWR)
        except OSError:
            return
        try:
            while not self.stop.is_set():
                batch = [self._one_write() for _ in range(self.rng.randrange(1, 8))]
                self.in_flight = [(o, len(d)) for o, d in batch]
                for offset, data in batch:
                    if not any(data) and fallocate(fd, DISCARD, offset, len(data)):
                        raise OSError("discard failed")
                    if any(data):
                        os.pwrite(fd, data, offset)
                os.fsync(fd)
                self.acked += batch
                self.in_flight = []
                self.stop.wait(0.02)  # leave most of the disk to the stream
        except OSError:  # the daemon was killed under us: the batch in flight is unacknowledged
            pass
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN once the daemon is gone
                os.close(fd)

    def _one_write(self) -> tuple[int, bytes]:
        """A write of random data, or (one time in five) a discard: zeros, written as a punch."""
        length = self.rng.randrange(1, 20_000 if self.rng.random() < 0.8 else 300_000)
        data = self.rng.randbytes(length) if length < 20_000 else bytes(length)
        return self.rng.randrange(self.size - length), data


def expected_after_crash(original: bytes, writer: GuestWriter, actual: bytes) -> bytes:
    """What the image must hold: the original, with every acknowledged write applied in order;
    bytes a write in flight touched may hold either state, so they are taken from `actual`."""
    model = bytearray(original)
    for offset, data in writer.acked:
        model[offset : offset + len(data)] = data
    for offset, length in writer.in_flight:
        model[offset : offset + length] = actual[offset : offset + length]
    return bytes(model)


@pytest.mark.mount
def test_kill_9_during_a_stream_with_fsynced_writes(tmp_path, mount, request):
    rounds = request.config.getoption("--crash-rounds")
    rng = random.Random(2024)
    for round_ in range(rounds):
        directory = tmp_path / f"round{round_}"
        directory.mkdir()
        chain = build_chain(directory, size=16 << 20, cluster_size=65536, seed=round_)
        original = qemu_convert(chain.top, directory / "original.raw")

        m = mount(chain.top, "speed=1M")  # several seconds of streaming: the kill lands mid-stream
        writer = GuestWriter(m.raw, chain.size, seed=round_)
        writer.start()
        time.sleep(rng.uniform(0.1, 1.5))
        m.proc.kill()
        m.proc.wait()
        writer.stop.set()
        writer.join(timeout=10)
        run("fusermount3", "-u", "-z", str(m.mountpoint))

        check = qemu_check(chain.top)
        assert check.returncode in (0, 3), f"round {round_}: {check.stdout}{check.stderr}"
        assert json.loads(qemu_img("info", "--output=json", str(chain.top)))["backing-filename"] == "mid.qed"
        after_crash = qemu_convert(chain.top, directory / "after-crash.raw")
        assert after_crash == expected_after_crash(original, writer, after_crash), f"round {round_}"

        m = mount(chain.top)
        assert run(FUSESTREAM, "wait", str(m.mountpoint), timeout=120).returncode == 0
        m.umount()
        assert "backing-filename" not in json.loads(qemu_img("info", "--output=json", str(chain.top)))
        assert qemu_check(chain.top).returncode in (0, 3)
        assert qemu_convert(chain.top, directory / "final.raw") == after_crash, f"round {round_}"
