"""Blocking work of the hot paths off the event loop, on this process's own thread pool.

Starlette's ``run_in_threadpool`` goes through anyio (a cancel scope, a capacity limiter, its worker
queue): on the 2-core development machine about 180 us of CPU per call with 8 in flight, against about
75 us for :func:`run_sync` (40,000 hops of a no-op function each). A check-in has one hop and an upload
several, so the difference is a noticeable share of their CPU. The semantics callers
rely on are kept: context variables are carried into the thread, and a caller that is cancelled does not
go on (to its ``finally`` blocks) while its function still runs in the thread.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

#: anyio's default limit: at most this many blocking calls run at once per process, the rest queue
MAX_THREADS = 40
_POOL = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="facefl-sync")

#: One thread for the hot path's SQLite write transactions (check-in, registration): SQLite has one
#: writer, and those transactions queue on the database's write lock anyway (``Database._write_lock``).
#: Queued here instead, back to back on one thread, they hand neither that lock nor the GIL between
#: threads: on the 2-core machine a check-in went from ~20 voluntary context switches to ~5, and its
#: CPU fell by about a fifth. The lock is still taken (other writers use it from the pool). Only for
#: SQLite: on PostgreSQL concurrent transactions overlap their round trips (see :func:`run_write`).
_SQLITE_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facefl-sqlite-writer")


async def run_write(serial: bool, fn: Callable[..., T], *args: Any) -> T:
    """A hot-path write transaction ``fn(*args)``: on the SQLite writer thread when ``serial``
    (``Database.serial_writes``), else as :func:`run_sync`."""
    return await _run(_SQLITE_WRITER if serial else _POOL, fn, *args)


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread; its result or its exception."""
    return await _run(_POOL, fn, *args)


async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    future = pool.submit(contextvars.copy_context().run, fn, *args)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if not future.cancel():  # already running: wait until it has returned, then be cancelled
            while not future.done():
                try:
                    await asyncio.shield(asyncio.wrap_future(future))
                except asyncio.CancelledError:
                    continue
                except Exception:
                    break
        raise
