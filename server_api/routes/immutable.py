"""Answers for immutable, content-addressed blobs (model weights, public pack and bank).

Small blobs come from a per-process byte cache as a plain Response, with the headers FileResponse sends
(content-length, last-modified, accept-ranges): no open, stat and chunked read per request. Large blobs,
and any request with a Range header (FileResponse answers those with partial content), stream from disk.
"""

from __future__ import annotations

import os
from email.utils import formatdate

from fastapi import Request, Response
from fastapi.responses import FileResponse

from server_api.services.blob_cache import BlobBytes
from server_api.services.context import ServiceContext
from server_api.threads import run_sync

MEDIA_TYPE = "application/octet-stream"
CACHE_CONTROL = "private, max-age=31536000, immutable"


def not_modified(etag: str, if_none_match: str | None) -> bool:
    return if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}


def _read_small(ctx: ServiceContext, key: str) -> BlobBytes | None:
    """The blob's bytes if it is small (None: larger, stream it). Opened once: size, mtime and bytes
    come from the same file."""
    with open(ctx.blobs.path(key), "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size > ctx.small_blobs.max_item:
            return None
        data = f.read()
    return BlobBytes(data=data, last_modified=formatdate(st.st_mtime, usegmt=True))


async def blob_response(
    request: Request, ctx: ServiceContext, key: str, headers: dict[str, str], size: int | None = None
) -> Response:
    """200 with the blob's bytes (``size``: its size when known, to skip looking at large blobs)."""
    small = ctx.small_blobs
    if (
        "range" not in request.headers
        and not small.is_large(key)
        and (size is None or size <= small.max_item)
    ):
        blob = small.get(key)
        if blob is None:
            blob = await run_sync(_read_small, ctx, key)
            if blob is None:
                small.mark_large(key)
            else:
                small.put(key, blob)
        if blob is not None:
            extra = {"accept-ranges": "bytes", "last-modified": blob.last_modified}
            return Response(blob.data, media_type=MEDIA_TYPE, headers={**headers, **extra})
    return FileResponse(ctx.blobs.path(key), media_type=MEDIA_TYPE, headers=headers)
