"""The `fusestream` command: create and inspect images without QEMU."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import __version__
from .errors import FusestreamError, printable
from .units import format_size, parse_size

if TYPE_CHECKING:
    from .formats.layer import Layer
    from .formats.qed_check import CheckResult

# The image commands (create, info, check) import the format modules when they run: without
# them, the commands that talk to a mount (status, stream, wait, ...) start in half the time.

# `fusestream wait` exit status: how the stream job ended (2 stays argparse's usage error).
WAIT_EXIT = {"completed": 0, "failed": 1, "cancelled": 3, "idle": 4}
POLL_SECONDS = 0.05
# `wait` polls status.json often near the job's end and rarely far from it, so that it returns
# soon after a short stream ends and costs the daemon little during a long one.
WAIT_POLL_MIN, WAIT_POLL_MAX = 0.01, 0.5

SUPPORTED_BACKING_FORMATS = ("raw", "qed", "qcow2")
OUTPUT_FORMATS = ("human", "json")  # qemu-img's --output
TABLE_SIZES = (2, 4, 8, 16)  # clusters per table: QED allows 1 too, but QEMU cannot open such images
# qemu-img create's -o keys for QED, and the argument each stands for.
CREATE_OPTIONS = {"backing_file": "backing", "backing_fmt": "backing_format",
                  "cluster_size": "cluster_size", "table_size": "table_size"}
CREATE_FLAGS = {"backing": "-b", "backing_format": "-F", "cluster_size": "--cluster-size",
                "table_size": "--table-size", "size": "-s"}


def cmd_create(args: argparse.Namespace) -> int:
    from .chain import open_layer, probe_format
    from .formats import qed
    from .sources import display_name, resolve_backing, same_location

    if args.format not in (None, "qed"):
        raise FusestreamError(f"create makes QED images only (-f qed), not '{args.format}'")
    merge_create_options(args)
    size = _parse_size_arg(args.size) if args.size else None
    backing_raw = False
    if args.backing:
        backing_path = resolve_backing(args.image, args.backing)
        if same_location(backing_path, args.image):
            raise FusestreamError(f"{args.image}: an image cannot be its own backing file")
        fmt = args.backing_format or probe_format(backing_path)
        backing = open_layer(backing_path, fmt)  # refuses formats we cannot read
        try:
            size = size if size is not None else backing.size
        finally:
            backing.close()
        backing_raw = fmt == "raw"
    elif args.backing_format:
        raise FusestreamError("-F needs -b")
    if size is None:
        raise FusestreamError(f"{args.image}: give a size (-s) or a backing file (-b)")
    size = qed.create(
        args.image,
        size,
        backing_filename=args.backing,
        backing_raw=backing_raw,
        cluster_size=_parse_size_arg(args.cluster_size) if args.cluster_size else qed.QED_DEFAULT_CLUSTER_SIZE,
        table_size=qed.QED_DEFAULT_TABLE_SIZE if args.table_size is None else args.table_size,
        overwrite=args.force,
    )
    print(f"Created {args.image}: qed, {format_size(size)} ({size} bytes)"
          + (f", backing file {display_name(args.backing)} ({fmt})" if args.backing else ""))
    return 0


def merge_create_options(args: argparse.Namespace) -> None:
    """Fold qemu-img's spellings, `-o KEY=VALUE` and the positional SIZE, into the arguments
    they stand for. A setting given twice is refused, so that neither silently wins."""
    settings = [(f"-o {key}", CREATE_OPTIONS[key], value) for key, value in _create_option_items(args.create_options)]
    if args.size_arg is not None:
        settings.append(("SIZE", "size", args.size_arg))
    given = {dest: flag for dest, flag in CREATE_FLAGS.items() if getattr(args, dest) is not None}
    for source, dest, value in settings:
        if dest in given:
            raise FusestreamError(f"{source}: given twice (and as {given[dest]})")
        given[dest] = source
        setattr(args, dest, value)
    if args.backing_format not in (None, *SUPPORTED_BACKING_FORMATS):
        raise FusestreamError(f"-o backing_fmt: '{args.backing_format}' is not one of "
                              + ", ".join(SUPPORTED_BACKING_FORMATS))
    if isinstance(args.table_size, str):
        try:
            args.table_size = int(args.table_size)
        except ValueError:
            raise FusestreamError(f"-o table_size: '{args.table_size}' is not a number") from None
    if args.table_size is not None and args.table_size not in TABLE_SIZES:
        why = " (QEMU cannot open an image with 1)" if args.table_size == 1 else ""
        raise FusestreamError(f"table size {args.table_size}: a power of two from 2 to 16 is needed{why}")


def _create_option_items(texts: list[str]) -> list[tuple[str, str]]:
    """The KEY=VALUE items of the -o lists; a key QED's create does not take is refused."""
    items = []
    for item in filter(None, ",".join(texts).split(",")):
        key, has_value, value = item.partition("=")
        if key not in CREATE_OPTIONS:
            raise FusestreamError(f"-o {key}: not an option of create (it takes {', '.join(CREATE_OPTIONS)})")
        if not has_value or not value:
            raise FusestreamError(f"-o {key}: needs a value ({key}=...)")
        items.append((key, value))
    return items


def _parse_size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise FusestreamError(str(err)) from None


def describe_layer(layer: Layer) -> dict:
    """The facts `info` shows for one layer; keys follow qemu-img info's JSON where it has one.
    A remote layer has no actual-size (None: qemu-img says "unavailable") and a "remote" object:
    what its source says (Source.describe). What a format adds is its module's `info` (see
    chain.FORMAT_MODULES). Backing URLs are shown without credentials."""
    from .chain import FORMATS
    from .sources import disk_usage, display_name, resolve_backing

    info = {
        "filename": layer.path,
        "format": layer.format_name,
        "virtual-size": layer.size,
        "actual-size": disk_usage(layer.source),
        **FORMATS[layer.format_name].info(layer),
    }
    if layer.backing_filename is not None:
        info["backing-filename"] = display_name(layer.backing_filename)
        info["full-backing-filename"] = display_name(resolve_backing(layer.path, layer.backing_filename))
        if layer.backing_format:
            info["backing-filename-format"] = layer.backing_format
    if layer.source.remote:
        info["remote"] = layer.source.describe()
    return info


def render_info(info: dict) -> str:
    lines = [
        f"image: {printable(info['filename'])}",
        f"file format: {info['format']}",
        f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {'unavailable' if info['actual-size'] is None else format_size(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "table-size" in info:
        lines.append(f"table_size: {info['table-size']}")
    for key, value in info.get("format-specific", {}).get("data", {}).items():
        lines.append(f"{key.replace('-', ' ')}: {str(value).lower() if isinstance(value, bool) else value}")
    if "backing-filename" in info:
        fmt = f" (format: {info['backing-filename-format']})" if "backing-filename-format" in info else ""
        lines.append(f"backing file: {printable(info['backing-filename'])}{fmt}")
        lines.append(f"backing file (resolved): {printable(info['full-backing-filename'])}")
    if info.get("need-check"):
        lines.append("needs check: yes (not closed cleanly)")
    if "remote" in info:
        lines += render_remote_info(info["remote"])
    return "\n".join(lines)


def render_remote_info(remote: dict) -> list[str]:
    """What the server said of a remote layer, and what reading it has cost so far."""
    lines = [f"server: {printable(str(remote['server'] or 'not named'))}"]
    lines += [f"{key.replace('_', '-')}: {printable(str(remote[key]))}"
              for key in ("etag", "last_modified") if remote[key] is not None]
    lines.append(f"fetched: {remote['bytes_fetched']} bytes in {remote['requests']} requests, "
                 f"{remote['connections']} connections, {remote['retries']} retries")
    if remote["last_error"]:
        lines.append(f"last error: {printable(remote['last_error'])}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    from .chain import open_chain, open_layer
    from .sources import absolute_location

    if args.chain:
        chain = open_chain(args.image, writable=False, lock=False)
        try:
            infos = [describe_layer(layer) for layer in chain.layers]
        finally:
            chain.close()
    else:
        layer = open_layer(absolute_location(args.image), lock=False)
        try:
            infos = [describe_layer(layer)]
        finally:
            layer.close()
    if _wants_json(args):
        print(json.dumps(infos if args.chain else infos[0], indent=4))
    else:
        print("\n\n".join(render_info(info) for info in infos))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """qemu-img check's meaning: 0 clean, 2 corruption, 3 leaks only, 1 the check itself failed
    (a FusestreamError, which run_main turns into one line and exit status 1)."""
    from .chain import probe_format
    from .formats import qed_check
    from .sources import absolute_location, display_name

    image = absolute_location(args.image)
    if probe_format(image) == "qcow2":
        raise FusestreamError(f"{display_name(image)}: a qcow2 image: check works on QED images "
                              "(use qemu-img check for qcow2)")
    result = qed_check.check_file(image, repair=args.repair)
    if _wants_json(args):
        print(json.dumps(check_report(result, args.image), indent=4))
    else:
        print(qed_check.render(result, args.image))
    return result.exit_status


def _wants_json(args: argparse.Namespace) -> bool:
    return getattr(args, "json", False) or args.output == "json"


def check_report(result: CheckResult, filename: str) -> dict:
    """qemu-img check --output=json's keys for what a QED check finds; like qemu-img, a count
    that is zero is left out (check-errors, always 0 once the check ran, excepted)."""
    counts = {"corruptions": result.corruptions, "leaks": result.leaks,
              "corruptions-fixed": result.corruptions_fixed, "leaks-fixed": result.leaks_fixed,
              "total-clusters": result.total_clusters, "allocated-clusters": result.allocated_clusters}
    return {"filename": filename, "format": "qed", "check-errors": 0,
            **{key: count for key, count in counts.items() if count}}


# -- driving a mount through its control files ---------------------------------------------------


def _control_file(mountpoint: str, name: str) -> str:
    try:
        os.stat(os.path.join(mountpoint, "status.json"))
    except OSError as err:
        raise _mount_error(mountpoint, err) from None
    return os.path.join(mountpoint, name)


def _mount_error(mountpoint: str, err: OSError) -> FusestreamError:
    """What a failed look at a mount's control files means: ENOTCONN is a FUSE mount whose
    daemon has died (killed, crashed), which stays until it is unmounted."""
    if err.errno == errno.ENOTCONN:
        return FusestreamError(f"{mountpoint}: the fusestream daemon of this mount is gone "
                               "(unmount it with fusermount3 -u)")
    return FusestreamError(f"{mountpoint}: not a fusestream mount")


def read_status(mountpoint: str) -> dict:
    """The stream object of the (first) image of a mount, from status.json."""
    try:
        with open(_control_file(mountpoint, "status.json")) as f:
            return json.load(f)["images"][0]
    except OSError as err:  # the daemon died after the first look (`status --watch`, `wait`)
        raise _mount_error(mountpoint, err) from None


def send_command(mountpoint: str, command: str) -> None:
    """Write one command to ctl; on EINVAL, the reason is the newest COMMAND_REJECTED event."""
    try:
        fd = os.open(_control_file(mountpoint, "ctl"), os.O_WRONLY)
        try:  # one write() is one command: unbuffered, so nothing is written twice
            os.write(fd, (command + "\n").encode())
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise FusestreamError(f"{mountpoint}: {err.strerror}") from None
        raise FusestreamError(f"{command}: {_last_rejection(mountpoint)}") from None


def _last_rejection(mountpoint: str) -> str:
    with open(_control_file(mountpoint, "events")) as f:
        rejected = [json.loads(line) for line in f if '"COMMAND_REJECTED"' in line]
    return rejected[-1]["data"]["reason"] if rejected else "rejected"


def progress_bar(stream: dict, width: int = 30) -> str:
    """The bar, the bytes copied per second (what `speed` limits) and the progress through the
    disk per second (skipped space included), and the time left that status.json measured."""
    done = stream["offset"] / stream["len"] if stream["len"] else 1.0
    filled = int(done * width)
    left = stream.get("seconds_left")
    eta = f"{left:.0f} s left" if left is not None else "measuring"
    rates = f"{format_size(stream['rate'])}/s copied, {format_size(stream.get('progress_rate', 0))}/s through"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done * 100:5.1f}%  "
            f"{format_size(stream['offset'])} of {format_size(stream['len'])}  {rates}  {eta}")


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        return watch_status(args.mountpoint)
    with open(_control_file(args.mountpoint, "status")) as f:
        sys.stdout.write(f.read())
    return 0


def watch_status(mountpoint: str) -> int:
    """Show the job until it ends, then the totals of what it copied meanwhile; the exit status
    is `wait`'s. On a terminal one line is redrawn in place; otherwise a plain line is printed
    every WATCH_LINE_SECONDS and at every change of state, for a log to keep."""
    tty = sys.stdout.isatty()
    started = time.monotonic()
    stream = read_status(mountpoint)["stream"]
    copied_at_start = stream.get("copied", 0)
    printed_at, printed_state = -WATCH_LINE_SECONDS, None
    while stream["state"] in ("running", "paused"):
        if tty:
            sys.stdout.write(watch_frame(watch_line(stream), shutil.get_terminal_size().columns))
            sys.stdout.flush()
        elif stream["state"] != printed_state or time.monotonic() - printed_at >= WATCH_LINE_SECONDS:
            print(watch_line(stream), flush=True)
            printed_at, printed_state = time.monotonic(), stream["state"]
        time.sleep(POLL_SECONDS)
        stream = read_status(mountpoint)["stream"]
    seconds = time.monotonic() - started
    end = watch_end_line(stream, stream.get("copied", 0) - copied_at_start, seconds)
    print(("\r\033[K" if tty else "") + end)  # the last line may wrap: nothing redraws it
    return WAIT_EXIT[stream["state"]]


WATCH_LINE_SECONDS = 1.0  # between the lines of `status --watch` when stdout is not a terminal


def watch_line(stream: dict) -> str:
    """The job as `status --watch` shows it while it runs or is paused, or once it has ended."""
    if stream["state"] == "running":
        return progress_bar(stream)
    if stream["state"] in ("paused", "cancelled"):
        done = stream["offset"] / stream["len"] * 100 if stream["len"] else 100.0
        return (f"{stream['state']} at {format_size(stream['offset'])} of {format_size(stream['len'])}"
                f" ({done:.1f}%)")
    return stream["state"] + (f" ({printable(stream['error'])})" if stream["error"] else "")


def watch_frame(line: str, columns: int) -> str:
    """Redraw `line` in place. It is cut to the terminal's width less one column: a longer line
    wraps, and as a carriage return goes back only to the start of its last row, every redraw
    would leave a stale copy of the first rows above it."""
    return "\r" + line[: max(columns - 1, 0)] + "\033[K"


def watch_end_line(stream: dict, copied: int, seconds: float) -> str:
    """How the job ended, and what it copied while watched: bytes, time and average rate."""
    if stream["state"] == "idle":
        return "idle: no stream has run in this mount"
    rate = copied / seconds if seconds > 0 else 0
    return f"{watch_line(stream)}: {format_size(copied)} copied in {seconds:.1f} s ({format_size(rate)}/s)"


def cmd_stream(args: argparse.Namespace) -> int:
    words = ["stream"]
    if args.base:
        words.append(f"base={base_argument(args.base)}")
    if args.speed:
        words.append(f"speed={args.speed}")
    send_command(args.mountpoint, ctl_command(words))
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    send_command(args.mountpoint, ctl_command(["rebase", base_argument(args.base)]))
    return 0


def base_argument(base: str) -> str:
    """A base as ctl takes it: a path made absolute from the current directory, a URL as it is."""
    from .sources import absolute_location

    return absolute_location(base)


def ctl_command(words: list[str]) -> str:
    """A ctl command line from its words, each quoted as ctl splits them (POSIX shell rules), so
    that a path may hold spaces, quotes, backslashes or '='."""
    return " ".join(shlex.quote(word) for word in words)


def cmd_simple(args: argparse.Namespace) -> int:
    send_command(args.mountpoint, args.command if args.command != "speed" else f"speed {args.rate}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """Block until the stream job ends; the exit status says how (WAIT_EXIT)."""
    while True:
        stream = read_status(args.mountpoint)["stream"]
        if stream["state"] not in ("running", "paused"):
            if stream["error"]:
                print_error("fusestream", f"stream failed: {stream['error']}")
            return WAIT_EXIT[stream["state"]]
        time.sleep(wait_poll_seconds(stream))


def wait_poll_seconds(stream: dict) -> float:
    """A quarter of the time the job has left (status.json's seconds_left; from a mount
    without it, the rest of the disk at `rate`), within [WAIT_POLL_MIN, WAIT_POLL_MAX];
    POLL_SECONDS while it is still being measured."""
    if stream["state"] == "paused":
        return WAIT_POLL_MAX
    seconds_left = stream.get("seconds_left")
    if seconds_left is None:
        if "seconds_left" in stream or not stream["rate"]:
            return POLL_SECONDS
        seconds_left = (stream["len"] - stream["offset"]) / stream["rate"]
    return min(WAIT_POLL_MAX, max(WAIT_POLL_MIN, seconds_left / 4))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusestream", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    create = sub.add_parser("create", help="create a QED image, optionally over a backing file")
    create.add_argument("-f", dest="format", metavar="FORMAT", help="qed, the only one (qemu-img's -f)")
    create.add_argument("-o", dest="create_options", action="append", default=[], metavar="KEY=VALUE[,...]",
                        help="qemu-img's spellings: " + ", ".join(f"{key}=" for key in CREATE_OPTIONS))
    create.add_argument("-b", dest="backing", metavar="BACKING",
                        help="backing file (stored as given; a relative name is relative to IMAGE's directory)")
    create.add_argument("-F", dest="backing_format", choices=SUPPORTED_BACKING_FORMATS,
                        help="backing file format (probed if not given)")
    create.add_argument("-s", dest="size", metavar="SIZE", help="virtual size, e.g. 10G (default: the backing file's)")
    create.add_argument("--cluster-size", metavar="N", help="default 64K")
    create.add_argument("--table-size", type=int, metavar="N",
                        help="clusters per table: a power of two from 2 to 16 (" + ", ".join(map(str, TABLE_SIZES))
                             + "), default 4")
    create.add_argument("--force", action="store_true", help="overwrite an existing file")
    create.add_argument("image")
    create.add_argument("size_arg", nargs="?", metavar="SIZE", help="the virtual size, as -s (qemu-img's spelling)")
    create.set_defaults(func=cmd_create)

    info = sub.add_parser("info", help="show an image, or its whole backing chain")
    info.add_argument("--chain", "--backing-chain", dest="chain", action="store_true", help="every layer, top first")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--output", choices=OUTPUT_FORMATS, help="json is --json (qemu-img's spelling)")
    info.add_argument("image")
    info.set_defaults(func=cmd_info)

    check = sub.add_parser("check", help="check a QED image's consistency (and repair it)",
                           description="Exit status as qemu-img check: 0 no problem, 1 the check failed, "
                                       "2 corruption found, 3 only leaked clusters found.")
    check.add_argument("--repair", action="store_true",
                       help="clear entries that point outside the file or into metadata; cut leaks off the end")
    check.add_argument("--output", choices=OUTPUT_FORMATS, help="json: qemu-img check's JSON report")
    check.add_argument("image")
    check.set_defaults(func=cmd_check)

    status = sub.add_parser("status", help="the stream status of a mount")
    status.add_argument("--watch", action="store_true", help="a live progress bar until the job ends")
    status.add_argument("mountpoint")
    status.set_defaults(func=cmd_status)

    stream = sub.add_parser("stream", help="start streaming the backing chain into the top image")
    stream.add_argument("--base", help="keep this backing file: stream only the layers above it, then rebase")
    stream.add_argument("--speed", help="bytes/s with K, M, G suffixes; 0 = unlimited")
    stream.add_argument("mountpoint")
    stream.set_defaults(func=cmd_stream)

    rebase = sub.add_parser("rebase", help="stream the layers above BASE, then make BASE the backing file")
    rebase.add_argument("mountpoint")
    rebase.add_argument("base")
    rebase.set_defaults(func=cmd_rebase)

    for name, text in (("pause", "pause the stream job"), ("resume", "resume a paused job"),
                       ("cancel", "cancel the job; the image keeps its backing file")):
        command = sub.add_parser(name, help=text)
        command.add_argument("mountpoint")
        command.set_defaults(func=cmd_simple)
    speed = sub.add_parser("speed", help="change the stream's rate limit")
    speed.add_argument("mountpoint")
    speed.add_argument("rate", help="bytes/s with K, M, G suffixes; 0 = unlimited")
    speed.set_defaults(func=cmd_simple)

    wait = sub.add_parser("wait", help="block until the stream job ends",
                          description="Exit status: 0 completed, 1 failed, 3 cancelled, 4 no stream has run.")
    wait.add_argument("mountpoint")
    wait.set_defaults(func=cmd_wait)
    return parser


# The exit status a shell reports for a process that SIGPIPE killed: what `cmd | head -1` expects.
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE


def quiet_on_broken_pipe(command: Callable[[], int]) -> int:
    """Run a program's main; when the reader of stdout has gone (`fusestream info | true`),
    exit BROKEN_PIPE_EXIT without a traceback. stdout is flushed here, so that the error is
    raised here rather than at the interpreter's exit, then pointed at /dev/null, so that the
    final flush has nowhere to fail: the way Python's documentation of SIGPIPE gives."""
    try:
        try:
            return command()
        finally:  # also after argparse's --help and --version, which exit through SystemExit
            sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_EXIT


# The exit status of a command that failed with a FusestreamError (check's EXIT_CHECK_FAILED too).
ERROR_EXIT = 1


def print_error(prog: str, message: str) -> None:
    """The one line a command prints for what went wrong, text an image supplied made printable."""
    print(f"{prog}: {printable(message)}", file=sys.stderr)


def run_main(prog: str, command: Callable[[], int]) -> int:
    """Run a program's main, the one place where the CLI turns errors into what a user sees: a
    FusestreamError is one line on stderr and ERROR_EXIT, ^C is 130, a reader of stdout that
    has gone is BROKEN_PIPE_EXIT; never a traceback."""
    def guarded() -> int:
        try:
            return command()
        except FusestreamError as err:
            print_error(prog, str(err))
            return ERROR_EXIT
        except KeyboardInterrupt:
            return 130

    return quiet_on_broken_pipe(guarded)


def main(argv: list[str] | None = None) -> int:
    return run_main("fusestream", lambda: run_command(argv))


def run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
