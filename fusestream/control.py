"""The control files: status, status.json and events are rendered here; ctl commands parsed and
applied here. The names, keys and wording are what users and management tools rely on (docs/mount.fusestream.md,
THE CONTROL FILES): keep them exact."""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
import shlex
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .chain import Chain
from .errors import CommandError
from .faults import WriteErrors
from .sources import absolute_location
from .sources.http import redact_urls
from .stream import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PAUSED,
    RUNNING,
    Streamer,
    StreamStatistics,
)
from .units import format_size, parse_size

if TYPE_CHECKING:  # the FUSE layer's: the control files only ask it for its figures
    from .native_reads import NativeReads

EVENT_NAMES = (
    "STREAM_STARTED", "STREAM_PAUSED", "STREAM_RESUMED", "STREAM_COMPLETED", "STREAM_CANCELLED",
    "STREAM_FAILED", "BACKING_CHANGED", "COMMAND_REJECTED", "BLOCK_IO_ERROR",
)
# Not an event of the job: the line that stands for events dropped from memory (EventLog).
EVENTS_DROPPED = "EVENTS_DROPPED"


# The events kept in memory: at most EVENTS_KEPT_BYTES of the newest lines. When they grow past
# that, the oldest lines down to half of it are dropped at once (the cost of dropping stays
# amortised over many events) and a gap takes their place, see _Gap.
EVENTS_KEPT_BYTES = 1 << 20
MAX_GAPS = 64  # past this, two neighbouring gaps become one: the gaps' memory is bounded too


@dataclasses.dataclass(frozen=True)
class _Gap:
    """Where dropped lines were: [start, end) of the events file, read as one line of spaces
    ending in an EVENTS_DROPPED notice (JSON allows the leading spaces). A reader that enters
    the gap at the start of any dropped line reads one well-formed line that says what was
    dropped: the notice is no longer than the last dropped line (`room` bytes), so it starts
    after all of them. The content is a fixed function of the offset, so reads of any size
    agree."""

    start: int
    end: int
    lines: int
    room: int
    notice: bytes

    def content(self, lo: int, hi: int) -> bytes:
        notice_at = self.end - len(self.notice)
        spaces = max(0, min(hi, notice_at) - lo)
        return b" " * spaces + self.notice[max(lo, notice_at) - notice_at : max(0, hi - notice_at)]


class EventLog:
    """The events file: JSON lines that only ever grow, so `tail -f` follows it. Only the newest
    lines are kept in memory (EVENTS_KEPT_BYTES); the older ones are dropped and read as
    EVENTS_DROPPED notices (_Gap), so offsets keep their meaning and every line stays JSON."""

    def __init__(self, image_name: str, clock: Callable[[], float] = time.time,
                 kept_bytes: int = EVENTS_KEPT_BYTES):
        self.image_name = image_name
        self.clock = clock
        self._kept_bytes_max = kept_bytes
        self._data = bytearray()  # the lines from offset self._start on
        self._start = 0
        self._gaps: list[_Gap] = []

    def emit(self, event: str, data: dict) -> None:
        assert event in EVENT_NAMES, event
        record = {"timestamp": self.clock(), "event": event, "image": self.image_name, "data": data}
        self._data += (json.dumps(record) + "\n").encode()
        if len(self._data) > self._kept_bytes_max:
            self._drop_oldest()

    def _notice(self, lines: int, size: int) -> bytes:
        """As short as a line of the log can be (compact, the time to the millisecond), so that it
        fits in the room of the line it ends on."""
        record = {"timestamp": round(self.clock(), 3), "event": EVENTS_DROPPED, "image": self.image_name,
                  "data": {"lines": lines, "bytes": size}}
        return (json.dumps(record, separators=(",", ":")) + "\n").encode()

    def _drop_oldest(self) -> None:
        """Drop the oldest lines, down to half the limit, ending at a line that has room for the
        gap's notice (all of them, if none has)."""
        cut = self._data.index(b"\n", len(self._data) - self._kept_bytes_max // 2) + 1
        while True:
            room = cut - (self._data.rfind(b"\n", 0, cut - 1) + 1)
            lines = self._data.count(b"\n", 0, cut)
            notice = self._notice(lines, cut)
            if len(notice) <= room or cut == len(self._data):
                break
            cut = self._data.index(b"\n", cut) + 1
        self._gaps.append(_Gap(self._start, self._start + cut, lines, room, notice))
        del self._data[:cut]
        self._start += cut
        if len(self._gaps) > MAX_GAPS:
            self._merge_two_gaps()

    def _merge_two_gaps(self) -> None:
        """Make the oldest two neighbouring gaps whose sum still fits one (the counts grow by a
        digit at most, so one almost always does)."""
        for i in range(len(self._gaps) - 1):
            first, second = self._gaps[i : i + 2]
            lines = first.lines + second.lines
            notice = self._notice(lines, second.end - first.start)
            if len(notice) <= second.room:
                self._gaps[i : i + 2] = [_Gap(first.start, second.end, lines, second.room, notice)]
                return

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, len(self))
        parts = []
        while offset < min(end, self._start):
            gap = self._gaps[bisect.bisect_right(self._gaps, offset, key=lambda g: g.start) - 1]
            parts.append(gap.content(offset, min(end, gap.end)))
            offset = min(end, gap.end)
        if offset < end:
            parts.append(bytes(self._data[offset - self._start : end - self._start]))
        return b"".join(parts)

    def __len__(self) -> int:
        return self._start + len(self._data)

    @property
    def kept_bytes(self) -> int:
        """The memory the log holds: the kept lines and the gaps' notices."""
        return len(self._data) + sum(len(gap.notice) for gap in self._gaps)

    def events(self) -> list[dict]:
        """The events still kept in memory, oldest first."""
        return [json.loads(line) for line in self._data.decode().splitlines()]


