"""An upload streaming into the staging area: written, hashed and validated in one pass over its bytes.

The route hands the body to :meth:`StagedUpdate.write` in batches (in a worker thread, one batch at a
time, while the event loop receives the next). Each batch is checked by the update scanner (header
against the expected tensors, finite values, the norm of the decoded values), hashed, and appended to
the staging file; nothing reads the file back. :meth:`StagedUpdate.store` fsyncs it and renames it into
the content-addressed blob store under the hash computed on the way in.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

from facefl import codec
from facefl.update_stream import ScanResult, UpdateScanner
from server_api.blobstore import FileBlobStore
from server_api.errors import invalid


class StagedUpdate:
    def __init__(
        self, blobs: FileBlobStore, expected: Mapping[str, codec.TensorSpec], keep: frozenset[str]
    ) -> None:
        self._blobs = blobs
        self._scanner = UpdateScanner(expected, keep)
        self._sha = hashlib.sha256()
        self.path = blobs.staging_file()
        self._file = self.path.open("wb")
        self.size = 0
        self.error: codec.CodecError | None = None  # the first problem found; later bytes are dropped
        self._stored = False

    @property
    def failed(self) -> bool:
        return self.error is not None

    def write(self, data: bytes | bytearray) -> None:
        """Validate, hash and stage the next bytes (a worker thread; never two calls at once)."""
        if self.error is not None:
            return
        try:
            self._scanner.feed(data)
        except codec.CodecError as exc:
            self.error = exc
            return
        self._sha.update(data)
        self._file.write(data)
        self.size += len(data)

    def finish(self) -> ScanResult:
        """The validated update (norm, kept tensors), or 422 ``bad_update`` saying what is wrong."""
        if self.error is None:
            try:
                return self._scanner.finish()
            except codec.CodecError as exc:
                self.error = exc
        raise invalid("bad_update", str(self.error))

    def store(self) -> tuple[str, int]:
        """fsync the staged bytes and move them into the blob store: durable when this returns."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        key = self._sha.hexdigest()
        self._blobs.adopt(self.path, key)
        self._stored = True
        return key, self.size

    def discard(self) -> None:
        """Close and delete the staging file unless it was stored (idempotent)."""
        if not self._file.closed:
            self._file.close()
        if not self._stored:
            self.path.unlink(missing_ok=True)
