"""The background services of a mount, on the mount's one nursery.

Each is started with `await nursery.start(service.run)`, which returns once it is ready, and
runs until stop() or until the nursery is cancelled (the unmount). They are timed by trio's
clock, so tests drive them with trio.testing.MockClock. Besides the stream job
(stream.Streamer), two timers keep the top image's metadata on disk:

- WriteBackTimer: the L2 entries that allocations changed are written every second (and at
  every fsync, by the guest's own request);
- NeedCheckTimer: QED_F_NEED_CHECK, which allocations set in an image without a backing file,
  is cleared once they have paused for NEED_CHECK_IDLE seconds, as QEMU does, so that the
  image on disk is marked clean long before the unmount.

A write error of either (a full filesystem, a failing device) is reported (faults.WriteErrors)
and tried again at the next tick: what was not written stays in memory until it is, and the
guest's fsync fails meanwhile.
"""

from __future__ import annotations

import abc
import math
from typing import TYPE_CHECKING

import trio

from .errors import FusestreamError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .faults import WriteErrors
    from .formats.qed import QedImage

WRITE_BACK_INTERVAL = 1.0  # seconds that allocations' L2 entries may wait in memory, at most
NEED_CHECK_IDLE = 5.0  # seconds without allocating writes before QED_F_NEED_CHECK is cleared (QEMU's)
NEED_CHECK_POLL = 1.0  # seconds between two looks at the image's count of allocations


class Service(abc.ABC):
    """A background task with run() and stop(): `await nursery.start(service.run)`."""

    def __init__(self) -> None:
        self._scope = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            await self.serve(task_status)

    def stop(self) -> None:
        """End the service (at once if it has not started yet)."""
        self._scope.cancel()

    @abc.abstractmethod
    async def serve(self, task_status: trio.TaskStatus[None]) -> None:
        """The service's work: calls task_status.started() once ready, then runs until cancelled."""


class _TopImageTimer(Service):
    """A service that acts on the top image every `interval` seconds, in a worker thread."""

    interval: float
    origin: str  # what its write errors are reported as (faults.WriteErrors)

    def __init__(self, top: QedImage, write_errors: WriteErrors,
                 run_sync: Callable[..., Awaitable] = trio.to_thread.run_sync):
        super().__init__()
        self.top = top
        self.write_errors = write_errors
        self.run_sync = run_sync  # worker threads, or inline in tests

    async def serve(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            try:
                await self.tick()
            except (OSError, FusestreamError) as err:
                self.write_errors.report(self.origin, err)

    @abc.abstractmethod
    async def tick(self) -> None:
        """One look at the top image."""


class WriteBackTimer(_TopImageTimer):
    """Writes the L2 entries that allocations changed (QedImage.write_back) every second."""

    interval = WRITE_BACK_INTERVAL
    origin = "write-back"

    async def tick(self) -> None:
        if self.top.needs_write_back:
            await self.run_sync(self.top.write_back)
            self.write_errors.cleared()


class NeedCheckTimer(_TopImageTimer):
    """Clears QED_F_NEED_CHECK once allocations have paused for NEED_CHECK_IDLE seconds. The
    image counts the allocations that set or kept the flag (need_check_allocations); the timer
    owns the deadline: NEED_CHECK_IDLE after the look that saw the count change, so the flag is
    cleared between NEED_CHECK_IDLE and NEED_CHECK_IDLE + NEED_CHECK_POLL seconds after the
    last allocation."""

    interval = NEED_CHECK_POLL
    origin = "need-check"

    def __init__(self, top: QedImage, write_errors: WriteErrors,
                 run_sync: Callable[..., Awaitable] = trio.to_thread.run_sync):
        super().__init__(top, write_errors, run_sync)
        self._seen = top.need_check_allocations
        self._deadline = -math.inf

    async def tick(self) -> None:
        now = trio.current_time()
        if self.top.need_check_allocations != self._seen:
            self._seen = self.top.need_check_allocations
            self._deadline = now + NEED_CHECK_IDLE
        elif self.top.need_check_set_by_us and now >= self._deadline:
            await self.run_sync(self.top.clear_need_check)
