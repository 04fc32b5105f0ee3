"""Per-device token buckets (in-process, per worker).

Each worker process keeps its own buckets: with N workers behind one port a device may get up to N times
the configured rate, and buckets start full after a restart. That is the price of adding no shared state
to the hot path (a DB-backed bucket would add a write transaction to every request, and SQLite has one
writer). The limiter's job is to stop a flooding device from monopolizing a worker, not exact quotas;
put a shared limiter (reverse proxy, API gateway) in front when exact global limits matter.
A refused request consumes nothing: the bucket's refill is a function of time alone.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token bucket per key: ``rate`` tokens per second, at most ``burst`` stored; thread-safe.

    ``check(key)`` returns 0.0 when the request may proceed (one token taken), else the seconds until a
    token is available. At most ``max_keys`` buckets are kept (least recently used evicted: an evicted
    bucket comes back full, which errs on the side of admitting).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, key: str) -> float:
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = _Bucket(tokens=self.burst, updated=now)
                self._buckets[key] = bucket
                if len(self._buckets) > self.max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            if tokens >= 1.0:
                bucket.tokens, bucket.updated = tokens - 1.0, now
                return 0.0
            return (1.0 - tokens) / self.rate  # the bucket itself is untouched: refusal consumes nothing

    @staticmethod
    def retry_after_header(wait_s: float) -> str:
        """Retry-After in whole seconds (at least 1), rounded up so that a compliant client succeeds."""
        return str(max(1, math.ceil(wait_s)))
