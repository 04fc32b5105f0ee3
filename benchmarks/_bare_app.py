"""A bare FastAPI app: the baseline that benchmarks/server_throughput.py measures facefl against.

Served by the same uvicorn command line as the facefl server (`--factory`, 1 worker, log level
`warning`), it does the least an endpoint of the same shape can do:

- `POST /checkin` parses a small JSON body (a pydantic model, as FastAPI apps do) and answers a small JSON;
- `POST /upload?fsync=1|0` streams the body to a new file in `FACEFL_BENCH_UPLOAD_DIR` (written in the
  event loop, page cache only) and, with `fsync=1`, fsyncs it off the event loop before answering;
- `GET /health`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel


class CheckinBody(BaseModel):
    task_id: int | None = None
    capabilities: dict[str, int | str] | None = None


def create_app() -> FastAPI:
    upload_dir = Path(os.environ.get("FACEFL_BENCH_UPLOAD_DIR", "bench-uploads"))
    upload_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="bare baseline")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/checkin")
    async def checkin(body: CheckinBody) -> dict[str, object]:
        return {"action": "wait", "retry_after_s": 1.0, "reason": "no_open_round", "task_id": body.task_id}

    @app.post("/upload", status_code=202)
    async def upload(request: Request, fsync: int = 1) -> dict[str, int]:
        path = upload_dir / f"{uuid.uuid4().hex}.part"
        received = 0
        f = path.open("wb")
        try:
            async for chunk in request.stream():
                received += len(chunk)
                f.write(chunk)
            if fsync:
                f.flush()
                await run_in_threadpool(os.fsync, f.fileno())
        finally:
            f.close()
        return {"bytes": received}

    return app
