"""What every service needs: settings, the database, the blob store and the aggregation executor."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from server_api.blobstore import FileBlobStore
from server_api.db import Database
from server_api.errors import conflict
from server_api.ratelimit import RateLimiter
from server_api.services.blob_cache import SmallBlobs, VersionBlobs
from server_api.services.secagg_cohorts import FrozenCohorts
from server_api.services.secagg_resend import RecordedDigests
from server_api.services.token_cache import TokenHashes
from server_api.settings import Settings

log = logging.getLogger("facefl.server")


def _limiter(rate: float, burst: float) -> RateLimiter | None:
    return RateLimiter(rate, burst) if rate > 0 else None


class InFlight:
    """Keys with a request in progress (per worker process): one upload per assignment at a time."""

    def __init__(self) -> None:
        self._keys: set[Hashable] = set()
        self._lock = threading.Lock()

    @contextmanager
    def claim(self, key: Hashable, detail: str) -> Iterator[None]:
        with self._lock:
            if key in self._keys:
                raise conflict(detail, code="upload_in_progress")
            self._keys.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._keys.discard(key)


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
    # registrations: per client address, and all addresses together (None: unlimited); per process
    register_limiter: RateLimiter | None = None
    register_global: RateLimiter | None = None
    # (round, device) pairs with an upload in progress in this process: one at a time per assignment
    uploads: InFlight = field(default_factory=InFlight)
    # device id -> token hash of devices seen by this process (immutable values: see TokenHashes)
    device_tokens: TokenHashes = field(default_factory=TokenHashes)
    # secure-aggregation cohorts as of a stage (final once reached: see FrozenCohorts)
    secagg_cohorts: FrozenCohorts = field(default_factory=FrozenCohorts)
    # digests of the devices' recorded secure-aggregation requests (immutable once recorded)
    secagg_submitted: RecordedDigests = field(default_factory=RecordedDigests)
    # model version -> its blob row, and small blobs' bytes (immutable values: see blob_cache)
    version_blobs: VersionBlobs = field(default_factory=VersionBlobs)
    small_blobs: SmallBlobs = field(default_factory=SmallBlobs)

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceContext:
        return cls(
            settings=settings,
            db=Database(settings.database_url),
            blobs=FileBlobStore(settings.data_dir / "blobs"),
            limiter=_limiter(settings.rate_limit_per_s, settings.rate_limit_burst),
            register_limiter=_limiter(settings.register_rate_per_s, settings.register_burst),
            register_global=_limiter(settings.register_global_rate_per_s, settings.register_global_burst),
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
        self.blobs.close()
