"""server_api.threads: blocking calls off the event loop, on the pool or on the SQLite writer thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server_api.threads import run_sync, run_write


def test_serial_writes_run_one_at_a_time_on_one_thread() -> None:
    names: set[str] = set()
    lock = threading.Lock()
    running = 0
    most = 0

    def work(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            names.add(threading.current_thread().name)
        threading.Event().wait(0.002)  # give another call the chance to overlap, were that possible
        with lock:
            running -= 1
        return i * i

    async def main() -> list[int]:
        return list(await asyncio.gather(*[run_write(True, work, i) for i in range(20)]))

    assert asyncio.run(main()) == [i * i for i in range(20)]
    assert most == 1
    assert len(names) == 1 and next(iter(names)).startswith("facefl-sqlite-writer")


def test_other_writes_and_blocking_calls_use_the_pool() -> None:
    def name() -> str:
        return threading.current_thread().name

    async def main() -> tuple[str, str]:
        return await run_write(False, name), await run_sync(name)

    assert all(n.startswith("facefl-sync") for n in asyncio.run(main()))


def test_errors_propagate() -> None:
    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(run_write(True, fail))


def test_a_cancelled_caller_waits_until_its_call_has_returned() -> None:
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def blocking() -> None:
        started.set()
        release.wait(10)
        order.append("call returned")

    async def main() -> None:
        task = asyncio.create_task(run_write(True, blocking))
        while not started.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        for _ in range(20):  # the task is cancelled, but does not finish while its call runs
            await asyncio.sleep(0)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        order.append("caller finished")

    asyncio.run(main())
    assert order == ["call returned", "caller finished"]
