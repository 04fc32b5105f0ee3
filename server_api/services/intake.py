"""An upload streaming into the staging area: written and validated in one pass over its bytes.

The route hands the body to :meth:`StagedUpdate.write_chunks` in batches (in a worker thread, one batch
at a time, while the event loop receives the next). Each batch is checked by the update scanner (header
against the expected tensors, finite values, the norm of the decoded values) and appended to the staging
file; nothing reads the file back. :meth:`StagedUpdate.store` fsyncs it and renames it into the blob
store under a random 256-bit key. Model versions are content-addressed (devices verify their sha256),
but an update is only ever read by its own row, is never shared, and no one checks its hash: hashing
4 MB cost ~3 ms of server CPU per upload (a fifth of the intake) for a name.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence

from facefl import codec
from facefl.update_stream import ScanResult, UpdateScanner
from server_api.blobstore import FileBlobStore
from server_api.errors import invalid

_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))  # buffers per writev call (1024 on Linux)


class StagedUpdate:
    def __init__(
        self, blobs: FileBlobStore, expected: Mapping[str, codec.TensorSpec], keep: frozenset[str]
    ) -> None:
        self._blobs = blobs
        self._scanner = UpdateScanner(expected, keep)
        self.path = blobs.staging_file()
        self._file = self.path.open("wb", buffering=0)  # writes go straight to the fd (_write_all)
        self.size = 0
        self.error: codec.CodecError | None = None  # the first problem found; later bytes are dropped
        self._stored = False

    @property
    def failed(self) -> bool:
        return self.error is not None

    def write(self, data: bytes | bytearray) -> None:
        """Validate and stage the next bytes (a worker thread; never two calls at once)."""
        self.write_chunks([data])

    def write_chunks(self, chunks: Sequence[bytes | bytearray]) -> None:
        """:meth:`write` for the body's chunks as received: no copy to join them, one write call."""
        if self.error is not None:
            return
        try:
            for data in chunks:
                self._scanner.feed(data)
        except codec.CodecError as exc:
            self.error = exc
            return
        _write_all(self._file.fileno(), chunks)
        self.size += sum(len(data) for data in chunks)

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
        os.fsync(self._file.fileno())
        self._file.close()
        key = secrets.token_hex(32)  # the blob store's key format; see the module docstring
        self._blobs.adopt(self.path, key)
        self._stored = True
        return key, self.size

    def discard(self) -> None:
        """Close and delete the staging file unless it was stored (idempotent)."""
        if not self._file.closed:
            self._file.close()
        if not self._stored:
            self.path.unlink(missing_ok=True)


def _write_all(fd: int, chunks: Sequence[bytes | bytearray]) -> None:
    """Write every chunk in order with as few system calls as the kernel allows (writev may stop short)."""
    pending = [memoryview(c) for c in chunks if len(c)]
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        while written:
            if written >= len(pending[0]):
                written -= len(pending.pop(0))
            else:
                pending[0] = pending[0][written:]
                written = 0
