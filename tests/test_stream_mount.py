"""Streaming through real mounts: the control files, the CLI, and the kernel as a client."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import stat
import subprocess
import time

import pytest
from conftest import FUSESTREAM, ctl, qemu_check, qemu_convert, qemu_img, run

from fusestream.formats import qed

pytestmark = pytest.mark.mount


def fusestream(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(FUSESTREAM, *args, check=check, timeout=120)


def status_json(m) -> dict:
    return json.loads((m.mountpoint / "status.json").read_text())["images"][0]


def events(m) -> list[str]:
    return [json.loads(line)["event"] for line in (m.mountpoint / "events").read_text().splitlines()]


def qemu_data_bytes(image) -> int:
    """Bytes of the virtual disk that hold data anywhere in the chain, by QEMU's map."""
    extents = json.loads(qemu_img("map", "--output=json", str(image)))
    return sum(e["length"] for e in extents if e["data"])


def test_full_stream_of_a_three_layer_chain(tmp_path, chain, mount):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    data = qemu_data_bytes(chain.top)
    m = mount(chain.top)
    assert fusestream("wait", str(m.mountpoint)).returncode == 0
    assert (m.mountpoint / "status").read_text() == "No active stream; last stream completed, backing file removed\n"
    image = status_json(m)
    assert image["name"] == "top.raw" and image["image"] == str(chain.top) and image["size"] == chain.size
    assert image["backing_chain"] == []
    product_keys = ("state", "offset", "len", "speed", "rate", "base", "error")
    assert {key: image["stream"][key] for key in product_keys} == {
        "state": "completed", "offset": chain.size, "len": chain.size, "speed": 0, "rate": 0, "base": None,
        "error": None}
    assert image["stream"]["remaining"] == 0 and image["stream"]["seconds_left"] is None
    assert m.raw.read_bytes() == expected
    m.umount()
    assert "backing-filename" not in json.loads(qemu_img("info", "--output=json", str(chain.top)))
    assert qemu_check(chain.top).returncode == 0
    assert qemu_convert(chain.top, tmp_path / "after.raw") == expected
    metadata = 64 * 1024  # header, L1 and the few L2 tables of this 8 MiB image
    assert chain.top.stat().st_blocks * 512 <= data + metadata


def test_stream_onto_a_base_with_mount_options(tmp_path, chain, mount):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    m = mount(chain.top, f"base={chain.base}", "speed=64M")
    assert fusestream("wait", str(m.mountpoint)).returncode == 0
    assert status_json(m)["backing_chain"] == [str(chain.base)]
    assert status_json(m)["stream"]["base"] == str(chain.base)
    assert "backing file is now base.raw" in (m.mountpoint / "status").read_text()
    chain.mid.unlink()  # no longer needed, even while mounted
    assert m.raw.read_bytes() == expected
    m.umount()
    info = json.loads(qemu_img("info", "--output=json", str(chain.top)))
    assert info["backing-filename"] == "base.raw" and info["backing-filename-format"] == "raw"
    assert qemu_convert(chain.top, tmp_path / "after.raw") == expected


def test_thousands_of_guest_writes_during_a_slow_stream_all_survive(tmp_path, chain, mount):
    model = bytearray(qemu_convert(chain.top, tmp_path / "expected.raw"))
    m = mount(chain.top, "speed=64K")  # ~2 minutes of stream: it outlasts the writes however slow
    rng = random.Random(9)
    fd = os.open(m.raw, os.O_RDWR)
    try:
        for i in range(3000):
            length = rng.randrange(1, 9000)
            offset = rng.randrange(chain.size - length)
            data = rng.randbytes(length)
            os.pwrite(fd, data, offset)
            model[offset : offset + length] = data
            if i % 500 == 0:
                assert status_json(m)["stream"]["state"] == "running"
        os.fsync(fd)
    finally:
        os.close(fd)
    fusestream("speed", str(m.mountpoint), "0")
    assert fusestream("wait", str(m.mountpoint)).returncode == 0
    assert m.raw.read_bytes() == model
    m.umount()
    assert qemu_check(chain.top).returncode == 0
    assert qemu_convert(chain.top, tmp_path / "after.raw") == model


def settled_stream(m) -> dict:
    """The stream's status once its offset has stayed put for 0.3 s (at most 10 s): a paused
    stream settles; one that goes on copying (at 1M, 10 steps a second) never does."""
    deadline = time.monotonic() + 10
    last = status_json(m)["stream"]
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = status_json(m)["stream"]
        if now["offset"] == last["offset"]:
            return now
        last = now
    raise AssertionError(f"the stream did not stop moving: {last}")