def render_status(name: str, stats: StreamStatistics) -> str:
    """One line, in the seed's wording."""
    if stats.state == RUNNING:
        percent = 100.0 * stats.offset / stats.len if stats.len else 100.0
        left = stats.seconds_left
        eta = f"{left:.0f} s left" if left is not None else "measuring"
        detail = f"{percent:.1f}%, {format_size(stats.rate)}/s, {eta}"
        return f"Streaming {name}: Completed {stats.offset} of {stats.len} bytes ({detail})\n"
    if stats.state == PAUSED:
        return f"No active stream; paused at {stats.offset} of {stats.len} bytes\n"
    return "No active stream" + _last_outcome(stats) + "\n"


def _last_outcome(stats: StreamStatistics) -> str:
    if stats.state == COMPLETED:
        if stats.backing_file is None:
            return "; last stream completed, backing file removed"
        return f"; last stream completed, backing file is now {stats.backing_file}"
    if stats.state == CANCELLED:
        return f"; last stream cancelled at {stats.offset} of {stats.len} bytes"
    if stats.state == FAILED:
        return f"; last stream failed: {stats.error}"
    return ""


def remote_layers(chain: Chain) -> list[dict[str, object]]:
    """What each remote backing layer's source says (Source.describe: its URL without
    credentials, what the server said, bytes fetched, requests, connections, retries, the last
    error), top down."""
    return [layer.source.describe() for layer in chain.backing_layers if layer.source.remote]


def render_remote(layer: dict[str, object]) -> str:
    """One line of `status` per remote layer."""
    error = f", last error: {layer['last_error']}" if layer["last_error"] else ""
    return (f"Remote {layer['url']}: {format_size(layer['bytes_fetched'])} fetched in {layer['requests']} requests, "
            f"{layer['connections']} connections, {layer['retries']} retries{error}\n")


def render_status_json(name: str, chain: Chain, stats: StreamStatistics, write_error: str | None = None,
                       native_reads: dict[str, int] | None = None) -> str:
    image = {
        "name": name,
        "image": chain.path,
        "size": chain.size,
        "backing_chain": [absolute_location(layer.path) for layer in chain.backing_layers],
        "stream": {
            "state": stats.state,
            "offset": stats.offset,
            "len": stats.len,
            "speed": stats.speed,
            "rate": stats.rate,
            "base": stats.base,
            "error": stats.error,
            "copied": stats.copied,
            "remaining": stats.remaining,
            "progress_rate": stats.progress_rate,
            "seconds_left": None if (left := stats.seconds_left) is None else round(left, 1),
        },
        "write_error": write_error,
    }
    if chain.remote:
        image["remote"] = remote_layers(chain)
    if native_reads is not None:
        image["native_reads"] = native_reads
    return json.dumps({"images": [image]}, indent=2) + "\n"


# A ctl command is at most this long: twice PATH_MAX, room for any path, quoted, with the other
# arguments. A longer write is refused before it is decoded or parsed, in constant time: shlex
# takes ~2 ms for 8 KiB but grows faster than the length (15 s for 1 MiB, on the event loop).
MAX_COMMAND_BYTES = 8 * 1024
# A rejected command is echoed in its COMMAND_REJECTED event up to this many bytes.
MAX_ECHOED_BYTES = 256
# Characters no command and no path in one may hold: C0 controls (but tab) and DEL. A NUL or a
# newline cannot be in a path we could open or show on one line.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _rate(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise CommandError(str(err)) from None


