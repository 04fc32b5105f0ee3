"""What every service needs: settings, the database, the blob store and the aggregation executor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from server_api.blobstore import FileBlobStore
from server_api.db import Database
from server_api.ratelimit import RateLimiter
from server_api.settings import Settings

log = logging.getLogger("facefl.server")


@dataclass
class ServiceContext:
    settings: Settings
    db: Database
    blobs: FileBlobStore
    # Aggregation runs on this thread, never on the event loop; one per process keeps memory at
    # O(model); workers on other processes are kept out by the compare-and-set on the round row.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="facefl-aggregate")
    )
    # evaluation of new model versions has its own thread, so that it never delays an aggregation
    eval_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="facefl-evaluate")
    )
    # per-device request rate (None: unlimited); per process, see server_api.ratelimit
    limiter: RateLimiter | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceContext:
        return cls(
            settings=settings,
            db=Database(settings.database_url),
            blobs=FileBlobStore(settings.data_dir / "blobs"),
            limiter=(
                RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
                if settings.rate_limit_per_s > 0
                else None
            ),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self._submit(self.executor, fn, *args)

    def submit_eval(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self._submit(self.eval_executor, fn, *args)

    @staticmethod
    def _submit(executor: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        def _run() -> Any:
            try:
                return fn(*args)
            except Exception:  # logged, and retried by the ticker (the round stays recoverable)
                log.exception("background job %s%r failed", getattr(fn, "__name__", fn), args)
                raise

        return executor.submit(_run)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=False)
        self.eval_executor.shutdown(wait=True, cancel_futures=True)
        self.db.dispose()