def test_pause_holds_progress_resume_finishes_cancel_keeps_the_chain(tmp_path, chain, mount):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    m = mount(chain.top, "speed=1M")
    time.sleep(0.5)
    fusestream("pause", str(m.mountpoint))
    held = settled_stream(m)  # a step already on its way when the pause came still lands
    assert held["state"] == "paused" and 0 < held["offset"] < held["len"]
    assert (m.mountpoint / "status").read_text().startswith("No active stream; paused at")
    time.sleep(1.0)
    assert status_json(m)["stream"]["offset"] == held["offset"]
    fusestream("resume", str(m.mountpoint))
    deadline = time.monotonic() + 10
    while status_json(m)["stream"]["offset"] == held["offset"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status_json(m)["stream"]["offset"] > held["offset"]
    fusestream("cancel", str(m.mountpoint))
    assert fusestream("wait", str(m.mountpoint), check=False).returncode == 3
    assert status_json(m)["stream"]["state"] == "cancelled"
    assert status_json(m)["backing_chain"] == [str(chain.mid), str(chain.base)]
    assert m.raw.read_bytes() == expected
    m.umount()
    assert json.loads(qemu_img("info", "--output=json", str(chain.top)))["backing-filename"] == "mid.qed"
    assert qemu_check(chain.top).returncode == 0
    assert qemu_convert(chain.top, tmp_path / "after.raw") == expected


def test_control_files_and_the_events_sequence(chain, mount):
    m = mount(chain.top, "nostream")
    assert sorted(os.listdir(m.mountpoint)) == ["ctl", "events", "status", "status.json", "top.raw"]
    assert stat.S_IMODE((m.mountpoint / "ctl").stat().st_mode) == 0o200
    assert (m.mountpoint / "status").read_text() == "No active stream\n"
    assert status_json(m)["stream"]["state"] == "idle"
    for bad in ("bogus", "pause", "stream base=/nowhere", "speed fast", "stream\nstream"):
        with pytest.raises(OSError) as err:
            ctl(m, bad)
        assert err.value.errno == errno.EINVAL
    assert status_json(m)["stream"]["state"] == "idle"
    ctl(m, "stream speed=1M base=base.raw")  # a relative base is beside the image, like backing names
    assert status_json(m)["stream"]["base"] == str(chain.base)
    ctl(m, "cancel")
    assert fusestream("wait", str(m.mountpoint), check=False).returncode == 3
    ctl(m, "stream speed=1M")
    assert re.match(r"^Streaming top\.raw: Completed \d+ of 8389120 bytes \(\d+\.\d%, .*\)\n$",
                    (m.mountpoint / "status").read_text())
    ctl(m, "pause")
    ctl(m, "resume")
    ctl(m, "speed 0")
    assert fusestream("wait", str(m.mountpoint)).returncode == 0
    assert events(m) == ["COMMAND_REJECTED"] * 5 + ["STREAM_STARTED", "STREAM_CANCELLED"] + [
        "STREAM_STARTED", "STREAM_PAUSED", "STREAM_RESUMED", "BACKING_CHANGED", "STREAM_COMPLETED"]
    m.umount()


def test_tail_f_follows_the_events_file(chain, mount):
    m = mount(chain.top, "nostream")
    tail = subprocess.Popen(["tail", "-n", "+1", "-f", str(m.mountpoint / "events")], stdout=subprocess.PIPE,
                            text=True)
    try:
        ctl(m, "stream")
        lines = [json.loads(tail.stdout.readline())["event"] for _ in range(3)]
        assert lines == ["STREAM_STARTED", "BACKING_CHANGED", "STREAM_COMPLETED"]
    finally:
        tail.kill()
        tail.wait()
        tail.stdout.close()
    m.umount()


def test_an_unmounted_stream_resumes_on_the_next_mount(tmp_path, chain, mount):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    m = mount(chain.top, "speed=1M")
    time.sleep(1.0)
    m.umount()  # stops the job between two steps
    assert json.loads(qemu_img("info", "--output=json", str(chain.top)))["backing-filename"] == "mid.qed"
    assert qemu_check(chain.top).returncode == 0
    m = mount(chain.top)
    assert fusestream("wait", str(m.mountpoint)).returncode == 0
    m.umount()
    assert qemu_convert(chain.top, tmp_path / "after.raw") == expected


def test_copy_on_read_fills_the_top_image(tmp_path, chain, mount):
    fresh = chain.top.with_name("fresh.qed")
    qed.create(str(fresh), chain.size, backing_filename=chain.mid.name)
    m = mount(fresh, "nostream", "copy_on_read")
    expected = qemu_convert(chain.mid, tmp_path / "expected.raw")
    with open(m.raw, "rb") as f:
        f.seek(1 << 20)
        assert f.read(300_000) == expected[1 << 20 : (1 << 20) + 300_000]
    m.umount()
    extents = json.loads(qemu_img("map", "--output=json", str(fresh)))
    in_top = [e for e in extents if e["depth"] == 0 and e["data"]]
    assert in_top, extents
    readahead = 1 << 20  # the kernel may read (and so copy) ahead of what was asked
    assert all(e["start"] >= (1 << 20) - 4096 and e["start"] + e["length"] <= (2 << 20) + readahead for e in in_top)
    assert qemu_convert(fresh, tmp_path / "after.raw") == expected


def test_status_watch_and_cli_errors(chain, mount):
    m = mount(chain.top, "speed=16M")
    watch = fusestream("status", "--watch", str(m.mountpoint))
    assert watch.stdout.splitlines()[-1].startswith("completed: ")
    result = fusestream("pause", str(m.mountpoint), check=False)
    assert result.returncode == 1 and "cannot pause: the stream is completed" in result.stderr
    assert "not a fusestream mount" in fusestream("status", "/tmp", check=False).stderr
    m.umount()


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def loop_device():
    """Attach files to loop devices; every one is detached after the test."""
    attached: list[str] = []

    def attach(path) -> str:
        device = run("losetup", "--find", "--show", str(path)).stdout.strip()
        attached.append(device)
        return device

    yield attach
    for device in attached:
        run("losetup", "-d", device, check=False)


def test_ext4_on_a_loop_device_while_streaming(tmp_path, mount, loop_device):
    """The kernel as a client: a filesystem used through the raw file during a stream."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"")
    os.truncate(base, 64 << 20)
    run("mkfs.ext4", "-q", "-F", str(base))
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    run("mount", "-o", "loop", str(base), str(fsdir))
    try:
        (fsdir / "before.bin").write_bytes(random.Random(1).randbytes(3 << 20))
    finally:
        run("umount", str(fsdir))
    top = tmp_path / "top.qed"
    fusestream("create", "-b", "base.raw", "-F", "raw", str(top))
    m = mount(top, "speed=128K")  # the base holds ~5 MiB of data: the stream outlasts the writes below
    device = loop_device(m.raw)
    run("mount", device, str(fsdir))
    try:
        files = {f"during-{i}.bin": random.Random(i).randbytes(200_000 * (i + 1)) for i in range(8)}
        for name, data in files.items():
            (fsdir / name).write_bytes(data)
        run("sync")
        assert status_json(m)["stream"]["state"] == "running"
    finally:
        run("umount", str(fsdir))
        run("losetup", "-d", device)
    fusestream("speed", str(m.mountpoint), "0")
    assert fusestream("wait", str(m.mountpoint)).returncode == 0
    m.umount()
    assert "backing-filename" not in json.loads(qemu_img("info", "--output=json", str(top)))
    streamed = tmp_path / "streamed.raw"
    qemu_convert(top, streamed)
    assert run("e2fsck", "-fn", str(streamed), check=False).returncode == 0
    base.unlink()  # the streamed image stands alone
    m = mount(top, "ro")
    device = loop_device(m.raw)
    run("mount", "-o", "ro", device, str(fsdir))
    try:
        assert (fsdir / "before.bin").read_bytes() == random.Random(1).randbytes(3 << 20)
        for name, data in files.items():
            assert (fsdir / name).read_bytes() == data
    finally:
        run("umount", str(fsdir))
        run("losetup", "-d", device)
    m.umount()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_stream_stops_cleanly_and_the_next_mount_resumes(tmp_path, chain, mount, sig):
    expected = qemu_convert(chain.top, tmp_path / "expected.raw")
    m = mount(chain.top, "speed=1M")
    time.sleep(0.7)
    assert status_json(m)["stream"]["state"] == "running"
    m.proc.send_signal(sig)
    m.proc.wait(timeout=30)
    assert m.proc.returncode == 0
    assert not os.path.ismount(m.mountpoint)
    assert qemu_check(chain.top).returncode == 0
    assert json.loads(qemu_img("info", "--output=json", str(chain.top)))["backing-filename"] == "mid.qed"
    m = mount(chain.top)
    assert fusestream("wait", str(m.mountpoint)).returncode == 0
    m.umount()
    assert qemu_convert(chain.top, tmp_path / "after.raw") == expected
