"""Request bodies streamed to a staging file under a size limit (never held in memory whole)."""

from __future__ import annotations

from pathlib import Path

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from server_api.errors import too_large
from server_api.services.context import ServiceContext

_FLUSH_BYTES = 1 << 20


async def receive_body(request: Request, ctx: ServiceContext) -> Path:
    """Stream the body into a staging file; 413 as soon as it exceeds the limit. Caller deletes the file."""
    limit = ctx.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    staged = await run_in_threadpool(ctx.blobs.staging_file)
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
