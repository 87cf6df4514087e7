"""Write errors of the top image, as the mount reports them: a state, an event, a log line.

As QEMU does with werror=report, the request that met the error fails (the guest's write or
fsync gets the errno) and a BLOCK_IO_ERROR event is emitted, with QEMU's fields. The background
tasks (the write-back and need-check timers, copy-on-read) report here too; their errors never end the daemon.
An error stays the current state until a write-back or a guest fsync succeeds; one event and one
log line per error, not one per failing retry, so a full disk does not flood the events log.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict], None]
"""Emits one event: its name and its data (the control files' events log)."""


def error_number(err: BaseException) -> int:
    """The errno behind an error: its own, or that of the OSError it was raised while handling
    (a StreamError wraps the top image's write error that way); EIO when there is none."""
    while err is not None:
        if isinstance(err, OSError) and err.errno:
            return err.errno
        err = err.__context__
    return errno.EIO


class WriteErrors:
    """The current write error of the mounted top image, if any. report() and cleared() may be
    called on the event loop or in its worker threads (trio.to_thread): the state and the
    event change on the loop."""

    def __init__(self, image_name: str, emit: EventSink):
        self.image_name = image_name
        self.emit = emit
        self.error: str | None = None  # "<origin>: <reason>" while a write error is unresolved
        self._errno: int | None = None

    def report(self, origin: str, err: BaseException | int) -> None:
        """A write to the top image failed in `origin` (guest write, guest fsync, write-back,
        need-check, copy-on-read)."""
        code = err if isinstance(err, int) else error_number(err)
        self._on_loop(self._report, origin, code)

    def cleared(self) -> None:
        """Everything written so far reached the disk: the error, if any, is over."""
        if self._errno is not None:
            self._on_loop(self._clear)

    def _on_loop(self, fn, *args) -> None:
        if trio.lowlevel.in_trio_run():
            fn(*args)
        else:
            trio.from_thread.run_sync(fn, *args)

    def _report(self, origin: str, code: int) -> None:
        reason = os.strerror(code)
        self.error = f"{origin}: {reason}"
        if code == self._errno:
            return
        self._errno = code
        log.error("%s: write error in %s: %s", self.image_name, origin, reason)
        self.emit("BLOCK_IO_ERROR", {"operation": "write", "action": "report", "nospace": code == errno.ENOSPC,
                                     "reason": reason, "origin": origin})

    def _clear(self) -> None:
        if self._errno is not None:
            log.info("%s: write errors are over: everything is written", self.image_name)
        self._errno = None
        self.error = None
