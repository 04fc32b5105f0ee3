"""Request bodies streamed to a staging file under a size limit (never held in memory whole)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import anyio
from fastapi import Request

from server_api.errors import too_large
from server_api.services.context import ServiceContext
from server_api.threads import run_sync

_FLUSH_BYTES = 1 << 20


async def receive_body(request: Request, ctx: ServiceContext) -> Path:
    """Stream the body into a staging file; 413 as soon as it exceeds the limit. Caller deletes the file."""
    limit = ctx.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    staged = await run_sync(ctx.blobs.staging_file)
    try:
        received = 0
        buffer = bytearray()
        async with await anyio.open_file(staged, "wb") as f:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:  # refused while streaming
                    raise too_large(limit)
                buffer += chunk
                if len(buffer) >= _FLUSH_BYTES:
                    await f.write(bytes(buffer))
                    buffer.clear()
            await f.write(bytes(buffer))
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


async def stream_body(
    request: Request,
    ctx: ServiceContext,
    write: Callable[[list[bytes]], None],
    failed: Callable[[], bool],
) -> int:
    """Hand the body to ``write`` in batches of about 1 MiB (the chunks as received, not joined: no copy
    on the event loop), each in a worker thread while the event loop receives the next (one write in
    flight at a time, in order); 413 as soon as the body exceeds the limit. Once ``failed()`` the rest of
    the body is read and dropped, so that the client gets the answer rather than a reset connection.
    Returns the body's size."""
    limit = ctx.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    received = 0
    batch: list[bytes] = []
    batched = 0
    pending: asyncio.Task[None] | None = None
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:  # refused while streaming
                raise too_large(limit)
            if failed() or not chunk:
                continue
            batch.append(chunk)
            batched += len(chunk)
            if batched >= _FLUSH_BYTES:
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(run_sync(write, batch))
                batch, batched = [], 0
        if pending is not None:
            await pending
            pending = None
        if batch and not failed():
            await run_sync(write, batch)
    finally:
        if pending is not None:  # an error or a disconnect: the write in flight ends before the caller
            with contextlib.suppress(Exception):  # discards the staging file
                await pending
    return received
