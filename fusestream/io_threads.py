"""Worker threads that run blocking calls for the event loop, with less hand-off work than
trio.to_thread.run_sync: a job is put on a queue that idle workers wait on, and its outcome is
handed back with TrioToken.run_sync_soon straight to the waiting task. No capacity limiter,
context copy or per-call thread-cache bookkeeping: a no-op call took 27 us against 42 us with
to_thread on a 2-vCPU VM (docs/performance.md, "Remote base").

A worker starts when a job finds none idle (up to `max_threads`; beyond that jobs queue), and
exits after `idle_seconds` without a job, so nothing outlives its use for long. As with
to_thread.run_sync, a waiting task cannot be cancelled: it waits for the call to return.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")
Job = tuple[Callable[..., object], tuple, trio.lowlevel.TrioToken, trio.lowlevel.Task]


class IoThreads:
    def __init__(self, name: str, max_threads: int = 40, idle_seconds: float = 10.0):
        self.name, self.max_threads, self.idle_seconds = name, max_threads, idle_seconds
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # workers waiting for a job, or about to

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) in a worker thread; its result, or its exception raised here."""
        self._submit((fn, args, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()))
        return await trio.lowlevel.wait_task_rescheduled(_not_abortable)  # unwraps the outcome

    def _submit(self, job: Job) -> None:
        with self._lock:  # a job is queued under the lock, so a worker that timed out sees it
            if self._idle:
                self._idle -= 1  # one idle worker is spoken for
                self._jobs.put(job)
                return
            if self._threads >= self.max_threads:
                self._jobs.put(job)
                return
            self._threads += 1
            number = self._threads
        threading.Thread(target=self._work, args=(job,), name=f"{self.name}-{number}", daemon=True).start()

    def _work(self, job: Job) -> None:
        while True:
            fn, args, token, task = job
            result = outcome.capture(fn, *args)
            with contextlib.suppress(trio.RunFinishedError):  # the loop has ended: nobody waits
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            del job, fn, args, task, result  # nothing of the job stays referenced while idle
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        self._threads -= 1
                        return


def _not_abortable(raise_cancel) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED
