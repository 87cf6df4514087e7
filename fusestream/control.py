"""The control files: status, status.json and events are rendered here; ctl commands parsed and
applied here. The names, keys and wording are the product contract (PRODUCT.md section 3)."""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable

from .chain import Chain
from .stream import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PAUSED,
    RUNNING,
    CommandError,
    Streamer,
    StreamStatistics,
)
from .units import format_size, parse_size

EVENT_NAMES = (
    "STREAM_STARTED", "STREAM_PAUSED", "STREAM_RESUMED", "STREAM_COMPLETED", "STREAM_CANCELLED",
    "STREAM_FAILED", "BACKING_CHANGED", "COMMAND_REJECTED", "BLOCK_IO_ERROR",
)


class EventLog:
    """The events file: JSON lines that only ever grow, so `tail -f` follows it."""

    def __init__(self, image_name: str, clock: Callable[[], float] = time.time):
        self.image_name = image_name
        self.clock = clock
        self._data = bytearray()

    def emit(self, event: str, data: dict) -> None:
        assert event in EVENT_NAMES, event
        record = {"timestamp": self.clock(), "event": event, "image": self.image_name, "data": data}
        self._data += (json.dumps(record) + "\n").encode()

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._data[offset : offset + size])

    def __len__(self) -> int:
        return len(self._data)

    def events(self) -> list[dict]:
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


def render_status_json(name: str, chain: Chain, stats: StreamStatistics, write_error: str | None = None) -> str:
    image = {
        "name": name,
        "image": chain.top.path,
        "size": chain.size,
        "backing_chain": [os.path.abspath(layer.path) for layer in chain.backing_layers],
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
    return json.dumps({"images": [image]}, indent=2) + "\n"


def _rate(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise CommandError(str(err)) from None


def parse_command(text: str) -> tuple[str, dict]:
    """One ctl command -> (verb, arguments); CommandError says what is wrong with it."""
    if text.count("\n") > 1 or (text.count("\n") == 1 and not text.endswith("\n")):
        raise CommandError("one command per write")
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
        if len(args) != 1:
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

    def __init__(self, name: str, chain: Chain, streamer: Streamer, events: EventLog):
        self.name = name
        self.chain = chain
        self.streamer = streamer
        self.events = events

    def status(self) -> bytes:
        line = render_status(self.name, self.streamer.statistics())
        if self._write_error() is not None:
            line = line.rstrip("\n") + f"; write error: {self._write_error()}\n"
        return line.encode()

    def status_json(self) -> bytes:
        return render_status_json(self.name, self.chain, self.streamer.statistics(), self._write_error()).encode()

    def _write_error(self) -> str | None:
        errors = self.streamer.write_errors
        return errors.error if errors is not None else None

    def command(self, raw: bytes) -> None:
        """Apply one ctl command; an invalid one changes nothing, raises CommandError and is
        logged as COMMAND_REJECTED."""
        text = raw.decode("utf-8", errors="replace")
        try:
            if "\ufffd" in text:
                raise CommandError("command is not valid UTF-8")
            verb, args = parse_command(text)
            if verb == "stream":
                self.streamer.start(**args)
            elif verb == "speed":
                self.streamer.set_speed(args["speed"])
            else:
                getattr(self.streamer, verb)()
        except CommandError as err:
            self.events.emit("COMMAND_REJECTED", {"command": text.strip(), "reason": str(err)})
            raise
