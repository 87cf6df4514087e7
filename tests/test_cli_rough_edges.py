"""Rough edges a new user found (issue 16, item 5): generic FUSE options, a closed pipe, qemu-img's
spellings, `status --watch` in a narrow terminal and in a pipe, and a mount whose daemon died."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest
from conftest import FUSESTREAM, MOUNT_HELPER, MOUNT_TIMEOUT, qemu_check, qemu_img, qemu_io, run

from fusestream import __version__, cli


def fusestream(*args: str, check: bool = True):
    return run(FUSESTREAM, *args, check=check)


def one_error_line(result, message: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def in_proc_mounts(mountpoint) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(mountpoint) for line in f)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# -- 1. generic FUSE options ------------------------------------------------------------------


@pytest.mark.mount
def test_the_generic_fuse_options_are_accepted(chain, mount):
    m = mount(chain.top, "nostream", "default_permissions", "allow_root", "auto_unmount")
    with open(m.raw, "rb") as f:
        assert len(f.read(65536)) == 65536
    m.umount()


@pytest.mark.mount
def test_auto_unmount_unmounts_when_the_daemon_is_killed(chain, mount):
    m = mount(chain.top, "nostream", "auto_unmount")
    try:
        m.proc.kill()
        m.proc.wait()
        wait_until(lambda: not in_proc_mounts(m.mountpoint), "auto_unmount left the dead mount behind")
    finally:
        if in_proc_mounts(m.mountpoint):
            run("fusermount3", "-u", "-z", str(m.mountpoint), check=False)


def test_allow_root_with_allow_other_is_one_line(chain, tmp_path):
    result = run(MOUNT_HELPER, "-f", "-o", "allow_other,allow_root", str(chain.top), str(tmp_path), check=False)
    one_error_line(result, "allow_other and allow_root exclude each other")


# -- 2. a closed pipe -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    [FUSESTREAM, "info", "--json", "{top}"],
    [FUSESTREAM, "info", "--chain", "{top}"],
    [FUSESTREAM, "check", "{top}"],
    [FUSESTREAM, "check", "--output=json", "{top}"],
])
def test_a_closed_pipe_is_no_traceback(chain, command):
    """`fusestream info --json IMG | true`: the reader is gone before anything is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([word.format(top=chain.top) for word in command], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 128 + 13  # as if killed by SIGPIPE, what a shell reports


# -- 3. qemu-img's spellings ------------------------------------------------------------------


def test_info_takes_qemu_imgs_output_and_backing_chain(chain):
    assert (json.loads(fusestream("info", "--output=json", str(chain.top)).stdout)
            == json.loads(fusestream("info", "--json", str(chain.top)).stdout))
    assert (fusestream("info", "--backing-chain", str(chain.top)).stdout
            == fusestream("info", "--chain", str(chain.top)).stdout)
    layers = json.loads(fusestream("info", "--backing-chain", "--output", "json", str(chain.top)).stdout)
    assert [layer["filename"] for layer in layers] == [str(chain.top), str(chain.mid), str(chain.base)]
    assert "image: " in fusestream("info", "--output=human", str(chain.top)).stdout


def test_check_output_json_has_qemu_imgs_keys(tmp_path):
    image = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", str(image), "10M")
    qemu_io(image, "write 0 64k", "write 1M 64k")
    ours = json.loads(fusestream("check", "--output=json", str(image)).stdout)
    theirs = json.loads(qemu_img("check", "--output=json", str(image)))
    del theirs["fragmented-clusters"]  # QEMU's measure of the layout; not a consistency finding
    assert ours == theirs
    with open(image, "ab") as f:  # two leaked clusters at the end
        f.write(b"\0" * 2 * 65536)
    leaky = fusestream("check", "--output=json", str(image), check=False)
    assert leaky.returncode == 3 and json.loads(leaky.stdout)["leaks"] == 2
    repaired = fusestream("check", "--repair", "--output=json", str(image))
    assert json.loads(repaired.stdout)["leaks-fixed"] == 2 and "leaks" not in json.loads(repaired.stdout)
    assert qemu_check(image).returncode == 0


def test_create_takes_qemu_imgs_format_options_and_positional_size(tmp_path):
    (tmp_path / "base.raw").write_bytes(b"\x42" * 65536)
    ours, theirs = tmp_path / "ours.qed", tmp_path / "theirs.qed"
    opts = "cluster_size=4K,table_size=2,backing_file=base.raw,backing_fmt=raw"
    fusestream("create", "-f", "qed", "-o", opts, str(ours), "1M")
    qemu_img("create", "-f", "qed", "-o", opts, str(theirs), "1M")
    assert ours.read_bytes() == theirs.read_bytes()
    fusestream("create", str(tmp_path / "plain.qed"), "3G")
    assert json.loads(qemu_img("info", "--output=json", str(tmp_path / "plain.qed")))["virtual-size"] == 3 << 30


@pytest.mark.parametrize("args, message", [
    (["-f", "qcow2", "{new}", "1M"], "'qcow2'"),
    (["-o", "compat=1.1", "{new}", "1M"], "compat"),
    (["-o", "cluster_size", "{new}", "1M"], "cluster_size"),
    (["-s", "1M", "{new}", "2M"], "twice"),
    (["-o", "cluster_size=4K", "--cluster-size", "4K", "{new}", "1M"], "twice"),
    (["-o", "backing_file=a.raw", "-b", "a.raw", "{new}"], "twice"),
])
def test_create_refuses_other_formats_and_unknown_options_in_one_line(tmp_path, args, message):
    new = str(tmp_path / "new.qed")
    one_error_line(fusestream("create", *[a.format(new=new) for a in args], check=False), message)
    assert not os.path.exists(new)


@pytest.mark.parametrize("table_size", [1, 2, 3, 4, 8, 16, 32])
def test_table_size_help_says_what_it_accepts(tmp_path, table_size):
    help_text = fusestream("create", "--help").stdout
    assert "a power of two from 2 to 16" in " ".join(help_text.split())
    result = fusestream("create", "--table-size", str(table_size), str(tmp_path / "t.qed"), "1M", check=False)
    if table_size in (2, 4, 8, 16):
        assert result.returncode == 0, result.stderr
    else:
        one_error_line(result, "a power of two from 2 to 16")


def test_mount_fusestream_version():
    assert run(MOUNT_HELPER, "--version").stdout.strip() == f"mount.fusestream {__version__}"


# -- 4. status --watch ------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [10, 20, 40, 80, 200])
def test_the_watch_line_fits_the_terminal(columns):
    stream = {"state": "running", "offset": 3 << 20, "len": 8 << 20, "speed": 0, "rate": 1 << 20,
              "progress_rate": 2 << 20, "seconds_left": 5.0, "copied": 3 << 20, "error": None}
    frame = cli.watch_frame(cli.watch_line(stream), columns)
    assert frame.startswith("\r") and frame.endswith("\033[K")
    visible = frame[1:-len("\033[K")]
    assert len(visible) == min(columns - 1, len(cli.watch_line(stream)))  # never wraps onto a new row
    assert visible == cli.watch_line(stream)[: len(visible)]


def test_the_watch_line_while_paused_says_where():
    stream = {"state": "paused", "offset": 2 << 20, "len": 8 << 20, "speed": 0, "rate": 0,
              "copied": 1 << 20, "error": None}
    assert cli.watch_line(stream) == "paused at 2 MiB of 8 MiB (25.0%)"


def watch_in_a_pipe(m):
    return subprocess.Popen([FUSESTREAM, "status", "--watch", str(m.mountpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.mount
def test_watch_in_a_pipe_prints_plain_lines_and_exits_like_wait(chain, mount):
    m = mount(chain.top, "nostream")
    fusestream("stream", "--speed", "64K", str(m.mountpoint))
    watch = watch_in_a_pipe(m)
    try:
        lines = [watch.stdout.readline(), watch.stdout.readline()]  # periodic lines, one at a time
        fusestream("pause", str(m.mountpoint))
        while "paused" not in lines[-1]:
            lines.append(watch.stdout.readline())
        fusestream("cancel", str(m.mountpoint))
        rest, stderr = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    output = "".join(lines) + rest
    assert "\r" not in output and "\033" not in output, output
    assert all(line.startswith("[") for line in lines[:2]), lines
    assert "paused at " in lines[-1] and " of 8.0 MiB" in lines[-1]
    last = output.splitlines()[-1]
    assert last.startswith("cancelled at ") and " copied in " in last and "/s)" in last, last
    waited = fusestream("wait", str(m.mountpoint), check=False)
    assert watch.returncode == cli.WAIT_EXIT["cancelled"] == waited.returncode
    m.umount()


FRAME = re.compile(r"\r([^\r\n\x1b]*)\x1b\[K")


def read_until_closed(fd: int, seconds: float, frames: int | None = None) -> bytes:
    """What a pty's other side wrote within `seconds`, or until it closed, or (if given) until
    that many redrawn frames have come."""
    data, deadline = b"", time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer has closed the pty
            break
        if not chunk:
            break
        data += chunk
        if frames is not None and len(FRAME.findall(data.decode(errors="replace"))) >= frames:
            break
    return data


@pytest.mark.mount
def test_watch_on_a_narrow_terminal_redraws_one_line_that_fits(chain, mount):
    m = mount(chain.top, "nostream")
    fusestream("stream", "--speed", "64K", str(m.mountpoint))
    terminal, watch_side = pty.openpty()
    fcntl.ioctl(watch_side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 30, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    watch = subprocess.Popen([FUSESTREAM, "status", "--watch", str(m.mountpoint)], stdout=watch_side,
                             stderr=subprocess.PIPE, env=env)
    os.close(watch_side)
    try:
        shown = read_until_closed(terminal, 30, frames=3)
        fusestream("cancel", str(m.mountpoint))
        shown += read_until_closed(terminal, 30)
        watch.wait(timeout=30)
    finally:
        os.close(terminal)
        if watch.poll() is None:
            watch.kill()
        watch.communicate()
    frames = FRAME.findall(shown.decode())
    assert len(frames) > 2 and frames[0].startswith("["), shown
    assert all(len(frame) <= 29 for frame in frames), frames
    assert shown.decode().rstrip().rpartition("\x1b[K")[2].startswith("cancelled at "), shown
    assert watch.returncode == cli.WAIT_EXIT["cancelled"]
    m.umount()


@pytest.mark.mount
def test_watch_totals_when_the_stream_completes(chain, mount):
    m = mount(chain.top, "speed=16M")
    watch = watch_in_a_pipe(m)
    stdout, _ = watch.communicate(timeout=60)
    assert watch.returncode == 0
    assert stdout.splitlines()[-1].startswith("completed: "), stdout
    assert " copied in " in stdout.splitlines()[-1]
    m.umount()


# -- 5. a mount whose daemon died -------------------------------------------------------------


@pytest.mark.mount
def test_commands_on_a_mount_whose_daemon_died_say_so(chain, mount):
    m = mount(chain.top, "nostream")
    try:
        m.proc.kill()
        m.proc.wait()
        for command in (["status"], ["status", "--watch"], ["stream"], ["wait"]):
            result = fusestream(*command, str(m.mountpoint), check=False)
            one_error_line(result, f"{m.mountpoint}: the fusestream daemon of this mount is gone "
                                   "(unmount it with fusermount3 -u)")
    finally:
        run("fusermount3", "-u", "-z", str(m.mountpoint), check=False)
