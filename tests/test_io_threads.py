"""IoThreads: blocking calls off the event loop, results and errors back, in parallel up to
its bound, workers gone when idle."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from fusestream.io_threads import IoThreads

TIMEOUT = 10.0


def run(main) -> None:
    async def capped() -> None:
        with trio.fail_after(TIMEOUT):
            await main()

    trio.run(capped)


def workers(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(f"{name}-")]


def test_a_call_runs_in_another_thread_and_its_result_or_error_comes_back():
    threads = IoThreads("io-result")

    async def main() -> None:
        assert await threads.run(threading.get_ident) != threading.get_ident()
        assert await threads.run(divmod, 7, 2) == (3, 1)
        with pytest.raises(ZeroDivisionError):
            await threads.run(divmod, 1, 0)
        assert await threads.run(int, "5") == 5  # a worker survives an error

    run(main)


def test_calls_run_in_parallel():
    threads = IoThreads("io-parallel")
    barrier = threading.Barrier(4, timeout=TIMEOUT)  # passes only with four calls at once

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(threads.run, barrier.wait)

    run(main)


def test_at_most_max_threads_run_and_the_rest_queue():
    threads = IoThreads("io-bound", max_threads=2)
    lock = threading.Lock()
    running, most = 0, 0

    def call() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(threads.run, call)

    run(main)
    assert most == 2
    assert len(workers("io-bound")) <= 2


def test_idle_workers_exit_and_new_calls_start_new_ones():
    threads = IoThreads("io-idle", idle_seconds=0.05)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(threads.run, time.sleep, 0.02)
        assert workers("io-idle")
        while workers("io-idle"):
            await trio.sleep(0.02)
        assert await threads.run(divmod, 9, 4) == (2, 1)

    run(main)


def test_a_cancelled_caller_waits_for_its_call_to_return():
    threads = IoThreads("io-cancel")
    done = threading.Event()

    def call() -> str:
        time.sleep(0.2)
        done.set()
        return "returned"

    async def main() -> None:
        with trio.move_on_after(0.01):
            await threads.run(call)
            assert done.is_set()  # not cancelled while the call ran
            await trio.sleep(1)  # the cancel arrives at the next checkpoint
        assert done.is_set()

    run(main)
