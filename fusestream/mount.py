"""mount.fusestream IMAGE MOUNTPOINT: the mount(8) helper.

Order matters: the chain is opened and the filesystem mounted (pyfuse3.init) in the calling
process, so that every error reaches the terminal as one line; only then does the helper fork
into the background (s3ql does the same).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import logging
import logging.handlers
import os
import re
import signal
import stat
import sys
import urllib.parse
from collections.abc import Callable

import pyfuse3
import trio

from . import __version__
from .chain import Chain, Confinement, open_chain
from .cli import run_main
from .control import Control, EventLog
from .errors import BackingFileError, FusestreamError, PrintableFormatter, UsageError
from .faults import WriteErrors
from .formats import qed_check
from .fs import RAW_INODE, Operations, raw_name
from .native_reads import DEFAULT_THREADS, MAX_THREADS, NativeReads
from .services import NeedCheckTimer, Service, WriteBackTimer
from .sources import HttpOptions, absolute_location
from .sources.http import url_origin
from .stream import CopyOnRead, Streamer
from .units import parse_size

log = logging.getLogger("fusestream")

# Generic options mount(8) may pass. These are handed to the kernel through libfuse.
KERNEL_FLAGS = {"nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime", "sync", "async", "dirsync"}
# ... and these are accepted but not passed on: they mean something only to mount(8) or fstab, or
# are atime variants that libfuse refuses (FUSE mounts get the kernel's relatime anyway).
MOUNT_ONLY = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
              "nofail", "_netdev", "silent", "loud", "lazytime", "nolazytime",
              "relatime", "norelatime", "strictatime", "diratime", "nodiratime"}


@dataclasses.dataclass
class MountOptions:
    ro: bool = False
    nostream: bool = False
    base: str | None = None
    speed: int = 0
    copy_on_read: bool = False
    read_threads: int = DEFAULT_THREADS
    allow_other: bool = False
    debug: bool = False
    backing_dir: str | None = None
    allow_devices: bool = False
    http: dict[str, object] = dataclasses.field(default_factory=dict)  # HttpOptions' fields, as given
    kernel_flags: list[str] = dataclasses.field(default_factory=list)
    fuse_flags: list[str] = dataclasses.field(default_factory=list)


VALUED_OPTIONS = ("base", "speed", "backing_dir", "read_threads")
# The remote layers' options (sources.http.HttpOptions): -o name -> (HttpOptions field, parser).
# QEMU curl's sslverify keeps its name; the tuning ones say http_, as a mount has local readahead,
# block sizes and timeouts too. allowed_origins may be given more than once (commas split -o).
HTTP_OPTIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    "sslverify": ("sslverify", lambda v: _on_off("sslverify", v)),
    "ca_file": ("ca_file", os.path.abspath),
    "allowed_origins": ("allowed_origins", lambda v: _origin(v)),
    "http_connections": ("connections", lambda v: _number("http_connections", int, v)),
    "http_timeout": ("timeout", lambda v: _number("http_timeout", float, v)),
    "http_retry_time": ("retry_time", lambda v: _number("http_retry_time", float, v)),
    "http_retry_delay_min": ("retry_delay_min", lambda v: _number("http_retry_delay_min", float, v)),
    "http_retry_delay_max": ("retry_delay_max", lambda v: _number("http_retry_delay_max", float, v)),
    "http_block_size": ("block_size", lambda v: _size("http_block_size", v)),
    "http_request_size": ("request_size", lambda v: _size("http_request_size", v)),
    "http_readahead": ("readahead", lambda v: _size("http_readahead", v)),
    "http_cache_size": ("cache_size", lambda v: _size("http_cache_size", v)),
}
FLAG_OPTIONS = ("ro", "nostream", "copy_on_read", "allow_other", "debug", "allow_devices")
# The FUSE options users know from other FUSE filesystems, handed to libfuse as they are:
# default_permissions is always set (pyfuse3.default_options), auto_unmount has libfuse mount
# through fusermount3, whose watcher unmounts once the daemon is gone, even after a kill -9.
FUSE_OPTIONS = ("default_permissions", "allow_root", "auto_unmount")
OPTION_NAMES = VALUED_OPTIONS + tuple(HTTP_OPTIONS) + FLAG_OPTIONS + FUSE_OPTIONS  # the -o options the man page names


def parse_options(texts: list[str]) -> MountOptions:
    """Parse the -o lists; an unknown option is an error, never ignored."""
    opts = MountOptions()
    for text in texts:
        for item in filter(None, text.split(",")):
            name, has_value, value = item.partition("=")
            if has_value and name in VALUED_OPTIONS:
                _set_valued(opts, name, value)
            elif has_value and name in HTTP_OPTIONS:
                _set_http(opts, name, value)
            elif not has_value and name in FLAG_OPTIONS:
                setattr(opts, name, True)
            elif not has_value and name in KERNEL_FLAGS:
                opts.kernel_flags.append(name)
            elif not has_value and name in FUSE_OPTIONS:
                opts.fuse_flags.append(name)
            elif name in MOUNT_ONLY or name.startswith("x-") or name == "comment":
                continue
            else:
                raise UsageError(f"unknown mount option '{item}'")
    if opts.allow_other and "allow_root" in opts.fuse_flags:
        raise UsageError("mount options allow_other and allow_root exclude each other")
    http_options(opts)  # refuses bad values now, as one line
    return opts


def http_options(opts: MountOptions) -> HttpOptions:
    """The remote layers' options: HttpOptions' defaults, changed by the -o options given."""
    return HttpOptions(**opts.http)


def _set_http(opts: MountOptions, name: str, value: str) -> None:
    if not value:
        raise UsageError(f"mount option '{name}=' needs a value")
    field, parse = HTTP_OPTIONS[name]
    parsed = parse(value)
    if field == "allowed_origins":
        parsed = (*opts.http.get(field, ()), parsed)
    opts.http[field] = parsed


def _on_off(name: str, value: str) -> bool:
    if value not in ("on", "off"):
        raise UsageError(f"mount option {name}: '{value}' is not on or off")
    return value == "on"


def _number(name: str, kind: type, value: str) -> object:
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"mount option {name}: '{value}' is not a number") from None


def _size(name: str, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as err:
        raise UsageError(f"mount option {name}: {err}") from None


def _origin(value: str) -> str:
    """An allowed origin, scheme://host[:port] and nothing more, as url_origin writes it."""
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as err:
        raise UsageError(f"mount option allowed_origins: '{value}': {err}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or "@" in parts.netloc:
        raise UsageError(f"mount option allowed_origins: '{value}' is not an origin (http[s]://host[:port])")
    return url_origin(value)


def _set_valued(opts: MountOptions, name: str, value: str) -> None:
    if not value:
        raise UsageError(f"mount option '{name}=' needs a value")
    if name == "base":  # a URL names a remote layer as it is
        opts.base = absolute_location(value)
    elif name == "backing_dir":
        opts.backing_dir = os.path.abspath(value)
    elif name == "read_threads":
        opts.read_threads = _number(name, int, value)
        if not 0 <= opts.read_threads <= MAX_THREADS:
            raise UsageError(f"mount option read_threads: {value} is not between 0 and {MAX_THREADS}")
    else:
        try:
            opts.speed = parse_size(value)
        except ValueError as err:
            raise UsageError(f"mount option speed: {err}") from None


def fuse_options(image: str, opts: MountOptions) -> set[str]:
    options = set(pyfuse3.default_options)
    fsname = image.replace("\\", "\\\\").replace(",", "\\,")  # libfuse splits options on commas
    options |= {f"fsname={fsname}", "subtype=fusestream"}
    options |= set(opts.kernel_flags) | set(opts.fuse_flags)
    if opts.ro:
        options.add("ro")
    if opts.allow_other:
        options.add("allow_other")
    if opts.debug:
        options.add("debug")
    return options


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mount.fusestream",
        description="Mount a QED image with its backing chain as one flat, writable raw file.",
    )
    parser.add_argument("image", help="the top QED image")
    parser.add_argument("mountpoint", help="an existing directory")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                        help="ro, nostream, base=PATH, speed=RATE, copy_on_read, allow_other, debug, "
                             "backing_dir=DIR, allow_devices, default_permissions, allow_root, auto_unmount; "
                             "for remote layers: " + ", ".join(f"{name}=" for name in HTTP_OPTIONS))
    # Flags that mount(8) passes to helpers: sloppy, no-mtab, verbose, and the type.
    parser.add_argument("-s", "-n", "-v", dest="mount_helper_flags", action="count", help=argparse.SUPPRESS)
    parser.add_argument("-t", dest="fstype", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def setup_logging(foreground: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    if foreground or not os.path.exists("/dev/log"):
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PrintableFormatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    else:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(PrintableFormatter("mount.fusestream[%(process)d]: %(levelname)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def open_mount_chain(image: str, opts: MountOptions) -> Chain:
    """The chain a mount serves: the image checked and repaired first when it is written, opened
    read-only where it cannot be written, its backing layers confined by the -o options."""
    if not os.path.exists(image):
        raise FusestreamError(f"{image}: no such file")
    writable = not opts.ro and os.access(image, os.W_OK)
    if not opts.ro and not writable:
        log.info("%s is not writable: serving read-only", image)
    if writable:
        repair_before_use(image)
    return open_chain(image, writable=writable,
                      confinement=Confinement(backing_dir=opts.backing_dir, allow_devices=opts.allow_devices,
                                              http=http_options(opts)))


def repair_before_use(image: str) -> None:
    """An image left with QED_F_NEED_CHECK is checked and repaired before it is written, as QEMU
    does; one that is still corrupt afterwards is not mounted read-write."""
    result = qed_check.repair_if_needed(image)
    if result is None:
        return
    log.warning("%s was not closed cleanly: check repaired %d corruptions and %d leaked clusters",
                image, result.corruptions_fixed, result.leaks_fixed)
    if result.corruptions:
        raise FusestreamError(f"{image}: {result.corruptions} corruptions remain after repair (see fusestream check)")


def check_mountpoint(mountpoint: str) -> None:
    try:
        mode = os.stat(mountpoint).st_mode
    except OSError as err:  # ENOTCONN: a FUSE daemon died there; ENOENT: no such directory
        hint = " (a crashed mount? unmount it with fusermount3 -u first)" if err.errno == errno.ENOTCONN else ""
        raise FusestreamError(f"{mountpoint}: {err.strerror}{hint}") from None
    if not stat.S_ISDIR(mode):
        raise FusestreamError(f"{mountpoint}: mount point is not a directory")
    if os.path.ismount(mountpoint):
        raise FusestreamError(f"{mountpoint}: something is already mounted there")


# The kernel's readahead window on the raw file. FUSE's default, 128 KiB, turns a sequential
# read into 128 KiB requests; with 4 MiB they are 1 MiB (FUSE's largest), several at a time:
# sequential 1 MiB reads of the 1 GiB bench chain went from 741 to 1125 MiB/s. Random reads do
# not trigger readahead, so they are unchanged.
READAHEAD_KIB = 4096


def widen_readahead(mountpoint: str) -> None:
    """Set the mount's readahead window: the read_ahead_kb of its backing device info, which
    libfuse would negotiate as max_readahead but pyfuse3 does not. Needs root; without it the
    kernel's default stays, and the mount works the same, only slower at sequential reads.
    Runs on the event loop once FUSE_INIT is answered (the kernel sets the window from that
    answer), so nothing here may touch the mount: `mountpoint` is already resolved."""
    device = mounted_device(mountpoint)
    if device is None:
        log.info("%s: readahead left at the kernel's default (not in /proc/self/mountinfo)", mountpoint)
        return
    path = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(f"{READAHEAD_KIB}\n")
    except OSError as err:
        log.info("%s: readahead left at the kernel's default (%s: %s)", mountpoint, path, err.strerror)


def mounted_device(mountpoint: str) -> str | None:
    """"major:minor" of what is mounted on `mountpoint` (a resolved path), from
    /proc/self/mountinfo. Not from stat(): before the event loop runs, a stat of our own mount
    would wait for ourselves."""
    device = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if unescape_mount_path(fields[4]) == mountpoint:
                device = fields[2]  # the last one listed is the one on top
    return device


def unescape_mount_path(path: str) -> str:
    """/proc's mount paths write space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), path)


def daemonize() -> None:
    """Detach after a successful mount: the parent exits 0, the child serves."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


@dataclasses.dataclass
class MountedImage:
    """What serves one mounted image: the Operations the kernel calls, connected to the control
    files at construction, and the services that run beside them on one nursery."""

    ops: Operations
    streamer: Streamer
    services: list[Service]


def build_mount(chain: Chain, opts: MountOptions) -> MountedImage:
    """Everything a mount of `chain` serves with, before the event loop runs (pyfuse3.init needs
    the Operations before the daemon forks)."""
    name = raw_name(chain.path)
    events = EventLog(name)
    write_errors = WriteErrors(name, events.emit)
    streamer = Streamer(chain, events.emit, default_base=opts.base, default_speed=opts.speed)
    copy_on_read = CopyOnRead(streamer, write_errors) if opts.copy_on_read else None
    native_reads = None
    if opts.read_threads and copy_on_read is None:  # copy-on-read must see every read
        native_reads = NativeReads(chain, RAW_INODE, opts.read_threads)
        streamer.guest.served_elsewhere = native_reads.served
    control = Control(name, chain, streamer, events, write_errors, native_reads)
    ops = Operations(chain, control, write_errors, streamer.guest, copy_on_read, read_only=opts.ro,
                     native_reads=native_reads)
    if native_reads is not None:
        native_reads.call_reads(ops.read_unmapped)
    services: list[Service] = [streamer]
    if not ops.read_only:
        services += [WriteBackTimer(chain.top, write_errors), NeedCheckTimer(chain.top, write_errors)]
    return MountedImage(ops, streamer, services)


async def serve(mounted: MountedImage, opts: MountOptions) -> None:
    """Run the FUSE loop and the services until unmounted; SIGTERM and SIGINT unmount cleanly.
    Unmounting cancels the stream job between two steps; the next mount resumes it."""
    async with trio.open_nursery() as nursery:
        for service in mounted.services:
            await nursery.start(service.run)
        if not opts.nostream and not mounted.ops.read_only and mounted.ops.chain.backing_layers:
            mounted.streamer.start()
        nursery.start_soon(_unmount_on_signal)
        native_reads = mounted.ops.native_reads
        await pyfuse3.main(native_threads=native_reads.threads if native_reads else 0)
        nursery.cancel_scope.cancel()


async def _unmount_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()


def run(args: argparse.Namespace) -> int:
    opts = parse_options(args.options)
    setup_logging(args.foreground, opts.debug)
    if not http_options(opts).sslverify:  # said where the user mounts, not only in a log
        print("mount.fusestream: warning: sslverify=off: the certificates of HTTPS layers are not verified, "
              "so anyone between here and their servers can change the data they serve", file=sys.stderr)
    image = os.path.abspath(args.image)
    check_mountpoint(args.mountpoint)
    chain = open_mount_chain(image, opts)
    if opts.base is not None:
        try:
            chain.base_layer(opts.base)
        except BackingFileError:
            chain.close()
            raise
    mounted = build_mount(chain, opts)
    ops = mounted.ops
    # From the mount on, SIGTERM and SIGINT must never kill the process half-way: the loop's own
    # receiver takes them while it runs; before and after it (mounting, daemonizing, closing) they
    # are ignored, in the daemon too (a fork keeps what is ignored).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Resolved now: once mounted, lstat() of the mount point would ask ourselves.
    ops.after_init = functools.partial(widen_readahead, os.path.realpath(args.mountpoint))
    try:
        pyfuse3.init(ops, args.mountpoint, fuse_options(image, opts))
    except RuntimeError as err:
        chain.close()
        raise FusestreamError(f"{args.mountpoint}: cannot mount: {err}") from None
    if not args.foreground:
        daemonize()
        setup_logging(False, opts.debug)
    log.info("mounted %s on %s (%s)", image, args.mountpoint, "read-only" if ops.read_only else "read-write")
    try:
        trio.run(serve, mounted, opts)
    finally:
        pyfuse3.close(unmount=True)
        chain.close()
        log.info("unmounted %s", args.mountpoint)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("mount.fusestream", lambda: run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
