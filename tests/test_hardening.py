"""Issue 10's hardening findings 3-9 (the daemon's input, sizes, hangs, paths, events, cancel):
each a test that failed before its fix. Hostile input must give one clear line or EINVAL plus a
COMMAND_REJECTED event, never a traceback, a hang or a dead daemon."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shlex
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import FUSESTREAM, MOUNT_HELPER, build_chain, inline, qemu_img, run

from fusestream import control
from fusestream.cli import ctl_command
from fusestream.control import EVENTS_DROPPED, MAX_COMMAND_BYTES, Control, EventLog, parse_command
from fusestream.errors import CommandError, PrintableFormatter, printable
from fusestream.faults import WriteErrors
from fusestream.formats import qed
from fusestream.formats.qed_structs import QED_HEADER, QED_HEADER_SIZE
from fusestream.stream import CANCELLED, COMPLETED, Streamer
from fusestream.units import parse_size

HUGE = "9" * 400
MIB = 1 << 20


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a command that failed as it should: exit 1, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def fusestream(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return run(FUSESTREAM, *args, check=False, timeout=timeout)


def mount_helper(*args: str) -> subprocess.CompletedProcess:
    return run(MOUNT_HELPER, *args, check=False, timeout=30)


def run_with_control(chain, body, run_sync=inline, events: EventLog | None = None) -> EventLog:
    """Run `await body(control)` with a Streamer (copy steps inline) on a MockClock."""
    events = events if events is not None else EventLog("top.raw", clock=lambda: 0.0)

    async def main():
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                streamer = Streamer(chain, events.emit, run_sync=run_sync)
                await nursery.start(streamer.run)
                await body(Control("top.raw", chain, streamer, events, WriteErrors("top.raw", events.emit)))
                streamer.stop()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return events


def ctl_write(mountpoint: Path, data: bytes) -> int | None:
    """Write one command to ctl; the errno it failed with, or None."""
    fd = os.open(mountpoint / "ctl", os.O_WRONLY)
    try:
        os.write(fd, data)
    except OSError as err:
        return err.errno
    finally:
        os.close(fd)
    return None


def read_events(mountpoint: Path) -> list[dict]:
    return [json.loads(line) for line in (mountpoint / "events").read_text().splitlines()]


# -- 3: numbers and paths from users ----------------------------------------------------------


def test_sizes_are_parsed_exactly_with_integers():
    assert parse_size("9223372036854775296") == 9223372036854775296  # a float made it 2^63
    assert parse_size("1.5M") == 3 << 19
    assert parse_size("8191P") == 8191 << 50
    for bad in ("0.5", "1.1K", HUGE, "16384P", "8388608T", "1e3", "-1", "\u0661"):
        with pytest.raises(ValueError):
            parse_size(bad)


BAD_COMMANDS = [
    f"speed {HUGE}\n".encode(),
    f"stream speed={HUGE}\n".encode(),
    b"stream base=/a\x00b\n",
    b"rebase /a\x00b\n",
    b"stream base=/a\x1b[2Jb\n",
    b"rebase '/a\rb'\n",
    b"stream base=/a\xffb\n",
    b"rebase ''\n",
]


def test_bad_numbers_and_paths_in_commands_are_rejected_and_logged(chain, open_chains):
    c = open_chains(chain.top)

    async def body(ctl):
        for raw in BAD_COMMANDS:
            with pytest.raises(CommandError):
                ctl.command(raw)
        assert ctl.streamer.job is None and ctl.streamer.default_speed == 0

    events = run_with_control(c, body)
    c.close()
    assert [e["event"] for e in events.events()] == ["COMMAND_REJECTED"] * len(BAD_COMMANDS)


@pytest.mark.mount
def test_the_daemon_survives_every_bad_command(chain, mount):
    m = mount(chain.top, "nostream")
    expected = m.raw.read_bytes()
    for raw in BAD_COMMANDS:
        assert ctl_write(m.mountpoint, raw) == errno.EINVAL, raw
    assert m.raw.read_bytes() == expected
    assert [e["event"] for e in read_events(m.mountpoint)] == ["COMMAND_REJECTED"] * len(BAD_COMMANDS)
    m.umount()


def test_huge_sizes_on_the_command_line_are_one_line(tmp_path):
    assert "16384P" in one_line_error(fusestream("create", "-s", "16384P", str(tmp_path / "a.qed")))
    assert "invalid size" in one_line_error(fusestream("create", "-s", HUGE, str(tmp_path / "a.qed")))
    assert "invalid size" in one_line_error(fusestream("create", "--cluster-size", HUGE, "-s", "1M",
                                                       str(tmp_path / "a.qed")))
    qemu_img("create", "-f", "qed", str(tmp_path / "b.qed"), "1M")
    (tmp_path / "mnt").mkdir()
    line = one_line_error(mount_helper("-o", f"speed={HUGE}", str(tmp_path / "b.qed"), str(tmp_path / "mnt")))
    assert "speed" in line
    assert not os.path.ismount(tmp_path / "mnt")


# -- 4: virtual sizes beyond QEMU's and the kernel's -------------------------------------------


def test_create_refuses_sizes_qemu_cannot_open(tmp_path):
    image = tmp_path / "a.qed"
    line = one_line_error(fusestream("create", "--cluster-size", "2M", "--table-size", "16",
                                     "-s", "9223372036854775296", str(image)))
    assert str(image) in line and "image_size" in line
    assert not image.exists()
    line = one_line_error(fusestream("create", "--cluster-size", "2M", "--table-size", "8",
                                     "-s", str(qed.BDRV_MAX_LENGTH + 512), str(image)))
    assert "QEMU" in line


def test_the_largest_size_we_create_opens_in_qemu(tmp_path):
    image = tmp_path / "a.qed"
    fusestream_ok = fusestream("create", "--cluster-size", "2M", "--table-size", "8",
                               "-s", str(qed.BDRV_MAX_LENGTH), str(image))
    assert fusestream_ok.returncode == 0, fusestream_ok.stderr
    info = json.loads(qemu_img("info", "--output=json", str(image)))
    assert info["virtual-size"] == qed.BDRV_MAX_LENGTH


def with_image_size(image: Path, size: int) -> None:
    with open(image, "r+b") as f:
        header = QED_HEADER.parse(f.read(QED_HEADER_SIZE))
        header.image_size = size
        f.seek(0)
        f.write(QED_HEADER.build(header))


@pytest.mark.mount
def test_an_image_of_2_pow_63_bytes_is_refused_at_open(tmp_path, mount):
    image = tmp_path / "big.qed"
    qed.create(str(image), 1 << 30, cluster_size=2 << 20, table_size=16)
    with_image_size(image, 1 << 63)
    assert "image_size" in one_line_error(fusestream("info", str(image)))
    assert "image_size" in one_line_error(fusestream("info", "--chain", str(image)))
    (tmp_path / "mnt").mkdir()
    line = one_line_error(mount_helper(str(image), str(tmp_path / "mnt")))
    assert str(image) in line and "image_size" in line
    assert not os.path.ismount(tmp_path / "mnt")
    with_image_size(image, qed.BDRV_MAX_LENGTH)  # the largest that opens: stat and read work
    m = mount(image, "ro")
    assert m.raw.stat().st_size == qed.BDRV_MAX_LENGTH
    with open(m.raw, "rb") as f:
        f.seek(qed.BDRV_MAX_LENGTH - 4096)
        assert f.read(8192) == bytes(4096)
    m.umount()


# -- 5: a long command is refused before it is parsed ------------------------------------------


def test_a_long_command_is_refused_without_being_parsed(chain, monkeypatch, open_chains):
    parsed = []

    def split(text, *args, **kw):
        parsed.append(len(text))
        raise ValueError("the test's split")

    monkeypatch.setattr(control.shlex, "split", split)
    c = open_chains(chain.top)

    async def body(ctl):
        for size in (MAX_COMMAND_BYTES + 1, MIB):
            with pytest.raises(CommandError, match="longer than"):
                ctl.command(b"stream base=" + b"a" * size + b"\n")

    events = run_with_control(c, body)
    c.close()
    assert parsed == []
    assert [e["event"] for e in events.events()] == ["COMMAND_REJECTED"] * 2


def test_a_rejected_command_never_echoes_credentials(chain, open_chains):
    """COMMAND_REJECTED echoes the command and the reason: a URL in either shows without its
    userinfo or query values (a presigned URL's signature)."""
    secrets = ("pw-123", "sig-456", "tok-789")
    url = "HTTPS://user:pw-123@images.example/base.raw?X-Amz-Signature=sig-456&X-Amz-Security-Token=tok-789"
    c = open_chains(chain.top)

    long_password = "p" * 300  # past what the event echoes: redacted before it is cut
    quoted = "https://user:it's-a-pw@images.example/x"  # a quote is legal in a userinfo
    commands = [f"stream base={url}\n", f"rebase '{url}'\n", f"stream base={url} speed=x\n",
                f"stream base=https://user:{long_password}@images.example/x\n", f"stream base={quoted}\n",
                "strem base=http://user:pw-123@[::1/x\n", "rebase http://[::1/x extra\n",
                # passwords with an unencoded / (split as host and port) or a character that
                # normalizes to one (urlsplit's error quotes the host part)
                "stream base=https://KEY:pw/123@images.example/x\n", "rebase https://KEY:12/pw-123@images.example/x\n",
                "stream base=https://user:pw\uff0f123@images.example/x\n"]

    async def body(ctl):
        for raw in commands:
            with pytest.raises(CommandError):
                ctl.command(raw.encode())

    events = run_with_control(c, body)
    c.close()
    rejected = [e["data"] for e in events.events()]
    assert len(rejected) == len(commands)  # a URL that cannot be split is rejected too, not a crash
    assert all("images.example/base.raw?X-Amz-Signature=***" in d["command"] for d in rejected[:3])
    shown = json.dumps(rejected, ensure_ascii=False)
    assert not any(secret in shown for secret in (*secrets, "ppppp", "it's-a-pw", "a-pw", "pw/123", "\uff0f"))


@pytest.mark.mount
def test_a_megabyte_ctl_write_does_not_hold_up_guest_reads(chain, mount):
    m = mount(chain.top, "nostream")
    latencies: list[float] = []
    stop = threading.Event()

    def guest():
        with open(m.raw, "rb", buffering=0) as f:
            while not stop.is_set():
                started = time.monotonic()
                os.pread(f.fileno(), 4096, 0)
                latencies.append(time.monotonic() - started)
                time.sleep(0.005)

    answers: list[int | None] = []
    reader = threading.Thread(target=guest, daemon=True)
    writer = threading.Thread(target=lambda: answers.append(ctl_write(m.mountpoint, b"stream base=" + b"a" * MIB)),
                              daemon=True)
    reader.start()
    try:
        started = time.monotonic()
        writer.start()
        writer.join(timeout=10)  # it took 17 s when the megabyte was parsed
        rejected_in = time.monotonic() - started
        time.sleep(0.05)
    finally:
        stop.set()
        reader.join(timeout=10)
    assert answers == [errno.EINVAL] and rejected_in < 5.0
    assert max(latencies) < 5.0
    [event] = read_events(m.mountpoint)
    assert event["event"] == "COMMAND_REJECTED" and len(event["data"]["command"]) <= 256
    m.umount()


# -- 6: FIFOs, devices, /proc, hostile names, hard-linked loops --------------------------------


def test_create_refuses_a_fifo_and_a_device_without_hanging(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "FIFO" in one_line_error(fusestream("create", "--force", "-s", "1M", str(fifo), timeout=10))
    assert "/dev/null" in one_line_error(fusestream("create", "--force", "-s", "1M", "/dev/null"))


@pytest.mark.parametrize("proc_file", ["/proc/self/status", "/proc/self/mem"])
def test_a_backing_file_under_proc_is_one_line(tmp_path, proc_file):
    assert proc_file in one_line_error(fusestream("create", "-b", proc_file, "-F", "raw", "-s", "1M",
                                                  str(tmp_path / "c.qed")))
    assert proc_file in one_line_error(fusestream("create", "-b", proc_file, "-s", "1M", str(tmp_path / "c.qed")))
    image = tmp_path / "top.qed"
    qed.create(str(image), 1 << 20, backing_filename=proc_file, backing_raw=True)
    assert proc_file in one_line_error(fusestream("info", "--chain", str(image)))
    (tmp_path / "mnt").mkdir()
    assert proc_file in one_line_error(mount_helper(str(image), str(tmp_path / "mnt")))
    assert not os.path.ismount(tmp_path / "mnt")


EVIL_NAME = "gone.raw\nfusestream: everything is fine\x1b[2J\x07"


def test_an_image_cannot_write_lines_or_escapes_to_the_terminal(tmp_path):
    image = tmp_path / "top.qed"
    qed.create(str(image), 1 << 20, backing_filename=EVIL_NAME, backing_raw=True)
    (tmp_path / "mnt").mkdir()
    for result in (mount_helper(str(image), str(tmp_path / "mnt")), fusestream("info", "--chain", str(image))):
        line = one_line_error(result)
        assert "\\nfusestream: everything is fine\\x1b[2J\\x07" in line
        assert "\x1b" not in line and "\x07" not in line
    shown = fusestream("info", str(image))
    assert shown.returncode == 0
    assert "\x1b" not in shown.stdout and "everything is fine" in shown.stdout
    assert not any(line.startswith("fusestream:") for line in shown.stdout.splitlines())


def test_printable_escapes_only_what_cannot_be_shown():
    assert printable("/vm/disk é.raw") == "/vm/disk é.raw"
    assert printable("a\nb\tc\x1b\x00\u202e\udcff") == "a\\nb\\tc\\x1b\\x00\\u202e\\udcff"
    record = logging.LogRecord("fusestream", logging.ERROR, __file__, 1, "stream failed: %s", (EVIL_NAME,), None)
    line = PrintableFormatter("%(levelname)s: %(message)s").format(record)
    assert line == "ERROR: stream failed: " + printable(EVIL_NAME) and "\n" not in line


def test_a_hard_linked_self_loop_is_a_loop_in_mount_and_info(tmp_path):
    top = tmp_path / "top.qed"
    qed.create(str(top), 1 << 20, backing_filename="link.qed")
    os.link(top, tmp_path / "link.qed")
    (tmp_path / "mnt").mkdir()
    assert "backing file loop" in one_line_error(mount_helper(str(top), str(tmp_path / "mnt")))
    assert "backing file loop" in one_line_error(fusestream("info", "--chain", str(top)))
    assert "own backing file" in one_line_error(
        fusestream("create", "--force", "-b", "top.qed", "-s", "1M", str(tmp_path / "link.qed")))


# -- 7: any path through ctl -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/vm dir/base.raw", "/a'b\"c\\d", "/x=y/ b ", "/tab\there", "/é/\u00a0"])
def test_ctl_commands_carry_any_path(path):
    assert parse_command(ctl_command(["rebase", path]) + "\n") == ("stream", {"base": path})
    assert parse_command(ctl_command(["stream", f"base={path}", "speed=1M"])) == (
        "stream", {"base": path, "speed": 1 << 20})


@pytest.mark.mount
@pytest.mark.parametrize("how", ["stream", "rebase"])
def test_stream_and_rebase_onto_a_base_whose_path_has_a_space(tmp_path, mount, how):
    built = build_chain(tmp_path, size=2 * MIB, cluster_size=4096, table_size=2, writes=4)
    directory = tmp_path / "vm dir 'quoted'"  # qemu-io cannot write from such a path: move them
    directory.mkdir()
    for layer in (built.base, built.mid, built.top):
        layer.rename(directory / layer.name)
    chain = dataclasses.replace(built, base=directory / built.base.name, mid=directory / built.mid.name,
                                top=directory / built.top.name)
    expected = run("qemu-img", "convert", "-O", "raw", str(chain.top), str(tmp_path / "expected.raw"))
    assert expected.returncode == 0
    m = mount(chain.top, "nostream")
    if how == "stream":
        result = fusestream("stream", "--base", str(chain.base), str(m.mountpoint))
    else:
        result = fusestream("rebase", str(m.mountpoint), str(chain.base))
    assert result.returncode == 0, result.stderr
    assert fusestream("wait", str(m.mountpoint)).returncode == 0
    assert m.raw.read_bytes() == (tmp_path / "expected.raw").read_bytes()
    m.umount()
    info = json.loads(qemu_img("info", "--output=json", str(chain.top)))
    assert info["backing-filename"] == "base.raw"


def test_the_cli_quotes_what_it_sends():
    assert ctl_command(["rebase", "/vm dir/b.raw"]) == "rebase '/vm dir/b.raw'"
    assert shlex.split(ctl_command(["stream", "base=/a'b"])) == ["stream", "base=/a'b"]


# -- 8: the events log is bounded in memory ----------------------------------------------------


def test_rejected_megabyte_commands_keep_memory_bounded(chain, open_chains):
    c = open_chains(chain.top)

    async def body(ctl):
        for _ in range(300):
            with pytest.raises(CommandError):
                ctl.command(b"x" * MIB)

    events = run_with_control(c, body)
    c.close()
    last = events.events()[-1]
    assert last["data"]["length"] == MIB and len(last["data"]["command"]) == control.MAX_ECHOED_BYTES
    assert len(events) < 300 * 1024  # each line holds the reason and 256 bytes of the command
    assert events.kept_bytes <= control.EVENTS_KEPT_BYTES


@pytest.mark.mount
def test_the_events_file_of_a_mount_stays_json_past_the_kept_tail(chain, mount):
    m = mount(chain.top, "nostream")
    events_file = m.mountpoint / "events"
    for n in range(4000):  # ~1.7 MB of COMMAND_REJECTED lines: past the 1 MiB kept in memory
        assert ctl_write(m.mountpoint, f"bogus{n} ".encode() + b"x" * 300) == errno.EINVAL
    content = events_file.read_bytes()
    assert len(content) == events_file.stat().st_size > control.EVENTS_KEPT_BYTES
    lines = [json.loads(line) for line in content.splitlines()]
    assert lines[0]["event"] == EVENTS_DROPPED
    rejected = [line["data"]["command"].split()[0] for line in lines if line["event"] == "COMMAND_REJECTED"]
    assert rejected == [f"bogus{n}" for n in range(4000 - len(rejected), 4000)]
    assert sum(line["data"]["lines"] for line in lines if line["event"] == EVENTS_DROPPED) + len(rejected) == 4000
    result = fusestream("speed", str(m.mountpoint), "fast")
    assert "invalid size 'fast'" in one_line_error(result)  # the CLI still finds the newest reason
    m.umount()


def emit_numbered(events: EventLog, first: int, count: int) -> None:
    for n in range(first, first + count):
        events.emit("STREAM_PAUSED", {"offset": n, "len": 1000})


def read_all(events: EventLog, offset: int, chunk: int) -> bytes:
    parts = []
    while offset < len(events):
        data = events.read(offset, chunk)
        assert data, offset
        parts.append(data)
        offset += len(data)
    return b"".join(parts)


@pytest.mark.parametrize("count", [500, 6000])  # 6000: more gaps than MAX_GAPS, merged
def test_a_reader_from_the_start_is_told_what_was_dropped(count):
    events = EventLog("top.raw", clock=time.time, kept_bytes=4096)
    emit_numbered(events, 0, count)
    total = len(events)
    content = read_all(events, 0, 4096)
    assert len(content) == total  # offsets keep their meaning: nothing ever shrinks
    for chunk in (1, 7, 113, 1 << 16):  # the same bytes whatever the reads' sizes
        assert read_all(events, 0, chunk) == content
    lines = [json.loads(line) for line in content.splitlines()]
    notices = [line for line in lines if line["event"] == EVENTS_DROPPED]
    kept = [line["data"]["offset"] for line in lines if line["event"] == "STREAM_PAUSED"]
    assert lines[0]["event"] == EVENTS_DROPPED and lines[0]["image"] == "top.raw"
    assert sum(n["data"]["lines"] for n in notices) + len(kept) == count
    assert sum(n["data"]["bytes"] for n in notices) + sum(len(line) + 1 for line in content.splitlines()
                                                           if b'"STREAM_PAUSED"' in line) == total
    assert kept == list(range(count - len(kept), count))
    assert len(notices) <= control.MAX_GAPS
    assert events.kept_bytes <= 4096 + control.MAX_GAPS * 200


def test_a_follower_that_fell_behind_gets_whole_lines_and_a_notice():
    events = EventLog("top.raw", kept_bytes=4096)
    emit_numbered(events, 0, 10)
    follower = len(events)
    for burst in range(20):  # tail -f, reading after each burst; it falls behind more and more
        emit_numbered(events, 10 + burst * 100, (burst + 1) * 5)
        new = read_all(events, follower, 4096)
        follower += len(new)
        lines = [json.loads(line) for line in new.splitlines()]
        if any(line["event"] == EVENTS_DROPPED for line in lines):
            assert lines[0]["event"] == EVENTS_DROPPED
        offsets = [line["data"]["offset"] for line in lines if line["event"] == "STREAM_PAUSED"]
        assert offsets == list(range(10 + burst * 100 + (burst + 1) * 5 - len(offsets),
                                     10 + burst * 100 + (burst + 1) * 5))
    assert follower == len(events)


# -- 9: cancel racing completion ---------------------------------------------------------------


def racing_cancel(at: str, outcome: list):
    """A run_sync that issues `cancel` just as the job calls `at` (a Copier or Chain method)."""
    streamer_box: list[Streamer] = []

    async def run_sync(fn, *args):
        if getattr(fn, "__name__", "") == at and streamer_box:
            try:
                streamer_box[0].cancel()
                outcome.append("accepted")
            except CommandError as err:
                outcome.append(str(err))
        return fn(*args)

    return run_sync, streamer_box


@pytest.mark.parametrize("at, answer, state", [
    ("rebase", "cannot cancel: the stream is completing", COMPLETED),
    ("drain", "accepted", CANCELLED),
])
def test_cancel_at_the_end_of_a_stream_is_answered_by_what_happens(chain, at, answer, state, open_chains):
    c = open_chains(chain.top)
    outcome: list[str] = []
    run_sync, streamer_box = racing_cancel(at, outcome)

    async def body(ctl):
        streamer_box.append(ctl.streamer)
        job = ctl.streamer.start()
        await job.wait_finished()
        outcome.append(job.state)
        try:
            ctl.command(b"cancel\n")
        except CommandError as err:
            outcome.append(str(err))

    events = run_with_control(c, body, run_sync=run_sync)
    late = "cannot cancel: the stream " + ("has completed" if state == COMPLETED else "was cancelled")
    assert outcome == [answer, state, late]
    assert c.top.backing_filename == (None if state == COMPLETED else "mid.qed")
    c.close()
    names = [e["event"] for e in events.events()]
    assert ("STREAM_COMPLETED" in names) == (state == COMPLETED)
    assert ("STREAM_CANCELLED" in names) == (state == CANCELLED)
