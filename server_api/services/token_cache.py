"""A per-process cache of device token hashes (authentication without a query per request)."""

from __future__ import annotations

import threading


class TokenHashes:
    """The stored token hash of recently seen devices, per worker process: a request by a known device
    is authenticated with one SHA-256 of its secret and a constant-time compare, without the database.

    Correct with any number of workers and hosts because the cached value never changes: a device's
    token is issued once at registration and is neither rotated nor revoked (were either added, this
    cache would have to be invalidated through the database). Only hashes read from the database, or
    written by this process's own committed registration, are cached; failed lookups are not (an
    attacker's random ids cannot fill it). At most ``max_entries`` (the oldest insert is evicted first).
    """

    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = max_entries
        self._hashes: dict[str, str] = {}
        self._lock = threading.Lock()  # inserts only; a dict read is atomic

    def get(self, device_id: str) -> str | None:
        return self._hashes.get(device_id)

    def put(self, device_id: str, token_hash: str) -> None:
        with self._lock:
            self._hashes[device_id] = token_hash
            while len(self._hashes) > self.max_entries:
                del self._hashes[next(iter(self._hashes))]

    def __len__(self) -> int:
        return len(self._hashes)
