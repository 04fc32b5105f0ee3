"""Per-process caches for serving immutable blobs: model versions' blob rows and small blobs' bytes.

Both are correct with any number of workers and hosts because what they hold never changes: a model
version's row (blob key, sha256, size, served) is written once, in the transaction that creates the
version, and a blob's key is the sha256 of its bytes. Only rows read from the database are cached, never
a miss (a version committed later by another worker must be found), so unknown ids cannot fill them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

#: blobs up to this size are answered from memory; larger ones stream from disk
SMALL_BLOB_BYTES = 1 << 20
#: bytes of small blobs kept per process (least recently used evicted first)
BYTES_BUDGET = 64 << 20


@dataclass(frozen=True)
class VersionBlob:
    """What serving a model version's weights needs from its row."""

    blob_key: str
    sha256: str
    size: int
    served: bool  # False: held back by the release gate (the admin's only)


@dataclass(frozen=True)
class BlobBytes:
    data: bytes
    last_modified: str  # as FileResponse would send it (HTTP date of the file's mtime when read)


class VersionBlobs:
    """version -> :class:`VersionBlob`, at most ``max_entries`` (least recently used evicted first)."""

    def __init__(self, max_entries: int = 512) -> None:
        self.max_entries = max_entries
        self._rows: OrderedDict[int, VersionBlob] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: int) -> VersionBlob | None:
        with self._lock:
            row = self._rows.get(version)
            if row is not None:
                self._rows.move_to_end(version)
            return row

    def put(self, version: int, row: VersionBlob) -> None:
        with self._lock:
            self._rows[version] = row
            self._rows.move_to_end(version)
            while len(self._rows) > self.max_entries:
                self._rows.popitem(last=False)

    def __len__(self) -> int:
        return len(self._rows)


class SmallBlobs:
    """blob key -> bytes of blobs up to ``max_item`` bytes, ``budget`` bytes in all (LRU); also remembers
    (bounded) which keys are larger, so that serving those does not read their size each time."""

    def __init__(self, budget: int = BYTES_BUDGET, max_item: int = SMALL_BLOB_BYTES) -> None:
        self.budget = budget
        self.max_item = max_item
        self._blobs: OrderedDict[str, BlobBytes] = OrderedDict()
        self._large: OrderedDict[str, None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> BlobBytes | None:
        with self._lock:
            blob = self._blobs.get(key)
            if blob is not None:
                self._blobs.move_to_end(key)
            return blob

    def is_large(self, key: str) -> bool:
        return key in self._large

    def put(self, key: str, blob: BlobBytes) -> None:
        if len(blob.data) > self.max_item:
            return
        with self._lock:
            old = self._blobs.pop(key, None)
            if old is not None:
                self._bytes -= len(old.data)
            self._blobs[key] = blob
            self._bytes += len(blob.data)
            while self._bytes > self.budget:
                _, evicted = self._blobs.popitem(last=False)
                self._bytes -= len(evicted.data)

    def mark_large(self, key: str) -> None:
        with self._lock:
            self._large[key] = None
            while len(self._large) > 1024:
                self._large.popitem(last=False)

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blobs)