def decode_command(raw: bytes) -> str:
    """The text of one ctl write; CommandError for one too long or not UTF-8."""
    if len(raw) > MAX_COMMAND_BYTES:
        raise CommandError(f"command longer than {MAX_COMMAND_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("command is not valid UTF-8") from None


def parse_command(text: str) -> tuple[str, dict]:
    """One ctl command -> (verb, arguments); CommandError says what is wrong with it. Words are
    split as a POSIX shell splits them (shlex), so a path may hold any character but the
    controls once quoted: base='/vm/my disk.raw'."""
    if len(text) > MAX_COMMAND_BYTES:
        raise CommandError(f"command longer than {MAX_COMMAND_BYTES} bytes")
    if text.count("\n") > 1 or (text.count("\n") == 1 and not text.endswith("\n")):
        raise CommandError("one command per write")
    if _CONTROL_CHARACTER.search(text.removesuffix("\n")):
        raise CommandError("command contains a control character")
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise CommandError(f"cannot parse command: {err}") from None
    if not words:
        raise CommandError("empty command")
    verb, args = words[0], words[1:]
    if verb == "stream":
        return verb, _stream_args(args)
    if verb == "rebase":
        if len(args) != 1 or not args[0]:
            raise CommandError("usage: rebase PATH")
        return "stream", {"base": args[0]}
    if verb == "speed":
        if len(args) != 1:
            raise CommandError("usage: speed RATE")
        return verb, {"speed": _rate(args[0])}
    if verb in ("pause", "resume", "cancel"):
        if args:
            raise CommandError(f"usage: {verb}")
        return verb, {}
    raise CommandError(f"unknown command '{verb}'")


def _stream_args(args: list[str]) -> dict:
    parsed: dict = {}
    for arg in args:
        key, has_value, value = arg.partition("=")
        if not has_value or key not in ("base", "speed") or not value or key in parsed:
            raise CommandError(f"invalid argument '{arg}' (usage: stream [base=PATH] [speed=RATE])")
        parsed[key] = value if key == "base" else _rate(value)
    return parsed


class Control:
    """The control files of one mounted image."""

    def __init__(self, name: str, chain: Chain, streamer: Streamer, events: EventLog, write_errors: WriteErrors,
                 native_reads: NativeReads | None = None):
        self.name = name
        self.native_reads = native_reads
        self.chain = chain
        self.streamer = streamer
        self.events = events
        self.write_errors = write_errors

    def status(self) -> bytes:
        line = render_status(self.name, self.streamer.statistics())
        if self.write_errors.error is not None:
            line = line.rstrip("\n") + f"; write error: {self.write_errors.error}\n"
        if self.chain.remote:
            line += "".join(render_remote(layer) for layer in remote_layers(self.chain))
        return line.encode()

    def status_json(self) -> bytes:
        native = self.native_reads.describe() if self.native_reads is not None else None
        return render_status_json(self.name, self.chain, self.streamer.statistics(), self.write_errors.error,
                                  native).encode()

    def command(self, raw: bytes) -> None:
        """Apply one ctl command; an invalid one changes nothing, raises CommandError and is
        logged as COMMAND_REJECTED."""
        try:
            verb, args = parse_command(decode_command(raw))
            if verb == "stream":
                self.streamer.start(**args)
            elif verb == "speed":
                self.streamer.set_speed(args["speed"])
            else:
                getattr(self.streamer, verb)()
        except CommandError as err:
            self.events.emit("COMMAND_REJECTED", rejection(raw, err))
            raise


def rejection(raw: bytes, err: CommandError) -> dict:
    """The data of a COMMAND_REJECTED event: the command (its first MAX_ECHOED_BYTES; then
    `length` says how long it was) and the reason, each with the credentials of any URL in it
    redacted (a base may be named by a presigned URL)."""
    data = {"command": shown_command(raw), "reason": redact_urls(str(err))}
    if len(raw) > MAX_ECHOED_BYTES:
        data["length"] = len(raw)
    return data


def shown_command(raw: bytes) -> str:
    """A ctl write as events and logs may show it: its URLs redacted, then cut to
    MAX_ECHOED_BYTES characters (redacted whole first: a URL cut short, its userinfo without the
    @ that ends it, would not be seen as one)."""
    return redact_urls(raw.decode("utf-8", errors="backslashreplace")).strip()[:MAX_ECHOED_BYTES]
